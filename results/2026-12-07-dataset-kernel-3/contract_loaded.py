"""Contracting recorded factors against contracting read-back ones (CPU seconds, alternating, one process).

    PYTHONPATH=. python results/2026-12-07-dataset-kernel-3/contract_loaded.py --block 64 --dir DIR
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
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--dir", required=True)
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
with engine.running(model):
    fa = plugin.factors(ca.net, ca.x1)
    fb = plugin.factors(cb.net, cb.x1)
store = FactorStore(args.dir, "k", 1 << 40)
store.save("x2", 0, plugin.factors_state(fb), 0)
gb = plugin.factors_from_state(cb.net, cb.x1, store.load("x2", 0))
for r in range(args.repeats):
    out = {}
    for name, other in (("recorded", fb), ("read_back", gb)) if r % 2 == 0 else (("read_back", gb), ("recorded", fb)):
        c = time.process_time()
        with engine.running(model):
            k = plugin.contract(fa, other, "trace")
        out[name] = time.process_time() - c
        out[name + "_sum"] = float(k.double().sum())
    print(json.dumps({"block": args.block, **out, "load": os.getloadavg()}), flush=True)
store.remove_all()
