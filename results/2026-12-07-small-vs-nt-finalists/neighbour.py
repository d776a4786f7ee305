"""What a large neighbour leaves behind: our fastest plugin's calls on the MLP 784-512-512-10 at N = 8, each timed
alone, right after one call of neural-tangents' Jacobian contraction (N·O·P = 27 M floats), then 40 calls in a
row; 6 rounds, the median per position. One thread, float32, the malloc settings of scripts/small_vs_nt.py.

    PYTHONPATH=. python results/2026-12-07-small-vs-nt-finalists/neighbour.py
"""

import os
import statistics
import time

import torch

os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
torch.set_num_threads(1)

from ntk_bench import implementations  # noqa: E402
from ntk_bench.bench.execution.worker import _keep_freed_memory  # noqa: E402
from ntk_bench.bench.zoo import architectures  # noqa: E402

_keep_freed_memory()


def prepared(name):
    arch = architectures.build("mlp", seed=0, in_features=784, width=512, depth=2, out=10)
    run, _ = implementations.get(name).prepare(arch.model, architectures.inputs(arch, 8, seed=1), None, "full")
    for _ in range(3):
        run()
    return run


ours, neighbour = prepared("explicit_mlp_compiled"), prepared("nt_jacobian_contraction")
per_position = [[] for _ in range(40)]
for _ in range(6):
    neighbour()
    for i in range(40):
        t0 = time.perf_counter()
        ours()
        per_position[i].append(time.perf_counter() - t0)
medians = [statistics.median(v) * 1e3 for v in per_position]
print("ms per call after the neighbour, by position:", " ".join(f"{m:.2f}" for m in medians))
print(f"first {medians[0]:.2f} ms, calls 2-10 {statistics.mean(medians[1:10]):.2f} ms, "
      f"calls 21-40 {statistics.mean(medians[20:]):.2f} ms; load average {os.getloadavg()[0]:.2f}")
