"""Write a synthetic results.jsonl of about ROWS rows, shaped like a real run's, for timing ``ntk-bench report``.

    python scripts/synthetic_results.py OUT_DIR [--rows 100000] [--configs 20]

Rows have every column a real row has (auto's paired timings, the timing blocks, the worker's fields); configs
(architectures' parameters) x N x O x mode x dtype cases, each run by our plugins and a few peers, about 5%
of them not ok. The numbers are random but consistent (time grows with N), so every section of the report fills.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ntk_bench.modes import MODES

OURS = ["jacobian_contraction", "ntk_vector_products", "autograd_loop", "explicit_mlp", "backpack_batchgrad",
        "backpack_sqrtggn", "structured", "auto"]
PEERS = ["nt_jacobian_contraction", "nt_ntk_vector_products", "nt_structured_derivatives", "asdl_implicit",
         "nngeometry_gram", "curvlinops_jacobian", "laplace_backpack"]


def main() -> None:
    """The command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--configs", type=int, default=20)
    args = ap.parse_args()
    rng = random.Random(0)
    impls = OURS + PEERS
    ns = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    os_ = [1, 2, 4, 8, 10, 16, 32, 64, 100, 128]
    per_config = max(1, args.rows // (args.configs * len(impls)))
    header = {"format_version": 1, "torch": "2.14.1", "jax": "0.4.23", "python": "3.11.7", "device_name": "x86_64",
              "cpu_threads": 2, "cpu_count": 2, "git_commit": "0" * 40, "code_sha1": "0" * 12,
              "started": "2026-12-07T00:00:00+0000", "sweep": "synthetic", "cases": 0, "host": "vm"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_rows = 0
    with open(out / "results.jsonl", "w") as f:
        f.write(json.dumps({"header": header}) + "\n")
        for c in range(args.configs):
            params = {"depth": 2, "in_features": 784, "out": 10, "width": 64 * (c + 1)}
            k = 0
            for dtype in ("float32", "float64"):
                for mode in MODES:
                    for o in os_:
                        for n in ns:
                            if k >= per_config:
                                break
                            k += 1
                            params["out"] = o
                            p = 784 * params["width"] + params["width"] ** 2 + params["width"] * o
                            for impl in impls:
                                status = "ok" if rng.random() > 0.05 else rng.choice(["mismatch", "error", "oom",
                                                                                      "timeout", "unsupported"])
                                t = 1e-4 * n * n * o * (1 + impls.index(impl) / 5) * rng.uniform(0.9, 1.1)
                                row = {"O": o, "P": p, "fp_flops": 2 * p,
                                       "case_id": f"{impl}/mlp({','.join(f'{a}={b}' for a, b in sorted(params.items()))})"
                                                  f"/N={n}/M=x1/{mode}/{dtype}/cpu",
                                       "impl": impl, "origin": "peer" if impl in PEERS else "ours", "arch": "mlp",
                                       "arch_params": json.dumps(params, sort_keys=True), "N": n, "M": n, "x2": "x1",
                                       "mode": mode, "dtype": dtype, "device": "cpu", "cpu_threads": 2,
                                       "predicted_jc_flops": 2 * n * o * p + n * n * o * o * p,
                                       "predicted_vp_flops": n * n * o * 2 * p, "kernel_bytes": n * n * o * o * 4,
                                       "memory_budget_bytes": None, "first_call_s": 3 * t, "peak_mem_bytes": n * n * o * 64,
                                       "time_median_s": t, "time_iqr_s": 0.02 * t, "time_repeats": 35,
                                       "time_blocks_s": [t * rng.uniform(0.95, 1.05) for _ in range(5)],
                                       "reference": "neural_tangents:structured_derivatives", "ref_block": "16x16",
                                       "rel_err": 1e-7 if status == "ok" else 0.2, "max_abs_err_rel_mean": 1e-6,
                                       "status": status, "worker": "worker", "cpu_affinity": [0, 1],
                                       "worker_host": "vm", "worker_threads": 2,
                                       "worker_malloc": "glibc mmap_threshold=33554432 trim_threshold=1073741824",
                                       "case_wall_s": 40 * t, "concurrent": [], "executor": "local"}
                                if status not in ("ok", "mismatch"):
                                    row.update(time_median_s=None, time_iqr_s=None, rel_err=None,
                                               error=f"injected {status} for a synthetic row")
                                if impl == "auto":
                                    row.update(auto_pick="structured", auto_reason="structured: predicted 1 ms",
                                               paired_auto_s=t, paired_pick_s=t, auto_over_pick_paired=1.01,
                                               paired_ratios={"structured": 1.01}, paired_fastest="structured",
                                               auto_over_fastest_paired=1.02)
                                f.write(json.dumps(row) + "\n")
                                n_rows += 1
    print(f"{out / 'results.jsonl'}: {n_rows} rows")


if __name__ == "__main__":
    main()
