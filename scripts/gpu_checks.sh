#!/usr/bin/env bash
# All the GPU checks in one go, for a GPU machine lent for a limited time, with its own Python (no venv, no package
# index):
#   0. MLP 784-512-512-10 at N=512: eager against CUDA-graph replay, split thresholds, JC (graph_check.txt);
#   1. the correctness suite, CUDA cases included, against the harness's float64 CPU reference
#      (neural-tangents is not installed there; `make test` checks that reference against it);
#   2. the `gpu` sweep, resumable, starting no case after DEADLINE_MIN minutes (DEVICES=all: a worker per GPU);
#   3. the report of what has run so far.
#
#   scripts/gpu_checks.sh OUTDIR [RUN_DIR]     env: PYTHON (python3), DEADLINE_MIN (6: the sweep starts no case after it),
#                                              START_BY_MIN (instead: no case after this many minutes from the script's start),
#                                              GRAPH_CHECK (1), TESTS (1), TEST_TIMEOUT_S (240), TEST_SELECT (tests: pytest's
#                                              selection), DEVICES (unset: one worker, as the committed runs; all: a
#                                              worker per visible GPU, references beside them; or cuda:0,cuda:1),
#                                              SWEEP_ARGS (more `ntk-bench run` options, e.g. --timeout 60),
#                                              WHEELS (a folder of carried wheels, installed first without an index:
#                                              the image has no pydantic, which the sweep schema needs)
#
# A RUN_DIR carried over from an earlier run (other code, another machine) is continued in a new segment with
# its own header (--force), so each part of the run says which code and machine made it.
#
# OUTDIR receives graph_check.txt, tests.log, sweep.log, and run.tar.gz (the run directory without its cached references).
set -u
OUTDIR=${1:?usage: scripts/gpu_checks.sh OUTDIR [RUN_DIR]}
RUN=${2:-results/$(date +%Y-%m-%d)-gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUTDIR" "$RUN"
export PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
    $PYTHON -m pip install --quiet --no-index --find-links "$WHEELS" "$WHEELS"/*.whl >"$OUTDIR/wheels.log" 2>&1
    echo "wheels: exit $?" | tee -a "$OUTDIR/wheels.log"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PYTHON -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__, "cuda", torch.cuda.is_available())'; } >"$OUTDIR/env.txt" 2>&1

if [ "${GRAPH_CHECK:-1}" = 1 ]; then
    timeout 240 $PYTHON scripts/gpu_graph_check.py --jc >"$OUTDIR/graph_check.txt" 2>&1
    echo "graph check: exit $?" | tee -a "$OUTDIR/graph_check.txt"
    cat "$OUTDIR/graph_check.txt"
fi

if [ "${TESTS:-1}" = 1 ]; then
    # One thread per xdist worker: 8 workers with a thread per core each oversubscribe the CPU.
    OMP_NUM_THREADS=1 NTK_BENCH_REFERENCE=harness timeout "${TEST_TIMEOUT_S:-240}" $PYTHON -m pytest -p no:cacheprovider \
        -q -n 8 --timeout=200 -rfE ${TEST_SELECT:-tests} >"$OUTDIR/tests.log" 2>&1
    echo "tests: exit $?" | tee -a "$OUTDIR/tests.log"
    tail -3 "$OUTDIR/tests.log"
fi

DEADLINE=${DEADLINE_MIN:-6}
if [ -n "${START_BY_MIN:-}" ]; then
    DEADLINE=$($PYTHON -c "print(max(0.5, ${START_BY_MIN} - $SECONDS / 60))")
fi
# shellcheck disable=SC2086
$PYTHON -m ntk_bench run --sweep gpu --out "$RUN" --resume --force --no-progress --deadline "$DEADLINE" \
    ${DEVICES:+--devices "$DEVICES"} --fail-on none ${SWEEP_ARGS:-} >"$OUTDIR/sweep.log" 2>&1
echo "sweep: exit $?" | tee -a "$OUTDIR/sweep.log"
$PYTHON -m ntk_bench report "$RUN" >>"$OUTDIR/sweep.log" 2>&1
tail -5 "$OUTDIR/sweep.log"
tar -czf "$OUTDIR/run.tar.gz" --exclude=references -C "$(dirname "$RUN")" "$(basename "$RUN")"
