"""A/B in one process: symmetric Grams in k row blocks on the CPU (new) against the old rule (halves from 8192
rows), alternating rounds (paired.time_rounds, 9 rounds of 50 ms blocks after their warm-up), one thread.

    NEW=512,128 OLD=8192,1000000000 FLAG=0 PYTHONPATH=. \\
        python results/2026-12-07-small-vs-nt-finalists/ab_symmetric_blocks.py mlp784_N64 mlp784_N128

NEW/OLD: (SYMMETRIC_SPLIT_MIN_ROWS_CPU, SYMMETRIC_BLOCK_MIN_ROWS) of each side; FLAG: 0 MKL's GEMMs, 1 oneDNN's,
unset the plugin's own first-call trial (which may pick differently for the two sides).
"""

import os
import statistics
import sys

import torch

from ntk_bench import implementations
from ntk_bench.bench.execution.worker import _keep_freed_memory
from ntk_bench.bench.measurement import paired
from ntk_bench.bench.zoo import architectures
from ntk_bench.implementations.core import contractions, onednn

torch.set_num_threads(1)
_keep_freed_memory()
SIDES = {side: tuple(int(v) for v in os.environ[side].split(",")) for side in ("NEW", "OLD")}
FLAG = {"1": True, "0": False}.get(os.environ.get("FLAG", ""))
MLP = {"in_features": 784, "width": 512, "depth": 2, "out": 10}
CASES = {**{f"mlp784_N{n}": ("mlp", MLP, n, "explicit_mlp") for n in (8, 32, 64, 128)},
         **{f"tutorial_cnn_N{n}": ("tutorial_cnn", {}, n, "structured") for n in (4, 16)},
         "cnn8_N8": ("cnn", {"channels": 8, "image": 16, "out": 10}, 8, "structured")}


def side_call(arch_name, params, n, impl, rule):
    arch = architectures.build(arch_name, seed=0, **params)
    x = architectures.inputs(arch, n, seed=1)
    plugin = implementations.get(impl)

    def call():
        contractions.SYMMETRIC_SPLIT_MIN_ROWS_CPU, contractions.SYMMETRIC_BLOCK_MIN_ROWS = rule
        with onednn.fixed_choice(FLAG):
            return plugin.compute(arch.model, x)

    return call


for cid in sys.argv[1:]:
    calls = {side.lower(): side_call(*CASES[cid], rule) for side, rule in SIDES.items()}
    new, old = calls["new"](), calls["old"]()
    print(cid, "relative difference new/old", float((new - old).norm() / old.norm()))
    times, _ = paired.time_rounds(calls, 0.0, min_rounds=9, max_rounds=9, block_s=0.05)
    ratios = [a / b for a, b in zip(times["new"], times["old"])]
    print(f"{cid}: new {statistics.median(times['new']) * 1e3:.3f} ms, old {statistics.median(times['old']) * 1e3:.3f}"
          f" ms, new/old {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
