"""Auto: pick the implementation for (model, N, M, O, mode, device) from the cost model.

Every other built-in plugin that supports the model gives a cost-model
estimate (FLOPs and peak bytes, from the layer shapes, P and [FP] measured by
FlopCounterMode); the predicted time is ``overhead_s + flops · s_per_flop``
with constants per plugin and device type fitted to measured runs
(``auto_calibration.json``, written by ``ntkbench calibrate``). A plugin whose
peak does not fit the memory budget is costed as blocked: its tiles' times
add up. The cheapest prediction wins; ``last_choice`` says which and why.
Cost: one forward pass on one sample to read the model, then the pick's own.
"""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import torch

from .base import NTKPlugin, shape_keyed_cache
from .costs import model_stats

CALIBRATION_FILE = Path(__file__).with_name("auto_calibration.json")
# Used for a plugin/device without fitted constants: 1 ms per call, 10 GFLOP/s (CPU) or 5 TFLOP/s (CUDA).
DEFAULT_CONSTANTS = {"cpu": {"overhead_s": 1e-3, "s_per_flop": 1e-10}, "cuda": {"overhead_s": 1e-3, "s_per_flop": 2e-13}}
CANDIDATES = ("explicit_mlp", "structured", "jacobian_contraction", "backpack_sqrtggn", "backpack_batchgrad",
              "ntk_vector_products", "autograd_loop")


def load_calibration(path: Path = CALIBRATION_FILE) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def default_memory_budget(device: torch.device) -> int:
    """80% of the free device memory, the allocator's cache included (CUDA), or half the available RAM (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks PyTorch's caching allocator holds but no tensor uses are free to this process too: counting
        # them out made auto block a 21 GB kernel after a 21 GB case on an 80 GB card (9.5 s instead of 0.13 s).
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(0.8 * (free + cached))
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"] // 2
    except (OSError, KeyError):
        return 8 << 30


class Auto(NTKPlugin):
    name = "auto"

    def __init__(self, calibration: dict | None = None):
        self._calibration = calibration
        self._choices: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.last_choice: tuple[str, str] | None = None

    @property
    def calibration(self) -> dict:
        if self._calibration is None:
            self._calibration = load_calibration()
        return self._calibration

    def supports(self, model):
        if self._candidates(model):
            return None
        return "auto: no plugin supports this model"

    @staticmethod
    def _candidates(model):
        from ntk_bench import implementations

        return [implementations.get(n) for n in CANDIDATES if implementations.get(n).supports(model) is None]

    def predict(self, plugin, stats, n, m, mode, symmetric, device_type, budget) -> tuple[float, int]:
        """(predicted seconds, tile edge) for ``plugin`` on an N x M kernel under ``budget`` bytes."""
        from .blocking import tile_size

        c = self.calibration.get(device_type, {}).get(plugin.name, DEFAULT_CONSTANTS[device_type])
        b = tile_size(plugin.with_budget(budget), stats, n, m, mode, budget, symmetric)
        if b >= max(n, m):
            est = plugin.estimate(stats, n, m, mode, symmetric)
            return c["overhead_s"] + est.flops * c["s_per_flop"], b
        tiles = math.ceil(n / b) * math.ceil(m / b)
        if symmetric:
            tiles = (tiles + math.ceil(n / b)) // 2
        est = plugin.estimate(stats, min(b, n), min(b, m), mode, False)
        return tiles * (c["overhead_s"] + est.flops * c["s_per_flop"]), b

    def choose(self, model, x1, x2=None, mode="full", memory_budget_bytes=None):
        """(the chosen plugin, why, the budget to compute it under or None), from the cost model.

        Cached per model, input shapes, dtype, device, mode and budget: the weights do not change the pick.
        """
        key = (tuple(x1.shape), None if x2 is None else tuple(x2.shape), x1.dtype, x1.device, mode, memory_budget_bytes)
        return shape_keyed_cache(self._choices, model, key,
                                 lambda: self._choose(model, x1, x2, mode, memory_budget_bytes))

    def _choose(self, model, x1, x2, mode, memory_budget_bytes):
        stats = model_stats(model, x1[:1])
        n, m = x1.shape[0], (x1 if x2 is None else x2).shape[0]
        device_type = "cuda" if x1.device.type == "cuda" else "cpu"
        budget = memory_budget_bytes or default_memory_budget(x1.device)
        costs = []
        for plugin in self._candidates(model):
            try:
                seconds, tile = self.predict(plugin, stats, n, m, mode, x2 is None, device_type, budget)
            except MemoryError:
                continue
            costs.append((seconds, plugin, tile))
        if not costs:
            raise MemoryError(f"auto: no plugin fits a memory budget of {budget:.3g} bytes")
        costs.sort(key=lambda c: c[0])
        seconds, best, tile = costs[0]
        runner_up = f"; next {costs[1][1].name} {costs[1][0]:.3g} s" if len(costs) > 1 else ""
        blocked = tile < max(n, m)
        why = (f"{best.name}: predicted {seconds:.3g} s{f', blocked in {tile}x{tile} tiles' if blocked else ''}"
               f"{runner_up} (P={stats.p}, O={stats.o}, [FP]={stats.fp_flops})")
        return best, why, (budget if blocked else memory_budget_bytes)

    def compute(self, model, x1, x2=None, mode="full", memory_budget_bytes=None):
        from .base import validate_inputs

        try:
            plugin, why, budget = self.choose(model, x1, x2, mode, memory_budget_bytes)
        except Exception:  # bad input: say what is wrong with it (the pick's compute validates the rest)
            validate_inputs(model, x1, x2, mode)
            raise
        self.last_choice = (plugin.name, why)
        return plugin.compute(model, x1, x2, mode, memory_budget_bytes=budget)


plugin = Auto()
