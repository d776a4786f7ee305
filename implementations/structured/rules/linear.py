"""Linear over any leading dimensions, and ``F.linear`` calls on batched tokens ("linear ops"): the patch form.

The patch form, shared with convolutions (``conv.py``) and embeddings (``embedding.py``): a side's input X as
``(N, groups, K, S)`` (K inputs per position and group, S output positions) and its G as
``(O, N, groups, C, S)`` (C outputs per position and group). The weight's term is
Θ_W[n, m, o, p] = Σ_{s,t} (X1[n,s]·X2[m,t]) (G1[o,n,s]·G2[p,m,t]), taken per layer in the cheaper by FLOPs of
the Gram order (never forming a Jacobian) and the Jacobian order (per-sample blocks, then their contraction).
"""

from __future__ import annotations

import torch

from ...core.contractions import input_gram
from ...core.costs import Layer
from .base import LayerCost, Rule, batch_first, covered, numel, order_of


class PatchSide:
    """One side of a patch-form layer: x (N, groups, K, S) (None for an Embedding: ``ids`` (N, S) instead),
    g (O, N, groups, C, S)."""

    __slots__ = ("x", "g", "ids", "n", "s")

    def __init__(self, x, g, ids=None):
        self.x, self.g, self.ids = x, g, ids
        self.n, self.s = g.shape[1], g.shape[-1]


# What one more operator costs, in FLOPs (about a dispatch's time at a CPU core's GEMM rate; a GPU launch at its
# rate is of the same order). It decides between the orders only for tiny layers, where the Gram order's extra
# operators cost more than the FLOPs it saves.
OPERATOR_FLOPS = 1_000_000


def order_costs(n, m, o, s, t, k, c, groups, mode, symmetric=False):
    """FLOPs of (the Gram order, the Jacobian order) for one patch-form weight: K inputs per position and group,
    C outputs per position in all groups, S and T positions per sample.

    Gram: X1 X2ᵀ (2·N·M·S·T·groups·K), then G2 contracted over t (2·N·M·S·T·O·C), then G1 over s and c
    (2·N·M·S·O²·C; O instead of O² for trace and diagonal). One Linear position: (X1 X2ᵀ) ⊙ (G1 G2ᵀ),
    2·N·M·(K + O²·C). Jacobian: per-sample blocks (2·(N·S + M·T)·O·C·K) and their contraction (2·N·M·O²·C·K).
    """
    oo = order_of(o, mode)
    if s == 1 and t == 1 and groups == 1:
        gram = 2 * n * m * (k + oo * c)
    else:  # (and its 8 or so more operators than the Jacobian order's, which decide for tiny layers)
        gram = 2 * n * m * s * t * (groups * k + o * c) + 2 * n * m * s * oo * c + 8 * OPERATOR_FLOPS
    build = n * s if symmetric else n * s + m * t
    jac = 2 * build * o * c * k + 2 * n * m * oo * c * k
    return gram, jac


def patch_gram(total, x1x2, g1, g2, mode):
    """Add Σ_{group,s,t} xx[group, (n,s), (m,t)] · Σ_c G1[o,n,group,c,s] G2[p,m,group,c,t] to ``total``.

    ``x1x2``: (groups, N·S, M·T). G2 is contracted first (over t), then G1 over (group, c, s): no N·M·O²·S·T
    intermediate.
    """
    o, n, gr, c, s = g1.shape
    m, t = g2.shape[1], g2.shape[-1]
    xxm = x1x2.view(gr, n * s, m, t).transpose(1, 2)  # (gr, M, N·S, T)
    g2p = g2.permute(2, 1, 4, 0, 3).reshape(gr, m, t, o * c)  # (gr, M, T, O·C)
    h = torch.matmul(xxm, g2p)  # (gr, M, N·S, O·C)
    h = h.view(gr, m, n, s, o, c).permute(2, 0, 5, 3, 1, 4).reshape(n, gr * c * s, m, o)  # (N, j, M, P)
    g1p = g1.permute(1, 0, 2, 3, 4).reshape(n, o, gr * c * s)  # (N, O, j)
    if mode == "full":
        total.add(torch.bmm(g1p, h.reshape(n, gr * c * s, m * o)).view(n, o, m, o).transpose(1, 2))
    elif mode == "trace":
        total.add(torch.einsum("noj,njmo->nm", g1p, h))
    else:
        total.add(torch.einsum("noj,njmo->nmo", g1p, h))


def patch_jacobian(side: PatchSide) -> torch.Tensor:
    """J[n, o, (group, c, k)] = Σ_s G[o,n,group,c,s]·X[n,group,k,s]: one batched GEMM, the weight's layout."""
    x, g = side.x, side.g
    o, n, gr, c, s = g.shape
    k = x.shape[2]
    gp = g.permute(1, 2, 0, 3, 4).reshape(n * gr, o * c, s)
    j = torch.bmm(gp, x.reshape(n * gr, k, s).transpose(1, 2))  # (N·gr, O·C, K)
    if gr == 1:
        return j.view(n, o, c * k)
    return j.view(n, gr, o, c, k).transpose(1, 2).reshape(n, o, gr * c * k)


def linear_jacobian(side: PatchSide) -> torch.Tensor:
    """A Linear's J[n, o, (c, k)] = Σ_s G[o,n,s,c]·X[n,s,k] as one batched GEMM over the (output, sample) pairs,
    reading G in the layout the backward wrote it ((O, N, S, C): C innermost, which ``patch_jacobian`` would
    first have to transpose) and X repeated per output. Returned as an (N, O, P) view of an (O, N, P) tensor
    (``KernelSum.add_jacobians`` contracts it in that order without a copy)."""
    x = side.x[:, 0].transpose(1, 2)  # (N, S, K)
    g = side.g[:, :, 0].transpose(2, 3)  # (O, N, S, C)
    o, n, s, c = g.shape
    k = x.shape[-1]
    j = torch.bmm(g.reshape(o * n, s, c).transpose(1, 2), x.expand(o, n, s, k).reshape(o * n, s, k))
    return j.view(o, n, c * k).transpose(0, 1)


def bias_jacobian(g: torch.Tensor) -> torch.Tensor:
    """Σ_s G as (N, O, C) for G (O, N, groups, C, S)."""
    o, n = g.shape[:2]
    return g.sum(-1).reshape(o, n, -1).transpose(0, 1)


def patch_estimate(layer: Layer, n: int, m: int, o: int, mode: str, symmetric: bool) -> LayerCost:
    """A Linear's or a ConvNd's cost: the cheaper order; the output Linear's (X1 X2ᵀ + 1) ⊗ I, one N x M GEMM."""
    if layer.is_output:
        return LayerCost(2 * n * m * layer.k + n * m * o, g_numbers=layer.s * layer.c)
    gram, jac = order_costs(n, m, o, layer.s, layer.s, layer.k, layer.c, layer.groups, mode, symmetric)
    side = n if symmetric else n + m
    cost = LayerCost(min(gram, jac), patches=layer.s * layer.k * layer.groups, g_numbers=layer.s * layer.c)
    if gram <= jac:
        cost.gram_held = n * m * layer.s * (layer.s * layer.groups + o * layer.c)
    else:
        cost.jac_held = side * o * (layer.p or layer.c * layer.k)
    return cost


class PatchRule(Rule):
    """The patch form's common part (Linear, ConvNd): Gram and Jacobian orders, the side's checks. Subclasses say
    how a use becomes a ``PatchSide`` (``side``) and what one call costs (``layers``)."""

    gram_capable = True
    groups = 1

    def check_side(self, side, n, o):
        k, c = self.sizes()
        self.expect("X (N, groups, K, S)", side.x.shape, (n, self.groups, k, None))
        self.expect("G (O, N, groups, C, S)", side.g.shape, (o, n, self.groups, c // self.groups, side.x.shape[-1]))

    def sizes(self) -> tuple[int, int]:
        """(K inputs per position and group, C outputs per position in all groups) of the weight."""
        w = self.module.weight
        return w.numel() // w.shape[0], w.shape[0]

    def costs(self, s1, s2, mode, symmetric):
        o, n, gr, c, s = s1.g.shape
        return order_costs(n, s2.n, o, s, s2.s, s1.x.shape[2], gr * c, gr, mode, symmetric)

    def add_gram(self, total, s1, s2, symmetric, bias, options):
        """The weight's (and the bias's) Gram term: one Linear position through KernelSum's (X1X2ᵀ+1) ⊙ G1G2ᵀ."""
        if s1.s == 1 and s2.s == 1 and self.groups == 1:
            x1, x2 = s1.x[:, 0, :, 0], s2.x[:, 0, :, 0]
            g1, g2 = s1.g[:, :, 0, :, 0], s2.g[:, :, 0, :, 0]
            total.add_gram(input_gram(x1, x2, bias), g1, g2, symmetric=symmetric)
            return []
        gr, k = self.groups, s1.x.shape[2]
        a = s1.x.permute(1, 0, 3, 2).reshape(gr, s1.n * s1.s, k)
        b = a if symmetric else s2.x.permute(1, 0, 3, 2).reshape(gr, s2.n * s2.s, k)
        patch_gram(total, torch.bmm(a, b.transpose(1, 2)), s1.g, s2.g, total.mode)
        return [(bias_jacobian(s1.g), None if symmetric else bias_jacobian(s2.g))] if bias else []

    def jacobians(self, side, slots):
        out = {}
        if "weight" in slots:
            out["weight"] = self.weight_jacobian(side)
        if "bias" in slots:
            out["bias"] = bias_jacobian(side.g)
        return out

    def weight_jacobian(self, side):
        """The weight's (N, O, P) Jacobian block."""
        return patch_jacobian(side)

    def summed(self, side, slots):
        out = {}
        x, g = side.x, side.g
        o, n, gr, c, s = g.shape
        if "weight" in slots:
            gp = g.permute(2, 0, 3, 1, 4).reshape(gr, o * c, n * s)
            xp = x.permute(1, 0, 3, 2).reshape(gr, n * s, -1)
            out["weight"] = torch.bmm(gp, xp).view(gr, o, c, -1).transpose(0, 1).reshape(o, -1)
        if "bias" in slots:
            out["bias"] = g.sum((1, 4)).reshape(o, -1)
        return out

    @classmethod
    def estimate(cls, layer, n, m, o, mode, symmetric):
        return patch_estimate(layer, n, m, o, mode, symmetric)


class LinearRule(PatchRule):
    """nn.Linear over any leading dimensions (tokens are positions): K = in_features, C = out_features, S the
    positions per sample. Its G is the identity where its output is the model's (N, O) output (the shortcut)."""

    name = "linear"
    output_shortcut = True

    @classmethod
    def batched(cls, module, dx, dz, rank):
        return dx == dz and dx < rank - 1  # (the features stay last)

    def side(self, use, grads, checking=False):
        x, g = batch_first(use, grads[0])
        return self.patch_side(x, g)

    @staticmethod
    def patch_side(x, g):
        """x (N, ..., K), g (O, N, ..., C) as the patch form, one group."""
        o, n = g.shape[:2]
        k, c = x.shape[-1], g.shape[-1]
        x = x.reshape(n, -1, k).transpose(1, 2).unsqueeze(1)  # (N, 1, K, S)
        g = g.reshape(o, n, -1, c).transpose(2, 3).unsqueeze(2)  # (O, N, 1, C, S)
        return PatchSide(x, g)

    def weight_jacobian(self, side):
        return linear_jacobian(side)

    @classmethod
    def layers(cls, entry, flops_of):
        c, k = entry.module.weight.shape
        return [Layer(cls.name, numel(call.z) // c, k, c, "bias" in entry.slots, is_output=call.is_output,
                      p=covered(entry.slots)) for call in entry.shapes]


class LinearOpRule(LinearRule):
    """A parameter a module reads only as ``F.linear``'s weight (and its bias as that call's bias) on batched
    tokens (MultiheadAttention's projections as ``rewrites.projected_mha`` computes them, a user's
    ``F.linear(x, self.weight, self.bias)``): the Linear rule on each call's recorded input and output."""

    name = "linear_op"
    level = "op"
    output_shortcut = False

    def sizes(self):
        w = self.slots["weight"]
        return w.shape[1], w.shape[0]

    @classmethod
    def layers(cls, entry, flops_of):
        c, k = entry.slots["weight"].shape
        return [Layer(cls.name, numel(call.z) // c, k, c, "bias" in entry.slots, p=covered(entry.slots))
                for call in entry.shapes]

