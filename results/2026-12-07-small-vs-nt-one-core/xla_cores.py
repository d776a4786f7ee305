"""neural-tangents' wall and CPU time a call, with its process held to one core (``NTK_BENCH_XLA_THREADS=1``, what
the comparison scripts and CPU-clock runs now do) and as before (XLA's default pool over both cores, torch at one
thread), each in a fresh process, for nt_structured_derivatives on three of the small models.

    PYTHONPATH=. python results/2026-12-07-small-vs-nt-one-core/xla_cores.py          # both, one after the other
    PYTHONPATH=. python results/2026-12-07-small-vs-nt-one-core/xla_cores.py held     # one side (a fresh process)
"""

import os
import subprocess
import sys
import time

CASES = [("mlp_tiny N=8", "mlp", {"in_features": 10, "width": 64, "depth": 2, "out": 3, "activation": "tanh"}, 8),
         ("mlp512 N=128", "mlp", {"in_features": 784, "width": 512, "depth": 2, "out": 10}, 128),
         ("cnn64 N=16", "cnn", {"channels": 64, "image": 16, "out": 10}, 16)]


def side(name: str) -> None:
    if name == "held":
        os.environ["NTK_BENCH_XLA_THREADS"] = "1"
    else:
        os.environ.pop("NTK_BENCH_XLA_THREADS", None)
    import torch

    from ntk_bench import implementations, reference
    from ntk_bench.bench.zoo import architectures

    torch.set_num_threads(1)
    for label, arch_name, params, n in CASES:
        arch = architectures.build(arch_name, seed=0, **params)
        x = architectures.inputs(arch, n, seed=1)
        run, _ = implementations.get("nt_structured_derivatives").prepare(arch.model, x, None, "full")
        run()
        one = time.perf_counter()
        run()
        calls = max(3, int(1.0 / max(time.perf_counter() - one, 1e-6)))
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            run()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        print(f"{name:8s} {label:13s} xla_threads {reference.xla_threads()}: wall {wall / calls * 1e3:8.3f} ms, "
              f"CPU {cpu / calls * 1e3:8.3f} ms a call (CPU/wall {cpu / wall:.2f}, {calls} calls); "
              f"load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        side(sys.argv[1])
    else:
        for name in ("held", "default"):
            subprocess.run([sys.executable, __file__, name], check=True)
