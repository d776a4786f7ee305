"""BackPACK SqrtGGNExact: the whole Jacobian in one backward pass.

For a sum-reduced MSE loss the exact GGN's square root is J/√2 (Dangel 2021),
so one backward pass of SqrtGGNExact yields every per-sample, per-output
gradient; then the N·M·O²·P contraction. Memory (N+M)·O·P. The fastest way to
materialise J on models it handles, but it needs a graph BackPACK's
second-order extensions fully support: an ``nn.Sequential`` of known layers
(a custom ``forward`` such as the tutorial's CNN is not). The caller's model
is never extended: BackPACK works on a deep copy.
"""

from __future__ import annotations

import math

from torch import nn

from .backpack_batchgrad import backpack_copy, quiet_backward_hooks
from .base import NTKPlugin, contract_jacobians


def _second_order_modules():
    from backpack.extensions import SqrtGGNExact

    return tuple(SqrtGGNExact()._BackpropExtension__module_extensions)


class BackpackSqrtGGN(NTKPlugin):
    name = "backpack_sqrtggn"

    def supports(self, model):
        try:
            known = _second_order_modules()
        except ImportError:
            return "backpack_sqrtggn: BackPACK (backpack-for-pytorch) is not installed"
        if not isinstance(model, nn.Sequential):
            return (
                "backpack_sqrtggn: needs an nn.Sequential of layers BackPACK's SqrtGGNExact supports, "
                f"found a custom module {type(model).__name__}"
            )
        for m in model.modules():
            if isinstance(m, nn.Sequential):
                continue
            if not isinstance(m, known):
                return f"backpack_sqrtggn: BackPACK's SqrtGGNExact has no rule for {type(m).__name__}"
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
        from backpack import backpack, extend
        from backpack.extensions import SqrtGGNExact

        n = x1.shape[0]
        x = x1 if x2 is None else torch.cat([x1, x2])
        net = backpack_copy(model)
        params = [p for p in net.parameters() if p.requires_grad]
        y = net(x)
        loss = extend(nn.MSELoss(reduction="sum"))(y, torch.zeros_like(y))
        with quiet_backward_hooks(), backpack(SqrtGGNExact()):
            loss.backward()
        scale = 1 / math.sqrt(2)
        # sqrt_ggn_exact: (O, N, *shape) -> (N, O, P_i)
        jac = [p.sqrt_ggn_exact.flatten(2).transpose(0, 1).mul(scale) for p in params]
        j1 = [j[:n] for j in jac]
        j2 = j1 if x2 is None else [j[n:] for j in jac]
        return contract_jacobians(j1, j2, mode)


plugin = BackpackSqrtGGN()
