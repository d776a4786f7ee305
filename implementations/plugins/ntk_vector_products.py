"""NTK-vector products: Θ's rows as J(x2)·(J(x1)ᵀ e), one vjp and one jvp per row; never builds J(x2).

For each sample n of x1 and output o (a "lane"), the vjp of that one sample
with the basis vector e_o gives its gradient g = J(x1[n])ᵀ e_o (P numbers);
the jvp of the whole batch x2 along g gives J(x2)·g = Θ[n, :, o, :] at once.
Lanes are vmapped, in chunks of x1's samples under ``memory_budget_bytes``.
This is neural-tangents' ntk_vector_products with per-sample vjps: N·O lanes,
each a batched forward-mode pass over x2 (matrix products), rather than one
lane per (pair, output) (the tutorial's version, N·M·O lanes that each redo
the vjp and read a P-vector for one number).

Attention runs through composite kernels (the fused ones have no forward-mode
derivative); samples whose forward cannot be vmapped (LSTM, GRU) are looped.

Cost: N·O·(vjp of one sample + jvp of M samples), about N·M·O·[FP]: no
N·M·O²·P contraction. Memory per lane: P for g, plus M samples' tangent
activations. Wins when O·P is large next to a forward pass (wide fully
connected nets with many outputs) and N is small.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, jvp, vjp, vmap

from ..core.base import NTKPlugin, UnsupportedModelError
from ..core.contractions import chunks, reduce_full
from ..core.declines import transform_declines
from ..core.module_walks import composite_attention, functional_single, per_sample


class NTKVectorProducts(NTKPlugin):
    """Θ's rows by a vjp of one sample of x1 and a jvp of the whole x2, vmapped over lanes in chunks that fit
    ``memory_budget_bytes`` (see the module docstring)."""

    name = "ntk_vector_products"
    tags = frozenset({"vector_products"})

    def __init__(self, memory_budget_bytes: int = 1 << 30):
        self.memory_budget_bytes = memory_budget_bytes

    @staticmethod
    def _bytes_per_lane(p, m, activations, o, itemsize):
        """One lane holds its gradient g (P) and the tangents of M samples' forward pass; twice that, for temporaries."""
        return 2 * (p + m * (activations + o)) * itemsize

    def with_budget(self, memory_budget_bytes):
        """A copy whose lane chunks fit the smaller of its own budget and ``memory_budget_bytes`` (the engine's
        budget for a call)."""
        return NTKVectorProducts(min(self.memory_budget_bytes, memory_budget_bytes))

    def estimate(self, stats, n, m, mode, symmetric):
        """Per lane: a vjp of one sample (3·[FP]) and a jvp of M samples (3·M·[FP]); N·O lanes, chunked."""
        from ..core.costs import Estimate, kernel_numel

        per_lane = self._bytes_per_lane(stats.p, m, stats.activations, stats.o, stats.itemsize)
        flops = n * stats.o * 3 * stats.fp_flops * (1 + m)
        lanes = stats.o * self._samples_per_chunk(n, stats.o, per_lane)
        return Estimate(flops, lanes * per_lane + 2 * kernel_numel(n, m, stats.o, "full") * stats.itemsize)

    def _samples_per_chunk(self, n, o, per_lane):
        """How many of x1's samples (O lanes each) are vmapped at once: as many as the budget holds, at least one."""
        return min(n, max(1, self.memory_budget_bytes // (per_lane * o)))

    def _kernel(self, model, x1, x2, mode):
        with transform_declines(self.name, model, x1):
            return self._products(model, x1, x2, mode)

    def _products(self, model, x1, x2, mode):
        from ..core.costs import cost_stats

        xb = x1 if x2 is None else x2
        params, f = functional_single(model)
        stats = cost_stats(model, x1[:1])
        o, m = stats.o, xb.shape[0]
        dtype = next(iter(params.values())).dtype
        basis = torch.eye(o, dtype=dtype, device=x1.device)

        def rows_of(xa):  # Θ[a, :, o, :] for every o: (O, M, O)
            _, vjp_fn = vjp(lambda p: f(p, xa), params)

            def row(e):
                (g,) = vjp_fn(e)
                return jvp(lambda p: functional_call(model, p, (xb,)), (params,), (g,))[1]

            return vmap(row)(basis)

        per_lane = self._bytes_per_lane(stats.p, m, stats.activations, o, basis.element_size())
        samples = self._samples_per_chunk(x1.shape[0], o, per_lane)
        try:
            with composite_attention():
                parts = [per_sample(model, rows_of, x1[s]) for s in chunks(x1.shape[0], samples)]  # each (n,O,M,O)
        except NotImplementedError as exc:
            if "forward AD" not in str(exc):
                raise
            raise UnsupportedModelError(f"ntk_vector_products: PyTorch has no forward-mode derivative for an op of "
                                        f"this model: {str(exc).splitlines()[0]}") from exc
        return reduce_full(torch.cat(parts).permute(0, 2, 1, 3), mode).contiguous()


plugin = NTKVectorProducts()
