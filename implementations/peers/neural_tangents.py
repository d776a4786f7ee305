"""neural-tangents' three NTK implementations as peers, run on the torch model's JAX translation.

The model goes through ``reference`` (torch.export to core ATen, one JAX rule per op, weights a Linear
transposes stored (in, out)) and neural-tangents' ``empirical_ntk_fn`` runs on it jitted, on the CPU, in the
dtype of x1 (float32 rows time neural-tangents in float32), with its own ``trace_axes``/``diagonal_axes`` for
the mode. ``prepare`` does the translation, the compilation's inputs and the conversion outside the timed
call; ``run()``'s first call compiles (once per model, shapes, mode and dtype), later calls are timed.
Through the translation neural-tangents is as fast as on the same network hand-written in JAX
(``scripts/nt_fairness.py``; ``results/2026-11-23-nt-fairness/``).

- ``nt_jacobian_contraction``: per-sample Jacobians, then J1 J2ᵀ. Wins when O·P is small next to a forward
  pass (conv nets with few outputs); costs (N+M)·O·P memory.
- ``nt_ntk_vector_products``: vjp then jvp per output lane; never builds J. Wins for wide nets with many
  outputs and small N; costs about N·M·O forward passes.
- ``nt_structured_derivatives``: the Jacobian's structure per primitive (``x @ W``, convolutions, broadcasts)
  contracted without materialising it. Wins on dense and conv layers; costs a longer compilation.

Peers take no memory budget, run on the CPU JAX backend only, and decline a model the translation cannot
reproduce (``prepare`` raises ``UnsupportedModelError`` with the translation's reason).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..core.base import MODES, NTKPlugin, UnsupportedModelError


class NeuralTangentsPeer(NTKPlugin):
    """neural-tangents' ``implementation`` through the reference's JAX translation."""

    origin = "peer"

    def __init__(self, implementation: str):
        self.implementation = implementation
        self.name = f"nt_{implementation}"
        self.tags = frozenset({"neural_tangents"} | ({"vector_products"} if implementation == "ntk_vector_products"
                                                     else set()))

    def supports(self, model: nn.Module) -> str | None:
        """None when neural-tangents imports and the model is on the CPU (JAX's CPU backend only), otherwise why
        not. Whether the model translates needs an input: ``prepare`` raises with that reason."""
        from ntk_bench import reference

        reason = reference.available()
        if reason is not None:
            return f"{self.name}: {reason}"
        devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
        if devices - {"cpu"}:
            return f"{self.name}: neural-tangents runs on the CPU JAX backend only; the model is on " \
                   f"{', '.join(sorted(devices - {'cpu'}))}"
        return None  # the translation's verdict needs an input: prepare() raises with its reason

    def prepare(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, mode: str = "full",
                memory_budget_bytes: int | None = None):
        """``(run, to_torch)``: ``run()`` is neural-tangents' jitted kernel on pre-converted JAX arrays,
        ``block_until_ready()`` included; ``to_torch`` turns its output into a torch tensor in the plugin
        shapes. The inputs and the model pass the same validation as ``compute``'s."""
        from ..core.engine import validated
        from ..core.locking import model_claimed
        from ..core.validation import budget_bytes

        if budget_bytes(memory_budget_bytes) is not None:
            raise UnsupportedModelError(f"{self.name}: neural-tangents takes no memory budget (it is run as its "
                                        "authors run it)")
        with model_claimed(model):
            validated(self, model, x1, x2, mode)
            return self._prepared(model, x1, x2, mode)

    def _prepared(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None, mode: str):
        """``prepare`` after validation: the translation to JAX and the converted inputs (``run`` only reads those)."""
        from ntk_bench import reference

        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
        reason = self.supports(model)
        if reason is not None:
            raise UnsupportedModelError(reason)
        if x1.device.type != "cpu" or (x2 is not None and x2.device.type != "cpu"):
            raise UnsupportedModelError(f"{self.name}: neural-tangents runs on the CPU JAX backend only")
        dtype = _dtype(model, x1)
        reason = reference.supports(model, x1)
        if reason is not None:
            raise UnsupportedModelError(f"{self.name}: {reason}")
        fn = reference.kernel_fn(model, x1, self.implementation, mode, dtype)
        a, b = fn.convert(x1), fn.convert(x2)

        def run():
            return fn.run(a, b).block_until_ready()

        return run, _to_torch

    def _kernel(self, model, x1, x2, mode):
        run, to_torch = self._prepared(model, x1, x2, mode)
        return to_torch(run())

    @staticmethod
    def xla_threads() -> int | None:
        """The cores neural-tangents computes on in this process (``reference.xla_threads``; None before it ran)."""
        from ntk_bench import reference

        return reference.xla_threads()


def _dtype(model: nn.Module, x: torch.Tensor) -> str:
    """float32 or float64: x's dtype, or the model's for integer inputs (token ids)."""
    dtype = x.dtype if x.is_floating_point() else next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype not in (torch.float32, torch.float64):
        raise UnsupportedModelError(f"neural-tangents peers run in float32 or float64, not {dtype}")
    return str(dtype).removeprefix("torch.")


def _to_torch(out) -> torch.Tensor:
    return torch.from_numpy(np.array(out))


plugins = [NeuralTangentsPeer(impl) for impl in
           ("jacobian_contraction", "ntk_vector_products", "structured_derivatives")]
nt_jacobian_contraction, nt_ntk_vector_products, nt_structured_derivatives = plugins

__all__ = ["NeuralTangentsPeer", "nt_jacobian_contraction", "nt_ntk_vector_products", "nt_structured_derivatives",
           "plugins"]
