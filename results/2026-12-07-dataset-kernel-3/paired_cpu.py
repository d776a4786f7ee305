"""This code's kernel_matrix against the same with part 2's behaviour (no factors on disk, no heap trimming, the
cap not counting the process's other memory), alternating in one process, one thread: CPU seconds and peak RSS
above the call's start.

    PYTHONPATH=. python results/2026-12-07-dataset-kernel-3/paired_cpu.py --N 512 --budget-gib 2 --repeats 2
"""

import argparse
import json
import os
import tempfile
import threading
import time

import psutil
import torch

import ntk_bench
from ntk_bench.bench.execution import tiles
from ntk_bench.bench.zoo import architectures

p = argparse.ArgumentParser()
p.add_argument("--N", type=int, default=512)
p.add_argument("--budget-gib", type=float, default=2.0)
p.add_argument("--repeats", type=int, default=2)
args = p.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
model, shape = architectures.tutorial_cnn()
model.eval()
x = torch.randn(args.N, *shape, generator=torch.Generator().manual_seed(args.N))
proc = psutil.Process()
real_trim, real_overhead = tiles._release_freed_memory, tiles._overhead


def call(variant):
    if variant == "part2":
        tiles._release_freed_memory, tiles._overhead = (lambda device: None), (lambda spec, fa: 0)
    else:
        tiles._release_freed_memory, tiles._overhead = real_trim, real_overhead
    start, peak, stop = proc.memory_info().rss, [0], threading.Event()

    def watch():
        while not stop.wait(0.02):
            peak[0] = max(peak[0], proc.memory_info().rss)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    with tempfile.TemporaryDirectory(dir="/work/notes/kres") as d:
        c, w = time.process_time(), time.perf_counter()
        k = ntk_bench.kernel_matrix(model, x, mode="trace", out=os.path.join(d, "K.zarr"), progress=False, verify=-1,
                                    memory_budget_bytes=int(args.budget_gib * (1 << 30)), impl="structured",
                                    factors_disk_bytes=0 if variant == "part2" else None)
        cpu, wall = time.process_time() - c, time.perf_counter() - w
    stop.set()
    t.join()
    run = k.attrs["timings"]["runs"][-1]
    return {"variant": variant, "N": args.N, "tile": k.tile, "cpu_s": cpu, "wall_s": wall,
            "peak_above_start_bytes": max(peak[0], proc.memory_info().rss) - start,
            "budget_bytes": int(args.budget_gib * (1 << 30)), "load": os.getloadavg(),
            **{k_: v for k_, v in run.items() if k_.endswith("cpu_s") or k_.startswith("blocks")}}


for r in range(args.repeats):
    for variant in ("now", "part2") if r % 2 == 0 else ("part2", "now"):
        print(json.dumps(call(variant)), flush=True)
