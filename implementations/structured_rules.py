"""The structured plugin's per-layer rules: a layer's contribution to Θ from its recorded input and output gradient.

Every rule sees, per side (x1, x2), the layer's recorded input and G = ∂f_o/∂Z for all O outputs at once, with
the batch dimension first, and offers some of:

- ``jacobians(side)``: the per-sample Jacobian of each of its parameters, (N, O, P) in the parameter's own
  (flattened) layout, so that the blocks of one parameter used twice can be summed before contracting;
- ``gram_cost`` / ``add_gram``: the Gram order, Θ = Σ_{s,t} (X1 X2ᵀ)[s,t] ⊙ (G1 G2ᵀ)[s,t] over output
  positions s, t, which never forms a Jacobian;
- ``summed(side)``: Σ_n of the per-sample Jacobian, (O, *shape), to check the plan against autograd.

Linear (over any leading dimensions: tokens are positions), ConvNd (patches of the padded input, groups
included) and Embedding (a Linear on one-hot ids: its X1 X2ᵀ is index equality) share the patch form: X as
(N, groups, K, S) and G as (O, N, groups, C, S). Affine normalisations (eval BatchNorm, LayerNorm, GroupNorm,
RMSNorm) scale the normalised input x̂ per channel: J_weight = Σ_positions x̂ ⊙ G, J_bias = Σ_positions G.
Every other module with parameters takes the generic rule: its own per-sample parameter Jacobian from its
recorded inputs and output gradients (``torch.func``: vmap over samples of the vjp of ``functional_call``,
vmapped over the O gradients), or, where vmap cannot run the module (LSTM, GRU), one sample at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

# -- which rule a module takes ------------------------------------------------------------------------------------

_CONV_FORWARDS = {c.forward: c._conv_forward for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)}
_RMSNORM = getattr(nn, "RMSNorm", None)


def _trainable_names(module: nn.Module) -> set[str]:
    return {k for k, p in module._parameters.items() if p is not None and p.requires_grad}


def rule_kind(module: nn.Module) -> tuple[str | None, str | None]:
    """(kind, problem): the rule a module with parameters takes, "linear", "conv", "embedding", "norm", or None
    for the generic rule; ``problem`` says why the module cannot be computed at all (None when it can).

    A dedicated rule needs the layer's own ``forward`` (a subclass overriding it is generic), its parameters held
    as plain ``weight`` / ``bias`` (a parametrization, or extra parameters as old-style ``weight_norm`` adds,
    make it generic).
    """
    from torch.nn.utils import parametrize

    cls = type(module)
    if parametrize.is_parametrized(module) or not _trainable_names(module) <= {"weight", "bias"}:
        return None, None
    if cls.forward is nn.Linear.forward:
        return "linear", None
    if _CONV_FORWARDS.get(cls.forward, False) is getattr(cls, "_conv_forward", None):
        return "conv", None
    if cls.forward is nn.Embedding.forward:
        if module.max_norm is not None:  # renormalises its weight in place on every call: a different function
            return None, "Embedding with max_norm (it rewrites its weight in place on every forward)"
        if module.scale_grad_by_freq:  # autograd's gradient is then not the derivative: nothing to check against
            return None, "Embedding with scale_grad_by_freq (its autograd gradient is not the derivative)"
        return "embedding", None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and cls.forward is nn.modules.batchnorm._BatchNorm.forward:
        if module.training or module.running_mean is None:
            return None, (f"{cls.__name__} normalises with batch statistics (training mode or "
                          "track_running_stats=False): the kernel depends on the batch; call model.eval()")
        return "norm", None
    if cls.forward in (nn.LayerNorm.forward, nn.GroupNorm.forward) or \
            (_RMSNORM is not None and cls.forward is _RMSNORM.forward):
        return "norm", None
    return None, None


# -- the patch form: Linear, ConvNd, Embedding ----------------------------------------------------------------------

def conv_patches(x: torch.Tensor, conv: nn.modules.conv._ConvNd) -> torch.Tensor:
    """The convolution's input patches as (N, groups, C_in/groups · prod(kernel), S): the padded input (every
    padding mode, ``padding="same"`` included) read as a strided view and copied once."""
    d = len(conv.kernel_size)
    if isinstance(conv.padding, str):  # "valid" or "same" (stride 1): PyTorch pads the extra one on the right
        pad = []
        for k, dil in zip(conv.kernel_size, conv.dilation):
            total = dil * (k - 1) if conv.padding == "same" else 0
            pad.append((total // 2, total - total // 2))
    else:
        pad = [(p, p) for p in conv.padding]
    flat = [v for lr in reversed(pad) for v in lr]  # F.pad's order: last dimension first
    if any(flat):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, flat, mode=mode)
    for i, (k, dil, st) in enumerate(zip(conv.kernel_size, conv.dilation, conv.stride)):
        x = x.unfold(2 + i, (k - 1) * dil + 1, st)
        if dil > 1:
            x = x[..., ::dil]
    # x: (N, C, *out, *kernel) -> (N, C, *kernel, *out)
    n, c = x.shape[:2]
    out = x.shape[2:2 + d]
    x = x.permute(0, 1, *range(2 + d, 2 + 2 * d), *range(2, 2 + d))
    return x.reshape(n, conv.groups, (c // conv.groups) * math.prod(conv.kernel_size), math.prod(out))


class PatchSide:
    """One side of a patch-form layer: x (N, groups, K, S) (None for Embedding: ``ids``), g (O, N, groups, C, S)."""

    __slots__ = ("x", "g", "ids", "n", "s")

    def __init__(self, x, g, ids=None):
        self.x, self.g, self.ids = x, g, ids
        self.n, self.s = g.shape[1], g.shape[-1]


# What one more operator costs, in FLOPs: about 20 us of dispatch at 50 GFLOP/s (2 CPU cores here; on a GPU a
# launch of a few us at TFLOP/s is of the same order). It decides between the orders only for tiny layers: on the
# text transformer (16-wide tokens, N=16) the Gram order's extra operators cost more than its FLOPs saved.
OPERATOR_FLOPS = 1_000_000


def order_costs(n, m, o, s, t, k, c, groups, mode, symmetric=False):
    """FLOPs of (the Gram order, the Jacobian order) for one patch-form weight: K inputs per position and group,
    C outputs per position in all groups, S and T positions per sample.

    Gram: X1 X2ᵀ (2·N·M·S·T·groups·K), then G2 contracted over t (2·N·M·S·T·O·C), then G1 over s and c
    (2·N·M·S·O²·C; O instead of O² for trace and diagonal). One Linear position: (X1 X2ᵀ) ⊙ (G1 G2ᵀ),
    2·N·M·(K + O²·C). Jacobian: per-sample blocks (2·(N·S + M·T)·O·C·K) and their contraction (2·N·M·O²·C·K).
    """
    oo = o * o if mode == "full" else o
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


class LinearRule:
    """Linear over any leading dimensions, and ConvNd (``conv=True``): the patch form with K inputs per position."""

    kind = "linear"
    gram_capable = True

    def __init__(self, module):
        self.module = module
        self.conv = isinstance(module, nn.modules.conv._ConvNd)
        self.groups = module.groups if self.conv else 1

    def side(self, x, g, z_shape):
        """x: the layer's input with the batch first; g: (O, N, *out) with the batch first."""
        o, n = g.shape[:2]
        if self.conv:
            x = conv_patches(x, self.module)
            g = g.reshape(o, n, self.groups, -1, x.shape[-1])
        else:
            k, c = x.shape[-1], g.shape[-1]
            x = x.reshape(n, -1, k).transpose(1, 2).unsqueeze(1)  # (N, 1, K, S)
            g = g.reshape(o, n, -1, c).transpose(2, 3).unsqueeze(2)  # (O, N, 1, C, S)
        return PatchSide(x, g)

    def costs(self, s1, s2, mode, symmetric):
        o, n, gr, c, s = s1.g.shape
        return order_costs(n, s2.n, o, s, s2.s, s1.x.shape[2], gr * c, gr, mode, symmetric)

    def add_gram(self, total, s1, s2, symmetric, bias):
        """The weight's (and the bias's) Gram term: one Linear position through KernelSum's (X1X2ᵀ+1) ⊙ G1G2ᵀ."""
        from .core.kernels import input_gram

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
            out["weight"] = linear_jacobian(side) if not self.conv else patch_jacobian(side)
        if "bias" in slots:
            out["bias"] = bias_jacobian(side.g)
        return out

    def summed(self, side, slots):
        """Σ_n J as (O, P) per slot."""
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


class EmbeddingRule:
    """Embedding: a Linear on one-hot ids. Gram order: X1 X2ᵀ is [id1[n,s] == id2[m,t]] (no one-hot);
    Jacobian order: the per-sample gradients scattered into the (V, D) table."""

    kind = "embedding"
    gram_capable = True

    def __init__(self, module):
        self.module = module

    def side(self, ids, g, z_shape):
        o, n = g.shape[:2]
        ids = ids.reshape(n, -1)
        g = g.reshape(o, n, -1, g.shape[-1])
        if self.module.padding_idx is not None:  # no gradient flows to the padding row
            g = g * (ids != self.module.padding_idx).to(g.dtype).unsqueeze(-1)
        return PatchSide(None, g.transpose(2, 3).unsqueeze(2), ids=ids)

    def costs(self, s1, s2, mode, symmetric):
        o, n, _, d, s = s1.g.shape
        gram, _ = order_costs(n, s2.n, o, s, s2.s, 0, d, 1, mode, symmetric)
        gram += n * s2.n * s * s2.s  # the index comparisons
        v = self.module.num_embeddings
        oo = o * o if mode == "full" else o
        jac = 2 * (n * s if symmetric else n * s + s2.n * s2.s) * o * d + 2 * n * s2.n * oo * d * v
        return gram, jac

    # The equal-id pairs are summed one by one when there are fewer than this fraction of all token pairs (a large
    # vocabulary: few tokens share an id), else through the dense index-equality matrix.
    SPARSE_BELOW = 1 / 16

    def add_gram(self, total, s1, s2, symmetric, bias):
        eq = s1.ids.reshape(-1, 1) == s2.ids.reshape(1, -1)  # (N·S, M·T)
        pairs = eq.nonzero()
        if pairs.shape[0] <= self.SPARSE_BELOW * eq.numel():
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


# -- affine normalisation ----------------------------------------------------------------------------------------------

class NormSide:
    __slots__ = ("xhat", "g", "n")

    def __init__(self, xhat, g):
        self.xhat, self.g, self.n = xhat, g, g.shape[1]


class NormRule:
    """y = x̂ ⊙ weight + bias with x̂ the normalised input, per channel (BatchNorm in eval: running statistics;
    GroupNorm) or per trailing element (LayerNorm, RMSNorm): J_weight = Σ_positions x̂ ⊙ G, J_bias = Σ G.
    Jacobian order only: its Gram order would sum the same products over pairs of positions."""

    kind = "norm"
    gram_capable = False

    def __init__(self, module):
        self.module = module
        self.per_channel = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))

    def normalised(self, x):
        mod = self.module
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return (x - mod.running_mean.view(shape)) * torch.rsqrt(mod.running_var.view(shape) + mod.eps)
        if isinstance(mod, nn.GroupNorm):
            return F.group_norm(x, mod.num_groups, None, None, mod.eps)
        if isinstance(mod, nn.LayerNorm):
            return F.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
        return F.rms_norm(x, mod.normalized_shape, None, mod.eps)

    def side(self, x, g, z_shape):
        o, n = g.shape[:2]
        xhat = self.normalised(x)
        if self.per_channel:  # (N, C, L)
            return NormSide(xhat.reshape(n, xhat.shape[1], -1), g.reshape(o, n, g.shape[2], -1))
        e = math.prod(self.module.normalized_shape)  # (N, L, E)
        return NormSide(xhat.reshape(n, -1, e), g.reshape(o, n, -1, e))

    def jacobians(self, side, slots):
        out = {}
        if self.per_channel:
            if "weight" in slots:
                out["weight"] = (side.g * side.xhat).sum(-1).transpose(0, 1)  # (einsum: a bmm per (n, c))
            if "bias" in slots:
                out["bias"] = side.g.sum(-1).transpose(0, 1)
        else:
            if "weight" in slots:
                out["weight"] = (side.g * side.xhat).sum(2).transpose(0, 1)
            if "bias" in slots:
                out["bias"] = side.g.sum(2).transpose(0, 1)
        return out

    def summed(self, side, slots):
        return {k: v.sum(0) for k, v in self.jacobians(side, slots).items()}


# -- the generic rule --------------------------------------------------------------------------------------------------

def _softmax(x, dim, dtype=None):
    """softmax as exp(x - max) / sum: its backward is made of ops vmap batches (``_softmax_backward_data`` under
    torch.func.vmap was about 40 times slower than this on the same cotangents)."""
    if dtype is not None:
        x = x.to(dtype)
    e = torch.exp(x - x.detach().amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention's math form (PyTorch's reference formula) with ``_softmax``."""
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return _softmax(scores, -1) @ value


def _batchable_softmax(x, dim=None, _stacklevel=3, dtype=None):
    return _softmax(x, dim, dtype) if dim is not None and x.is_floating_point() else \
        _F_SOFTMAX(x, dim, _stacklevel, dtype)


def _batchable_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False):
    if dropout_p or enable_gqa:
        return _F_ATTENTION(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale)


_F_SOFTMAX, _F_ATTENTION, _F_MHA = F.softmax, F.scaled_dot_product_attention, F.multi_head_attention_forward

# How many MultiheadAttention calls ``_projected_mha`` has computed (the plan compares such models' recorded
# output with their own forward).
projected_mha_calls = 0


def _projected_mha(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
                   add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True, key_padding_mask=None,
                   need_weights=True, attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None,
                   k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
                   is_causal=False):
    """torch.nn.functional.multi_head_attention_forward for self-attention with packed projections, written so
    that both projections are ``F.linear`` calls on (L, N, E) tensors: the plan sees the parameters as Linears
    over tokens (``structured_plan``'s linear ops), where PyTorch's own code applies the output projection to
    (L·N, E) rows. The same operations otherwise, masks merged as PyTorch merges them; any other configuration
    (cross-attention, separate projection weights, bias_k/bias_v, zero attention, static keys, dropout while
    training, unbatched input) goes to PyTorch's function."""
    global projected_mha_calls
    e = query.shape[-1] if query.dim() == 3 else None
    if query.dim() != 3 or not (query is key and key is value) or use_separate_proj_weight or \
            in_proj_weight is None or bias_k is not None or bias_v is not None or add_zero_attn or \
            static_k is not None or static_v is not None or (training and dropout_p > 0) or \
            e != embed_dim_to_check or e % num_heads or (is_causal and attn_mask is None) or \
            (attn_mask is not None and tuple(attn_mask.shape[-2:]) != (query.shape[0],) * 2) or \
            (attn_mask is not None and attn_mask.dim() == 3 and attn_mask.shape[0] != query.shape[1] * num_heads) or \
            (attn_mask is not None and attn_mask.dim() not in (2, 3)) or \
            (key_padding_mask is not None and tuple(key_padding_mask.shape) != tuple(query.shape[1::-1])):
        return _F_MHA(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k,
                      bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=training,
                      key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                      use_separate_proj_weight=use_separate_proj_weight, q_proj_weight=q_proj_weight,
                      k_proj_weight=k_proj_weight, v_proj_weight=v_proj_weight, static_k=static_k,
                      static_v=static_v, average_attn_weights=average_attn_weights, is_causal=is_causal)
    projected_mha_calls += 1
    length, n, _ = query.shape
    heads, hd = num_heads, e // num_heads
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)  # (1 or N·heads, L, L)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(n, 1, 1, length).expand(-1, heads, -1, -1).reshape(n * heads, 1, length)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    proj = F.linear(query, in_proj_weight, in_proj_bias)  # (L, N, 3E)
    q, k, v = proj.unflatten(-1, (3, heads, hd)).permute(2, 1, 3, 0, 4)  # each (N, heads, L, hd)
    if need_weights:
        scores = (q * math.sqrt(1.0 / hd)) @ k.transpose(-2, -1)  # (N, heads, L, L)
        if attn_mask is not None:
            scores = scores + (attn_mask.view(n, heads, attn_mask.shape[-2], length) if attn_mask.shape[0] > 1
                               else attn_mask)
        weights = F.softmax(scores, dim=-1)
        out = weights @ v
    else:
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else attn_mask.view(n, heads, -1, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal)
    out = F.linear(out.permute(2, 0, 1, 3).reshape(length, n, e), out_proj_weight, out_proj_bias)  # (L, N, E)
    if not need_weights:
        return out, None
    return out, weights.mean(dim=1) if average_attn_weights else weights


class _BatchableOps(torch.overrides.TorchFunctionMode):
    """The model's own softmax and scaled_dot_product_attention calls by ``_softmax`` / ``_attention`` (dropout
    and grouped-query attention left to PyTorch's own); those from inside torch.nn.functional
    (multi_head_attention_forward) go to the module's names, which ``math_attention`` points at them."""

    SOFTMAX = (torch.softmax, _F_SOFTMAX, torch.Tensor.softmax, torch.special.softmax)
    ATTENTION = (_F_ATTENTION,)

    def __init__(self):
        super().__init__()
        self.hits = 0  # calls it replaced

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SOFTMAX and args and isinstance(args[0], torch.Tensor):
            self.hits += 1
            rest = list(args[1:])
            dim = kwargs.get("dim", rest[0] if rest else None)
            dtype = kwargs.get("dtype", rest[2] if func is _F_SOFTMAX and len(rest) > 2 else
                               (rest[1] if func is not _F_SOFTMAX and len(rest) > 1 else None))
            return _batchable_softmax(args[0], dim, dtype=dtype)
        if func in self.ATTENTION:
            self.hits += 1
            return _batchable_attention(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _functional_names():
    """torch.nn.functional's softmax and scaled_dot_product_attention pointed at the batchable forms, and
    multi_head_attention_forward at ``_projected_mha``; restored."""
    F.softmax, F.scaled_dot_product_attention = _batchable_softmax, _batchable_attention
    F.multi_head_attention_forward = _projected_mha
    try:
        yield
    finally:
        F.softmax, F.scaled_dot_product_attention = _F_SOFTMAX, _F_ATTENTION
        F.multi_head_attention_forward = _F_MHA


# Whether the model calls softmax / scaled_dot_product_attention itself (the plan says; unknown: True): the torch
# function mode that replaces those calls costs a few microseconds on every other call (an LSTM's per-step ops).
_DIRECT_CALLS: contextvars.ContextVar = contextvars.ContextVar("structured_direct_softmax", default=True)


@contextlib.contextmanager
def direct_calls(present: bool):
    """Inside: ``math_attention`` intercepts the model's own softmax/attention calls only when ``present``."""
    token = _DIRECT_CALLS.set(present)
    try:
        yield
    finally:
        _DIRECT_CALLS.reset(token)


@contextlib.contextmanager
def math_attention(direct: bool | None = None):
    """Attention in a form vmap batches: softmax and scaled_dot_product_attention as ``_softmax`` /
    ``_attention`` (the fused CPU attention kernel and softmax's backward have no batching rule: vmap would run
    them sample by sample and output by output), any other attention through PyTorch's math kernel. Calls from
    inside torch.nn.functional (MultiheadAttention) always; the model's own calls when ``direct`` (default: what
    ``direct_calls`` says). Yields the torch function mode (its ``hits``), or None."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch without the context manager: the default kernels
        kernel = contextlib.nullcontext()
    else:
        kernel = sdpa_kernel([SDPBackend.MATH])
    mode = _BatchableOps() if (_DIRECT_CALLS.get() if direct is None else direct) else None
    with kernel, _functional_names(), (mode if mode is not None else contextlib.nullcontext()):
        yield mode


def _rnn_supported(module) -> bool:
    """nn.RNN / LSTM / GRU configurations ``functional_rnn`` reproduces (no projections; inter-layer dropout only
    in eval mode)."""
    return type(module) in (nn.RNN, nn.LSTM, nn.GRU) and not getattr(module, "proj_size", 0) and \
        not (module.training and module.dropout > 0)


def functional_rnn(module, params, args, kwargs):
    """nn.RNN / LSTM / GRU's forward written with per-step ops that torch.func.vmap can batch (aten::lstm and
    aten::gru have no batching rule), taking the parameters from ``params`` where given. Same outputs as the
    module: (output, h_n) or (output, (h_n, c_n)). The generic rule checks it against the module's own output."""
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    lstm, gru = isinstance(module, nn.LSTM), isinstance(module, nn.GRU)
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(1 if not module.batch_first else 0)
    if module.batch_first:
        x = x.transpose(0, 1)  # (T, N, F)
    t_len, n = x.shape[:2]
    dirs, h = (2 if module.bidirectional else 1), module.hidden_size
    if hx is None:
        h0 = x.new_zeros(module.num_layers * dirs, n, h)
        hx = (h0, h0) if lstm else h0
    elif unbatched:
        hx = tuple(v.unsqueeze(1) for v in hx) if lstm else hx.unsqueeze(1)
    h_all, c_all = (hx[0], hx[1]) if lstm else (hx, None)

    def w(name):
        return params[name] if name in params else getattr(module, name)

    act = torch.tanh if not isinstance(module, nn.RNN) or module.nonlinearity == "tanh" else torch.relu
    layer_in, h_out, c_out = x, [], []
    for layer in range(module.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = w("weight_ih" + sfx), w("weight_hh" + sfx)
            b_ih = w("bias_ih" + sfx) if module.bias else None
            b_hh = w("bias_hh" + sfx) if module.bias else None
            xi = F.linear(layer_in, w_ih, b_ih)  # (T, N, gates·H), all steps at once
            k = layer * dirs + d
            hs, cs = h_all[k], (c_all[k] if lstm else None)
            steps = [None] * t_len
            for t in (range(t_len - 1, -1, -1) if d else range(t_len)):
                hh = F.linear(hs, w_hh, b_hh)
                if lstm:
                    i, f, g, o = (xi[t] + hh).chunk(4, -1)
                    cs = torch.sigmoid(f) * cs + torch.sigmoid(i) * torch.tanh(g)
                    hs = torch.sigmoid(o) * torch.tanh(cs)
                elif gru:
                    xr, xz, xn = xi[t].chunk(3, -1)
                    hr, hz, hn = hh.chunk(3, -1)
                    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                    hs = (1 - z) * torch.tanh(xn + r * hn) + z * hs
                else:
                    hs = act(xi[t] + hh)
                steps[t] = hs
            outs.append(torch.stack(steps))
            h_out.append(hs)
            c_out.append(cs)
        layer_in = torch.cat(outs, -1) if dirs == 2 else outs[0]
    out = layer_in.transpose(0, 1) if module.batch_first else layer_in
    h_n = torch.stack(h_out)
    if unbatched:
        out, h_n = out.squeeze(0 if module.batch_first else 1), h_n.squeeze(1)
    if lstm:
        c_n = torch.stack(c_out)
        return out, (h_n, c_n.squeeze(1) if unbatched else c_n)
    return out, h_n


class GenericSide:
    __slots__ = ("jac", "n")

    def __init__(self, jac, n):
        self.jac, self.n = jac, n


class GenericRule:
    """Any other module with parameters: its per-sample parameter Jacobian from its recorded inputs and output
    gradients, J[n, o] = vjp of the module alone on sample n along G[o, n], for the parameters the plan gives it
    (its own, those of submodules it uses without calling them, a parametrization's originals).

    ``mode`` "vmap": torch.func.vmap over samples of the vjp of ``functional_call`` (the batch dimension kept as
    a dimension of size 1), vmapped over the O gradients: one call. "loop": one sample at a time through the
    module's own forward, the O gradients in one batched backward (modules vmap cannot run: LSTM, GRU).
    Cost: about one forward and one O-wide backward of the module per sample, and (N, O, P) numbers.
    """

    kind = "generic"
    gram_capable = False

    def __init__(self, module, names):
        self.module, self.names = module, list(names)  # the parameters' names relative to the module
        self.mode = "vmap"

    def params(self):
        found = dict(self.module.named_parameters(remove_duplicate=False))
        return {k: found[k] for k in self.names}

    def side(self, call, grads):
        """call: (leaves, treespec, in_dims, out_dims, out_index) with the inputs' batch dimensions; grads: per
        differentiated output leaf, (O, *leaf.shape)."""
        leaves, spec, in_dims, out_dims, out_index = call
        n = next(leaf.shape[d] for leaf, d in zip(leaves, in_dims) if d is not None)
        if self.mode == "vmap":
            jac = self._vmap(leaves, spec, in_dims, out_dims, out_index, grads, n)
        else:
            jac = self._loop(leaves, spec, in_dims, out_dims, out_index, grads, n)
        return GenericSide(jac, n)

    def reproduces(self, call, outs) -> bool:
        """Whether the module run per sample (in this rule's mode) gives the recorded outputs: it does not mix the
        samples of a batch, and its batch dimensions are the ones the plan found."""
        from torch.func import vmap

        leaves, spec, in_dims, out_dims, out_index = call
        n = next(leaf.shape[d] for leaf, d in zip(leaves, in_dims) if d is not None)
        with torch.no_grad(), math_attention(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")
            if self.mode == "vmap":
                params = {k: p.detach() for k, p in self.params().items()}
                split = [leaf if d is None else leaf.unflatten(d, (n, 1)) for leaf, d in zip(leaves, in_dims)]
                got = vmap(lambda ls: self._call(params, ls, spec, out_index), in_dims=(list(in_dims),),
                           out_dims=tuple(out_dims))(split)
                got = [g.flatten(d, d + 1) for g, d in zip(got, out_dims)]
            else:
                per = []
                for i in range(n):
                    sample = [leaf if d is None else leaf.narrow(d, i, 1) for leaf, d in zip(leaves, in_dims)]
                    args, kwargs = pytree.tree_unflatten(list(sample), spec)
                    res = pytree.tree_leaves(self.module(*args, **kwargs))
                    per.append([res[j] for j in out_index])
                got = [torch.cat([p[k] for p in per], d) for k, d in enumerate(out_dims)]
        tol = 1e-9 if outs[0].dtype == torch.float64 else 1e-4
        for a, b in zip(got, outs):
            b = b.detach()
            if a.shape != b.shape or not torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max())):
                return False
        return True

    def _call(self, params, leaves, spec, out_index):
        from torch.func import functional_call

        args, kwargs = pytree.tree_unflatten(list(leaves), spec)
        if _rnn_supported(self.module) and not self.module._forward_hooks and not self.module._forward_pre_hooks:
            out = functional_rnn(self.module, params, tuple(args), kwargs)
        else:
            out = functional_call(self.module, params, tuple(args), kwargs)
        out = pytree.tree_leaves(out)
        return tuple(out[i] for i in out_index)

    def _vmap(self, leaves, spec, in_dims, out_dims, out_index, grads, n):
        from torch.func import vjp, vmap

        params = {k: p.detach() for k, p in self.params().items()}
        split = [leaf if d is None else leaf.unflatten(d, (n, 1)) for leaf, d in zip(leaves, in_dims)]
        gsplit = [g.unflatten(1 + d, (n, 1)) for g, d in zip(grads, out_dims)]

        def one(leaves_n, grads_n):
            _, pull = vjp(lambda p: self._call(p, leaves_n, spec, out_index), params)
            return vmap(lambda gs: pull(tuple(gs))[0])(grads_n)

        with torch.no_grad(), math_attention(), warnings.catch_warnings():  # (torch.func ignores no_grad)
            warnings.filterwarnings("ignore", message="There is a performance drop")
            jac = vmap(one, in_dims=([d for d in in_dims], [1 + d for d in out_dims]))(split, gsplit)
        return {k: v.reshape(n, v.shape[1], -1) for k, v in jac.items()}

    def _loop(self, leaves, spec, in_dims, out_dims, out_index, grads, n):
        params = self.params()
        names = list(params)
        blocks = {k: [] for k in names}
        o = grads[0].shape[0]
        for i in range(n):
            sample = [leaf if d is None else leaf.narrow(d, i, 1) for leaf, d in zip(leaves, in_dims)]
            gs = [g.narrow(1 + d, i, 1) for g, d in zip(grads, out_dims)]
            with torch.enable_grad(), math_attention():
                args, kwargs = pytree.tree_unflatten(list(sample), spec)
                outs = pytree.tree_leaves(self.module(*args, **kwargs))
                outs = [outs[j] for j in out_index]
                got = torch.autograd.grad(outs, list(params.values()), gs, is_grads_batched=True, allow_unused=True)
            for k, gr in zip(names, got):
                blocks[k].append(gr.reshape(o, -1) if gr is not None else params[k].new_zeros(o, params[k].numel()))
        return {k: torch.stack(v) for k, v in blocks.items()}

    def jacobians(self, side, slots):
        return {k: side.jac[k] for k in slots}

    def summed(self, side, slots):
        return {k: side.jac[k].sum(0) for k in slots}


class TapRule:
    """Parameters a module reads only through single ops with one batched output (ViT's class token ``expand``-ed
    over the batch, its positional embedding added): per op call, J[n, o] = vjp of that op alone with respect to
    the parameters, along G[o] restricted to sample n. Cost per call: N·O lanes of the op's backward (over its
    whole output: cheap for the broadcasts it is meant for), N·O·P numbers."""

    kind = "tap"
    gram_capable = False
    LANES_NUMEL = 1 << 24  # masked cotangents built at once, at most (N·O·|Z| numbers), else sample by sample

    def __init__(self, slots):
        self.slots = dict(slots)

    def side(self, use, g, dim):
        """use: the recorded op (func, argument leaves, which leaves are parameters); g: (O, *Z.shape); dim: Z's
        batch dimension."""
        from torch.func import vjp, vmap

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
        return GenericSide({k: j.reshape(n, o, -1) for k, j in zip(names, jac)}, n)

    def jacobians(self, side, slots):
        return {k: side.jac[k] for k in slots if k in side.jac}

    def summed(self, side, slots):
        return {k: side.jac[k].sum(0) for k in slots if k in side.jac}


def make_rule(kind, module, names=None):
    if kind in ("linear", "conv"):
        return LinearRule(module)
    if kind == "embedding":
        return EmbeddingRule(module)
    if kind == "norm":
        return NormRule(module)
    return GenericRule(module, names)
