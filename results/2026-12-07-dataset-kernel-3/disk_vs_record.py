"""A block's factors: recording them against writing and reading them back (the factor store's format), CPU
seconds of this process, alternating in one process, one thread; new files each time (as a run writes them).

    PYTHONPATH=. python results/2026-12-07-dataset-kernel-3/disk_vs_record.py --block 64 --repeats 4 --dir DIR
"""

import argparse
import json
import os
import time

import torch

from ntk_bench import implementations
from ntk_bench.bench.execution.factor_store import FactorStore
from ntk_bench.bench.zoo import architectures
from ntk_bench.implementations.core import engine

p = argparse.ArgumentParser()
p.add_argument("--block", type=int, default=64)
p.add_argument("--repeats", type=int, default=4)
p.add_argument("--dir", required=True)
args = p.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
model, shape = architectures.tutorial_cnn()
model.eval()
x = torch.randn(args.block, *shape, generator=torch.Generator().manual_seed(1))
plugin = implementations.get("structured")
call = engine.validated(plugin, model, x, None, "trace")
store = FactorStore(args.dir, "k", 1 << 40)
rows = []
for r in range(args.repeats):
    c = time.process_time()
    with engine.running(model):
        f = plugin.factors(call.net, call.x1)
    rec = time.process_time() - c
    c = time.process_time()
    store.save("x1", r, plugin.factors_state(f), 0)
    save = time.process_time() - c
    del f
    c = time.process_time()
    g = plugin.factors_from_state(call.net, call.x1, store.load("x1", r))
    load = time.process_time() - c
    rows.append({"block": args.block, "bytes": g.nbytes(), "record_cpu_s": rec, "write_cpu_s": save,
                 "read_cpu_s": load, "load": os.getloadavg()})
    print(json.dumps(rows[-1]), flush=True)
    del g
store.remove_all()
