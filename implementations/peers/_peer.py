"""What the peer plugins (other libraries' NTK routines) share.

A peer does its library's set-up in ``_setup`` (wrapping the model, building the
data loader or linear operator) and returns the library's own routine as
``run`` and a converter of its output to the plugin shapes. ``prepare`` hands
both to a runner, which times ``run`` alone; ``compute`` calls them in a row.
Peers never tile under a memory budget. Each peer imports its library inside
its methods, so the package works without it (``supports`` then says so).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from typing import Callable

import torch
from torch import nn

from ..core.base import NTKPlugin, UnsupportedModelError


@functools.lru_cache(maxsize=None)
def import_error(module: str) -> str | None:
    """None when ``module`` imports, otherwise the error (cached: the answer does not change in a process)."""
    try:
        with warnings.catch_warnings():  # the libraries' import-time deprecation chatter (torch.jit.script ...)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            importlib.import_module(module)
    except Exception as exc:  # an installed but broken library is as unusable as a missing one: say which
        return f"{type(exc).__name__}: {exc}"
    return None


def shared_submodule(model: nn.Module) -> str | None:
    """'a' (also 'b') when one submodule holding parameters is registered under two names."""
    seen: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen and next(module.parameters(), None) is not None:
            return f"{seen[id(module)] or type(model).__name__!r} (also {name!r})"
        seen.setdefault(id(module), name)
    return None


def reraise_as_unsupported(exc: BaseException, name: str, patterns: dict[str, str]) -> None:
    """Raise UnsupportedModelError from ``exc`` when its message contains one of ``patterns``' keys (the value
    says why the library cannot take the model); otherwise return, and the caller re-raises ``exc``."""
    text = str(exc)
    for pattern, why in patterns.items():
        if pattern in text:
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise UnsupportedModelError(f"{name}: {why} ({type(exc).__name__}: {first[:200]})") from exc


@contextlib.contextmanager
def hooks_restored(model: nn.Module):
    """Remove, on the way out, any module hook a library registered and left behind (e.g. after an error)."""
    modules = list({id(m): m for m in model.modules()}.values())
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    before = [(m, kind, set(getattr(m, kind))) for m in modules for kind in kinds if hasattr(m, kind)]
    flags = [(m, getattr(m, "_is_full_backward_hook", None)) for m in modules]
    try:
        yield
    finally:
        for m, kind, keys in before:
            hooks = getattr(m, kind)
            for key in [k for k in hooks if k not in keys]:
                del hooks[key]
        for m, flag in flags:
            if getattr(m, "_is_full_backward_hook", None) is not flag:
                m._is_full_backward_hook = flag


class PeerPlugin(NTKPlugin):
    """Another library's NTK routine, run the way its authors run it (origin "peer").

    Subclasses set ``name``, ``package`` (the distribution, for messages) and ``module`` (what to import), and
    implement ``_setup`` and, where the library cannot take every model, ``_supports``.
    """

    origin = "peer"
    package = ""
    module = ""

    def supports(self, model: nn.Module) -> str | None:
        error = import_error(self.module)
        if error is not None:
            return f"{self.name}: {self.package} is not installed or does not import ({error})"
        return self._supports(model)

    def _supports(self, model: nn.Module) -> str | None:
        return None

    def known_inexact(self, model: nn.Module, dtype: torch.dtype) -> str | None:
        """Why this library's result for ``model`` in ``dtype`` is expected to miss the float64 tolerance (a
        documented limitation of the library, which the runner must still report as a mismatch), or None."""
        return None

    def _refuse_budget(self, memory_budget_bytes) -> None:
        from ..core.validation import budget_bytes

        if budget_bytes(memory_budget_bytes) is not None:  # (a malformed budget gets the same error as elsewhere)
            raise UnsupportedModelError(f"{self.name}: a peer runs as its library does and takes no memory budget")

    def compute(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, mode: str = "full",
                memory_budget_bytes: int | None = None) -> torch.Tensor:
        self._refuse_budget(memory_budget_bytes)
        return super().compute(model, x1, x2, mode)

    def prepare(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, mode: str = "full",
                memory_budget_bytes: int | None = None
                ) -> tuple[Callable[[], object], Callable[[object], torch.Tensor]]:
        """The library's set-up, done here after the same validation as ``compute``; ``run`` is its NTK routine
        alone and ``to_torch`` the conversion and the checks of the result."""
        from ..core.engine import checked, validated
        from ..core.locking import model_claimed
        from ..core.state import dense_gradients

        self._refuse_budget(memory_budget_bytes)

        @contextlib.contextmanager
        def held():  # the model to this call alone, as in ``compute``, while each step runs
            with model_claimed(model), dense_gradients(model):
                yield

        with held():
            call = validated(self, model, x1, x2, mode)
            run, convert = self._setup(call.net, call.x1, call.x2, mode)

        def run_held():
            with held():
                return run()

        def to_torch(out):
            with held():
                return checked(self, convert(out), call, mode)

        return run_held, to_torch

    def _kernel(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None, mode: str) -> torch.Tensor:
        run, convert = self._setup(model, x1, x2, mode)
        return convert(run()).detach()

    def _setup(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None,
               mode: str) -> tuple[Callable[[], object], Callable[[object], torch.Tensor]]:
        """(the library's routine as a zero-argument function, its output -> the kernel in ``mode``'s shape)."""
        raise NotImplementedError
