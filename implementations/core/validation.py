"""Checks before any work: the inputs, the model's output, and whether the model's NTK is well defined.

A kernel is refused, not computed, when the forward pass depends on the other samples of the batch
(BatchNorm using batch statistics), on randomness (Dropout and other random ops in train mode) or changes the
model's state (running statistics, spectral norm's power iteration in train mode): every plugin would compute
a different number, and none of them would be the model's NTK. Named modules are caught by type; a one-off
probe (two forwards of one sample under different random seeds, one of two samples, cached per model) catches
the rest.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import weakref

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from .base import MODES, UnsupportedModelError
from .module_walks import describe, has_trainable_parameters, module_names, shape_keyed_cache, submodules
from .tolerances import tolerance


class IllDefinedKernelError(ValueError):
    """The model's NTK is not well defined as it is (train-mode BatchNorm, Dropout, ...); the message says why."""


_FIND = object()


def validate_inputs(model: nn.Module, x1, x2, mode: str, trainable=_FIND) -> None:
    """Raise a clear ValueError/TypeError for inputs no plugin can take. ``trainable``: the model's first trainable
    parameter (None: it has none) where the caller knows it (``state.Snapshot.first_trainable``), else found here."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    p0 = trainable if trainable is not _FIND else next(
        (p for m in submodules(model) for p in m._parameters.values() if p is not None and p.requires_grad), None)
    if p0 is None:
        raise ValueError("model has no trainable parameters: its NTK is empty")
    if p0.device.type == "meta":
        raise ValueError("the model's parameters are on the meta device (shapes without values): materialise them "
                         "first, e.g. model.to_empty(device='cpu') then load_state_dict(...)")
    for label, x in (("x1", x1), ("x2", x2)):
        if x is None and label == "x2":
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(x).__name__}")
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{label} has dtype {x.dtype}; the NTK takes real floating-point or integer inputs")
        if x.dim() < 1 or (x.is_floating_point() and x.dim() < 2):
            raise ValueError(f"{label} must be batched, shape (N, ...); got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{label} is an empty batch (shape {tuple(x.shape)})")
        if x.numel() == 0:
            raise ValueError(f"{label} has samples without features (shape {tuple(x.shape)}): each sample needs at least "
                             "one number")
        if x.device != p0.device:
            raise ValueError(f"{label} is on {x.device} but the model's parameters are on {p0.device}")
        if x.is_floating_point():
            if x.dtype != p0.dtype:
                raise TypeError(
                    f"{label} has dtype {x.dtype} but the model's parameters are {p0.dtype}; "
                    f"convert one of them (e.g. model.to({x.dtype}))"
                )
            if not math.isfinite(x.sum().item()) and not bool(torch.isfinite(x).all()):  # (a sum is 2 ops, not 4;
                raise ValueError(f"{label} contains NaN or inf")                          # an overflow is rechecked)
    if x2 is not None:
        if x1.shape[1:] != x2.shape[1:]:
            raise ValueError(
                f"x1 and x2 have different per-sample shapes: {tuple(x1.shape[1:])} vs {tuple(x2.shape[1:])}"
            )
        if x1.dtype != x2.dtype:
            raise TypeError(f"x1 has dtype {x1.dtype} but x2 has {x2.dtype}")


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    o: int  # outputs per sample
    vector: bool  # the model returns (N,): one output, given to plugins as (N, 1)


_OUTPUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _kind(y) -> str:
    if isinstance(y, torch.Tensor):
        return f"a tensor of shape {tuple(y.shape)}"
    return f"a {type(y).__name__}"


def output_spec(model: nn.Module, x: torch.Tensor) -> OutputSpec:
    """O from a forward pass on one sample (cached per model, parameter shapes, flags and input shape).

    The model must map (N, ...) to (N, O) or (N,); a tuple, a dict or more dimensions is an error that says how
    to wrap the model.
    """
    def spec():
        with torch.enable_grad():  # (to see whether autograd connects the output to the parameters)
            y = model(x[:1])
        if isinstance(y, torch.Tensor) and y.dim() == 2 and y.shape[0] == 1:
            if y.shape[1] == 0:
                raise ValueError("the model has no outputs: it returns shape (1, 0) for a batch of 1, so its NTK is "
                                 "empty")
            _refuse_detached(y)
            return OutputSpec(y.shape[1], False)
        if isinstance(y, torch.Tensor) and y.dim() == 1 and y.shape[0] == 1:
            _refuse_detached(y)
            return OutputSpec(1, True)
        if isinstance(y, (tuple, list, dict)) or not isinstance(y, torch.Tensor):
            raise ValueError(
                f"the model returns {_kind(y)} for a batch of 1; the NTK needs one tensor of shape (N, O) or (N,). "
                "Wrap the model so that it returns that tensor, e.g. a module whose forward is "
                "`return model(x)[0]` (tuple) or `return model(x)['logits']` (dict)")
        raise ValueError(
            f"model output must have shape (N, O) or (N,); got {tuple(y.shape)} for a batch of 1. "
            "Flatten the outputs of a sample into one axis, e.g. nn.Sequential(model, nn.Flatten())")

    flags = tuple(m.training for m in submodules(model))
    return shape_keyed_cache(_OUTPUTS, model, (tuple(x.shape[1:]), x.dtype, x.device, flags), spec)


def _refuse_detached(y: torch.Tensor) -> None:
    """An output without autograd history although the model has trainable parameters: its forward runs under
    ``torch.no_grad()`` or detaches the result. Autograd would give a zero Jacobian while the function does depend
    on the parameters (and the reference, which reads the forward's operations, sees that dependence): no kernel
    is the NTK of both, so every plugin refuses it."""
    if not y.requires_grad:
        raise ValueError("the model's output has no autograd history (requires_grad=False) although it has trainable "
                         "parameters: its forward runs under torch.no_grad()/inference_mode, detaches the output, or "
                         "goes through an operation autograd cannot differentiate; compute the output with gradients "
                         "enabled")


def budget_bytes(memory_budget_bytes) -> int | None:
    """A memory budget as an ``int``: any integral number (``int``, ``numpy.int64``, ...) above zero; None stays None.
    A bool, a float, a string or a number ≤ 0 is a ValueError."""
    if memory_budget_bytes is None:
        return None
    if isinstance(memory_budget_bytes, numbers.Integral) and not isinstance(memory_budget_bytes, bool) \
            and int(memory_budget_bytes) > 0:
        return int(memory_budget_bytes)
    raise ValueError(f"memory_budget_bytes must be a positive whole number of bytes, got {memory_budget_bytes!r} "
                     f"({type(memory_budget_bytes).__name__})")


def refuse_scripted(plugin: str, model: nn.Module) -> None:
    """UnsupportedModelError naming the first TorchScript module (``torch.jit.script`` / ``trace``) in the model: its
    parameters cannot be substituted (``functional_call``), its calls cannot be hooked or recorded, and its
    ``_parameters`` is not a dict, so no plugin can be sure of its Jacobian."""
    scripted = next((m for m in submodules(model) if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:  # (a direct walk per call; the names only for the message)
        raise UnsupportedModelError(
            f"{plugin}: {describe(model, scripted)} is a TorchScript module; its parameters cannot be substituted "
            "nor its calls recorded. Use the Python module it was scripted from")


# Modules whose forward is random in train mode (p > 0), and those that use batch statistics.
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _static_problem(model: nn.Module) -> str | None:
    """The first module whose type says the kernel is ill defined, and why."""
    for name, m in model.named_modules():
        where = f"{name or 'the model itself'} ({type(m).__name__})"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not m.track_running_stats or m.running_mean is None:
                return f"{where} normalises with the statistics of the batch (track_running_stats=False)"
            if m.training:
                return f"{where} is in train mode: it normalises with the statistics of the batch"
        if not m.training:
            continue
        if isinstance(m, _DROPOUT) and m.p > 0:
            return f"{where} is in train mode: it drops units at random"
        if isinstance(m, nn.RReLU):
            return f"{where} is in train mode: its slopes are random"
        if isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            return f"{where} is in train mode with dropout={m.dropout}: it drops attention weights at random"
        if isinstance(m, nn.RNNBase) and m.dropout > 0 and m.num_layers > 1:
            return f"{where} is in train mode with dropout={m.dropout} between layers"
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            return f"{where} is in train mode: each call updates its running statistics"
    return None


def _buffers(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    return [(m, k, b) for m in dict.fromkeys(submodules(model)) for k, b in m._buffers.items() if b is not None]


def _probe(model: nn.Module, x: torch.Tensor) -> str | None:
    """Run the forward on one sample twice under different random seeds, and on two samples: a state change, a
    difference between the two runs, or a first row that depends on the second sample, is a reason to refuse."""
    buffers = _buffers(model)
    saved = [(m, k, b, b._version, b.detach().clone()) for m, k, b in buffers]
    one = x[:1]
    two = torch.cat([x[:2], x[:1]])[:2] if x.shape[0] >= 2 else torch.cat([x[:1], x[:1]])
    calls: dict[int, int] = {}
    try:
        with torch.no_grad():
            runs = []
            for seed in (12345, 54321):
                with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                    torch.manual_seed(seed)
                    if runs:
                        runs.append(model(one))
                        continue
                    counter = register_module_forward_pre_hook(
                        lambda m, args: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
                    try:
                        runs.append(model(one))
                    finally:
                        counter.remove()
            changed = [(m, k) for m, k, b, version, _ in saved if m._buffers.get(k) is not b or b._version != version]
            if changed:
                m, k = changed[0]
                return f"{describe(model, m)} changes its buffer {k!r} in the forward pass (train mode)"
            batch = model(two)
    finally:
        for m, k, b, version, copy in saved:
            if m._buffers.get(k) is not b:
                m._buffers[k] = b
            if b._version != version:
                with torch.no_grad():
                    b.copy_(copy)
    _CALLS[model] = [m for m in dict.fromkeys(submodules(model)) if calls.get(id(m), 0) > 1]
    a, b = runs
    if not isinstance(a, torch.Tensor):
        return None  # output_spec reports the output's form
    scale = float(a.detach().abs().max()) if a.numel() else 0.0
    rtol = tolerance(a.dtype, "repeat")
    atol = rtol * max(scale, 1e-30)
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        return "its forward pass is random: two runs on the same sample differ"
    if isinstance(batch, torch.Tensor) and batch.shape[:1] == (2,) and not torch.allclose(batch[:1], a, rtol=rtol,
                                                                                      atol=atol):
        return "a sample's output depends on the other samples of the batch"
    return None


_PROBED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CALLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> modules its forward calls twice or more


def called_more_than_once(model: nn.Module) -> list[str]:
    """Modules with parameters of their own that the model's forward calls more than once (their parameters add up
    their uses: a method that reads one input and one output per module cannot take them), as seen by the probe of
    the last call (``check_well_defined``), named."""
    modules = _CALLS.get(model, [])
    return [describe(model, m) for m in modules if any(p is not None and p.requires_grad
                                                        for p in m._parameters.values())]


def _refuse(problem: str | None) -> None:
    if problem is not None:
        raise IllDefinedKernelError(
            f"the NTK of this model is not well defined as it is: {problem}. Call model.eval() (and use running "
            "statistics) before computing its NTK")


def refuse_ill_defined_modules(model: nn.Module) -> None:
    """Raise :class:`IllDefinedKernelError` for a module whose type says the kernel is ill defined (a train-mode
    BatchNorm, Dropout, ...): before any forward pass."""
    _refuse(_static_problem(model))


def probe_forward(model: nn.Module, x: torch.Tensor) -> None:
    """Raise :class:`IllDefinedKernelError` when the forward pass is random, batch-dependent or changes the model's
    buffers. Runs once per model, train/eval flags, parameter shapes and input shape; leaves the buffers as found."""
    flags = tuple(m.training for m in submodules(model))
    _refuse(shape_keyed_cache(_PROBED, model, (tuple(x.shape[1:]), x.dtype, x.device, flags),
                              lambda: _probe(model, x)))


def share_probe(model: nn.Module, wrapper: nn.Module) -> None:
    """What the probe found about ``model`` holds for a wrapper that only reshapes its output."""
    if model in _CALLS:
        _CALLS[wrapper] = _CALLS[model]


def check_well_defined(model: nn.Module, x: torch.Tensor) -> None:
    """Both checks: the modules' types, then the probe."""
    refuse_ill_defined_modules(model)
    probe_forward(model, x)


__all__ = ["IllDefinedKernelError", "OutputSpec", "budget_bytes", "called_more_than_once", "check_well_defined",
           "has_trainable_parameters", "module_names", "output_spec", "probe_forward", "refuse_ill_defined_modules",
           "refuse_scripted", "share_probe", "validate_inputs"]
