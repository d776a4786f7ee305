"""BackPACK BatchGrad: per-sample gradients of each output, O backward passes.

Cost: one forward of the stacked batch [x1; x2], O backward passes (BatchGrad
gives all N per-sample gradients of output o at once), then the N·M·O²·P
contraction; memory (N+M)·O·P. Much faster than the autograd loop because the
batch is parallel; works on any graph whose parameterised layers BackPACK's
first-order extensions know. The caller's model is never extended: BackPACK
works on a deep copy.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

from torch import nn

from .base import NTKPlugin, contract_jacobians


@contextlib.contextmanager
def quiet_backward_hooks():
    """BackPACK's hooks fire on module outputs when inputs need no grad; torch warns each time."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def backpack_copy(model):
    """An extended deep copy of ``model`` (the caller's model keeps no hooks)."""
    from backpack import extend

    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.grad = None
    return extend(clone)


def _first_order_modules():
    from backpack.extensions import BatchGrad

    return tuple(BatchGrad()._BackpropExtension__module_extensions)


class BackpackBatchGrad(NTKPlugin):
    name = "backpack_batchgrad"

    def supports(self, model):
        try:
            known = _first_order_modules()
        except ImportError:
            return "backpack_batchgrad: BackPACK (backpack-for-pytorch) is not installed"
        for m in model.modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)) and not isinstance(m, known):
                return f"backpack_batchgrad: BackPACK's BatchGrad has no rule for {type(m).__name__}"
        return None

    def estimate(self, stats, n, m, mode, symmetric):
        """One forward of [x1; x2], O backward passes (or one, O-wide), per-sample gradients, contraction."""
        from .costs import Estimate, contraction_flops, jacobian_bytes, kernel_numel

        side = n if symmetric else n + m
        flops = side * (stats.fp_flops + stats.o * (2 * stats.fp_flops + 2 * stats.p)) + contraction_flops(stats, n, m, mode)
        peak = 2 * jacobian_bytes(stats, n, 0 if symmetric else m) + side * stats.o * stats.activations * stats.itemsize
        return Estimate(flops, peak + kernel_numel(n, m, stats.o, mode) * stats.itemsize)

    def _kernel(self, model, x1, x2, mode):
        import torch
        from backpack import backpack
        from backpack.extensions import BatchGrad

        n = x1.shape[0]
        x = x1 if x2 is None else torch.cat([x1, x2])
        net = backpack_copy(model)
        params = [p for p in net.parameters() if p.requires_grad]
        y = net(x)
        o = y.shape[1]
        jac = [x.new_empty((x.shape[0], o, p.numel())) for p in params]
        for a in range(o):
            with quiet_backward_hooks(), backpack(BatchGrad(), retain_graph=True):
                y[:, a].sum().backward(retain_graph=True)
            for block, p in zip(jac, params):
                block[:, a] = p.grad_batch.reshape(x.shape[0], -1)
        j1 = [j[:n] for j in jac]
        j2 = j1 if x2 is None else [j[n:] for j in jac]
        return contract_jacobians(j1, j2, mode)


plugin = BackpackBatchGrad()
