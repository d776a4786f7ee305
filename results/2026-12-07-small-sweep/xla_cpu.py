"""Neural-tangents' CPU time against its wall time, with XLA at one thread ("one") and at its default ("default"):
nt_structured_derivatives on the sweep's 64-channel CNN at N = 16, torch at one thread, 20 warm calls.

    PYTHONPATH=. python results/2026-12-07-small-sweep/xla_cpu.py one
    PYTHONPATH=. python results/2026-12-07-small-sweep/xla_cpu.py default
"""

import os
import sys
import time

if sys.argv[1] == "one":  # (before JAX starts: XLA reads its flags once)
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

import torch  # noqa: E402

from ntk_bench import implementations  # noqa: E402
from ntk_bench.bench.zoo import architectures  # noqa: E402

torch.set_num_threads(1)
arch = architectures.build("cnn", seed=0, channels=64, image=16, out=10)
x = architectures.inputs(arch, 16, seed=1)
run, _ = implementations.get("nt_structured_derivatives").prepare(arch.model, x, None, "full")
run()
run()
c0, w0 = time.process_time(), time.perf_counter()
for _ in range(20):
    run()
c, w = time.process_time() - c0, time.perf_counter() - w0
print(f"{sys.argv[1]}: wall {w / 20 * 1e3:.1f} ms/call, CPU {c / 20 * 1e3:.1f} ms/call, CPU/wall {c / w:.2f}; load "
      f"{os.getloadavg()[0]:.2f}")
