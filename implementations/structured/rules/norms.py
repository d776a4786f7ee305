"""Affine normalisations: eval BatchNorm, GroupNorm (per channel), LayerNorm, RMSNorm (per trailing element)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...core.costs import Layer
from .base import LayerCost, Rule, batch_first, covered, numel, order_of


class NormSide:
    """One side of a normalisation: x̂ the normalised input and G, per channel ``(N, C, L)`` / ``(O, N, C, L)`` or
    per trailing element ``(N, L, E)`` / ``(O, N, L, E)`` (L the positions)."""

    __slots__ = ("xhat", "g", "n")

    def __init__(self, xhat, g):
        self.xhat, self.g, self.n = xhat, g, g.shape[1]


class NormRule(Rule):
    """y = x̂ ⊙ weight + bias with x̂ the normalised input: J_weight = Σ_positions x̂ ⊙ G, J_bias = Σ_positions G,
    per channel or per trailing element. Jacobian order only: its Gram order would sum the same products over
    pairs of positions. Subclasses say how x̂ is computed and over which dimension the affine map runs."""

    name = "norm"
    per_channel = False  # the affine map per channel (dimension 1) rather than per trailing element

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ for the layer's input ``x`` (the batch first)."""
        raise NotImplementedError

    @classmethod
    def channels(cls, module, z: tuple) -> int:
        """The numbers the weight scales per sample of per-sample output shape ``z``."""
        return math.prod(module.normalized_shape)

    @classmethod
    def batched(cls, module, dx, dz, rank):
        if cls.per_channel:
            return dx == 0 and dz == 0 and rank >= 2
        return dx == dz and dx < rank - len(module.normalized_shape)

    def side(self, use, grads, checking=False):
        x, g = batch_first(use, grads[0])
        o, n = g.shape[:2]
        xhat = self.normalised(x)
        if self.per_channel:  # (N, C, L)
            return NormSide(xhat.reshape(n, xhat.shape[1], -1), g.reshape(o, n, g.shape[2], -1))
        e = math.prod(self.module.normalized_shape)  # (N, L, E)
        return NormSide(xhat.reshape(n, -1, e), g.reshape(o, n, -1, e))

    def check_side(self, side, n, o):
        c = self.module.weight.numel() if self.module.weight is not None else None
        if self.per_channel:
            self.expect("x̂ (N, C, L)", side.xhat.shape, (n, c, None))
            self.expect("G (O, N, C, L)", side.g.shape, (o,) + tuple(side.xhat.shape))
        else:
            self.expect("x̂ (N, L, E)", side.xhat.shape, (n, None, c))
            self.expect("G (O, N, L, E)", side.g.shape, (o,) + tuple(side.xhat.shape))

    def jacobians(self, side, slots):
        out = {}
        over = -1 if self.per_channel else 2
        if "weight" in slots:
            out["weight"] = (side.g * side.xhat).sum(over).transpose(0, 1)  # (einsum: a bmm per (n, c))
        if "bias" in slots:
            out["bias"] = side.g.sum(over).transpose(0, 1)
        return out

    @classmethod
    def layers(cls, entry, flops_of):
        out = []
        for call in entry.shapes:
            c = cls.channels(entry.module, call.z)
            out.append(Layer(cls.name, numel(call.z) // c, 1, c, "bias" in entry.slots, p=covered(entry.slots)))
        return out

    @classmethod
    def estimate(cls, layer, n, m, o, mode, symmetric):
        side = n if symmetric else n + m
        return LayerCost(2 * side * o * layer.s * layer.c + 2 * n * m * order_of(o, mode) * layer.p,
                         jac_held=side * o * layer.p, g_numbers=layer.s * layer.c)


class BatchNormRule(NormRule):
    """Eval-mode BatchNorm1d/2d/3d: x̂ = (x - running_mean) / sqrt(running_var + eps) per channel."""

    per_channel = True

    @classmethod
    def problem(cls, module):
        if module.training or module.running_mean is None:
            return (f"{type(module).__name__} normalises with batch statistics (training mode or "
                    "track_running_stats=False): the kernel depends on the batch; call model.eval()")
        return None

    @classmethod
    def channels(cls, module, z):
        return z[0]

    def normalised(self, x):
        mod = self.module
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - mod.running_mean.view(shape)) * torch.rsqrt(mod.running_var.view(shape) + mod.eps)


class GroupNormRule(NormRule):
    """GroupNorm: x̂ normalised per sample and group, the affine map per channel."""

    per_channel = True

    @classmethod
    def channels(cls, module, z):
        return z[0]

    def normalised(self, x):
        return F.group_norm(x, self.module.num_groups, None, None, self.module.eps)


class LayerNormRule(NormRule):
    """LayerNorm over its trailing ``normalized_shape``."""

    def normalised(self, x):
        return F.layer_norm(x, self.module.normalized_shape, None, None, self.module.eps)


class RMSNormRule(NormRule):
    """RMSNorm over its trailing ``normalized_shape`` (a weight, no bias)."""

    def normalised(self, x):
        return F.rms_norm(x, self.module.normalized_shape, None, self.module.eps)
