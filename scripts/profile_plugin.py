"""Where a plugin's time goes on one problem: median times (plugins timed in alternating blocks, against the first),
then torch.profiler's top operators.

    python scripts/profile_plugin.py structured explicit_mlp --arch mlp --params '{"in_features": 784, "width": 512, "depth": 2, "out": 10}' --N 512 --device cuda
    python scripts/profile_plugin.py structured jacobian_contraction --arch resnet18 --params '{"out": 10}' --N 8 --M 8 --threads 2 --rows 0 --pairs 3

Times are wall-clock medians over ``--pairs`` alternating calls (a b, b a, ...), so that a shared machine's drift
hits every plugin alike, with the median of the per-pair ratios; with ``--cpu-time`` the process's CPU time
instead of the wall clock (steadier on a loaded machine; with one thread). Calls go through
``_kernel`` inside the model-state guard (what ``compute`` times, minus its input checks), so integer inputs work
whatever the input validation of the day accepts. The first call (a plan, a backend trial) is timed apart.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ntk_bench import implementations  # noqa: E402
from ntk_bench.bench.zoo import architectures  # noqa: E402


def main() -> None:
    """The command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("impls", nargs="+")
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--params", default='{"in_features": 784, "width": 512, "depth": 2, "out": 10}')
    ap.add_argument("--N", type=int, default=512)
    ap.add_argument("--M", type=int, default=None, help="x2's batch size (default: x2 = None)")
    ap.add_argument("--mode", default="full")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--pairs", type=int, default=5, help="alternating pairs of calls per plugin pair")
    ap.add_argument("--cpu-time", action="store_true", help="time with process CPU time, not the wall clock")
    ap.add_argument("--rows", type=int, default=15, help="profiler rows per plugin (0: no profile)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    arch = architectures.build(args.arch, seed=0, dtype=dtype, **json.loads(args.params))
    model = arch.model.to(args.device)
    x1 = architectures.inputs(arch, args.N, seed=1, dtype=dtype, device=args.device)
    x2 = None if args.M is None else architectures.inputs(arch, args.M, seed=2, dtype=dtype, device=args.device)
    from ntk_bench.implementations.core.state import preserved as model_state_preserved

    clock = time.process_time if args.cpu_time else time.perf_counter

    def paired(fa, fb):
        """(median a, median b, median a/b) over alternating calls."""
        import statistics

        ta, tb = [], []
        for i in range(args.pairs):
            for f, acc in (((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta))):
                t = clock()
                f()
                acc.append(clock() - t)
        return statistics.median(ta), statistics.median(tb), statistics.median(a / b for a, b in zip(ta, tb))

    def caller(plugin):
        def run():
            with model_state_preserved(model):
                out = plugin._kernel(model, x1, x2, args.mode)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return out
        return run

    print(f"{args.arch} {args.params} N={args.N} M={args.M} {args.mode} {args.dtype} {args.device} "
          f"threads={torch.get_num_threads()} P={arch.num_parameters} O={arch.num_outputs}")
    runs, first = {}, None
    for name in args.impls:
        run = caller(implementations.get(name))
        t = time.perf_counter()
        try:
            out = run()
        except Exception as exc:  # a plugin that declines or fails: say so, time the others
            print(f"{name}: {type(exc).__name__}: {exc}")
            continue
        print(f"{name}: first call {time.perf_counter() - t:.3f} s, max RSS so far "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
        if first is None:
            first = (name, out)
        else:
            err = float((out.double() - first[1].double()).norm() / first[1].double().norm())
            print(f"  relative difference from {first[0]}: {err:.2e}")
        runs[name] = run
    names = list(runs)
    for name in names[1:]:
        a, b, ratio = paired(runs[names[0]], runs[name])
        print(f"paired: {names[0]} {a * 1e3:.1f} ms, {name} {b * 1e3:.1f} ms, ratio {ratio:.3f}")
    if len(names) == 1:
        a, _, _ = paired(runs[names[0]], runs[names[0]])
        print(f"{names[0]}: median {a * 1e3:.1f} ms")
    if not args.rows:
        return
    for name in names:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if args.device.startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                runs[name]()
        key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
        print(f"\n=== {name}: 3 calls")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
