"""Compiled kernels: a plugin's kernel run through ``torch.compile`` (Inductor), with eager as the fallback.

When it wins: small calls made many times. A small model's kernel in eager mode is hundreds of torch operators,
each paying Python and dispatcher overhead larger than its arithmetic; Inductor fuses the elementwise work into
a few generated C++ (or Triton) kernels around the GEMMs, and one compiled call costs one guard check and one
wrapper call. When the arithmetic dominates (wide layers, large batches), compiling gains little: the GEMMs are
the same library calls either way (a plugin that chooses between oneDNN's GEMM and MKL's keeps its choice in the
compiled kernel: ``onednn.linear``).

What it costs: seconds of compilation on the first call for a model, its input shapes, dtype and mode (more for
transformers: tens of seconds), one more eager kernel on that first call (the compiled kernel is checked against
it), and memory for the generated code. Each compiled kernel is kept per model object (weakly: it goes with the
model) and key; torch's guards recompile it when a parameter is replaced or a module's flags change, and the
cache key below gives such a model a fresh entry, checked again on its first call.

A plugin takes part by offering ``pure_kernel(model, x1, x2, mode)`` (the inputs of the first call, for whatever
plan the plugin makes per shapes; the function must not keep them): a function ``(model, x1, x2) -> kernel``
(the model an argument, not kept in a closure: the cache is weak in the model) that
``torch.compile(fullgraph=True)`` can trace (no Python-side caches or side effects, no host syncs; parameters read
from the model, so in-place updates are seen), and optionally ``compile_context(model, x1, x2, mode)``: switches
set around the compiled call (read while tracing, or by an operator when it runs; they must hold when it runs).
Without ``pure_kernel`` the plugin's ``_kernel`` itself is tried. Whatever fails (a graph break, a compile error,
a compiled kernel that differs from the eager one by more than the dtype's tolerance) falls back to the eager
kernel for that key, and the reason is kept (``info``).

Which to use: compilation is opt-in (the ``*_compiled`` variants, ``ntk(..., compile=True)``), not the default,
because its first call costs seconds to a minute while the eager first call costs milliseconds; it pays off
from about (compile time) / (time saved per call) calls on one model and shapes, and only where dispatch
overhead is a large part of the call (results/2026-12-07-small-vs-nt has the measurements).

:class:`CompiledPlugin` wraps a plugin as ``<name>_compiled``: the same supports, estimate and validation,
with the kernel step compiled (the built-in variants: ``plugins/compiled.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
import types
import weakref
from collections.abc import Callable

import torch
from torch import nn

from . import unchanged
from .base import NTKPlugin
from .tolerances import tolerance


@dataclasses.dataclass
class Entry:
    """One compiled kernel: its callable, whether its first call was checked, its compile time, why it failed."""

    fn: Callable[..., torch.Tensor]
    checked: bool = False
    compile_s: float | None = None
    failed: str | None = None


@dataclasses.dataclass(frozen=True)
class Info:
    """How a call went: ``compiled`` (the compiled kernel ran), the compile time of this key (None when this
    call did not compile) and the reason of a fallback to eager."""

    compiled: bool
    compile_s: float | None = None
    fallback: str | None = None


_CODES = itertools.count()


def _fresh_function(pure):
    """``pure`` behind a function with its own code object: dynamo keeps compiled graphs per code object, so each
    entry gets its own cache (no guard scans across models, no recompile limit shared between them)."""
    def kernel(model, x1, x2):
        return pure(model, x1, x2)

    code = kernel.__code__.replace(co_name=f"ntk_compiled_kernel_{next(_CODES)}")
    return types.FunctionType(code, kernel.__globals__, code.co_name, None, kernel.__closure__)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def _context(plugin, model, x1, x2, mode):
    """The plugin's ``compile_context(model, x1, x2, mode)`` (global switches its pure kernel needs, set outside
    the compiled code)."""
    context = getattr(plugin, "compile_context", None)
    return context(model, x1, x2, mode) if context is not None else contextlib.nullcontext()


class Cache:
    """Compiled kernels per model (weakly) and key; thread-safe lookups, one compile per key."""

    def __init__(self):
        self._entries: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._local = threading.local()

    @staticmethod
    def key(plugin: NTKPlugin, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None, mode: str) -> tuple:
        """What the compiled kernel was built for: the plugin, the mode, the inputs' shapes, dtype and device, and the
        generation of the model's state (``engine.model_generation``: a rebound attribute, a replaced parameter, a
        changed flag or hook gets a new entry, compiled and checked afresh; torch's own guards recompile too)."""
        from .engine import model_generation

        generation: object = model_generation(model)
        if generation is None:  # (a kernel called outside ``compute``: no validated state to go by)
            generation = tuple(map(id, unchanged.state(model)))
        return (plugin.name, mode, tuple(x1.shape), x1.dtype, x1.device, None if x2 is None else tuple(x2.shape),
                generation)

    def entries(self, model: nn.Module) -> dict:
        with self._lock:
            return self._entries.setdefault(model, {})

    @property
    def last(self) -> Info | None:
        """This thread's last call's :class:`Info`."""
        return getattr(self._local, "info", None)

    def kernel(self, plugin: NTKPlugin, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None,
               mode: str) -> torch.Tensor:
        """The kernel by the compiled path where it works, else by ``plugin._kernel``; ``last`` says which."""
        entries = self.entries(model)
        key = self.key(plugin, model, x1, x2, mode)
        entry = entries.get(key)
        if entry is None:
            pure = getattr(plugin, "pure_kernel", None)
            pure = pure(model, x1, x2, mode) if pure is not None else \
                (lambda m, a, b: plugin._kernel(m, a, b, mode))
            entry = entries.setdefault(key, Entry(torch.compile(_fresh_function(pure), fullgraph=True,
                                                                dynamic=False)))
        if entry.failed is not None:
            self._local.info = Info(False, None, entry.failed)
            return plugin._kernel(model, x1, x2, mode)
        with _context(plugin, model, x1, x2, mode):
            if entry.checked:
                self._local.info = Info(True)
                return entry.fn(model, x1, x2)
            return self._first_call(plugin, entry, model, x1, x2, mode)

    def _first_call(self, plugin, entry: Entry, model, x1, x2, mode) -> torch.Tensor:
        """Compile, run, and compare with the eager kernel; any failure is kept as the entry's reason."""
        t0 = time.perf_counter()
        try:
            out = entry.fn(model, x1, x2)
        except Exception as exc:  # a graph break (fullgraph), an unsupported op, an Inductor error: eager instead
            entry.failed = f"torch.compile failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}" \
                if str(exc).strip() else f"torch.compile failed: {type(exc).__name__}"
            self._local.info = Info(False, time.perf_counter() - t0, entry.failed)
            return plugin._kernel(model, x1, x2, mode)
        entry.compile_s = time.perf_counter() - t0
        eager = plugin._kernel(model, x1, x2, mode)
        if not isinstance(out, torch.Tensor) or out.shape != eager.shape:
            entry.failed = f"the compiled kernel has shape {getattr(out, 'shape', type(out).__name__)}, " \
                           f"the eager one {tuple(eager.shape)}"
        else:
            err = _relative_error(out, eager)
            # Inductor reorders sums and fuses elementwise work: rounding-level differences, judged as a kernel
            # against a reference (relative Frobenius error).
            tol = tolerance(eager.dtype, "reference")
            if not err <= tol:
                entry.failed = f"the compiled kernel differs from the eager one by {err:.2e} (relative, > {tol:g})"
        if entry.failed is not None:
            self._local.info = Info(False, entry.compile_s, entry.failed)
            return eager
        entry.checked = True
        self._local.info = Info(True, entry.compile_s)
        return out


CACHE = Cache()


class CompiledPlugin(NTKPlugin):
    """``base`` with its kernel compiled (``CACHE``): same answers, same declines; ``info()`` says how the last
    call of this thread went."""

    capturable = False  # (a CUDA graph of a compiled kernel is Inductor's business: mode="reduce-overhead")

    def __init__(self, base: NTKPlugin):
        self.base = base
        self.name = f"{base.name}_compiled"
        self.origin = base.origin
        self.tags = frozenset(getattr(base, "tags", ())) | {"compiled"}

    def supports(self, model):
        reason = self.base.supports(model)
        if reason is not None and reason.startswith(f"{self.base.name}:"):
            return self.name + reason[len(self.base.name):]
        return reason

    def estimate(self, stats, n, m, mode, symmetric):
        return self.base.estimate(stats, n, m, mode, symmetric)

    def _kernel(self, model, x1, x2, mode):
        return CACHE.kernel(self.base, model, x1, x2, mode)

    @staticmethod
    def info() -> Info | None:
        """How this thread's last compiled call went (compiled or fallen back, compile time, reason)."""
        return CACHE.last


__all__ = ["CACHE", "Cache", "CompiledPlugin", "Entry", "Info"]
