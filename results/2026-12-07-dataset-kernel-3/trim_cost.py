"""What handing freed heap back (malloc_trim after each block's recording) costs: a band's work (record a row and
a column block, contract them) with and without it, CPU seconds, alternating in one process, one thread.

    PYTHONPATH=. python results/2026-12-07-dataset-kernel-3/trim_cost.py --block 128 --repeats 4
"""

import argparse
import json
import os
import time

import psutil
import torch

from ntk_bench import implementations
from ntk_bench.bench.execution import tiles
from ntk_bench.bench.zoo import architectures
from ntk_bench.implementations.core import engine

p = argparse.ArgumentParser()
p.add_argument("--block", type=int, default=128)
p.add_argument("--repeats", type=int, default=4)
args = p.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
model, shape = architectures.tutorial_cnn()
model.eval()
xa = torch.randn(args.block, *shape, generator=torch.Generator().manual_seed(1))
xb = torch.randn(args.block, *shape, generator=torch.Generator().manual_seed(2))
plugin = implementations.get("structured")
ca = engine.validated(plugin, model, xa, None, "trace")
cb = engine.validated(plugin, model, xb, None, "trace")
proc = psutil.Process()
for r in range(args.repeats):
    out = {}
    for trim in (True, False) if r % 2 == 0 else (False, True):
        c = time.process_time()
        with engine.running(model):
            fa = plugin.factors(ca.net, ca.x1)
            if trim:
                tiles._release_freed_memory("cpu")
            fb = plugin.factors(cb.net, cb.x1)
            if trim:
                tiles._release_freed_memory("cpu")
            plugin.contract(fa, fb, "trace")
        out["trim" if trim else "no_trim"] = time.process_time() - c
        out[("trim" if trim else "no_trim") + "_rss_after"] = proc.memory_info().rss
        del fa, fb
    print(json.dumps({"block": args.block, **out, "load": os.getloadavg()}), flush=True)
