"""Jacobian contraction: per-sample Jacobians with torch.func, then J1 J2ᵀ.

Cost: N·O·[FP] to build the Jacobians plus N·M·O²·P to contract them (full
mode; trace and diagonal contract directly, N·M·O·P); memory (N+M)·O·P.
Wins when O·P is small relative to a forward pass (convolutions with few
outputs); loses to structured methods on wide MLPs, where the O²·P
contraction dominates, and runs out of memory when N·O·P does not fit.
Works on any model torch.func can differentiate: samples are vmapped, or
looped where the forward cannot be vmapped (LSTM, GRU).
"""

from __future__ import annotations

from torch.func import jacrev

from .base import NTKPlugin
from .kernels import contract_jacobians
from .modelinfo import composite_attention, functional_single, per_sample


def per_sample_jacobians(model, x):
    """One (N, O, P_i) block per trainable parameter, via jacrev per sample (vmapped where possible)."""
    params, f = functional_single(model)
    with composite_attention():
        jac = per_sample(model, lambda xi: jacrev(f)(params, xi), x)
    return [j.flatten(2) for j in jac.values()]


class JacobianContraction(NTKPlugin):
    name = "jacobian_contraction"

    def _kernel(self, model, x1, x2, mode):
        j1 = per_sample_jacobians(model, x1)
        j2 = j1 if x2 is None else per_sample_jacobians(model, x2)
        return contract_jacobians(j1, j2, mode)


plugin = JacobianContraction()
