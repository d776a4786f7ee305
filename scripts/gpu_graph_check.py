"""On a GPU: MLP 784-512-512-10 at N=M=512, eager against CUDA-graph replay, with and without the symmetric split.

    python scripts/gpu_graph_check.py [--N 512] [--jc]

Prints one line per (plugin, graphs, split threshold): the median time (the runner's ``time_call``, CUDA
synchronised), its ratio to Jacobian contraction's (with --jc) and the error against the eager kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ntk_bench import implementations  # noqa: E402
from ntk_bench.bench.measurement.timers import time_call  # noqa: E402
from ntk_bench.bench.zoo import architectures  # noqa: E402
from ntk_bench.implementations.core import contractions as base  # noqa: E402
from ntk_bench.implementations.core import cuda_graphs  # noqa: E402


def main() -> None:
    """The command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=512)
    ap.add_argument("--jc", action="store_true",
                    help="also time jacobian_contraction, the slow baseline of the printed ratios")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    arch = architectures.build("mlp", seed=0, in_features=784, width=512, depth=2, out=10)
    model = arch.model.to(args.device)
    x = architectures.inputs(arch, args.N, seed=1).to(args.device)
    jc_s = time_call(lambda: implementations.get("jacobian_contraction").compute(model, x), 1.0)[0] if args.jc else None
    if jc_s:
        print(f"jacobian_contraction: {jc_s * 1e3:.2f} ms")
    # the library's two thresholds (eager, captured), each tried both ways
    default_split = base.SYMMETRIC_SPLIT_MIN_ROWS, base.SYMMETRIC_SPLIT_MIN_ROWS_CAPTURED
    for name in ("structured", "explicit_mlp", "auto"):
        plugin = implementations.get(name)
        os.environ["NTK_BENCH_CUDA_GRAPHS"] = "0"
        eager = plugin.compute(model, x)
        for graphs in ("0", "1"):
            for split in default_split:
                os.environ["NTK_BENCH_CUDA_GRAPHS"] = graphs
                base.SYMMETRIC_SPLIT_MIN_ROWS = base.SYMMETRIC_SPLIT_MIN_ROWS_CAPTURED = split
                cuda_graphs.CACHE = cuda_graphs.GraphCache()  # a fresh capture for this threshold
                out = plugin.compute(model, x)
                replayed = cuda_graphs.last_replay_bytes is not None
                err = float((out - eager).norm() / eager.norm())
                s = time_call(lambda: plugin.compute(model, x), 1.0)[0]
                ratio = f", JC / this {jc_s / s:.0f}x" if jc_s else ""
                print(f"{name}: graphs={graphs} (replayed: {replayed}) split from {split} rows: {s * 1e3:.3f} ms"
                      f"{ratio}; rel. diff. to eager {err:.1e}", flush=True)
    base.SYMMETRIC_SPLIT_MIN_ROWS, base.SYMMETRIC_SPLIT_MIN_ROWS_CAPTURED = default_split


if __name__ == "__main__":
    main()
