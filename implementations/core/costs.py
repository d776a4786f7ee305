"""The cost model: what a model's layers look like, and what each algorithm costs on them.

``model_stats(model, x_single)`` reads, from one forward pass on one sample (with gradients enabled, so that
modules take the path the plugins' own forwards take), the parameter count P, the output width O, the FLOPs
of a forward pass [FP] (torch's FlopCounterMode), the activation size, and one :class:`Layer` per call of a
module with trainable parameters, classified as ``structured``'s rules see it: "linear" (over any leading
dimensions: S positions, K inputs, C outputs), "conv" (ConvNd: S output positions, K = C_in/groups · kernel
inputs per position and group, C outputs, ``groups``), "embedding" (S ids, K = the vocabulary, C = the
embedding width), "norm" (eval BatchNorm, LayerNorm, GroupNorm, RMSNorm: S positions, C scaled channels) and
"generic" (any other module with parameters, and parameters of modules that are not called, counted at the
nearest called module above them: P of its parameters, ``flops`` of one forward of that module), "tap" (such
parameters when each is read only by single operations with one output: S = their outputs' numbers), and
"linear" again for those read only as ``F.linear``'s weight and bias (MultiheadAttention's projections).
Plugins turn these into an :class:`Estimate` (FLOPs and peak bytes) for a block of N x M samples; blocking
and ``auto`` decide from those estimates.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# The arithmetic of an estimate lives in estimate (which the interface itself may import); re-exported here.
from .estimate import Estimate, contraction_flops, jacobian_bytes, kernel_numel  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Layer:
    kind: str  # "linear" | "conv" | "embedding" | "norm" | "generic" | "tap"
    s: int  # output positions per sample
    k: int  # inputs per position and group (patch size; the vocabulary for an embedding)
    c: int  # outputs per position, all groups (channels)
    bias: bool
    is_output: bool = False  # a Linear whose output is the model's: its G is the identity
    groups: int = 1
    p: int = 0  # trainable parameters of this layer (for "generic": those the module's vjp covers)
    flops: int = 0  # "generic": one forward of the module on one sample


@dataclasses.dataclass(frozen=True)
class ModelStats:
    p: int  # trainable parameters
    o: int  # outputs per sample
    fp_flops: int  # one forward pass on one sample
    activations: int  # numbers held by module outputs in one sample's forward pass
    layers: tuple[Layer, ...]
    itemsize: int
    # Memory-bound work FLOPs miss: numbers written by the forward's operators (elementwise ops, norms, pooling,
    # depthwise convs move far more numbers than they do FLOPs; FlopCounterMode counts none for most of them), and
    # the number of those operators (each costs a dispatch, forward and backward, whatever its size).
    traffic: int = 0
    ops: int = 0

    @property
    def widths(self) -> int:
        """Σ_l S_l·C_l: numbers per (sample, output) in the output gradients of all layers."""
        return sum(layer.s * layer.c for layer in self.layers if layer.kind not in ("generic", "tap"))


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


def model_stats(model: nn.Module, x_single: torch.Tensor) -> ModelStats:
    """The model's stats for inputs shaped like ``x_single`` (one sample), cached per model and input shape."""
    from .modelinfo import shape_keyed_cache

    key = (tuple(x_single.shape), x_single.dtype, x_single.device)
    return shape_keyed_cache(_STATS, model, key, lambda: _measure_stats(model, x_single))


def _layer_record(module, kind, inputs, output, own):
    """The Layer of one call of a module with a rule (None where the call is not in the layer's own layout)."""
    bias = any(k == "bias" for k, _ in own)
    p = sum(q.numel() for _, q in own)
    if not isinstance(output, torch.Tensor) or not inputs or not isinstance(inputs[0], torch.Tensor):
        return None
    if kind == "conv":
        d = len(module.kernel_size)
        s = math.prod(output.shape[-d:])
        k = module.in_channels // module.groups * math.prod(module.kernel_size)
        return Layer("conv", s, k, module.out_channels, bias, groups=module.groups, p=p)
    if kind == "linear":
        return Layer("linear", output[0].numel() // module.out_features, module.in_features, module.out_features,
                     bias, p=p)
    if kind == "embedding":
        return Layer("embedding", inputs[0][0].numel(), module.num_embeddings, module.embedding_dim, False, p=p)
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        c = output.shape[1]
    else:
        c = math.prod(module.normalized_shape)
    return Layer("norm", output[0].numel() // c, 1, c, bias, p=p)


def _measure_stats(model: nn.Module, x_single: torch.Tensor) -> ModelStats:
    from torch.utils.flop_counter import FlopCounterMode

    from ..structured_rules import rule_kind

    named = list(model.named_modules(remove_duplicate=True))
    names = {m: k for k, m in named}
    parent = {}
    for _, m in named:
        for child in m._modules.values():
            if child is not None and child not in parent:
                parent[child] = m
    records, outputs, activations, called, rnn_flops = [], [], [0], set(), {}

    def hook(module, inputs, output):
        called.add(module)
        if isinstance(module, nn.RNNBase) and inputs and isinstance(inputs[0], torch.Tensor):
            rnn_flops[module] = _rnn_flops(module, inputs[0])
        if isinstance(output, torch.Tensor):
            activations[0] += output[0].numel()
        own = [(k, q) for k, q in module._parameters.items() if q is not None and q.requires_grad]
        if not own:
            return
        kind, _ = rule_kind(module)
        layer = _layer_record(module, kind, inputs, output, own) if kind else None
        records.append((module, layer))
        outputs.append(output)

    from ..structured_plan import _is_in_place, _ParamOps, linear_ops
    from ..structured_rules import _functional_names

    ops = _ParamOps({id(q) for q in model.parameters() if q.requires_grad})
    traffic = _Traffic()
    handles = [m.register_forward_hook(hook) for _, m in named]
    try:  # (MultiheadAttention as structured records it: its projections as F.linear calls)
        with torch.enable_grad(), _functional_names(), FlopCounterMode(display=False) as counter, ops, traffic:
            y = model(x_single)
    finally:
        for h in handles:
            h.remove()
    per_module = counter.get_flop_counts()

    def counted(m):
        return int(sum(per_module.get(type(model).__name__ + ("." + names[m] if names.get(m) else ""), {}).values()))

    # (FlopCounterMode has no formula for the fused RNN ops: their FLOPs from the shapes)
    missed = sum(f for m, f in rnn_flops.items() if not counted(m))
    total = int(counter.get_total_flops()) + missed

    def module_flops(m):
        return counted(m) or rnn_flops.get(m, 0) or total

    layers, generic = [], {}
    for (module, layer), z in zip(records, outputs):
        if layer is not None:
            layers.append(dataclasses.replace(layer, is_output=True) if z is y and layer.kind == "linear" else layer)
        else:
            generic.setdefault(module, 0)
    ruled = {m for m, layer in records if layer is not None}
    for m in names:  # parameters of modules without a rule, or not called: the nearest called module above
        own = sum(q.numel() for q in m._parameters.values() if q is not None and q.requires_grad)
        if own and m not in ruled:
            host = m
            while host not in called and host in parent:
                host = parent[host]
            generic[host] = generic.get(host, 0) + own
    by_id = {id(q): q for q in model.parameters()}
    for m, p in generic.items():
        if not p:
            continue
        pids = {id(q) for k in names if _hosted(k, m, parent, called) for q in k._parameters.values()
                if q is not None and q.requires_grad}
        for w, (b, idx) in linear_ops(ops.ops, pids).items():  # structured's linear ops
            weight = by_id[w]
            own = weight.numel() + (by_id[b].numel() if b is not None else 0)
            for i in idx:
                layers.append(Layer("linear", math.prod(ops.ops[i][2][0][0]) // weight.shape[0], weight.shape[1],
                                    weight.shape[0], b is not None, p=own))
            pids -= {w, b}
            p -= own
        if not p:
            continue
        mine = [op for op in ops.ops if set(op[1]) & pids]
        if mine and all(set(op[1]) <= pids and not _is_in_place(op[0]) and len(op[2]) == 1 and op[2][0] is not None
                        and op[2][0][1] for op in mine):  # read only by single ops: structured's taps
            layers.append(Layer("tap", sum(math.prod(op[2][0][0]) for op in mine), p, 1, False, p=p))
        else:
            layers.append(Layer("generic", 1, p, 1, False, p=p, flops=max(module_flops(m), 2 * p)))
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    o = 1 if y.dim() == 1 else y.shape[-1]
    return ModelStats(p, o, total, activations[0], tuple(layers), y.element_size(), traffic.elements, traffic.ops)  # the kernel's numbers (x_single may hold integer ids)


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


def _hosted(module, host, parent, called) -> bool:
    """Whether ``module``'s own parameters are counted at ``host`` (itself if called, else the nearest called
    module above it)."""
    while module not in called and module in parent:
        module = parent[module]
    return module is host
