"""Jacobian contraction: per-sample Jacobians with torch.func, then J1 J2ᵀ.

Cost: N·O·[FP] to build the Jacobians plus N·M·O²·P to contract them (full
mode; trace and diagonal contract directly, N·M·O·P); memory (N+M)·O·P.
Wins when O·P is small relative to a forward pass (convolutions with few
outputs); loses to structured methods on wide MLPs, where the O²·P
contraction dominates, and runs out of memory when N·O·P does not fit.
"""

from __future__ import annotations

from torch.func import jacrev, vmap

from .base import NTKPlugin, contract_jacobians, functional_single


def per_sample_jacobians(model, x):
    """One (N, O, P_i) block per trainable parameter, via vmap(jacrev)."""
    params, f = functional_single(model)
    jac = vmap(jacrev(f), (None, 0))(params, x)
    return [j.flatten(2) for j in jac.values()]


class JacobianContraction(NTKPlugin):
    name = "jacobian_contraction"

    def _kernel(self, model, x1, x2, mode):
        j1 = per_sample_jacobians(model, x1)
        j2 = j1 if x2 is None else per_sample_jacobians(model, x2)
        return contract_jacobians(j1, j2, mode)


plugin = JacobianContraction()
