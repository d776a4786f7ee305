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

import functools
import math

from torch import nn

from ._backpack import BackpackPlugin, backpack_problem


@functools.cache  # the module types BackPACK has rules for do not change; building
# the extension to read them costs more than the rest of ``supports``
def _second_order_modules():
    from backpack.extensions import SqrtGGNExact

    return tuple(SqrtGGNExact()._BackpropExtension__module_extensions)


class BackpackSqrtGGN(BackpackPlugin):
    """The whole Jacobian from one backward pass of BackPACK's SqrtGGNExact on a deep copy of the model, then
    contracted (see the module docstring)."""

    name = "backpack_sqrtggn"

    def supports(self, model):
        """None when BackPACK is installed and the model is an ``nn.Sequential`` of layers its second-order
        extensions know, otherwise why not."""
        try:
            known = _second_order_modules()
        except ImportError:
            return "backpack_sqrtggn: BackPACK (backpack-for-pytorch) is not installed"
        if not isinstance(model, nn.Sequential):
            return (
                "backpack_sqrtggn: needs an nn.Sequential of layers BackPACK's SqrtGGNExact supports, "
                f"found a custom module {type(model).__name__}"
            )
        for name, m in model.named_modules():
            if isinstance(m, nn.Sequential):
                continue
            if not isinstance(m, known):
                return f"backpack_sqrtggn: BackPACK's SqrtGGNExact has no rule for {name} ({type(m).__name__})"
        return backpack_problem(model, self.name)

    def _jacobians(self, net, x, params):
        import torch
        from backpack import backpack, extend
        from backpack.extensions import SqrtGGNExact

        y = net(x)
        loss = extend(nn.MSELoss(reduction="sum"))(y, torch.zeros_like(y))
        with backpack(SqrtGGNExact()):
            loss.backward()
        # sqrt_ggn_exact: (O, N, *shape) -> (N, O, P_i), times 1/√2
        return [p.sqrt_ggn_exact.flatten(2).transpose(0, 1).mul(1 / math.sqrt(2)) for p in params]


plugin = BackpackSqrtGGN()
