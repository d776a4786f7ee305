"""ntkbench run | report | list | calibrate  (also: python -m bench ...)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_list(args) -> int:
    from ntk_bench import implementations

    from . import architectures, sweeps

    print("plugins:", ", ".join(implementations.names()))
    print("neural-tangents peers:", ", ".join(sweeps.NT_PEERS))
    print("architectures:", ", ".join(architectures.names()))
    print("sweeps:")
    for name, spec in sweeps.SWEEPS.items():
        print(f"  {name:10s} {len(sweeps.expand(spec))} cases  {spec.get('description', '')}")
    print(f"default sweep here: {sweeps.default_sweep_name()}")
    return 0


def _cmd_run(args) -> int:
    from . import runner, sweeps

    try:
        spec = sweeps.load(args.sweep)
        cases = sweeps.expand(spec, args.impls.split(",") if args.impls else None)
    except sweeps.SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.timeout is not None or args.memory_budget is not None:
        import dataclasses

        changes = {}
        if args.timeout is not None:
            changes["timeout_s"] = args.timeout
        if args.memory_budget is not None:
            changes["memory_budget_bytes"] = int(args.memory_budget * 2**30)
        cases = [dataclasses.replace(c, **changes) for c in cases]
    out = Path(args.out or f"results/{spec['name']}")
    try:
        path = runner.run_sweep(cases, out, spec["name"], resume=args.resume, progress=not args.no_progress,
                                deadline_s=None if args.deadline is None else args.deadline * 60)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"results: {path}")
    return 0


def _cmd_report(args) -> int:
    from . import report

    try:
        path = report.write_report(Path(args.run), args.out and Path(args.out))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def _cmd_calibrate(args) -> int:
    from ntk_bench.implementations.auto import CALIBRATION_FILE

    from . import calibrate

    fitted = calibrate.calibrate([Path(r) for r in args.runs], Path(args.out or CALIBRATION_FILE))
    for device, table in fitted.items():
        for impl, c in table.items():
            print(f"{device:5s} {impl:22s} overhead {c['overhead_s'] * 1e3:8.3f} ms  {1 / c['s_per_flop'] / 1e9 if c['s_per_flop'] else float('inf'):10.3g} GFLOP/s  ({c['cases']} cases)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ntkbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="plugins, architectures and sweeps").set_defaults(func=_cmd_list)
    run = sub.add_parser("run", help="run a sweep, appending rows to OUT/results.jsonl")
    run.add_argument("--sweep", default="default", help="a built-in sweep name, 'default' (gpu with CUDA, else quick), or a .toml/.json file")
    run.add_argument("--out", help="run directory (default results/<sweep>)")
    run.add_argument("--resume", action="store_true", help="continue a run in OUT, skipping finished cases")
    run.add_argument("--impls", help="comma-separated plugins/peers to run instead of the sweep's")
    run.add_argument("--timeout", type=float, help="per-case timeout in seconds (overrides the sweep)")
    run.add_argument("--deadline", type=float, metavar="MIN",
                     help="start no case after MIN minutes (the rest: run again with --resume)")
    run.add_argument("--memory-budget", type=float, help="memory budget in GiB for plugins that tile their work")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=_cmd_run)
    rep = sub.add_parser("report", help="write results.csv, summary.md and plots for a run")
    rep.add_argument("run", help="run directory holding results.jsonl")
    rep.add_argument("--out", help="where to write (default: the run directory)")
    rep.set_defaults(func=_cmd_report)
    cal = sub.add_parser("calibrate", help="fit auto's cost-model constants to runs")
    cal.add_argument("runs", nargs="+", help="run directories holding results.jsonl")
    cal.add_argument("--out", help="calibration file (default implementations/auto_calibration.json)")
    cal.set_defaults(func=_cmd_calibrate)
    args = parser.parse_args(argv)
    return args.func(args)
