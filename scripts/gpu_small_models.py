"""Small models and the real-network targets on one GPU, eager against compiled, in one short run.

    python scripts/gpu_small_models.py --out "$OUT"                       # on the device machine (minutes)
    python scripts/gpu_small_models.py --out /tmp/x --device cpu --tiny   # the script itself, on the CPU, seconds

Cases: the three small models of ``scripts/small_vs_nt.py`` (MLP 10-64-64-3 tanh N=8, the tiny text transformer
N=4, the 8-channel CNN N=8), the MLP 784-512-512-10 at N=512, ResNet-18 at 224x224 with O=8 N=8, O=128 N=1 and
O=1000 N=1, and neural-tangents' notebook MLP (3 x Dense(2048) on 3072 inputs) O=8 N=16. For each, every plugin
that takes the model (``--impls``, or per case ``CASE_IMPLS``: what fits the device time): the first call (on a GPU: plan, CUDA-graph capture, or compilation) and the
warm median over ``--reps`` synchronised calls with the 25th-75th percentile band, float32, TF32 off.
neural-tangents runs on the CPU JAX backend only: its published A100 times are in the table's target column.

Rows go to ``OUT/results.jsonl`` as each finishes (a run cut short keeps what it did), the table to
``OUT/table.md``. A case or plugin that would start after ``--deadline-s`` is skipped and says so; an
out-of-memory error is a row, not the end. ``--tiny`` shrinks every model (ResNet-18 at 32x32, MLPs of width 16)
to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (id, zoo architecture, parameters, N, target in ms on the GPU or None, neural-tangents' published A100 ms or None)
CASES = [
    ("mlp_tiny", "mlp", {"in_features": 10, "width": 64, "depth": 2, "out": 3, "activation": "tanh"}, 8, None, None),
    ("text_tiny", "text_transformer", {"vocab": 50, "seq": 12, "d_model": 32, "heads": 2, "ff": 64, "layers": 1,
                                       "out": 10}, 4, None, None),
    ("cnn_small", "cnn", {"channels": 8, "image": 16, "out": 10}, 8, None, None),
    ("mlp512_N512", "mlp", {"in_features": 784, "width": 512, "depth": 2, "out": 10}, 512, None, None),
    ("resnet18_224_O8_N8", "resnet18", {"image": 224, "out": 8}, 8, 20.0, 46.5),
    ("resnet18_224_O128_N1", "resnet18", {"image": 224, "out": 128}, 1, 25.0, 51.0),
    ("resnet18_224_O1000_N1", "resnet18", {"image": 224, "out": 1000}, 1, 150.0, 343.0),
    ("dense2048x3_O8_N16", "mlp", {"in_features": 3072, "width": 2048, "depth": 3, "out": 8}, 16, 1.0, None),
]
TINY = {"mlp512_N512": ({"in_features": 16, "width": 16, "depth": 2, "out": 10}, 8),
        "resnet18_224_O8_N8": ({"image": 32, "out": 8}, 2), "resnet18_224_O128_N1": ({"image": 32, "out": 128}, 1),
        "resnet18_224_O1000_N1": ({"image": 32, "out": 16}, 1),
        "dense2048x3_O8_N16": ({"in_features": 16, "width": 16, "depth": 3, "out": 8}, 4)}
IMPLS = ["explicit_mlp", "explicit_mlp_compiled", "structured", "structured_compiled", "jacobian_contraction",
         "jacobian_contraction_compiled", "auto"]
# Per case, the plugins worth the device time: no compiled Jacobian contraction on ResNet-18 (its compilation
# takes minutes), no Jacobian contraction at all on the wide MLPs (N·O·P floats), explicit_mlp where it applies.
CASE_IMPLS = {
    "mlp512_N512": ["explicit_mlp", "explicit_mlp_compiled", "structured", "auto"],
    "resnet18_224_O8_N8": ["structured", "jacobian_contraction", "auto"],
    "resnet18_224_O128_N1": ["structured", "jacobian_contraction", "auto"],
    "resnet18_224_O1000_N1": ["structured", "auto"],
    "dense2048x3_O8_N16": ["explicit_mlp", "explicit_mlp_compiled", "structured", "structured_compiled", "auto"],
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _quantiles(values):
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q[0], q[2]


def run_one(name: str, arch, x, device: str, reps: int, max_first_s: float) -> dict:
    """One plugin on one case: first call, then ``reps`` synchronised warm calls."""
    from ntk_bench import implementations

    plugin = implementations.get(name)
    reason = plugin.supports(arch.model)
    if reason is not None:
        return {"skipped": reason[:300]}
    try:
        _sync(device)
        t0 = time.perf_counter()
        plugin.compute(arch.model, x)
        _sync(device)
        row = {"first_call_s": time.perf_counter() - t0}
        info = plugin.info() if hasattr(plugin, "info") else None
        if info is not None:
            row.update(compiled=info.compiled, compile_s=info.compile_s, fallback=info.fallback)
        if row["first_call_s"] > max_first_s:
            return {**row, "skipped": f"first call {row['first_call_s']:.1f} s > {max_first_s:g} s"}
        plugin.compute(arch.model, x)
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            plugin.compute(arch.model, x)
            _sync(device)
            times.append(time.perf_counter() - t0)
        med, lo, hi = _quantiles(times)
        row.update(time_median_s=med, time_p25_s=lo, time_p75_s=hi, reps=reps)
        if device.startswith("cuda"):
            row["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        return row
    except implementations.UnsupportedModelError as exc:
        return {"skipped": str(exc)[:300]}
    except torch.OutOfMemoryError as exc:
        return {"error": f"out of memory: {str(exc).splitlines()[0][:200]}"}
    except Exception as exc:  # a row says what failed; the next plugin still runs
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    finally:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_small_models_out")))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="shrunk models, to check the script (e.g. on a CPU)")
    ap.add_argument("--cases", nargs="*", help="case ids (default: all)")
    ap.add_argument("--impls", nargs="*", help="plugins (default: per case, CASE_IMPLS or IMPLS)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--deadline-s", type=float, default=480.0, help="start nothing after this many seconds")
    ap.add_argument("--max-first-s", type=float, default=120.0)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from ntk_bench.bench.zoo import architectures

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device, "tiny": args.tiny, "torch": torch.__version__, "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    rows = []
    with open(args.out / "results.jsonl", "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for cid, arch_name, params, n, target_ms, nt_ms in CASES:
            if args.cases and cid not in args.cases:
                continue
            if args.tiny and cid in TINY:
                params, n = TINY[cid]
            arch = architectures.build(arch_name, seed=0, device=args.device, **params)
            x = architectures.inputs(arch, n, seed=1, device=args.device)
            for name in args.impls or CASE_IMPLS.get(cid, IMPLS):
                row = {"case": cid, "arch": arch_name, "params": params, "N": n, "impl": name,
                       "target_ms": target_ms, "nt_a100_ms": nt_ms}
                if time.perf_counter() - start > args.deadline_s:
                    row["skipped"] = f"past the deadline ({args.deadline_s:g} s)"
                else:
                    row.update(run_one(name, arch, x, args.device, args.reps, args.max_first_s))
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(json.dumps(row), flush=True)
    lines = ["| case | N | plugin | first call s | warm ms (p25–p75) | target ms | nt A100 ms | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        warm = (f"{r['time_median_s'] * 1e3:.3g} ({r['time_p25_s'] * 1e3:.3g}–{r['time_p75_s'] * 1e3:.3g})"
                if "time_median_s" in r else "")
        first = f"{r['first_call_s']:.3g}" if "first_call_s" in r else ""
        note = r.get("skipped") or r.get("error") or ("" if r.get("compiled") in (None, True)
                                                       else f"eager: {r.get('fallback')}")
        lines.append(f"| {r['case']} | {r['N']} | {r['impl']} | {first} | {warm} | {r['target_ms'] or ''} | "
                     f"{r['nt_a100_ms'] or ''} | {(note or '')[:120]} |")
    (args.out / "table.md").write_text(json.dumps(meta) + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
