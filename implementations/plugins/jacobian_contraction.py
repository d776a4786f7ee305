"""Jacobian contraction: per-sample Jacobians with torch.func, then J1 J2ᵀ.

Cost: N·O·[FP] to build the Jacobians plus N·M·O²·P to contract them (full
mode; trace and diagonal contract directly, N·M·O·P); memory (N+M)·O·P.
Wins when O·P is small relative to a forward pass (convolutions with few
outputs); loses to structured methods on wide MLPs, where the O²·P
contraction dominates, and runs out of memory when N·O·P does not fit.
Works on any model torch.func can differentiate: samples are vmapped, or
looped where the forward cannot be vmapped (LSTM, GRU). On its first call per model and
input shapes the vmapped Jacobians are checked against a loop over one sample (the first and the
last): torch's batching rules are not right everywhere (through PReLU with as many samples as
outputs, ``vmap(jacrev(f))`` mixes the sample and output levels without raising), and a model whose
check fails is looped from then on. Models torch.func cannot take (an old-style autograd.Function,
a gradient taken inside the forward) are declined, naming the cause.
"""

from __future__ import annotations

import weakref

import torch
from torch.func import jacrev

from ..core.base import NTKPlugin
from ..core.contractions import contract_jacobians
from ..core.declines import transform_declines
from ..core.module_walks import (
    _VMAP_FAILS,
    composite_attention,
    functional_single,
    per_sample,
    shape_keyed_cache,
)
from ..core.tolerances import tolerance

# model -> {(parameter shapes, input shape, dtype, device): True}: the vmapped Jacobians were checked
_VMAP_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vmap_key(x):
    return (tuple(x.shape[1:]), x.dtype, x.device)  # module_walks.per_sample's key for a model that is looped


def vmap_agrees(jac: dict, one_sample, x: torch.Tensor) -> bool:
    """Whether the vmapped Jacobians ``jac`` of the first and the last sample of ``x`` match ``one_sample(xi)``
    computed alone, to about the square root of the dtype's precision (a batching rule that mixes levels is off
    by far more; batched and looped kernels differ only in the order of their sums)."""
    tol = tolerance(next(iter(jac.values())).dtype, "jacobian_batching")
    for i in sorted({0, x.shape[0] - 1}):
        alone = one_sample(x[i])
        diff = sum(float(torch.linalg.vector_norm(jac[k][i] - alone[k]) ** 2) for k in alone) ** 0.5
        size = sum(float(torch.linalg.vector_norm(alone[k]) ** 2) for k in alone) ** 0.5
        if not diff <= tol * max(size, 1e-30):
            return False
    return True


def per_sample_jacobians(model, x):
    """One (N, O, P_i) block per trainable parameter, via jacrev per sample (vmapped where possible; the first
    call per model and input shapes checks the vmapped result against a loop and loops from then on where they
    disagree)."""
    params, f = functional_single(model)

    def one_sample(xi):
        return jacrev(f)(params, xi)

    with composite_attention():
        looped = _vmap_key(x) in _VMAP_FAILS.get(model, ())
        jac = per_sample(model, one_sample, x)
        if not looped and _vmap_key(x) not in _VMAP_FAILS.get(model, ()):
            agrees = shape_keyed_cache(_VMAP_CHECKED, model, (tuple(x.shape), x.dtype, x.device),
                                       lambda: vmap_agrees(jac, one_sample, x))
            if not agrees:
                _VMAP_FAILS.setdefault(model, set()).add(_vmap_key(x))
                jac = per_sample(model, one_sample, x)
    return [j.flatten(2) for j in jac.values()]


class JacobianContraction(NTKPlugin):
    name = "jacobian_contraction"

    def _kernel(self, model, x1, x2, mode):
        with transform_declines(self.name, model, x1):
            j1 = per_sample_jacobians(model, x1)
            j2 = j1 if x2 is None else per_sample_jacobians(model, x2)
        return contract_jacobians(j1, j2, mode)


    def pure_kernel(self, model, x1, x2, mode):
        """Vmapped per-sample Jacobians and their contraction as a function of the inputs alone, for ``compiled``
        (no cached loop fallback: a model vmap cannot take fails to compile and runs the eager kernel)."""
        def kernel(model, x1, x2):
            params, f = functional_single(model)
            jac = torch.func.vmap(jacrev(f), in_dims=(None, 0))
            j1 = [j.flatten(2) for j in jac(params, x1).values()]
            j2 = j1 if x2 is None else [j.flatten(2) for j in jac(params, x2).values()]
            return contract_jacobians(j1, j2, mode)

        return kernel

    @staticmethod
    def compile_context(model, x1, x2, mode):
        return composite_attention()


plugin = JacobianContraction()
