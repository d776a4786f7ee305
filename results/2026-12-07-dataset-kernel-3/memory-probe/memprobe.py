"""RSS per phase of a CNN kernel_matrix call (scratch)."""
import ctypes
import json
import os
import sys
import tempfile
import threading
import time

import psutil
import torch

torch.set_num_threads(1)
import ntk_bench
from ntk_bench.bench.execution import tiles
from ntk_bench.bench.zoo import architectures
from ntk_bench.implementations.structured.plugin import Structured

N = int(sys.argv[1]); trim = "trim" in sys.argv
proc = psutil.Process()
libc = ctypes.CDLL("libc.so.6")
class Peak:
    def __init__(s): s.peak = proc.memory_info().rss; s.stop = threading.Event(); threading.Thread(target=s.run, daemon=True).start()
    def run(s):
        while not s.stop.wait(0.01): s.peak = max(s.peak, proc.memory_info().rss)
    def reset(s): s.peak = proc.memory_info().rss
P = Peak()
torch.manual_seed(0)
model, shape = architectures.tutorial_cnn(); model.eval()
x = torch.randn(N, *shape, generator=torch.Generator().manual_seed(N))
base = proc.memory_info().rss
log = []
def wrap(name, fn):
    def f(*a, **k):
        before = proc.memory_info().rss; P.reset()
        out = fn(*a, **k)
        after = proc.memory_info().rss
        if trim: libc.malloc_trim(0)
        log.append((name, round((before-base)/1e9,3), round((P.peak-base)/1e9,3), round((after-base)/1e9,3), round((proc.memory_info().rss-base)/1e9,3), tiles._CACHE.bytes/1e9))
        return out
    return f
Structured.factors = wrap("factors", Structured.factors)
Structured.contract = wrap("contract", Structured.contract)
Structured.factors_from_state = wrap("read", Structured.factors_from_state)
from ntk_bench.bench.execution import kernel_matrix as km

for nm in ("_pick", "_tile_edge", "_choose_onednn", "_predicted_s", "_tile_peak"):
    setattr(km, nm, wrap(nm, getattr(km, nm)))
budget = 2 << 30
with tempfile.TemporaryDirectory(dir="/work/notes/kres") as d:
    t0 = time.process_time(); P.reset(); gpeak = Peak()
    k = ntk_bench.kernel_matrix(model, x, mode="trace", out=os.path.join(d, "K.zarr"), memory_budget_bytes=budget, progress=False, verify=-1,
                                factors_disk_bytes=int(os.environ.get("FD", "0")))
    cpu = time.process_time() - t0
for row in log: print(row)
print(json.dumps({"N": N, "trim": trim, "tile": k.tile, "cpu_s": cpu, "peak_above_base_GB": (gpeak.peak-base)/1e9, "budget_GB": budget/1e9, "run": k.attrs["timings"]["runs"][-1], "tile_peak_est": None}))
