"""Taps: parameters a module reads only through single torch functions with one batched output."""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from ...core.costs import Layer
from .base import LayerCost, Rule, covered, numel, order_of


class JacobianSide:
    """Finished per-sample Jacobian blocks, ``jac[slot]`` (N, O, P), of ``n`` samples (taps, the generic rule)."""

    __slots__ = ("jac", "n")

    def __init__(self, jac, n):
        self.jac, self.n = jac, n


def check_jacobian_side(rule: Rule, side: JacobianSide, n: int, o: int) -> None:
    """Every block of ``side`` is (N, O, P) for its slot, and there is no block for a slot the rule lacks."""
    for k, j in side.jac.items():
        if k not in rule.slots:
            rule.fail(f"a Jacobian for {k!r}, which it does not cover")
        rule.expect(f"the Jacobian of {k}", j.shape, (n, o, rule.slots[k].numel()))


class TapRule(Rule):
    """Parameters a module reads only through single ops with one batched output (ViT's class token ``expand``-ed
    over the batch, its positional embedding added, a transposed convolution's weight): per op call,
    J[n, o] = vjp of that op alone with respect to the parameters, along G[o] restricted to sample n. Cost per
    call: N·O lanes of the op's backward (over its whole output: cheap for the broadcasts it is meant for),
    N·O·P numbers."""

    name = "tap"
    level = "op"
    LANES_NUMEL = 1 << 24  # masked cotangents built at once, at most (N·O·|Z| numbers), else sample by sample

    def side(self, use, grads, checking=False):
        """``use``: the recorded op (func, argument leaves, which leaves are parameters)."""
        from torch.func import vjp, vmap

        g, dim = grads[0], use.entry.out_dims[use.index][0]
        names = list(use.params)
        where = [use.params[k] for k in names]

        def op(*ps):
            leaves = list(use.leaves)
            for i, p in zip(where, ps):
                leaves[i] = p
            args, kwargs = pytree.tree_unflatten(leaves, use.spec)
            return use.func(*args, **kwargs)

        o = g.shape[0]
        gm = g.movedim(1 + dim, 1)  # (O, N, ...)
        n = gm.shape[1]
        with torch.no_grad():
            _, pull = vjp(op, *[self.slots[k].detach() for k in names])
            per = max(1, self.LANES_NUMEL // max(1, g.numel() * n))
            blocks = []
            for start in range(0, n, per):
                idx = torch.arange(start, min(n, start + per), device=g.device)
                mask = torch.zeros(len(idx), n, dtype=g.dtype, device=g.device)
                mask[torch.arange(len(idx)), idx] = 1
                lanes = gm.unsqueeze(0) * mask.view(len(idx), 1, n, *([1] * (gm.dim() - 2)))  # (n', O, N, ...)
                lanes = lanes.movedim(2, 2 + dim)
                blocks.append(vmap(vmap(pull))(lanes))
            jac = [torch.cat([b[i] for b in blocks]) for i in range(len(names))]
        return JacobianSide({k: j.reshape(n, o, -1) for k, j in zip(names, jac)}, n)

    def check_side(self, side, n, o):
        check_jacobian_side(self, side, n, o)

    def jacobians(self, side, slots):
        return {k: side.jac[k] for k in slots if k in side.jac}

    def summed(self, side, slots):
        return {k: side.jac[k].sum(0) for k in slots if k in side.jac}

    @classmethod
    def layers(cls, entry, flops_of):
        p = covered(entry.slots)
        return [Layer(cls.name, sum(numel(call.z) for call in entry.shapes), p, 1, False, p=p)]

    @classmethod
    def estimate(cls, layer, n, m, o, mode, symmetric):
        side = n if symmetric else n + m  # N·O lanes of each op's backward over the whole batch
        return LayerCost(2 * (n * n + (0 if symmetric else m * m)) * o * layer.s
                         + 2 * n * m * order_of(o, mode) * layer.p, jac_held=side * o * layer.p)
