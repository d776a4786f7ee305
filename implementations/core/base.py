"""The interface every NTK plugin offers. It imports nothing else of the package but ``estimate``.

A plugin subclasses :class:`NTKPlugin`, sets ``name``, and implements ``_kernel(model, x1, x2, mode)``
(optionally ``supports``, ``estimate``). ``compute`` runs the whole call through ``engine``: validation, the
refusal of ill-defined models, planning (memory budget and tiles, CUDA-graph replay), the kernel, and the
checks of its result, leaving the caller's model as it was found. So ``_kernel`` sees detached inputs, grad
mode on, a model whose output is (N, O), and returns a kernel in the mode's shape.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .estimate import Estimate, contraction_flops, jacobian_bytes, kernel_numel

MODES = ("full", "trace", "diagonal")


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


class NTKPlugin:
    """One algorithm for the empirical NTK Θ(x1, x2) = J(x1) J(x2)ᵀ."""

    name: str = ""
    # "ours" (an algorithm of this project, one auto may pick) or "peer" (another library's routine, run as its
    # authors run it, for comparison)
    kind: str = "ours"
    # What the algorithm is, for choosing plugins by family rather than by name (a sweep's
    # ``impls = ["ours", "-tag:loop"]``): ``loop`` (one backward pass per sample and output), ``vector_products``
    # (NTK-vector products: N·M·O passes, no Jacobian), ``backpack`` (needs BackPACK), ``neural_tangents``
    # (neural-tangents' own implementations, in JAX). The registry's ``names(tag=...)`` reads them.
    tags: frozenset[str] = frozenset()
    # True where ``_kernel`` can be captured in a CUDA graph: no host syncs, no data-dependent shapes (cuda_graphs).
    capturable: bool = False

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
        """The planning step of a validated call: tiles under a budget, a replayed CUDA graph, or ``_kernel``
        (``auto`` overrides it to pick a plugin)."""
        return _the_engine().plan_and_run(self, model, x1, x2, mode, memory_budget_bytes)

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
