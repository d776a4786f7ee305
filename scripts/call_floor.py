"""Where a small model's call goes: the floor of a compiled call, against neural-tangents' whole kernel.

    python scripts/call_floor.py [--rounds 9] [--json FILE]

On the tiny MLP (10-64-64-3, tanh, N = 8, full mode, float32, one thread), timed in alternating rounds in one
process (``paired.time_rounds``), each the median over rounds of its time per call:

- ``nt_structured_derivatives``: neural-tangents' fastest, its ``run()`` (one jitted XLA executable);
- ``explicit_mlp_compiled``: our fastest, ``compute`` (the engine's checks around the compiled kernel);
- ``compiled kernel``: the same compiled kernel called directly (dynamo's guards and Inductor's wrapper around
  the generated code), no engine;
- ``compiled x + 1``: ``torch.compile`` of ``x + 1`` on an (8, 10) tensor: what any compiled call costs here;
- ``eager x + 1``: one eager operator.

So ``compute`` minus ``compiled kernel`` is the engine's share, ``compiled x + 1`` the wrapper's floor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", type=Path, help="write the medians (seconds) here")
    args = ap.parse_args()
    os.environ["NTK_BENCH_XLA_THREADS"] = "1"  # neural-tangents on the one core torch's thread computes on
    torch.set_num_threads(1)
    from ntk_bench import implementations
    from ntk_bench.bench.measurement import paired
    from ntk_bench.bench.zoo import architectures
    from ntk_bench.implementations.core import compiled

    params = {"in_features": 10, "width": 64, "depth": 2, "out": 3, "activation": "tanh"}
    calls = {}
    for name in ("nt_structured_derivatives", "explicit_mlp_compiled"):
        arch = architectures.build("mlp", seed=0, **params)
        x = architectures.inputs(arch, 8, seed=1)
        run, _ = implementations.get(name).prepare(arch.model, x, None, "full")
        run()
        calls[name] = run
        if name == "explicit_mlp_compiled":
            (entry,) = compiled.CACHE.entries(arch.model).values()
            if not entry.checked:
                raise SystemExit(f"explicit_mlp_compiled did not compile: {entry.failed}")
            calls["compiled kernel"] = lambda fn=entry.fn, m=arch.model, x=x: fn(m, x, None)
    small = torch.randn(8, 10)
    plus_one = torch.compile(lambda t: t + 1, fullgraph=True, dynamic=False)
    plus_one(small)
    calls["compiled x + 1"] = lambda: plus_one(small)
    calls["eager x + 1"] = lambda: small + 1
    times, _ = paired.time_rounds(calls, 0.0, min_rounds=args.rounds, max_rounds=args.rounds, block_s=0.02)
    medians = {k: statistics.median(v) for k, v in times.items()}
    for k, v in medians.items():
        print(f"{k:28s} {v * 1e6:9.1f} µs")
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"medians_s": medians, "rounds": args.rounds,
                                         "load": os.getloadavg(), "torch": torch.__version__}, indent=1) + "\n")


if __name__ == "__main__":
    main()
