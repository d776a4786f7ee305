"""The FLOP floor of ``structured`` on one zoo model, and the time it takes at this machine's float32 GEMM rate:
``python scripts/flop_floor.py ARCH N [--params JSON] [--threads T]``.

Floor = the forward (N·[FP]) + the O-wide input-gradient backward (about N·O·[FP]: one forward's FLOPs per
output and sample) + each layer's rule in its cheaper order (the cost model's per-layer terms). The GEMM rate is
a 2048³ float32 matrix product's, the fastest kernel this machine runs; a time under floor / rate is out of reach
for the algorithm on this machine.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    """The command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arch")
    ap.add_argument("n", type=int)
    ap.add_argument("--params", default="{}")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ntk_bench.bench.zoo import architectures
    from ntk_bench.implementations import get
    from ntk_bench.implementations.core.costs import cost_stats

    arch = architectures.build(args.arch, **json.loads(args.params))
    stats = cost_stats(arch.model, architectures.inputs(arch, 1))
    n, o, fp = args.n, stats.o, stats.fp_flops
    estimate = get("structured").estimate(stats, n, n, "full", True).flops
    rules = estimate - n * (fp + 2 * o * fp)  # (the estimate counts the backward as 2·O forwards)
    floor = n * fp + n * o * fp + rules
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    rate = 2 * 2048 ** 3 / sorted(times)[len(times) // 2]
    print(f"{args.arch} {args.params} N=M={n} O={o} P={stats.p} [FP]={fp / 1e9:.3f} GFLOP")
    print(f"forward {n * fp / 1e9:.1f} + O-wide backward {n * o * fp / 1e9:.1f} + rules {rules / 1e9:.1f} "
          f"= {floor / 1e9:.1f} GFLOP")
    print(f"float32 GEMM 2048^3 on {args.threads} threads: {rate / 1e9:.1f} GFLOP/s -> floor {floor / rate:.3f} s")


if __name__ == "__main__":
    main()
