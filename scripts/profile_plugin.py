"""Where a plugin's time goes on one problem: median time, then torch.profiler's top operators.

    python scripts/profile_plugin.py structured explicit_mlp --arch mlp --params '{"in_features": 784, "width": 512, "depth": 2, "out": 10}' --N 512 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ntk_bench import implementations  # noqa: E402
from ntk_bench.bench import architectures  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("impls", nargs="+")
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--params", default='{"in_features": 784, "width": 512, "depth": 2, "out": 10}')
    ap.add_argument("--N", type=int, default=512)
    ap.add_argument("--mode", default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    arch = architectures.build(args.arch, seed=0, **json.loads(args.params))
    model = arch.model.to(args.device)
    x = architectures.inputs(arch, args.N, seed=1).to(args.device)
    from torch.utils import benchmark

    for name in args.impls:
        plugin = implementations.get(name)
        fn = lambda: plugin.compute(model, x, mode=args.mode)  # noqa: E731
        fn()
        t = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=1.0)
        print(f"\n=== {name}: median {t.median * 1e3:.3f} ms over {len(t.times)} blocks of {t.number_per_run}")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if args.device.startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
