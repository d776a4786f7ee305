"""explicit_mlp in trace mode, the layer below a Linear output layer: its Gram from the output weights' column norms
(KernelSum.add_scaled_gram, "new") against the plain Gram of G = W_L * phi'(z) ("old", add_gram), one process,
alternating, 9 rounds, one thread; the two kernels' largest relative difference printed first.

    PYTHONPATH=. python results/2026-12-07-mlp-trace-gram/ab_trace.py
"""
import statistics
import time

import torch

torch.set_num_threads(1)
from ntk_bench.bench.zoo import architectures
from ntk_bench.implementations.core import contractions as c
from ntk_bench.implementations.plugins.explicit_mlp import plugin as E

new = c.KernelSum.add_scaled_gram
def old(self, xx, w, d1, d2, symmetric=False):
    self.add_gram(xx, w.unsqueeze(1) * d1, w.unsqueeze(1) * d2, symmetric=symmetric)
torch.manual_seed(0)
for (fi, wd, dp, o, n) in [(784, 512, 2, 10, 128), (3072, 2048, 3, 8, 256)]:
    m, shape = architectures.mlp(in_features=fi, width=wd, depth=dp, out=o)
    x = torch.randn(n, *shape)
    def call(f):
        c.KernelSum.add_scaled_gram = f
        with torch.no_grad():
            return E._recursion(m, x, None, "trace")
    a, b = call(old), call(new)
    print("max rel diff", float((a - b).abs().max() / a.abs().max()))
    times = {"old": [], "new": []}
    for r in range(9):
        for v in (("old", "new") if r % 2 else ("new", "old")):
            t0 = time.perf_counter(); call(old if v == "old" else new); times[v].append(time.perf_counter() - t0)
    print(fi, wd, dp, o, n, {v: f"{statistics.median(t)*1e3:.1f} ms" for v, t in times.items()},
          "new/old", round(statistics.median([b / a for a, b in zip(times["old"], times["new"])]), 3))
