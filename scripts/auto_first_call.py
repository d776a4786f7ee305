"""auto's first call against its pick's, on fresh model instances, in one process on one torch thread.

    PYTHONPATH=. python scripts/auto_first_call.py [--pairs 6] [--out FILE.json] [--profile]

For each model (the zoo's tiny mlp, cnn, cnn_batchnorm and transformers, and resnet18 on 32x32 images): a fresh
instance per call (built from the same seed, so the same architecture and weights, a new object: caches keyed
by the model object miss, caches keyed by its structure and shapes may hit), then ``auto`` and its pick each
call ``compute`` once on their own fresh instance, in pairs whose order alternates (a b, b a, ...), timed on
process CPU time (what another process holding a core does not inflate). Before the pairs, one unpaired
warm-up call of each (the process's first call of a plugin on a model pays imports and one-off set-up); the
report gives the median of the pairs' ratios, and the first pair's (the first fresh instance after warm-up).
``--profile`` prints where auto's extra time goes on one more fresh instance (cProfile, cumulative).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N = 8
MODELS = [("mlp", {"in_features": 16, "width": 32, "depth": 2}), ("cnn", {}), ("cnn_batchnorm", {}),
          ("mlp_layernorm", {}), ("text_transformer", {}), ("vit_tiny", {}), ("resnet18", {"image": 16})]


def fresh(name: str, params: dict):
    """A new instance of the model (same seed, same weights) and N inputs."""
    from ntk_bench.bench.zoo import architectures

    arch = architectures.build(name, seed=0, **params)
    return arch.model, architectures.inputs(arch, N, seed=1)


def _cpu(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def measure(name: str, params: dict, pairs: int) -> dict:
    """One model: a warm-up call of auto and of its pick, then ``pairs`` pairs of first calls on fresh instances in
    alternating order (process CPU time); the row, with the ratios auto / pick."""
    from ntk_bench import implementations

    auto = implementations.get("auto")
    model, x = fresh(name, params)
    warm_auto = _cpu(lambda: auto.compute(model, x))
    pick = auto.last_choice[0]
    plugin = implementations.get(pick)
    model, x = fresh(name, params)
    warm_pick = _cpu(lambda: plugin.compute(model, x))
    a, b, picks = [], [], set()
    for i in range(pairs):
        for who in (("auto", "pick") if i % 2 == 0 else ("pick", "auto")):
            model, x = fresh(name, params)
            if who == "auto":
                a.append(_cpu(lambda m=model, x=x: auto.compute(m, x)))
                picks.add(auto.last_choice[0])
            else:
                b.append(_cpu(lambda m=model, x=x: plugin.compute(m, x)))
    ratios = [p / q for p, q in zip(a, b)]
    return {"model": name, "params": params, "N": N, "pick": pick, "picks_seen": sorted(picks),
            "why": auto.last_choice[1], "warmup_auto_s": warm_auto, "warmup_pick_s": warm_pick,
            "auto_first_calls_s": a, "pick_first_calls_s": b, "ratios": ratios,
            "median_ratio": statistics.median(ratios), "max_ratio": max(ratios),
            "auto_median_s": statistics.median(a), "pick_median_s": statistics.median(b),
            "load_average": round(os.getloadavg()[0], 2)}


def profile(name: str, params: dict) -> None:
    """Print the 25 most expensive functions (cumulative) of auto's first call on a fresh instance."""
    import cProfile
    import pstats

    from ntk_bench import implementations

    auto = implementations.get("auto")
    model, x = fresh(name, params)
    pr = cProfile.Profile()
    pr.enable()
    auto.compute(model, x)
    pr.disable()
    pstats.Stats(pr).sort_stats("cumulative").print_stats(25)


def main(argv=None) -> int:
    """The command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--out")
    p.add_argument("--only", nargs="*")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = []
    for name, params in MODELS:
        if args.only and name not in args.only:
            continue
        row = measure(name, params, args.pairs)
        rows.append(row)
        print(f"{name:18s} pick {row['pick']:22s} auto {row['auto_median_s'] * 1e3:7.2f} ms  pick "
              f"{row['pick_median_s'] * 1e3:7.2f} ms  ratio median {row['median_ratio']:.2f} max "
              f"{row['max_ratio']:.2f} (first pair {row['ratios'][0]:.2f}; warm-up {row['warmup_auto_s'] * 1e3:.1f} / "
              f"{row['warmup_pick_s'] * 1e3:.1f} ms)  picks {row['picks_seen']}  load {row['load_average']}",
              flush=True)
        if args.profile:
            profile(name, params)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"timer": "process_time", "torch_threads": 1, "rows": rows},
                                             indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
