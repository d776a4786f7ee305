"""Ours against a neural-tangents peer on one zoo model, timed in alternating calls in one process (drift and
machine noise hit both alike): ``python scripts/paired_ratio.py ARCH N OURS PEER [--params JSON] [--rounds R]``.

Prints each side's median and the median over rounds of ours / peer. Both are warmed up (planned, compiled)
before the rounds; the peer's call is its prepared, jitted run (as the runner times it); the worker's memory
setting (``_keep_freed_memory``) applies to both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    """The command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arch")
    ap.add_argument("n", type=int)
    ap.add_argument("ours")
    ap.add_argument("peer")
    ap.add_argument("--params", default="{}")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from ntk_bench.bench.execution.worker import _keep_freed_memory

    _keep_freed_memory()
    torch.set_num_threads(args.threads)
    from ntk_bench.bench.zoo import architectures
    from ntk_bench.implementations import get

    arch = architectures.build(args.arch, **json.loads(args.params))
    x = architectures.inputs(arch, args.n)
    ours = get(args.ours)
    run, _ = get(args.peer).prepare(arch.model, x, None, "full")
    calls = {"ours": lambda: ours.compute(arch.model, x), "peer": run}
    for fn in calls.values():
        for _ in range(3):
            fn()
    times = {"ours": [], "peer": []}
    for r in range(args.rounds):
        for side in (("ours", "peer") if r % 2 == 0 else ("peer", "ours")):
            t0 = time.perf_counter()
            calls[side]()
            times[side].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["ours"], times["peer"])]
    print(f"{args.arch} N={args.n}: {args.ours} {statistics.median(times['ours']) * 1e3:.1f} ms, "
          f"{args.peer} {statistics.median(times['peer']) * 1e3:.1f} ms, ours/peer median over "
          f"{args.rounds} rounds {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
