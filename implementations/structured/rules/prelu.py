"""PReLU's weight: y = max(x, 0) + weight ⊙ min(x, 0), one slope per channel (dimension 1) or one for all."""

from __future__ import annotations

from ...core.costs import Layer
from .base import LayerCost, Rule, batch_first, covered, numel, order_of


class PReLUSide:
    """One side: min(x, 0) as (N, C, L) and G as (O, N, C, L), C the slopes (1: one slope over everything)."""

    __slots__ = ("neg", "g", "n")

    def __init__(self, neg, g):
        self.neg, self.g, self.n = neg, g, g.shape[1]


class PReLURule(Rule):
    """nn.PReLU: J_weight[n, o, c] = Σ_positions min(x, 0)[n, c] ⊙ G[o, n, c] (Jacobian order, P = C)."""

    name = "prelu"

    @classmethod
    def batched(cls, module, dx, dz, rank):
        if module.num_parameters > 1:  # (the slopes run along dimension 1: the batch must be dimension 0)
            return dx == 0 and dz == 0 and rank >= 2
        return dx == dz

    def side(self, use, grads, checking=False):
        x, g = batch_first(use, grads[0])
        o, n = g.shape[:2]
        c = self.module.num_parameters
        neg = x.clamp(max=0).reshape(n, c, -1)
        return PReLUSide(neg, g.reshape(o, n, c, -1))

    def check_side(self, side, n, o):
        self.expect("min(x, 0) (N, C, L)", side.neg.shape, (n, self.module.num_parameters, None))
        self.expect("G (O, N, C, L)", side.g.shape, (o,) + tuple(side.neg.shape))

    def jacobians(self, side, slots):
        return {"weight": (side.g * side.neg).sum(-1).transpose(0, 1)}

    @classmethod
    def layers(cls, entry, flops_of):
        c = entry.module.num_parameters
        return [Layer(cls.name, numel(call.z) // c, 1, c, False, p=covered(entry.slots)) for call in entry.shapes]

    @classmethod
    def estimate(cls, layer, n, m, o, mode, symmetric):
        side = n if symmetric else n + m
        return LayerCost(2 * side * o * layer.s * layer.c + 2 * n * m * order_of(o, mode) * layer.p,
                         jac_held=side * o * layer.p, g_numbers=layer.s * layer.c)
