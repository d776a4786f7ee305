"""The cost model: what a model looks like to the plugins' estimates, and what each algorithm costs on it.

``cost_stats(model, x_single)`` reads, from one forward pass on one sample (with gradients enabled, so that
modules take the path the plugins' own forwards take), the parameter count P, the output width O, the FLOPs
of a forward pass [FP] (torch's FlopCounterMode; fused RNN ops counted from their shapes) in all and per module,
the activation size, and the numbers and operators of the forward's memory-bound work. Plugins turn these into
an :class:`Estimate` (FLOPs and peak bytes) for a block of N x M samples; blocking and ``auto`` decide from
those estimates. A plugin that needs more of the model than these numbers (``structured``'s layers and their
rules, ``explicit_mlp``'s Linear layers) reads it itself through :meth:`CostStats.view`, once per stats: the cost
model does not classify layers for any plugin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# The arithmetic of an estimate lives in estimate (which the interface itself may import); re-exported here.
from .estimate import Estimate, contraction_flops, jacobian_bytes, kernel_numel  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer's geometry as a plugin's estimate reads it (per sample; what each number means for a given
    ``kind`` is the describing plugin's, e.g. ``structured``'s rules).

    ``kind``: the layer's kind in that plugin's terms; ``s``: output positions; ``k``: inputs per position and
    group (the patch size; the vocabulary for an embedding); ``c``: outputs per position, all groups; ``bias``:
    it has a trainable bias; ``is_output``: its output is the model's own; ``groups``; ``p``: the trainable
    parameters it covers; ``flops``: one forward of the layer's module on one sample, where the estimate reruns
    the module.
    """

    kind: str
    s: int
    k: int
    c: int
    bias: bool
    is_output: bool = False
    groups: int = 1
    p: int = 0
    flops: int = 0


@dataclasses.dataclass(frozen=True)
class CostStats:
    """What the cost model read off a model on one sample.

    ``p``: trainable parameters; ``o``: outputs per sample; ``fp_flops``: one forward pass on one sample;
    ``activations``: numbers held by module outputs in that forward; ``itemsize``: bytes per number of the
    kernel; ``traffic``: numbers written by the forward's operators (the memory-bound work FLOPs miss:
    elementwise ops, norms, pooling, depthwise convs); ``ops``: those operators' count (each costs a dispatch,
    forward and backward, whatever its size); ``module_flops``: per module name (``named_modules``' names, "" for
    the model), FLOPs of one forward of that module on one sample, where the counter saw any. The model (weakly)
    and the sample are kept for :meth:`view`.
    """

    p: int
    o: int
    fp_flops: int
    activations: int
    itemsize: int
    traffic: int = 0
    ops: int = 0
    module_flops: Mapping[str, int] = dataclasses.field(default_factory=dict)
    sample: Any = dataclasses.field(default=None, compare=False, repr=False)
    _model: Any = dataclasses.field(default=None, compare=False, repr=False)
    _views: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def view(self, name: str, build: Callable[[Any, Any], Any]) -> Any:
        """A plugin's own reading of the model, ``build(model, x_single)``, computed once per stats under
        ``name`` (the model is None where it no longer exists, or the stats were unpickled)."""
        if name not in self._views:
            model = self._model() if self._model is not None else None
            self._views[name] = build(model, self.sample)
        return self._views[name]

    def __getstate__(self):
        return {**self.__dict__, "_model": None}  # (a weak reference does not pickle)


class _Traffic(TorchDispatchMode):
    """Counts the operators a forward runs and the numbers their outputs hold (views excluded: they move none)."""

    def __init__(self):
        super().__init__()
        self.elements, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.ops += 1
            self.elements += sum(v.numel() for v in torch.utils._pytree.tree_leaves(out) if isinstance(v, torch.Tensor))
        return out


_STATS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cost_stats(model: nn.Module, x_single: torch.Tensor) -> CostStats:
    """The model's stats for inputs shaped like ``x_single`` (one sample), cached per model and input shape."""
    from .module_walks import shape_keyed_cache

    key = (tuple(x_single.shape), x_single.dtype, x_single.device)
    return shape_keyed_cache(_STATS, model, key, lambda: _measure_stats(model, x_single))


def measure(model: nn.Module, x_single: torch.Tensor, within: Callable = contextlib.nullcontext) -> CostStats:
    """The model's stats with its forward run inside ``within()`` (a plugin's own rewrites of the forward, whose
    FLOPs and operators are what it will run); not cached (the plugin keeps them in its ``CostStats.view``)."""
    return _measure_stats(model, x_single, within)


def _measure_stats(model: nn.Module, x_single: torch.Tensor, within: Callable = contextlib.nullcontext) -> CostStats:
    from torch.utils.flop_counter import FlopCounterMode

    named = list(model.named_modules(remove_duplicate=True))
    activations, rnn_flops = [0], {}

    def hook(module, inputs, output):
        if isinstance(module, nn.RNNBase) and inputs and isinstance(inputs[0], torch.Tensor):
            rnn_flops[module] = _rnn_flops(module, inputs[0])
        if isinstance(output, torch.Tensor):
            activations[0] += output[0].numel()

    traffic = _Traffic()
    handles = [m.register_forward_hook(hook) for _, m in named]
    try:
        with torch.enable_grad(), FlopCounterMode(display=False) as counter, traffic, within():
            y = model(x_single)
    finally:
        for h in handles:
            h.remove()
    per_module = counter.get_flop_counts()

    def counted(name):
        return int(sum(per_module.get(type(model).__name__ + ("." + name if name else ""), {}).values()))

    # (FlopCounterMode has no formula for the fused RNN ops: their FLOPs from the shapes)
    names = {m: k for k, m in named}
    missed = sum(f for m, f in rnn_flops.items() if not counted(names[m]))
    module_flops = {k: counted(k) or rnn_flops.get(m, 0) for k, m in named}
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    o = 1 if y.dim() == 1 else y.shape[-1]
    return CostStats(p, o, int(counter.get_total_flops()) + missed, activations[0], y.element_size(),
                      traffic.elements, traffic.ops, {k: f for k, f in module_flops.items() if f},
                      x_single.detach().clone(), weakref.ref(model))  # (itemsize: the kernel's; x may hold ids)


def _rnn_flops(module: nn.RNNBase, x: torch.Tensor) -> int:
    """One forward of an RNN / LSTM / GRU on ``x``: per layer, direction and step the gates' two GEMMs
    (2·gates·H·(in + H)) and about ten elementwise operations per gate unit."""
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
    steps = x.shape[-2] if module.batch_first and x.dim() == 3 else x.shape[0]
    batch = x.shape[0 if module.batch_first else 1] if x.dim() == 3 else 1
    dirs, h = (2 if module.bidirectional else 1), module.hidden_size
    flops = 0
    for layer in range(module.num_layers):
        width = module.input_size if layer == 0 else h * dirs
        flops += dirs * steps * batch * (2 * gates * h * (width + h) + 10 * gates * h)
    return flops


