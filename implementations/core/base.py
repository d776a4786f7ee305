"""The interface every NTK plugin offers. It imports nothing else of the package but ``estimate``.

A plugin subclasses :class:`NTKPlugin`, sets ``name``, and implements ``_kernel(model, x1, x2, mode)``
(optionally ``supports``, ``estimate``). ``compute`` runs the whole call through ``engine``: validation, the
refusal of ill-defined models, dispatch (memory budget and tiles, CUDA-graph replay), the kernel, and the
checks of its result, leaving the caller's model as it was found. So ``_kernel`` sees detached inputs, grad
mode on, a model whose output is (N, O), and returns a kernel in the mode's shape.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from ...modes import MODES  # noqa: F401 - re-exported: the interface's modes
from .estimate import Estimate, contraction_flops, jacobian_bytes, kernel_numel

# The call machinery: ``core.engine`` sets this to itself when imported (the registry imports it), so the engine
# depends on this interface and not the reverse.
_engine = None


def _the_engine():
    if _engine is None:
        raise RuntimeError("NTKPlugin.compute needs the call machinery, which installs itself when imported: "
                           "import ntk_bench.implementations (or ntk_bench.implementations.core.engine) first")
    return _engine


class UnsupportedModelError(ValueError):
    """The plugin cannot handle this model; the message says why."""


class StaleFactors(Exception):
    """A block's factors (a plugin's ``factors``, or ones kept on disk) that do not fit the model as it is now: a
    forward that took another path than the plan's, or factors recorded with another plan, block or dtype. The
    dataset kernel records them again or computes the block's tiles whole."""


class NTKPlugin:
    """One algorithm for the empirical NTK Θ(x1, x2) = J(x1) J(x2)ᵀ."""

    name: str = ""
    # Where the algorithm comes from: "ours" (this project's) or "peer" (another library's routine, run as its
    # authors run it, for comparison). (Once called ``kind``, which still reads and sets it, with a warning.)
    origin: str = "ours"
    # Labels the registry selects plugins by (``implementations.names(tag=...)``, a sweep's ``impls = ["ours",
    # "-tag:loop"]``), so that no list of names is written by hand. What the algorithm is, set by the plugin:
    # ``loop`` (one backward pass per sample and output), ``vector_products`` (NTK-vector products: N·M·O passes, no
    # Jacobian), ``backpack`` (needs BackPACK), ``neural_tangents`` (neural-tangents' own implementations, in JAX).
    # The roles the project gives a built-in, set by the registry's table: ``auto`` (``auto`` may pick it), ``fast``
    # (a call stays well under a second on small models: what ``ntk-bench run --model`` runs by default).
    tags: frozenset[str] = frozenset()
    # True where ``_kernel`` can be captured in a CUDA graph: no host syncs, no data-dependent shapes (cuda_graphs).
    capturable: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        legacy = cls.__dict__.get("kind")
        if isinstance(legacy, str):  # a plugin written before ``kind`` became ``origin``
            warnings.warn(f"{cls.__name__}.kind is deprecated: set origin = {legacy!r} instead", DeprecationWarning,
                          stacklevel=2)
            cls.origin = legacy
            del cls.kind  # the alias below reads origin

    @property
    def kind(self) -> str:
        """Deprecated alias of :attr:`origin` (stored rows keep their ``kind`` field)."""
        warnings.warn("NTKPlugin.kind is deprecated: read origin instead", DeprecationWarning, stacklevel=2)
        return self.origin

    @kind.setter
    def kind(self, value: str) -> None:
        warnings.warn("NTKPlugin.kind is deprecated: set origin instead", DeprecationWarning, stacklevel=2)
        self.origin = value

    def supports(self, model: nn.Module) -> str | None:
        """None when this plugin can handle ``model``, otherwise the reason it cannot."""
        return None

    def compute(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, mode: str = "full",
                memory_budget_bytes: int | None = None) -> torch.Tensor:
        """Θ(x1, x2) with shape (N, M, O, O) / (N, M) / (N, M, O) for full / trace / diagonal.

        ``x2=None`` means x2 = x1. The result is detached, on the inputs' device, in their dtype (integer inputs:
        the parameters' dtype). With ``memory_budget_bytes`` the kernel is computed in tiles whose estimated
        peak fits the budget; a kernel too large to sit next to a tile within the budget is returned in CPU memory.
        """
        return _the_engine().compute(self, model, x1, x2, mode, memory_budget_bytes)

    def prepare(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, mode: str = "full",
                memory_budget_bytes: int | None = None) -> tuple[Callable[[], object], Callable[[object], torch.Tensor]]:
        """``(run, to_torch)``: ``run()`` computes the kernel in the plugin's native form and ``to_torch(out)`` turns
        that into the plugin shapes as a torch tensor. A runner times ``run`` alone, so a peer does its set-up
        here (translating the model, converting inputs) and returns its own routine, called as its authors call it.
        For our plugins ``run`` is ``compute`` itself."""
        return (lambda: self.compute(model, x1, x2, mode, memory_budget_bytes=memory_budget_bytes)), (lambda out: out)

    def dispatch(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None, mode: str,
                 memory_budget_bytes: int | None) -> torch.Tensor:
        """The dispatch step of a validated call: tiles under a budget, a replayed CUDA graph, or ``_kernel``
        (``auto`` overrides it to pick a plugin)."""
        return _the_engine().dispatch(self, model, x1, x2, mode, memory_budget_bytes)

    def with_budget(self, memory_budget_bytes: int) -> "NTKPlugin":
        """This plugin, for a call under a memory budget (plugins that tile internally override it)."""
        return self

    def estimate(self, stats, n: int, m: int, mode: str, symmetric: bool):
        """Cost-model FLOPs and peak bytes for an N x M block (``costs.Estimate``).

        The default is Jacobian contraction's: (N+M)·O Jacobian rows of P numbers
        each, built with one backward per output, then contracted.
        """
        side = n if symmetric else n + m
        flops = side * stats.o * 3 * stats.fp_flops + contraction_flops(stats, n, m, mode)
        peak = 2 * jacobian_bytes(stats, n, 0 if symmetric else m) + side * stats.o * stats.activations * stats.itemsize
        return Estimate(flops, peak + kernel_numel(n, m, stats.o, mode) * stats.itemsize)

    def _kernel(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None, mode: str) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<NTK plugin {self.name}>"
