"""The cost model: what a model's layers look like, and what each algorithm costs on them.

``model_stats(model, x_single)`` reads, from one forward pass on one sample,
the parameter count P, the output width O, the FLOPs of a forward pass [FP]
(torch's FlopCounterMode), the activation size, and for every Linear/Conv2d
layer its positions S, inputs per position K and outputs C. Plugins turn
these into an :class:`Estimate` (FLOPs and peak bytes) for a block of N x M
samples; blocking and ``auto`` decide from those estimates.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Layer:
    kind: str  # "linear" | "conv2d" | "other"
    s: int  # output positions per sample
    k: int  # inputs per position (patch size)
    c: int  # outputs per position (channels)
    bias: bool
    is_output: bool = False  # a Linear whose output is the model's: its G is the identity


@dataclasses.dataclass(frozen=True)
class ModelStats:
    p: int  # trainable parameters
    o: int  # outputs per sample
    fp_flops: int  # one forward pass on one sample
    activations: int  # numbers held by module outputs in one sample's forward pass
    layers: tuple[Layer, ...]
    itemsize: int

    @property
    def widths(self) -> int:
        """Σ_l S_l·C_l: numbers per (sample, output) in the output gradients of all layers."""
        return sum(layer.s * layer.c for layer in self.layers)


@dataclasses.dataclass(frozen=True)
class Estimate:
    flops: float
    bytes: float


_STATS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_stats(model: nn.Module, x_single: torch.Tensor) -> ModelStats:
    """The model's stats for inputs shaped like ``x_single`` (one sample), cached per model and input shape."""
    from .modelinfo import shape_keyed_cache

    key = (tuple(x_single.shape), x_single.dtype, x_single.device)
    return shape_keyed_cache(_STATS, model, key, lambda: _measure_stats(model, x_single))


def _measure_stats(model: nn.Module, x_single: torch.Tensor) -> ModelStats:
    from torch.utils.flop_counter import FlopCounterMode

    layers, outputs, activations = [], [], [0]

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor):
            activations[0] += output[0].numel()
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            return
        if isinstance(module, nn.Conv2d):
            s = output.shape[-1] * output.shape[-2]
            k = module.in_channels // module.groups * math.prod(module.kernel_size)
            layers.append(Layer("conv2d", s, k, module.out_channels, module.bias is not None))
        elif isinstance(module, nn.Linear):
            s = output[0].numel() // module.out_features
            layers.append(Layer("linear", s, module.in_features, module.out_features, module.bias is not None))
        else:
            layers.append(Layer("other", 1, sum(p.numel() for p in own), 1, False))
        outputs.append(output)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            y = model(x_single)
    finally:
        for h in handles:
            h.remove()
    p = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = [dataclasses.replace(layer, is_output=True) if z is y and layer.kind == "linear" else layer
              for layer, z in zip(layers, outputs)]
    itemsize = y.element_size()  # the kernel's numbers (x_single may hold integer ids)
    return ModelStats(p, y.shape[-1], int(counter.get_total_flops()), activations[0], tuple(layers), itemsize)


def jacobian_bytes(stats: ModelStats, n: int, m: int) -> float:
    """Per-sample Jacobians of both sides, (N+M)·O·P numbers."""
    return (n + m) * stats.o * stats.p * stats.itemsize


def kernel_numel(n: int, m: int, o: int, mode: str) -> int:
    return n * m * {"full": o * o, "trace": 1, "diagonal": o}[mode]


def contraction_flops(stats: ModelStats, n: int, m: int, mode: str) -> float:
    """J1 J2ᵀ: 2·N·M·O²·P (full) or 2·N·M·O·P (trace, diagonal)."""
    return 2 * kernel_numel(n, m, stats.o, "full" if mode == "full" else "diagonal") * stats.p
