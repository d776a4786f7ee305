"""Embedding: a Linear on one-hot ids, in the patch form without the one-hot."""

from __future__ import annotations

import torch

from ...core.costs import Layer
from .base import LayerCost, Rule, batch_first, covered, numel, order_of
from .linear import PatchSide, order_costs, patch_gram


class EmbeddingRule(Rule):
    """nn.Embedding: a Linear on one-hot ids (K = the vocabulary, C = the embedding width, S the ids per sample).
    Gram order: X1 X2ᵀ is [id1[n,s] == id2[m,t]] (no one-hot); Jacobian order: the per-sample gradients
    scattered into the (V, D) table. No gradient reaches the padding row."""

    name = "embedding"
    gram_capable = True

    @classmethod
    def problem(cls, module):
        if module.max_norm is not None:  # renormalises its weight in place on every call: a different function
            return "Embedding with max_norm (it rewrites its weight in place on every forward)"
        if module.scale_grad_by_freq:  # autograd's gradient is then not the derivative: nothing to check against
            return "Embedding with scale_grad_by_freq (its autograd gradient is not the derivative)"
        return None

    @classmethod
    def batched(cls, module, dx, dz, rank):
        return dx == dz

    def side(self, use, grads, checking=False):
        ids, g = batch_first(use, grads[0])
        o, n = g.shape[:2]
        ids = ids.reshape(n, -1)
        g = g.reshape(o, n, -1, g.shape[-1])
        if self.module.padding_idx is not None:  # no gradient flows to the padding row
            g = g * (ids != self.module.padding_idx).to(g.dtype).unsqueeze(-1)
        return PatchSide(None, g.transpose(2, 3).unsqueeze(2), ids=ids)

    def check_side(self, side, n, o):
        self.expect("the ids (N, S)", side.ids.shape, (n, None))
        self.expect("G (O, N, 1, D, S)", side.g.shape, (o, n, 1, self.module.embedding_dim, side.ids.shape[1]))

    def costs(self, s1, s2, mode, symmetric):
        o, n, _, d, s = s1.g.shape
        gram, _ = order_costs(n, s2.n, o, s, s2.s, 0, d, 1, mode, symmetric)
        gram += n * s2.n * s * s2.s  # the index comparisons
        v = self.module.num_embeddings
        jac = 2 * (n * s if symmetric else n * s + s2.n * s2.s) * o * d + 2 * n * s2.n * order_of(o, mode) * d * v
        return gram, jac

    def add_gram(self, total, s1, s2, symmetric, bias, options):
        eq = s1.ids.reshape(-1, 1) == s2.ids.reshape(1, -1)  # (N·S, M·T)
        pairs = eq.nonzero()
        if pairs.shape[0] <= options.embedding_sparse_below * eq.numel():
            total.add(self._pair_sum(pairs, s1, s2, total.mode))
        else:
            patch_gram(total, eq.to(s1.g.dtype).unsqueeze(0), s1.g, s2.g, total.mode)
        return []

    @staticmethod
    def _pair_sum(pairs, s1, s2, mode):
        """Σ over token pairs with the same id of G1[o,n,s]·G2[p,m,t] (over the embedding dimension), in the mode's
        shape: a GEMM of O x D by D x O per pair, scattered into its (n, m)."""
        o, n, _, d, s = s1.g.shape
        m, t = s2.n, s2.s
        i, j = pairs[:, 0], pairs[:, 1]
        a = s1.g[:, :, 0].permute(1, 3, 0, 2).reshape(n * s, o, d)[i]  # (E, O, D)
        b = s2.g[:, :, 0].permute(1, 3, 0, 2).reshape(m * t, o, d)[j]
        where = torch.div(i, s, rounding_mode="floor") * m + torch.div(j, t, rounding_mode="floor")
        if mode == "full":
            terms, shape = torch.bmm(a, b.transpose(1, 2)), (n, m, o, o)
        elif mode == "trace":
            terms, shape = (a * b).sum((1, 2)), (n, m)
        else:
            terms, shape = (a * b).sum(2), (n, m, o)
        out = torch.zeros((n * m,) + terms.shape[1:], dtype=terms.dtype, device=terms.device)
        return out.index_add_(0, where, terms).view(shape)

    def jacobians(self, side, slots):
        o, n, _, d, s = side.g.shape
        v = self.module.num_embeddings
        rows = (torch.arange(n, device=side.ids.device).unsqueeze(1) * v + side.ids).reshape(-1)
        src = side.g[:, :, 0].permute(1, 3, 0, 2).reshape(n * s, o * d)
        j = torch.zeros(n * v, o * d, dtype=src.dtype, device=src.device).index_add_(0, rows, src)
        return {"weight": j.view(n, v, o, d).transpose(1, 2).reshape(n, o, v * d)}

    def summed(self, side, slots):
        o, n, _, d, s = side.g.shape
        src = side.g[:, :, 0].permute(1, 3, 0, 2).reshape(n * s, o * d)
        j = torch.zeros(self.module.num_embeddings, o * d, dtype=src.dtype, device=src.device)
        j.index_add_(0, side.ids.reshape(-1), src)
        return {"weight": j.view(-1, o, d).transpose(0, 1).reshape(o, -1)}

    @classmethod
    def layers(cls, entry, flops_of):
        mod = entry.module
        return [Layer(cls.name, numel(call.x), mod.num_embeddings, mod.embedding_dim, False, p=covered(entry.slots))
                for call in entry.shapes]

    @classmethod
    def estimate(cls, layer, n, m, o, mode, symmetric):
        side = n if symmetric else n + m
        gram, _ = order_costs(n, m, o, layer.s, layer.s, 0, layer.c, layer.groups, mode, symmetric)
        gram += n * m * layer.s * layer.s
        jac = 2 * side * layer.s * o * layer.c + 2 * n * m * order_of(o, mode) * layer.c * layer.k
        cost = LayerCost(min(gram, jac), g_numbers=layer.s * layer.c)
        if gram <= jac:
            cost.gram_held = n * m * layer.s * (layer.s * layer.groups + o * layer.c)
        else:
            cost.jac_held = side * o * (layer.p or layer.c * layer.k)
        return cost
