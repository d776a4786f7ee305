"""BackPACK BatchGrad: per-sample gradients of each output, O backward passes.

Cost: one forward of the stacked batch [x1; x2], O backward passes (BatchGrad
gives all N per-sample gradients of output o at once), then the N·M·O²·P
contraction; memory (N+M)·O·P. Much faster than the autograd loop because the
batch is parallel; works on any graph whose parameterised layers BackPACK's
first-order extensions know. The caller's model is never extended: BackPACK
works on a deep copy.
"""

from __future__ import annotations

import functools

from ..core.base import UnsupportedModelError
from ._backpack import BackpackPlugin, backpack_problem


@functools.cache  # the module types BackPACK has rules for do not change; building
# the extension to read them costs more than the rest of ``supports``
def _first_order_modules():
    from backpack.extensions import BatchGrad

    return tuple(BatchGrad()._BackpropExtension__module_extensions)


class BackpackBatchGrad(BackpackPlugin):
    """Per-sample gradients of each output from BackPACK's BatchGrad on a deep copy of the model, then contracted
    (see the module docstring)."""

    name = "backpack_batchgrad"

    def supports(self, model):
        """None when BackPACK is installed and every module holding trainable parameters is one its first-order
        extensions know, otherwise why not."""
        try:
            known = _first_order_modules()
        except ImportError:
            return "backpack_batchgrad: BackPACK (backpack-for-pytorch) is not installed"
        for name, m in model.named_modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)) and not isinstance(m, known):
                return (f"backpack_batchgrad: BackPACK's BatchGrad has no rule for {name or 'the model itself'} "
                        f"({type(m).__name__}), which has parameters")
        return backpack_problem(model, self.name)

    def _jacobians(self, net, x, params):
        from backpack import backpack
        from backpack.extensions import BatchGrad

        names = {id(p): k for k, p in net.named_parameters()}
        y = net(x)
        jac = [y.new_empty((x.shape[0], y.shape[1], p.numel())) for p in params]
        for a in range(y.shape[1]):
            for p in params:  # (a parameter that gets no gradient keeps no stale grad_batch from output a - 1)
                p.grad = None
                if hasattr(p, "grad_batch"):
                    del p.grad_batch
            with backpack(BatchGrad(), retain_graph=True):
                y[:, a].sum().backward(retain_graph=True)
            for block, p in zip(jac, params):
                grad_batch = getattr(p, "grad_batch", None)
                if grad_batch is None:
                    if p.grad is not None:
                        raise UnsupportedModelError(
                            f"{self.name}: {names[id(p)]!r} got a gradient but BackPACK computed no per-sample "
                            f"gradients for it (a layer BackPACK's hooks did not see)")
                    # no gradient reached it (an unused expert, a branch under no_grad): its Jacobian is zero
                    block[:, a] = 0
                elif grad_batch.shape[0] != x.shape[0]:
                    raise UnsupportedModelError(
                        f"{self.name}: {names[id(p)]!r} sees a sub-batch of {grad_batch.shape[0]} of the "
                        f"{x.shape[0]} samples (its layer runs on part of the batch, e.g. x[mask] in a mixture of "
                        f"experts), and BackPACK's per-sample gradients are those of its own batch")
                else:
                    block[:, a] = grad_batch.reshape(x.shape[0], -1)
        return jac


plugin = BackpackBatchGrad()
