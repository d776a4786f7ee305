"""Autograd loop: one torch.autograd.grad call per (sample, output), as torchntk does.

Cost: N·O backward passes (each through the whole batch's graph) plus the
N·M·O²·P contraction; memory N·O·P. Works on any differentiable model and
needs nothing beyond autograd, but is the slowest: it is the baseline the
others are measured against. Unlike torchntk it handles any number of outputs.
"""

from __future__ import annotations

import torch

from ..core.base import NTKPlugin
from ..core.contractions import contract_jacobians
from ..core.module_walks import trainable_parameters


def jacobians_by_autograd(model, x):
    """The Jacobian of ``model`` at ``x`` as one (N, O, P_i) block per trainable parameter, row by row: one
    ``torch.autograd.grad`` per (sample, output); a parameter the output does not depend on gets zeros."""
    params = list(trainable_parameters(model).values())
    y = model(x)
    n, o = y.shape
    jac = [y.new_empty((n, o, p.numel())) for p in params]  # (the output's dtype: x may hold integer ids)
    for i in range(n):
        for a in range(o):
            grads = torch.autograd.grad(y[i, a], params, retain_graph=True, allow_unused=True)
            for block, g in zip(jac, grads):
                block[i, a] = 0 if g is None else g.reshape(-1)
    return jac


class AutogradLoop(NTKPlugin):
    """The baseline: the Jacobians row by row with autograd, then contracted (see the module docstring)."""

    name = "autograd_loop"
    tags = frozenset({"loop"})

    def estimate(self, stats, n, m, mode, symmetric):
        """Each of the N·O backward passes runs through the whole batch's graph."""
        from ..core.costs import Estimate, contraction_flops, jacobian_bytes, kernel_numel

        sides = [n] if symmetric else [n, m]
        flops = sum(b * stats.o * (2 * b * stats.fp_flops) for b in sides) + contraction_flops(stats, n, m, mode)
        peak = jacobian_bytes(stats, n, 0 if symmetric else m) + max(sides) * stats.activations * stats.itemsize
        return Estimate(flops, peak + kernel_numel(n, m, stats.o, mode) * stats.itemsize)

    def _kernel(self, model, x1, x2, mode):
        j1 = jacobians_by_autograd(model, x1)
        j2 = j1 if x2 is None else jacobians_by_autograd(model, x2)
        return contract_jacobians(j1, j2, mode)


plugin = AutogradLoop()
