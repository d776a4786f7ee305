"""How steady this machine's own speed is: every 2 s, a fixed float32 GEMM (320 × 512 × 512, MKL), a pure-Python
loop and a 16 MB elementwise pass, each the mean of several calls, on one thread.

    python results/2026-12-08-small-vs-nt-epyc/speed_phases.py SECONDS
"""

import sys
import time

import torch

torch.set_num_threads(1)
a, w = torch.randn(320, 512), torch.randn(512, 512)
big = torch.randn(4_000_000)


def mean_ms(f, n):
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1e3


def py():
    x = 0
    for i in range(20000):
        x += i


end = time.time() + float(sys.argv[1])
while time.time() < end:
    print(time.strftime("%H:%M:%S"), "gemm %.3f ms" % mean_ms(lambda: a @ w, 20), "py %.3f ms" % mean_ms(py, 20),
          "stream %.3f ms" % mean_ms(lambda: big.mul(2.0), 10), flush=True)
    time.sleep(2)
