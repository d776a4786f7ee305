"""The per-call work of ``compute`` on small models, counted rather than timed: Python function calls (cProfile's
count over warm calls) and ATen operators dispatched (a counting dispatch mode; eager plugins only). The counts do
not depend on the machine's load, so they compare two versions of the code on a shared machine where timings of
calls this short do not hold up.

    python scripts/per_call_work.py mlp_tiny:explicit_mlp text_tiny:structured cnn_small:structured

Cases are ``scripts/small_vs_nt.py``'s; prints one JSON line per case and plugin.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


class _Count(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def count(case_id: str, impl: str, calls: int = 50) -> dict:
    """{python_calls, aten_ops} per warm ``compute`` call of ``impl`` on the case (aten_ops None for a compiled
    plugin: a dispatch mode would change what its compiled code runs)."""
    from small_vs_nt import CASES

    from ntk_bench import implementations
    from ntk_bench.bench.zoo import architectures

    _, arch_name, params, n = {c[0]: c for c in CASES}[case_id]
    arch = architectures.build(arch_name, seed=0, **params)
    x = architectures.inputs(arch, n, seed=1)
    plugin = implementations.get(impl)
    for _ in range(4):  # (plans, backend trials, compilation: the first calls)
        plugin.compute(arch.model, x)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        plugin.compute(arch.model, x)
    profile.disable()
    ops = None
    if "compiled" not in impl:
        with _Count() as counter:
            for _ in range(5):
                plugin.compute(arch.model, x)
        ops = counter.n / 5
    return {"case": case_id, "impl": impl, "python_calls": pstats.Stats(profile).total_calls / calls, "aten_ops": ops}


def main() -> None:
    torch.set_num_threads(1)
    for arg in sys.argv[1:]:
        case_id, impl = arg.split(":")
        print(json.dumps(count(case_id, impl)), flush=True)


if __name__ == "__main__":
    main()
