"""A plugin's first call against its warm calls, each measurement in a fresh process on one torch thread.

    PYTHONPATH=. python scripts/first_call.py [--model resnet18] [--image 224] [--out-features 1000] [--n 4]
        [--plugin structured] [--runs 2] [--warm 3] [--profile FILE] [--json FILE] [--max-rss-gb G]
        [--memory-budget-bytes B]

Each run is a new Python process (nothing cached from an earlier call: imports, plans, backend decisions): it
builds the zoo model (seeded), takes N inputs, times ``compute`` once (the first call) and then ``--warm`` more
times on the same model and inputs, on wall-clock and on process CPU time (what other processes on a loaded
machine do not inflate), and reports first / median(warm). ``--profile FILE`` writes the first call's cProfile
(sorted by cumulative time) of one more run. ``--max-rss-gb`` stops a run whose resident memory passes that many GiB
(on a shared machine, before the system starts reclaiming memory from others); ``--memory-budget-bytes`` passes the
engine's budget to every call (the kernel computed in tiles that fit it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from ntk_bench import implementations
    from ntk_bench.bench.zoo import architectures

    params = {"image": args.image, "out": args.out_features} if args.model in ("resnet18", "mobilenet_v3_small") \
        else {}
    arch = architectures.build(args.model, seed=0, **params)
    x = architectures.inputs(arch, args.n, seed=1)
    plugin = implementations.get(args.plugin)
    times = []
    prof = None
    for i in range(1 + args.warm):
        if i == 0 and args.profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        w0, c0 = time.perf_counter(), time.process_time()
        plugin.compute(arch.model, x, memory_budget_bytes=args.memory_budget_bytes)
        times.append((time.perf_counter() - w0, time.process_time() - c0))
        if prof is not None:
            prof.disable()
            import io
            import pstats

            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(45)
            Path(args.profile).write_text(s.getvalue())
            prof = None
    warm_wall = statistics.median(t[0] for t in times[1:])
    warm_cpu = statistics.median(t[1] for t in times[1:])
    return {"first_wall_s": times[0][0], "first_cpu_s": times[0][1], "warm_wall_s": [t[0] for t in times[1:]],
            "warm_cpu_s": [t[1] for t in times[1:]], "ratio_wall": times[0][0] / warm_wall,
            "ratio_cpu": times[0][1] / warm_cpu, "load_average": os.getloadavg()}


def _run_watched(cmd: list[str], env: dict, max_rss_gb: float | None) -> tuple[str, float]:
    """(stdout, peak resident GiB seen) of the child ``cmd``, its RSS polled every 0.2 s; over ``max_rss_gb`` the
    child is killed and the script exits with the peak it reached."""
    import tempfile

    import psutil

    # (files, not pipes: a chatty child would fill a pipe's buffer and block while this loop polls)
    out_f, err_f = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=out_f, stderr=err_f, text=True)
    ps, peak = psutil.Process(proc.pid), 0.0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss / 2 ** 30)
        except psutil.NoSuchProcess:
            break
        if max_rss_gb is not None and peak > max_rss_gb:
            proc.kill()
            proc.wait()
            raise SystemExit(f"stopped: the run's resident memory passed {max_rss_gb} GiB ({peak:.2f} GiB)")
        time.sleep(0.2)
    proc.wait()
    out_f.seek(0)
    err_f.seek(0)
    out, err = out_f.read(), err_f.read()
    if proc.returncode != 0:
        raise SystemExit(f"the run failed (exit {proc.returncode}):\n{err[-4000:]}")
    return out, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--out-features", type=int, default=1000)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--plugin", default="structured")
    p.add_argument("--runs", type=int, default=2, help="fresh processes")
    p.add_argument("--warm", type=int, default=3, help="warm calls after the first, per process")
    p.add_argument("--profile", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--max-rss-gb", type=float, default=None, help="stop a run whose RSS passes this many GiB")
    p.add_argument("--memory-budget-bytes", type=int, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    base = [sys.executable, __file__, "--child", "--model", args.model, "--image", str(args.image),
            "--out-features", str(args.out_features), "--n", str(args.n), "--plugin", args.plugin,
            "--warm", str(args.warm)] + (["--memory-budget-bytes", str(args.memory_budget_bytes)]
                                          if args.memory_budget_bytes else [])
    rows = []
    for r in range(args.runs):
        cmd = base + (["--profile", args.profile] if args.profile and r == 0 else [])
        out, peak = _run_watched(cmd, env, args.max_rss_gb)
        row = json.loads(out.strip().splitlines()[-1])
        row["peak_rss_gib"] = peak
        rows.append(row)
        print(f"run {r}: first {row['first_wall_s']:.2f} s wall / {row['first_cpu_s']:.2f} s CPU; warm "
              f"{', '.join(f'{w:.2f}' for w in row['warm_wall_s'])} s wall / "
              f"{', '.join(f'{c:.2f}' for c in row['warm_cpu_s'])} s CPU; first/warm {row['ratio_wall']:.2f}x "
              f"wall, {row['ratio_cpu']:.2f}x CPU; peak RSS {peak:.2f} GiB; load {row['load_average'][0]:.2f}",
              flush=True)
    summary = {"model": args.model, "image": args.image, "out": args.out_features, "n": args.n,
               "plugin": args.plugin, "runs": rows,
               "median_ratio_cpu": statistics.median(r["ratio_cpu"] for r in rows),
               "median_ratio_wall": statistics.median(r["ratio_wall"] for r in rows)}
    print(f"median first/warm: {summary['median_ratio_cpu']:.2f}x CPU, {summary['median_ratio_wall']:.2f}x wall")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
