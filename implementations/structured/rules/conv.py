"""ConvNd (groups, dilation, stride, every padding mode): the patch form, X the padded input's patches."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from ...core.costs import Layer
from .base import batch_first, covered, numel
from .linear import PatchRule, PatchSide


def conv_patches(x, conv: nn.modules.conv._ConvNd):
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


class ConvRule(PatchRule):
    """nn.Conv1d/2d/3d: K = C_in/groups · prod(kernel) inputs per output position and group, C = C_out,
    S the output positions; the weight's layout (C_out, C_in/groups, *kernel) is the patch form's (group, c, k)."""

    name = "conv"

    def __init__(self, module, slots):
        super().__init__(module, slots)
        self.groups = module.groups

    @classmethod
    def applies(cls, module, key):
        # (a subclass may keep forward and replace _conv_forward: another function)
        return super().applies(module, key) and type(module)._conv_forward is key._conv_forward

    @classmethod
    def batched(cls, module, dx, dz, rank):
        return dx == 0 and dz == 0 and rank >= 2

    def side(self, use, grads, checking=False):
        x, g = batch_first(use, grads[0])
        o, n = g.shape[:2]
        x = conv_patches(x, self.module)
        return PatchSide(x, g.reshape(o, n, self.groups, -1, x.shape[-1]))

    @classmethod
    def layers(cls, entry, flops_of):
        mod = entry.module
        d = len(mod.kernel_size)
        k = mod.in_channels // mod.groups * math.prod(mod.kernel_size)
        return [Layer(cls.name, numel(call.z[-d:]), k, mod.out_channels, "bias" in entry.slots, groups=mod.groups,
                      p=covered(entry.slots)) for call in entry.shapes]
