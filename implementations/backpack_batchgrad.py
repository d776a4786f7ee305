"""BackPACK BatchGrad: per-sample gradients of each output, O backward passes.

Cost: one forward of the stacked batch [x1; x2], O backward passes (BatchGrad
gives all N per-sample gradients of output o at once), then the N·M·O²·P
contraction; memory (N+M)·O·P. Much faster than the autograd loop because the
batch is parallel; works on any graph whose parameterised layers BackPACK's
first-order extensions know. The caller's model is never extended: BackPACK
works on a deep copy.
"""

from __future__ import annotations

from ._backpack import BackpackPlugin, backpack_problem


def _first_order_modules():
    from backpack.extensions import BatchGrad

    return tuple(BatchGrad()._BackpropExtension__module_extensions)


class BackpackBatchGrad(BackpackPlugin):
    name = "backpack_batchgrad"

    def supports(self, model):
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

        y = net(x)
        jac = [y.new_empty((x.shape[0], y.shape[1], p.numel())) for p in params]
        for a in range(y.shape[1]):
            for p in params:  # (an output that does not reach a parameter leaves it none: its rows are zero)
                p.__dict__.pop("grad_batch", None)
            with backpack(BatchGrad(), retain_graph=True):
                y[:, a].sum().backward(retain_graph=True)
            for block, p in zip(jac, params):
                grad_batch = getattr(p, "grad_batch", None)
                block[:, a] = 0 if grad_batch is None else grad_batch.reshape(x.shape[0], -1)
        return jac


plugin = BackpackBatchGrad()
