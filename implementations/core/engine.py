"""One NTK call, start to end, in one place: validation → dispatch → kernel → checks.

    compute(plugin, model, x1, x2, mode, memory_budget_bytes)
      1. validation   inputs (types, shapes, devices, dtypes, NaN/inf); the model's output form (N, O) or (N,);
                      refusal of ill-defined kernels (train-mode BatchNorm, Dropout, random or stateful forwards)
                      before any work; the plugin's ``supports``
      2. dispatch     ``plugin.dispatch``: under a memory budget, tiles (``tiling``); on a GPU, a captured
                      CUDA graph replayed (``cuda_graphs``); else the kernel itself (``auto`` picks a plugin here)
      3. kernel       ``plugin._kernel`` on detached inputs, with grad mode on (calls under ``torch.no_grad()``
                      and ``torch.inference_mode()`` work)
      4. checks       the kernel's shape, its finiteness (float32 overflow is an error, not an inf kernel), a
                      detached result in the inputs' dtype; the caller's model put back as found (``state``)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import sys
import threading
import weakref

import torch
from torch import nn

from . import base as _base
from . import unchanged
from .base import NTKPlugin, UnsupportedModelError
from .contractions import kernel_shape
from .input_errors import named_input_errors
from .locking import model_claimed
from .state import Snapshot, as_found, dense_gradients, preserved
from .unchanged import Verdicts, input_key
from .validation import (
    budget_bytes,
    output_spec,
    probe_forward,
    refuse_ill_defined_modules,
    refuse_scripted,
    share_probe,
    validate_inputs,
)
from .wrappers import unwrap


class NonFiniteKernelError(ValueError):
    """The kernel has inf or NaN entries although the inputs are finite (an overflow)."""


class _ColumnOutput(nn.Module):
    """A model returning (N,) seen as returning (N, 1)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).unsqueeze(1)


# The wrappers of the last few (N,)-output models, so that caches keyed by the model (its stats, CUDA graphs,
# auto's pick) see the same object on every call. Bounded: a wrapper holds its model.
_COLUMN_WRAPPERS: "collections.OrderedDict[int, tuple[weakref.ref, _ColumnOutput]]" = collections.OrderedDict()
_MAX_COLUMN_WRAPPERS = 8
_COLUMN_WRAPPERS_LOCK = threading.Lock()


def _as_matrix_output(model: nn.Module) -> nn.Module:
    with _COLUMN_WRAPPERS_LOCK:  # (threads on different models: one's eviction must not drop the other's entry)
        entry = _COLUMN_WRAPPERS.get(id(model))
        if entry is None or entry[0]() is not model:
            entry = (weakref.ref(model), _ColumnOutput(model))
            _COLUMN_WRAPPERS[id(model)] = entry
            while len(_COLUMN_WRAPPERS) > _MAX_COLUMN_WRAPPERS:
                _COLUMN_WRAPPERS.popitem(last=False)
        _COLUMN_WRAPPERS.move_to_end(id(model))
    share_probe(model, entry[1])
    return entry[1]


def _plain(x: torch.Tensor | None) -> torch.Tensor | None:
    """The input without its autograd history or ``requires_grad`` (so nothing accumulates into ``x.grad``), and
    outside inference mode (an inference tensor cannot be saved for backward)."""
    if x is None:
        return None
    return x.detach().clone() if x.is_inference() else x.detach()


@contextlib.contextmanager
def _integer_inputs_named(x1: torch.Tensor):
    """A model that fails on integer inputs gets an error saying that the inputs are integers."""
    try:
        yield
    except (RuntimeError, TypeError) as exc:
        if x1.is_floating_point():
            raise
        raise TypeError(f"x1 has dtype {x1.dtype} and the model's forward fails on it ({type(exc).__name__}: {exc}); "
                        "integer inputs are for models that take them (token ids for an Embedding): convert numbers "
                        "to floating point") from exc


def _all_finite(t: torch.Tensor) -> bool:
    # (a sum read as a number first: one operator; an inf or NaN sum, an overflow of the sum itself included, is
    # looked at entry by entry)
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


def compute(plugin: NTKPlugin, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None,
            mode: str = "full", memory_budget_bytes: int | None = None) -> torch.Tensor:
    """Θ(x1, x2) of ``model`` by ``plugin``: see the module docstring for the steps. Calls on one model from several
    threads take turns (``locking``): a call changes the model while it runs."""
    model = unwrap(model)  # torch.compile's and DataParallel's wrappers: the module they run, before anything else
    memory_budget_bytes = budget_bytes(memory_budget_bytes)
    with model_claimed(model):
        call = validated(plugin, model, x1, x2, mode, memory_budget_bytes)
        if call.snapshot is None:
            with running(model):
                out = plugin.dispatch(call.net, call.x1, call.x2, mode, memory_budget_bytes)
        else:  # (the model's state is the one its snapshot was taken in: ``state.as_found`` compares, restores less)
            assert call.state is not None  # (a snapshot is only taken with the state it was taken in)
            with torch.inference_mode(False), torch.enable_grad(), as_found(model, call.snapshot, call.state):
                out = plugin.dispatch(call.net, call.x1, call.x2, mode, memory_budget_bytes)
        return checked(plugin, out, call, mode, memory_budget_bytes)


@contextlib.contextmanager
def running(model: nn.Module):
    """Step 3's surroundings, for any code that runs a plugin's kernel (or part of it) on a validated call: the model
    claimed by this thread, grad mode on outside inference mode, sparse Embeddings' gradients dense, and the model
    put back as found afterwards."""
    with model_claimed(model), torch.inference_mode(False), torch.enable_grad(), preserved(model), \
            dense_gradients(model):
        yield


@dataclasses.dataclass(frozen=True)
class Call:
    """A validated call: the model as plugins see it (output (N, O)), the detached inputs, O, and the result dtype;
    ``state``: the model's ``unchanged.state`` as validated, and ``snapshot``: the ``state.Snapshot`` taken in that
    state (None where the state changed during validation)."""

    model: nn.Module
    net: nn.Module
    x1: torch.Tensor
    x2: torch.Tensor | None
    o: int
    dtype: torch.dtype
    state: list | None = None
    snapshot: Snapshot | None = None


def validated(plugin: NTKPlugin, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None, mode: str,
              memory_budget_bytes: int | None = None) -> Call:
    """Step 1, validation: raises a clear error for bad inputs, an ill-defined kernel or a declined model. The
    inputs are checked on every call; the model's checks once per plugin, input shapes and model state
    (``unchanged``): a call on an unchanged model reuses their verdict."""
    model = unwrap(model)  # (peers' prepare comes here directly)
    entry, now = _VERDICTS.lookup(model) if isinstance(model, nn.Module) else (None, None)
    snapshot = None if entry is None else entry.snapshot
    validate_inputs(model, x1, x2, mode, **({} if snapshot is None else {"trainable": snapshot.first_trainable}))
    budget_bytes(memory_budget_bytes)
    key = (plugin, *input_key(x1, x2))
    verdict = None if entry is None else entry.verdicts.get(key)
    if x1.is_inference() or (x2 is not None and x2.is_inference()):
        with torch.inference_mode(False):
            x1, x2 = _plain(x1), _plain(x2)
    else:
        x1, x2 = x1.detach(), (None if x2 is None else x2.detach())
    as_validated = True  # (whether the model is still in state ``now``)
    if verdict is None:  # (a model that changed gets a new generation here)
        verdict = _model_checks(plugin, model, x1)
        entry = _VERDICTS.put(model, now, key, verdict)
        as_validated = unchanged.same(now, unchanged.state(model))
    assert entry is not None  # (a cached verdict comes from an entry; a new one was just put in one)
    if as_validated and entry.snapshot is None:
        entry.snapshot = Snapshot(model)
    snapshot = entry.snapshot if as_validated else None
    spec, reason = verdict
    net = _as_matrix_output(model) if spec.vector else model
    if reason is not None:
        raise UnsupportedModelError(reason)
    return Call(model, net, x1, x2, spec.o, _result_dtype(model, x1), now, snapshot)


# Per model: the verdict of the model's checks (output form, the plugin's decline) while its state is unchanged.
_VERDICTS = Verdicts()


def model_generation(model: nn.Module) -> int | None:
    """The generation of ``model``'s state at its last validated call (``unchanged.Verdicts.generation``): caches
    of per-model work (``compiled``) key on it to start afresh when the model changed."""
    return _VERDICTS.generation(model)


def _model_checks(plugin: NTKPlugin, model: nn.Module, x1: torch.Tensor):
    """(the output's form, the plugin's reason to decline or None); an ill-defined model raises."""
    refuse_scripted(plugin.name, model)
    refuse_ill_defined_modules(model)
    with torch.inference_mode(False):
        with named_input_errors(model, x1, "x1"), _integer_inputs_named(x1):
            probe_forward(model, x1)  # random, batch-dependent or stateful forwards (it puts back what it touched)
            spec = output_spec(model, x1)
    net = _as_matrix_output(model) if spec.vector else model
    with preserved(model):
        reason = plugin.supports(net)
    return spec, reason


def dispatch(plugin: NTKPlugin, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None, mode: str,
             memory_budget_bytes: int | None) -> torch.Tensor:
    """The dispatch step: tiles under a budget, else a replayed CUDA graph where one applies, else the kernel."""
    if memory_budget_bytes is not None:
        from .tiling import tiled_kernel

        return tiled_kernel(plugin.with_budget(memory_budget_bytes), model, x1, x2, mode, memory_budget_bytes)
    from . import cuda_graphs

    out = cuda_graphs.CACHE.kernel(plugin, model, x1, x2, mode)
    return plugin._kernel(model, x1, x2, mode) if out is None else out


def _result_dtype(model: nn.Module, x1: torch.Tensor) -> torch.dtype:
    if x1.is_floating_point():
        return x1.dtype
    return next(p for p in model.parameters() if p.requires_grad).dtype


def checked(plugin, out, call: Call, mode: str, memory_budget_bytes: int | None = None) -> torch.Tensor:
    """Step 4: the kernel's shape and finiteness; detached, in the result's dtype and on the inputs' device."""
    x1, x2 = call.x1, call.x2
    expected = kernel_shape(x1.shape[0], (x1 if x2 is None else x2).shape[0], call.o, mode)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(f"{plugin.name} returned shape {got}, expected {expected}")
    out = out.detach()
    if not _all_finite(out):
        raise NonFiniteKernelError(
            f"{plugin.name}: the kernel has inf or NaN entries although the inputs are finite: the model's outputs "
            f"or gradients overflow in {out.dtype} for these inputs (try float64, or smaller inputs)")
    if memory_budget_bytes is not None:  # a blocked kernel may be kept in CPU memory
        return out.to(dtype=call.dtype)
    if out.dtype == call.dtype and out.device == x1.device:  # (the usual case: no conversion to dispatch)
        return out
    return out.to(device=x1.device, dtype=call.dtype)


# NTKPlugin.compute and .dispatch run through this module: installed into the interface, which does not import it.
_base._engine = sys.modules[__name__]
