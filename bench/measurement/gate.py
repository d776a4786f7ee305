"""The regression gate's timer: ``python -m ntk_bench.bench.measurement.gate --out DIR [--sweep FILE] [--plugin MODULE]``.

Times every case of a sweep and writes ``DIR/results.jsonl`` in the runner's
format (a header line, then one row per case with ``time_blocks_s``), for
``ntk-bench compare BASE DIR --fail-above 1.10``. Made for a shared machine
(a CI runner), where wall-clock times of the same code differ a lot from one
run to the next:

- on the CPU it measures the **process's CPU time** per call (``--clock cpu``,
  ``time.process_time``): time spent waiting for a core that another process
  holds is not counted; on a GPU, wall time with the device synchronised;
- **one torch thread** by default: two threads on a core shared with another
  process wait for each other;
- blocks of calls are taken in **rounds over all cases** (case 1, 2, ..., then
  again), so each case's blocks spread over the whole run and its band includes
  the run's own drift;
- the blocks of **several fresh processes** are pooled (``--processes``): what
  a process settles once (a backend a plugin picked by timing its first call,
  memory layout) differs between processes, and a single process would show one
  draw of it as a difference between runs;
- every case gets at least the blocks ``compare``'s rank test needs for a
  verdict (``rank_test.min_blocks``): the rounds grow where the options give fewer,
  and a call longer than its share of the budget is a block of one call;
- each kernel is checked once against ``jacobian_contraction`` in float64 on the
  same inputs (status ``mismatch`` beyond the float32 tolerance): a fast wrong
  kernel does not pass the gate.

A plugin's own CI times its plugin with ``--plugin my_package.my_module`` (the
module registers it) and a sweep file naming it. ``prepare`` and ``time_block``
are the pieces the pytest plugin (``ntk_bench.bench.pytest_plugin``) reuses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..store.row import FORMAT_VERSION, check_header, check_row
from .rank_test import DEFAULT_ALPHA, min_blocks
from .timing import CLOCKS, clock

_WORSE = {"ok": 0, "unsupported": 1, "mismatch": 2, "oom": 3, "error": 4}


def required_blocks() -> int:
    """Blocks per run each case needs for compare's rank test to be able to reach its default level."""
    return min_blocks(DEFAULT_ALPHA)


@dataclasses.dataclass
class Prepared:
    """One case made ready to time: its timed call (``call()``, CUDA synchronised), the calls per block, its row so
    far (status, first call, agreement), and its blocks (seconds per call)."""

    case: object
    row: dict
    call: object
    number: int
    kernel: object = None
    blocks: list = dataclasses.field(default_factory=list)


def prepare(case, budget_s: float, n_blocks: int, check: bool = True):
    """Build ``case``'s problem, run its plugin once (the first call, timed) and check the kernel against
    ``jacobian_contraction`` in float64; a :class:`Prepared` with calls per block sized so that ``n_blocks`` blocks
    take about ``budget_s``, or the row of a case that is not ok (unsupported, mismatch, error, oom)."""
    import torch

    from ntk_bench import implementations
    from ntk_bench.implementations.core.tolerances import tolerance

    from . import failures, one_case, problem_build

    row = {**one_case.case_fields(case), "cpu_threads": torch.get_num_threads(),
           "memory_budget_bytes": case.memory_budget_bytes}
    try:
        arch, model, x1, x2 = problem_build.build_problem(case.problem, problem_build.DTYPES[case.dtype], case.device)
        row.update(O=arch.num_outputs, P=arch.num_parameters)
        plugin = implementations.get(case.impl)
        reason = plugin.supports(model)
        if reason is not None:
            return {**row, "status": "unsupported", "error": reason}
        # A peer sets up here, outside the timed call (NTKPlugin.prepare); ours time compute itself.
        run, to_torch = plugin.prepare(model, x1, x2, mode=case.mode, memory_budget_bytes=case.memory_budget_bytes)

        def call():
            out = run()
            if case.device.startswith("cuda"):
                torch.cuda.synchronize()
            return out

        t0 = time.perf_counter()
        kernel = to_torch(call())
        row["first_call_s"] = time.perf_counter() - t0
        if case.impl == "auto":
            row["auto_pick"] = implementations.get("auto").last_choice[0]
        if check:
            _, ref_model, r1, r2 = problem_build.build_problem(case.problem, torch.float64, "cpu")
            ref = implementations.get("jacobian_contraction").compute(ref_model, r1, r2, mode=case.mode)
            row["rel_err"] = one_case.agreement(kernel, ref)[0]
            row["reference"] = "harness:jacobian_contraction:float64:cpu"
            row["status"] = "ok" if row["rel_err"] <= tolerance(case.dtype) else "mismatch"
        else:
            row["status"] = "ok"
        t0 = time.perf_counter()
        for _ in range(3):  # (auto tries two plugins in turn over its first four calls: settled after these)
            call()
        one = (time.perf_counter() - t0) / 3
        if case.impl == "auto":
            row["auto_pick"] = implementations.get("auto").last_choice[0]
    except Exception as exc:  # the case failed: a row with the reason, the gate sees ok → error
        return {**row, "status": failures.status_of(exc), "error": f"{type(exc).__name__}: {exc}"[:500]}
    number = max(1, round(budget_s / n_blocks / max(one, 1e-6)))
    return Prepared(case, row, call, number, kernel)


def time_block(c: Prepared, timer) -> float:
    """Seconds per call of one block of ``c.number`` calls, by ``timer``."""
    t0 = timer()
    for _ in range(c.number):
        c.call()
    return (timer() - t0) / c.number


def time_cases(cases, rounds: int, blocks: int, budget_s: float | None, timer, share: int = 1) -> dict[str, dict]:
    """Time ``cases`` in this process: set each up, then ``rounds`` rounds of ``blocks`` blocks over all of them;
    rows by case id. ``budget_s`` (default: each case's ``time_budget_s``) is divided by ``share`` (the processes
    a run pools)."""
    n_blocks = rounds * blocks
    ready, rows = [], {}
    for case in cases:
        budget = (budget_s if budget_s is not None else case.time_budget_s) / share
        got = prepare(case, budget, n_blocks)
        if isinstance(got, Prepared):
            got.kernel = None  # not held while the others are timed
            ready.append(got)
            rows[case.id] = got.row
        else:
            rows[case.id] = got
    for _ in range(rounds):
        for c in ready:
            c.blocks += [time_block(c, timer) for _ in range(blocks)]
    for c in ready:
        c.row.update(time_blocks_s=c.blocks, time_repeats=c.number * len(c.blocks))
    return rows


def merge(parts: list[dict[str, dict]], cases, timer_name: str) -> dict[str, dict]:
    """Each case's blocks from every process pooled; a case not ok in one process keeps that process's row."""
    rows = {}
    for case in cases:
        got = [p[case.id] for p in parts if case.id in p]
        worst = max(got, key=lambda r: _WORSE.get(r.get("status"), 5))
        if worst.get("status") != "ok":
            rows[case.id] = worst
            continue
        blocks = [b for r in got for b in r["time_blocks_s"]]
        q = statistics.quantiles(blocks, n=4) if len(blocks) > 1 else [blocks[0]] * 3
        rows[case.id] = {**got[0], "time_median_s": statistics.median(blocks), "time_iqr_s": q[2] - q[0],
                         "time_blocks_s": blocks, "time_repeats": sum(r["time_repeats"] for r in got),
                         "rel_err": max(r.get("rel_err", 0.0) for r in got), "processes": len(got),
                         "timer": timer_name}
    return rows


def _finite(v):
    """JSON has no NaN or infinity: None instead."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m ntk_bench.bench.measurement.gate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run directory to write (results.jsonl); must not hold one yet")
    p.add_argument("--sweep", required=True, help="sweep file or built-in sweep name")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE (it registers a plugin) in every timing process; repeatable")
    p.add_argument("--device", help="run every case on this device instead of the sweep's (e.g. cuda)")
    p.add_argument("--clock", default="cpu", choices=CLOCKS,
                   help="cpu: process CPU time on the CPU (default); wall: wall time (perf_counter)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--processes", type=int, default=3,
                   help="fresh processes to time in, one after another, their blocks pooled (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all cases in each process (default 3; more "
                                                         "where fewer would not give the rank test its blocks)")
    p.add_argument("--blocks", type=int, default=3, help="timing blocks per case and round (default 3)")
    p.add_argument("--budget", type=float, help="seconds of timing per case over all rounds (default: the sweep's "
                                                "time_budget_s)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.threads, args.rounds, args.blocks, args.processes) < 1:
        p.error("--threads, --processes, --rounds and --blocks must be positive")
    if args.budget is not None and not args.budget > 0:
        p.error("--budget must be positive")
    return args


def _rounds_for_a_verdict(args) -> int:
    """``--rounds``, or more where the pooled blocks would be fewer than the rank test needs."""
    per_round = args.processes * args.blocks
    return max(args.rounds, math.ceil(required_blocks() / per_round))


def _worker_env() -> dict:
    """The environment of a timing process: this ntk_bench importable first (a checkout run without install)."""
    from ntk_bench.version import package_parent

    root = str(package_parent())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, os.getcwd()] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def main(argv=None) -> int:
    args = _parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # before torch is imported: its pools read it
    os.environ.setdefault("NTK_BENCH_XLA_THREADS", str(args.threads))  # a peer's XLA at the same count (reference)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
    warnings.filterwarnings("ignore", message="Extension saving to", module="backpack")
    import torch

    from ntk_bench import implementations

    from .. import sweeps
    from . import environment

    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        for module in args.plugin:
            try:
                implementations.load_module(module)
            except Exception as exc:  # the user's module: say which and why, in one line
                raise ValueError(f"--plugin {module}: {type(exc).__name__}: {exc}") from None
        spec = sweeps.load(args.sweep)
        cases = sweeps.expand(spec)
    except (sweeps.SweepError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.device:
        cases = [dataclasses.replace(c, device=args.device) for c in cases]
    devices = {c.device for c in cases}
    timer, timer_name = clock(args.clock, "cuda" if any(d.startswith("cuda") for d in devices) else "cpu")
    if args.worker:  # one of the processes of a run: its rows to the file named by --out
        rows = time_cases(cases, args.rounds, args.blocks, args.budget, timer, share=args.processes)
        Path(args.out).write_text(json.dumps({k: {c: _finite(v) for c, v in r.items()} for k, r in rows.items()}))
        return 0
    out = Path(args.out)
    path = out / "results.jsonl"
    if path.exists():
        print(f"error: {path} exists; remove it or pick another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    rounds = _rounds_for_a_verdict(args)
    started, load_before = time.monotonic(), _load()
    parts = []
    for i in range(args.processes):
        part = out / f".process{i}.json"
        cmd = [sys.executable, "-m", "ntk_bench.bench.measurement.gate", "--worker", "--out", str(part), "--sweep", args.sweep,
               "--clock", args.clock, "--threads", str(args.threads), "--processes", str(args.processes),
               "--rounds", str(rounds), "--blocks", str(args.blocks)]
        cmd += [x for m in args.plugin for x in ("--plugin", m)]
        cmd += (["--device", args.device] if args.device else []) + \
            (["--budget", str(args.budget)] if args.budget is not None else [])
        done = subprocess.run(cmd, env=_worker_env())
        if done.returncode != 0:
            print(f"error: timing process {i + 1} of {args.processes} exited with {done.returncode}", file=sys.stderr)
            return 2
        parts.append(json.loads(part.read_text()))
        part.unlink()
    rows = merge(parts, cases, timer_name)
    header = {"format_version": FORMAT_VERSION, **environment.environment(), "sweep": spec.get("name", "regression"),
              "cases": len(cases),
              "timer": timer_name, "processes": args.processes, "rounds": rounds,
              "blocks_per_round": args.blocks, "torch_threads": args.threads, "plugins": args.plugin,
              "load_average": [load_before, _load()]}
    with open(path, "w") as f:
        f.write(json.dumps({"header": check_header(header)}) + "\n")
        for case in cases:
            f.write(json.dumps({k: _finite(v) for k, v in check_row(rows[case.id]).items()}, allow_nan=False) + "\n")
    statuses: dict[str, int] = {}
    for r in rows.values():
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    print(f"{path}: {len(cases)} cases ({', '.join(f'{v} {k}' for k, v in statuses.items())}) in "
          f"{time.monotonic() - started:.0f} s: {args.processes} processes x {rounds} rounds x {args.blocks} blocks, "
          f"{timer_name}, {args.threads} thread(s), load average {load_before} -> {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
