"""Autograd loop: one torch.autograd.grad call per (sample, output), as torchntk does.

Cost: N·O backward passes (each through the whole batch's graph) plus the
N·M·O²·P contraction; memory N·O·P. Works on any differentiable model and
needs nothing beyond autograd, but is the slowest: it is the baseline the
others are measured against. Unlike torchntk it handles any number of outputs.
"""

from __future__ import annotations

import torch

from .base import NTKPlugin, contract_jacobians, trainable_parameters


def jacobians_by_autograd(model, x):
    params = list(trainable_parameters(model).values())
    y = model(x)
    n, o = y.shape
    jac = [x.new_empty((n, o, p.numel())) for p in params]
    for i in range(n):
        for a in range(o):
            grads = torch.autograd.grad(y[i, a], params, retain_graph=True, allow_unused=True)
            for block, g in zip(jac, grads):
                block[i, a] = 0 if g is None else g.reshape(-1)
    return jac


class AutogradLoop(NTKPlugin):
    name = "autograd_loop"

    def _kernel(self, model, x1, x2, mode):
        j1 = jacobians_by_autograd(model, x1)
        j2 = j1 if x2 is None else jacobians_by_autograd(model, x2)
        return contract_jacobians(j1, j2, mode)


plugin = AutogradLoop()
