"""The Gram GEMMs' library, before and after, in one process: each case's kernel with MKL's Grams (as before) and
with the backend trial's choice (now), eager and compiled, timed in alternating rounds (``paired.time_rounds``).

    PYTHONPATH=. python results/2026-12-08-small-vs-nt-epyc/gemm_choice_ab.py [--rounds 8] [--cases ...]

Eager "before" patches ``onednn.gram`` back to ``a @ b.T`` (the layers' GEMMs as the trial chose, as before);
compiled "before" is the same compiled kernel with its large GEMMs held to MKL's (``onednn.fixed_choice(False)``:
what Inductor called before). One thread, neural-tangents
not involved; prints one line per case and plugin: medians (ms) and the median of the per-round ratios, with its
25th-75th percentiles.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--cases", nargs="*", default=["mlp512_N8", "mlp512_N32", "mlp512_N128", "cnn_small",
                                                   "text_tiny"])
    args = ap.parse_args()
    from ntk_bench.bench.execution.worker import _keep_freed_memory
    from ntk_bench.bench.measurement import environment

    _keep_freed_memory()
    torch.set_num_threads(1)
    import small_vs_nt

    from ntk_bench import implementations
    from ntk_bench.bench.measurement import paired
    from ntk_bench.bench.zoo import architectures
    from ntk_bench.implementations.core import onednn

    print(f"# {environment.cpu_name()} ({environment.cpu_capability()}), torch {torch.__version__}, 1 thread")
    now_gram = onednn.gram

    def before_gram(a, b):
        return a @ b.T

    for cid, arch_name, params, n in [c for c in small_vs_nt.CASES if c[0] in args.cases]:
        arch = architectures.build(arch_name, seed=0, **params)
        x = architectures.inputs(arch, n, seed=1)
        names = [p for p in ("explicit_mlp", "explicit_mlp_compiled", "structured")
                 if implementations.get(p).supports(arch.model) is None]
        for name in names:
            plugin = implementations.get(name)
            calls = {}
            if name.endswith("_compiled"):
                run, _ = plugin.prepare(arch.model, x, None, "full")
                run()

                def with_mkl(run=run):
                    with onednn.fixed_choice(False):  # (the same compiled kernel: its GEMMs choose when they run)
                        return run()

                calls = {"before": with_mkl, "now": run}
            else:
                run, _ = plugin.prepare(arch.model, x, None, "full")
                run()

                def with_gram(g, run=run):
                    def call():
                        onednn.gram = g
                        try:
                            return run()
                        finally:
                            onednn.gram = now_gram
                    return call

                calls = {"before": with_gram(before_gram), "now": with_gram(now_gram)}
            times, _ = paired.time_rounds(calls, 0.0, min_rounds=args.rounds, max_rounds=args.rounds)
            ratios = [a / b for a, b in zip(times["now"], times["before"])]
            q = statistics.quantiles(ratios, n=4, method="inclusive")
            print(f"{cid} {name}: before {statistics.median(times['before']) * 1e3:.3f} ms, now "
                  f"{statistics.median(times['now']) * 1e3:.3f} ms, now/before {statistics.median(ratios):.2f} "
                  f"({q[0]:.2f}-{q[2]:.2f})", flush=True)


if __name__ == "__main__":
    main()
