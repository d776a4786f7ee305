"""The regression gate's timing: ``python benchmarks/regression.py --out DIR`` (``make benchmark-save``/``-compare``).

Times every case of a small sweep (``benchmarks/regression.toml``) and writes
``DIR/results.jsonl`` in the runner's format (a header line, then one row per
case with ``time_blocks_s``), for ``ntk-bench compare BASE DIR --fail-above 1.10``.
Made for a shared machine, where wall-clock times of the same code differ a lot
from one run to the next (the README's "Comparing two runs" has the numbers):

- on the CPU it measures the **process's CPU time** per call (``time.process_time``):
  time spent waiting for a core that another process holds is not counted; on a
  GPU, wall time with the device synchronised;
- **one torch thread** by default: two threads on a core shared with another
  process wait for each other;
- blocks of calls are taken in **rounds over all cases** (case 1, 2, ..., then
  again), so each case's blocks spread over the whole run and its band includes
  the run's own drift;
- the blocks of **several fresh processes** are pooled (``--processes``, 3): what
  a process settles once (a backend a plugin picked by timing its first call,
  memory layout) differs between processes, and a single process would show one
  draw of it as a difference between runs;
- each kernel is checked once against ``jacobian_contraction`` in float64 on the
  same inputs (status ``mismatch`` beyond the float32 tolerance): a fast wrong
  kernel does not pass the gate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout: time the checkout's ntk_bench
    sys.path.insert(0, str(HERE.parent))


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run directory to write (results.jsonl); must not hold one yet")
    p.add_argument("--sweep", default=str(HERE / "regression.toml"), help="sweep file or built-in sweep name")
    p.add_argument("--device", help="run every case on this device instead of the sweep's (e.g. cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--processes", type=int, default=3,
                   help="fresh processes to time in, one after another, their blocks pooled (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all cases in each process (default 3)")
    p.add_argument("--blocks", type=int, default=3, help="timing blocks per case and round (default 3)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, help="seconds of timing per case over all rounds (default: the sweep's "
                                                "time_budget_s)")
    args = p.parse_args(argv)
    if min(args.threads, args.rounds, args.blocks, args.processes) < 1:
        p.error("--threads, --processes, --rounds and --blocks must be positive")
    if args.budget is not None and not args.budget > 0:
        p.error("--budget must be positive")
    return args


class _Case:
    """One case made ready to time: its model and inputs, the timed call, its row so far."""

    def __init__(self, case, row, call, number):
        self.case, self.row, self.call, self.number = case, row, call, number
        self.blocks: list[float] = []


def _prepare(case, budget_s: float, n_blocks: int):
    import torch

    from ntk_bench import implementations
    from ntk_bench.bench import measure

    row = {**measure.case_fields(case), "cpu_threads": torch.get_num_threads(),
           "memory_budget_bytes": case.memory_budget_bytes}
    try:
        arch, model, x1, x2 = measure.build_problem(case.problem, measure.DTYPES[case.dtype], case.device)
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
        _, ref_model, r1, r2 = measure.build_problem(case.problem, torch.float64, "cpu")
        ref = implementations.get("jacobian_contraction").compute(ref_model, r1, r2, mode=case.mode)
        row["rel_err"] = measure.agreement(kernel, ref)[0]
        row["reference"] = "harness:jacobian_contraction:float64:cpu"
        row["status"] = "ok" if row["rel_err"] <= measure.TOLERANCE[case.dtype] else "mismatch"
        t0 = time.perf_counter()
        for _ in range(3):
            call()
        one = (time.perf_counter() - t0) / 3
    except Exception as exc:  # the case failed: a row with the reason, the gate sees ok → error
        return {**row, "status": measure._status_of(exc), "error": f"{type(exc).__name__}: {exc}"[:500]}
    number = max(1, round(budget_s / n_blocks / max(one, 1e-6)))
    return _Case(case, row, call, number)


def _time_block(c: _Case, timer) -> float:
    t0 = timer()
    for _ in range(c.number):
        c.call()
    return (timer() - t0) / c.number


def _finite(v):
    """JSON has no NaN or infinity: None instead."""
    return None if isinstance(v, float) and v != v or v in (float("inf"), float("-inf")) else v


def _run_cases(cases, args, timer) -> dict[str, dict]:
    """Time ``cases`` in this process: set each up, then rounds of blocks over all of them; rows by case id."""
    n_blocks = args.rounds * args.blocks
    ready, rows = [], {}
    for case in cases:
        budget = (args.budget if args.budget is not None else case.time_budget_s) / args.processes
        got = _prepare(case, budget, n_blocks)
        if isinstance(got, _Case):
            ready.append(got)
            rows[case.id] = got.row
        else:
            rows[case.id] = got
    for _ in range(args.rounds):
        for c in ready:
            c.blocks += [_time_block(c, timer) for _ in range(args.blocks)]
    for c in ready:
        c.row.update(time_blocks_s=c.blocks, time_repeats=c.number * len(c.blocks))
    return rows


_WORSE = {"ok": 0, "unsupported": 1, "mismatch": 2, "oom": 3, "error": 4}


def _merge(parts: list[dict[str, dict]], cases, timer_name: str) -> dict[str, dict]:
    """Each case's blocks from every process pooled; a case not ok in one process keeps that process's row."""
    rows = {}
    for case in cases:
        got = [p[case.id] for p in parts if case.id in p]
        worst = max(got, key=lambda r: _WORSE.get(r.get("status"), 5))
        if worst.get("status") != "ok":
            rows[case.id] = worst
            continue
        blocks = [b for r in got for b in r["time_blocks_s"]]
        q = statistics.quantiles(blocks, n=4)
        rows[case.id] = {**got[0], "time_median_s": statistics.median(blocks), "time_iqr_s": q[2] - q[0],
                         "time_blocks_s": blocks, "time_repeats": sum(r["time_repeats"] for r in got),
                         "rel_err": max(r["rel_err"] for r in got), "processes": len(got), "timer": timer_name}
    return rows


def _finite(v):
    """JSON has no NaN or infinity: None instead."""
    return None if isinstance(v, float) and v != v or v in (float("inf"), float("-inf")) else v


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def main(argv=None) -> int:
    args = _parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # before torch is imported: its pools read it
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
    warnings.filterwarnings("ignore", message="Extension saving to", module="backpack")
    import torch

    from ntk_bench.bench import measure, sweeps

    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        spec = sweeps.load(args.sweep)
        cases = sweeps.expand(spec)
    except sweeps.SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.device:
        cases = [dataclasses.replace(c, device=args.device) for c in cases]
    cpu = all(c.device == "cpu" for c in cases)
    timer, timer_name = (time.process_time, "process_time") if cpu else (time.perf_counter, "perf_counter")
    if args.worker:  # one of the processes of a run: its rows to the file named by --out
        rows = _run_cases(cases, args, timer)
        Path(args.out).write_text(json.dumps({k: {c: _finite(v) for c, v in r.items()} for k, r in rows.items()}))
        return 0
    out = Path(args.out)
    path = out / "results.jsonl"
    if path.exists():
        print(f"error: {path} exists; remove it or pick another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.monotonic(), _load()
    parts = []
    for i in range(args.processes):
        part = out / f".process{i}.json"
        cmd = [sys.executable, __file__, "--worker", "--out", str(part), "--sweep", args.sweep,
               "--threads", str(args.threads), "--processes", str(args.processes), "--rounds", str(args.rounds),
               "--blocks", str(args.blocks)] + (["--device", args.device] if args.device else []) + \
            (["--budget", str(args.budget)] if args.budget is not None else [])
        done = subprocess.run(cmd)
        if done.returncode != 0:
            print(f"error: timing process {i + 1} of {args.processes} exited with {done.returncode}", file=sys.stderr)
            return 2
        parts.append(json.loads(part.read_text()))
        part.unlink()
    rows = _merge(parts, cases, timer_name)
    header = {**measure.environment(), "sweep": spec.get("name", "regression"), "cases": len(cases),
              "timer": timer_name, "processes": args.processes, "rounds": args.rounds,
              "blocks_per_round": args.blocks, "torch_threads": args.threads,
              "load_average": [load_before, _load()]}
    with open(path, "w") as f:
        f.write(json.dumps({"header": header}) + "\n")
        for case in cases:
            f.write(json.dumps({k: _finite(v) for k, v in rows[case.id].items()}, allow_nan=False) + "\n")
    statuses: dict[str, int] = {}
    for r in rows.values():
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    print(f"{path}: {len(cases)} cases ({', '.join(f'{v} {k}' for k, v in statuses.items())}) in "
          f"{time.monotonic() - started:.0f} s: {args.processes} processes, {timer_name}, {args.threads} thread(s), "
          f"load average {load_before} -> {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
