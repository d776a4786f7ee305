"""What the two BackPACK plugins share: a hook-free copy of the caller's model, and the
stacked-batch Jacobian then contraction. BackPACK itself is imported only when used."""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch

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


class BackpackPlugin(NTKPlugin):
    """Per-sample Jacobians of the stacked batch [x1; x2] from a BackPACK extension, then J1 J2ᵀ."""

    def _jacobians(self, net, x, params) -> list[torch.Tensor]:
        """One (N+M, O, P_i) block per parameter of the extended copy ``net``."""
        raise NotImplementedError

    def estimate(self, stats, n, m, mode, symmetric):
        """One forward of [x1; x2], O backward passes (or one, O-wide), per-sample gradients, contraction."""
        from .costs import Estimate, contraction_flops, jacobian_bytes, kernel_numel

        side = n if symmetric else n + m
        flops = side * (stats.fp_flops + stats.o * (2 * stats.fp_flops + 2 * stats.p)) + contraction_flops(stats, n, m, mode)
        peak = 2 * jacobian_bytes(stats, n, 0 if symmetric else m) + side * stats.o * stats.activations * stats.itemsize
        return Estimate(flops, peak + kernel_numel(n, m, stats.o, mode) * stats.itemsize)

    def _kernel(self, model, x1, x2, mode):
        n = x1.shape[0]
        x = x1 if x2 is None else torch.cat([x1, x2])
        net = backpack_copy(model)
        with quiet_backward_hooks():
            jac = self._jacobians(net, x, [p for p in net.parameters() if p.requires_grad])
        j1 = [j[:n] for j in jac]
        j2 = j1 if x2 is None else [j[n:] for j in jac]
        return contract_jacobians(j1, j2, mode)
