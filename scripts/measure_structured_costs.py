"""Measure ``structured``'s time on real networks, and ``auto``'s first call against its pick's, for the cost-model
check (tests/implementations/plugins/test_costs_real.py reads the file this writes; it does not time anything itself).

    python scripts/measure_structured_costs.py --out results/DATE-structured-costs/times.json

Networks: every factory of the real zoo (bench/zoo/real_models.py) at the real sweep's sizes where it has them, and
timm's efficientnet_b0, convnext_atto, regnetx_002 and deit_tiny_patch16_224 (``pretrained=False,
num_classes=10``) on 32x32 images. Each is timed with process CPU time on one torch thread (what another process
holding a core does not inflate), as the median of several steady calls after a first call; the first calls of
``auto`` and of its pick are timed on fresh copies of the model (each builds its own plan), in three pairs whose
order alternates, and compared by the median of the pairs' ratios.
"""

from __future__ import annotations

import argparse
import copy
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
TIMM = [("efficientnet_b0", {}), ("convnext_atto", {}), ("regnetx_002", {}),
        ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 8})]
# (factory, params) of the real zoo; the real sweep's sizes where it names them
ZOO = [("resnet18", {"image": 32}), ("mobilenet_v3_small", {"image": 32}),
       ("vit_tiny", {"image": 32, "patch": 4, "layers": 4, "heads": 4, "hidden": 64, "mlp": 128}),
       ("text_transformer", {"vocab": 1000, "seq": 32, "d_model": 64, "heads": 4, "ff": 128, "layers": 2}),
       ("lstm", {"features": 16, "seq": 32, "hidden": 64}), ("gru", {"features": 16, "seq": 32, "hidden": 64}),
       ("mlp_layernorm", {}), ("cnn_groupnorm", {}), ("cnn_batchnorm", {}), ("conv1d_net", {}),
       ("conv_variants", {}), ("mlp_tied", {})]


def build(source: str, name: str, params: dict, n: int = N):
    """(model, x) of one network: ``source`` "zoo" (the real zoo at ``params``) or "timm" (32x32 images)."""
    import torch

    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10, **params).eval()
        return model, torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    from ntk_bench.bench import sweeps
    from ntk_bench.bench.measurement.problem_build import build_problem

    problem = sweeps.Problem(name, tuple(sorted(params.items())), n, None)
    _, model, x, _ = build_problem(problem, torch.float32, "cpu")
    return model, x


def _cpu(fn):
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def measure(source, name, params, repeats, pairs=3):
    """One network's costs in process CPU time: structured's first call and ``repeats`` later calls, then auto's
    first call against its pick's, each on a fresh copy, in ``pairs`` pairs of alternating order; the row."""
    import torch

    from ntk_bench import implementations

    structured, auto = implementations.get("structured"), implementations.get("auto")
    model, x = build(source, name, params)
    first_s, _ = _cpu(lambda: structured.compute(copy.deepcopy(model), x))
    fresh = copy.deepcopy(model)
    structured.compute(fresh, x)
    steady = [_cpu(lambda: structured.compute(fresh, x))[0] for _ in range(repeats)]
    # auto's first call and its pick's, each on a fresh copy, in pairs whose order alternates (a b, b a, ...)
    auto_first, pick_first, pick, why = [], [], None, None
    for i in range(pairs):
        for who in (("auto", "pick") if i % 2 == 0 else ("pick", "auto")):
            if who == "auto":
                auto_first.append(_cpu(lambda: auto.compute(copy.deepcopy(model), x))[0])
                pick, why = auto.last_choice
            else:
                plugin = implementations.get(pick or auto.choose(model, x)[0].name)
                pick_first.append(_cpu(lambda: plugin.compute(copy.deepcopy(model), x))[0])
    ratios = [a / b for a, b in zip(auto_first, pick_first)]
    return {"source": source, "network": name, "params": params, "N": int(x.shape[0]), "mode": "full",
            "structured_s": statistics.median(steady), "structured_blocks_s": steady,
            "structured_first_call_s": first_s, "auto_first_call_s": statistics.median(auto_first),
            "auto_first_calls_s": auto_first, "auto_pick": pick, "auto_why": why,
            "pick_first_call_s": statistics.median(pick_first), "pick_first_calls_s": pick_first,
            "auto_over_pick_first_call": statistics.median(ratios), "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    """The command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", nargs="*", help="network names to measure (default: all)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    rows = []
    out = Path(args.out)
    for source, nets in (("zoo", ZOO), ("timm", TIMM)):
        for name, params in nets:
            if args.only and name not in args.only:
                continue
            load = os.getloadavg()[0]
            row = {**measure(source, name, params, args.repeats), "load_average": round(load, 2)}
            rows.append(row)
            print(f"{name}: structured {row['structured_s']:.4g} s (first {row['structured_first_call_s']:.3g} s); "
                  f"auto first {row['auto_first_call_s']:.3g} s -> {row['auto_pick']} first "
                  f"{row['pick_first_call_s']:.3g} s (paired ratio {row['auto_over_pick_first_call']:.2f}); "
                  f"load {load:.1f}", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"timer": "process_time", "torch_threads": 1, "cpu_count": os.cpu_count(),
                                       "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
