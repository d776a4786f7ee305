"""Every JAX rule of the translator against the torch op it stands for, in float64 on random inputs.

For each entry of ``aten_rules.RULES`` the op runs in torch and its rule in JAX on the same arguments; values
must agree to 1e-12 (relative to the largest), and for floating outputs the gradients with respect to every
floating input too (a vector-Jacobian product with a random cotangent). A rule added without a sample here
fails ``test_every_rule_has_a_sample``.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from ntk_bench import reference  # noqa: F401 - first: it quiets TensorFlow/XLA's logging before JAX loads

pytest.importorskip("jax")

from ntk_bench.reference import aten_rules as R  # noqa: E402

F64 = torch.float64


def r(*shape):
    return torch.randn(shape, dtype=F64)


def pos(*shape):
    return torch.rand(shape, dtype=F64) + 0.5


def unit(*shape):
    return torch.rand(shape, dtype=F64) * 1.6 - 0.8


def ints(high, *shape):
    return torch.randint(0, high, shape)


def mask(*shape):
    return torch.rand(shape) > 0.5


def S(*args, **kwargs):
    return args, kwargs


# name -> list of zero-argument factories of (args, kwargs); called after torch.manual_seed(0).
SAMPLES: dict[str, list] = {
    # symbolic sizes and asserts
    "aten.sym_size.int": [lambda: S(r(2, 3), 1)],
    "aten.sym_numel.default": [lambda: S(r(2, 3))],
    "aten._assert_scalar.default": [lambda: S(True, "holds")],
    "aten.sym_constrain_range_for_size.default": [lambda: S(3, min=2, max=5)],
    "aten.sym_constrain_range.default": [lambda: S(3, min=2, max=5)],
    "aten._assert_tensor_metadata.default": [lambda: S(r(2, 3), size=[2, 3], dtype=F64)],
    # products and convolutions
    "aten.mm.default": [lambda: S(r(3, 4), r(4, 5))],
    "aten.bmm.default": [lambda: S(r(2, 3, 4), r(2, 4, 5))],
    "aten.matmul.default": [lambda: S(r(2, 3, 4), r(4, 5)), lambda: S(r(4), r(4, 2))],
    "aten.mv.default": [lambda: S(r(3, 4), r(4))],
    "aten.dot.default": [lambda: S(r(4), r(4))],
    "aten.addmm.default": [lambda: S(r(5), r(3, 4), r(4, 5)), lambda: S(r(3, 5), r(3, 4), r(4, 5), beta=0.5, alpha=2.0)],
    "aten.baddbmm.default": [lambda: S(r(2, 3, 5), r(2, 3, 4), r(2, 4, 5), beta=1.5, alpha=0.5)],
    "aten.linear.default": [lambda: S(r(3, 4), r(5, 4), r(5)), lambda: S(r(2, 3, 4), r(5, 4))],
    "aten.convolution.default": [
        lambda: S(r(2, 3, 7, 6), r(4, 3, 3, 2), r(4), [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
        lambda: S(r(2, 4, 9, 8), r(6, 2, 3, 3), r(6), [2, 1], [1, 2], [2, 1], False, [0, 0], 2),
        lambda: S(r(2, 4, 8, 8), r(4, 1, 3, 3), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 4),
        lambda: S(r(2, 3, 11), r(5, 3, 3), r(5), [2], [1], [2], False, [0], 1),
        lambda: S(r(1, 2, 5, 4, 4), r(3, 2, 2, 3, 2), r(3), [1, 2, 1], [1, 0, 1], [1, 1, 2], False, [0, 0, 0], 1),
        lambda: S(r(2, 4, 5, 5), r(4, 3, 3, 3), r(6), [2, 2], [1, 1], [1, 1], True, [1, 0], 2),
        lambda: S(r(2, 3, 7), r(3, 2, 4), None, [3], [2], [2], True, [1], 1),
    ],
    # normalisation
    "aten._native_batch_norm_legit_no_training.default": [
        lambda: S(r(3, 4, 5, 5), r(4), r(4), r(4), pos(4), 0.1, 1e-5),
        lambda: S(r(3, 4, 6), None, None, r(4), pos(4), 0.1, 1e-3)],
    "aten.native_batch_norm.default": [lambda: S(r(3, 4, 5), r(4), r(4), r(4), pos(4), False, 0.1, 1e-5)],
    "aten.native_layer_norm.default": [lambda: S(r(3, 5, 6), [6], r(6), r(6), 1e-5),
                                       lambda: S(r(3, 4, 5), [4, 5], None, None, 1e-6)],
    "aten.native_group_norm.default": [lambda: S(r(2, 6, 4, 3), r(6), r(6), 2, 6, 12, 3, 1e-5),
                                       lambda: S(r(2, 4, 5), None, None, 2, 4, 5, 2, 1e-5)],
    # pooling
    "aten.max_pool2d_with_indices.default": [
        lambda: S(r(2, 3, 8, 7), [2, 2], [2, 2]),
        lambda: S(r(2, 3, 9, 9), [3, 3], [2, 2], [1, 1], [1, 1], True),
        lambda: S(r(2, 3, 10, 9), [3, 2], [2, 1], [1, 0], [2, 1], False)],
    "aten.max_pool3d_with_indices.default": [lambda: S(r(1, 2, 5, 6, 5), [2, 3, 2], [2, 2, 1], [1, 1, 0])],
    "aten.max_pool1d.default": [lambda: S(r(2, 3, 9), [3], [2], [1], [1], True)],
    "aten.max_pool2d.default": [lambda: S(r(2, 3, 8, 8), [3, 3], [2, 2], [1, 1])],
    "aten.max_pool3d.default": [lambda: S(r(1, 2, 4, 5, 6), [2, 2, 2])],
    "aten.avg_pool1d.default": [lambda: S(r(2, 3, 9), [3], [2], [1], True, False)],
    "aten.avg_pool2d.default": [
        lambda: S(r(2, 3, 8, 8), [2, 2]),
        lambda: S(r(2, 3, 9, 8), [3, 3], [2, 2], [1, 1], True, True),
        lambda: S(r(2, 3, 9, 8), [3, 2], [2, 2], [1, 1], True, False),
        lambda: S(r(2, 3, 7, 7), [3, 3], [2, 2], [1, 1], False, True, 4)],
    "aten.avg_pool3d.default": [lambda: S(r(1, 2, 5, 6, 5), [2, 3, 2], [2, 2, 1], [1, 1, 0], False, False)],
    "aten._adaptive_avg_pool2d.default": [lambda: S(r(2, 3, 6, 8), [2, 4]), lambda: S(r(2, 3, 7, 5), [3, 2])],
    "aten._adaptive_avg_pool3d.default": [lambda: S(r(1, 2, 4, 5, 6), [2, 3, 1])],
    "aten.adaptive_avg_pool1d.default": [lambda: S(r(2, 3, 10), [4])],
    "aten.adaptive_avg_pool2d.default": [lambda: S(r(2, 3, 7, 6), [3, 3])],
    "aten.adaptive_max_pool1d.default": [lambda: S(r(2, 3, 10), [4])],
    "aten.adaptive_max_pool2d.default": [lambda: S(r(2, 3, 7, 6), [3, 2])],
    "aten.adaptive_max_pool3d.default": [lambda: S(r(1, 2, 5, 4, 6), [2, 3, 4])],
    # activations and elementwise
    "aten.relu.default": [lambda: S(r(3, 4))],
    "aten.sigmoid.default": [lambda: S(r(3, 4))],
    "aten.tanh.default": [lambda: S(r(3, 4))],
    "aten.exp.default": [lambda: S(r(3, 4))],
    "aten.log.default": [lambda: S(pos(3, 4))],
    "aten.log2.default": [lambda: S(pos(3, 4))],
    "aten.log10.default": [lambda: S(pos(3, 4))],
    "aten.log1p.default": [lambda: S(pos(3, 4))],
    "aten.expm1.default": [lambda: S(r(3, 4))],
    "aten.sqrt.default": [lambda: S(pos(3, 4))],
    "aten.rsqrt.default": [lambda: S(pos(3, 4))],
    "aten.neg.default": [lambda: S(r(3, 4))],
    "aten.abs.default": [lambda: S(r(3, 4))],
    "aten.sign.default": [lambda: S(r(3, 4))],
    "aten.sin.default": [lambda: S(r(3, 4))],
    "aten.cos.default": [lambda: S(r(3, 4))],
    "aten.tan.default": [lambda: S(unit(3, 4))],
    "aten.asin.default": [lambda: S(unit(3, 4))],
    "aten.acos.default": [lambda: S(unit(3, 4))],
    "aten.atan.default": [lambda: S(r(3, 4))],
    "aten.sinh.default": [lambda: S(r(3, 4))],
    "aten.cosh.default": [lambda: S(r(3, 4))],
    "aten.asinh.default": [lambda: S(r(3, 4))],
    "aten.acosh.default": [lambda: S(pos(3, 4) + 1)],
    "aten.atanh.default": [lambda: S(unit(3, 4))],
    "aten.erf.default": [lambda: S(r(3, 4))],
    "aten.erfinv.default": [lambda: S(unit(3, 4))],
    "aten.floor.default": [lambda: S(r(3, 4) * 3)],
    "aten.ceil.default": [lambda: S(r(3, 4) * 3)],
    "aten.round.default": [lambda: S(r(3, 4) * 3)],
    "aten.trunc.default": [lambda: S(r(3, 4) * 3)],
    "aten.isnan.default": [lambda: S(torch.tensor([1.0, math.nan, math.inf], dtype=F64))],
    "aten.isinf.default": [lambda: S(torch.tensor([1.0, math.nan, -math.inf], dtype=F64))],
    "aten.isfinite.default": [lambda: S(torch.tensor([1.0, math.nan, -math.inf], dtype=F64))],
    "aten.logical_not.default": [lambda: S(mask(3, 4))],
    "aten.reciprocal.default": [lambda: S(pos(3, 4))],
    "aten.silu.default": [lambda: S(r(3, 4))],
    "aten.hardsigmoid.default": [lambda: S(r(3, 4) * 4)],
    "aten.hardswish.default": [lambda: S(r(3, 4) * 4)],
    "aten.mish.default": [lambda: S(r(3, 4))],
    "aten.bitwise_not.default": [lambda: S(mask(3, 4)), lambda: S(ints(9, 3, 4))],
    "aten.clone.default": [lambda: S(r(3, 4))],
    "aten.alias.default": [lambda: S(r(3, 4))],
    "aten.lift_fresh_copy.default": [lambda: S(r(3, 4))],
    "aten.detach.default": [lambda: S(r(3, 4))],
    "aten.gelu.default": [lambda: S(r(3, 4)), lambda: S(r(3, 4), approximate="tanh")],
    "aten.leaky_relu.default": [lambda: S(r(3, 4)), lambda: S(r(3, 4), 0.2)],
    "aten.elu.default": [lambda: S(r(3, 4)), lambda: S(r(3, 4), 0.5, 1.5, 2.0)],
    "aten.softplus.default": [lambda: S(r(3, 4)), lambda: S(r(3, 4) * 10, 2.0, 5.0)],
    "aten.log_sigmoid_forward.default": [lambda: S(r(3, 4))],
    "aten.clamp.default": [lambda: S(r(3, 4), -0.5, 0.5), lambda: S(r(3, 4), None, 0.2)],
    "aten.clamp.Tensor": [lambda: S(r(3, 4), r(4) - 0.5, r(3, 1) + 0.5)],
    "aten.clamp_min.default": [lambda: S(r(3, 4), 0.1)],
    "aten.clamp_min.Tensor": [lambda: S(r(3, 4), r(4))],
    "aten.clamp_max.default": [lambda: S(r(3, 4), 0.1)],
    "aten.clamp_max.Tensor": [lambda: S(r(3, 4), r(4))],
    "aten.hardtanh.default": [lambda: S(r(3, 4) * 2), lambda: S(r(3, 4) * 8, 0.0, 6.0)],
    "aten.add.Tensor": [lambda: S(r(3, 4), r(4)), lambda: S(r(3, 4), r(3, 1), alpha=2.5), lambda: S(ints(5, 3), 2)],
    "aten.add.Scalar": [lambda: S(r(3, 4), 1.5)],
    "aten.sub.Tensor": [lambda: S(r(3, 4), r(4), alpha=0.5), lambda: S(7, ints(5, 3))],
    "aten.sub.Scalar": [lambda: S(r(3, 4), 1.5)],
    "aten.rsub.Tensor": [lambda: S(r(3, 4), r(4), alpha=2.0)],
    "aten.rsub.Scalar": [lambda: S(r(3, 4), 1.5)],
    "aten.mul.Tensor": [lambda: S(r(3, 4), r(3, 1)), lambda: S(r(3, 4), 2.0)],
    "aten.mul.Scalar": [lambda: S(r(3, 4), 0.59)],
    "aten.div.Tensor": [lambda: S(r(3, 4), pos(4)), lambda: S(ints(9, 4), ints(3, 4) + 1)],
    "aten.div.Scalar": [lambda: S(r(3, 4), 3.0)],
    "aten.div.Tensor_mode": [lambda: S(r(3, 4) * 5, pos(4), rounding_mode="floor"),
                             lambda: S(r(3, 4) * 5, pos(4), rounding_mode="trunc"),
                             lambda: S(ints(20, 4) - 10, ints(3, 4) + 1, rounding_mode="trunc"),
                             lambda: S(ints(20, 4) - 10, ints(3, 4) + 1, rounding_mode="floor"),
                             lambda: S(r(3, 4), pos(4), rounding_mode=None)],
    "aten.div.Scalar_mode": [lambda: S(r(3, 4) * 5, 2.0, rounding_mode="floor")],
    "aten.pow.Tensor_Scalar": [lambda: S(r(3, 4), 2), lambda: S(pos(3, 4), 1.7), lambda: S(r(3, 4), 3)],
    "aten.pow.Tensor_Tensor": [lambda: S(pos(3, 4), r(3, 4))],
    "aten.pow.Scalar": [lambda: S(2.0, r(3, 4))],
    "aten.remainder.Tensor": [lambda: S(r(3, 4) * 5, pos(4))],
    "aten.remainder.Scalar": [lambda: S(r(3, 4) * 5, 1.5), lambda: S(ints(20, 5) - 10, 3)],
    "aten.fmod.Tensor": [lambda: S(r(3, 4) * 5, pos(4))],
    "aten.fmod.Scalar": [lambda: S(r(3, 4) * 5, 1.5)],
    "aten.atan2.default": [lambda: S(r(3, 4), r(3, 4))],
    "aten.maximum.default": [lambda: S(r(3, 4), r(4))],
    "aten.minimum.default": [lambda: S(r(3, 4), r(4))],
    "aten.where.self": [lambda: S(mask(3, 4), r(3, 4), r(4)), lambda: S(mask(3, 1), r(3, 4), torch.tensor(0.0, dtype=F64))],
    "aten.masked_fill.Scalar": [lambda: S(r(3, 4), mask(3, 4), -1.5)],
    "aten.masked_fill.Tensor": [lambda: S(r(3, 4), mask(4), torch.tensor(2.0, dtype=F64))],
    **{f"aten.{c}.Tensor": [lambda: S(r(3, 4), r(4)), lambda: S(ints(3, 4), ints(3, 4))]
       for c in ("eq", "ne", "lt", "le", "gt", "ge")},
    **{f"aten.{c}.Scalar": [lambda: S(r(3, 4), 0.1), lambda: S(ints(3, 5), 1)]
       for c in ("eq", "ne", "lt", "le", "gt", "ge")},
    "aten.logical_and.default": [lambda: S(mask(3, 4), mask(4))],
    "aten.logical_or.default": [lambda: S(mask(3, 4), mask(4))],
    "aten.logical_xor.default": [lambda: S(mask(3, 4), mask(4))],
    "aten.bitwise_and.Tensor": [lambda: S(mask(3, 4), mask(4)), lambda: S(ints(9, 4), ints(9, 4))],
    "aten.bitwise_or.Tensor": [lambda: S(mask(3, 4), mask(4))],
    "aten.bitwise_xor.Tensor": [lambda: S(ints(9, 4), ints(9, 4))],
    # reductions
    "aten.sum.dim_IntList": [lambda: S(r(3, 4, 5), [1]), lambda: S(r(3, 4, 5), [0, 2], True),
                             lambda: S(mask(3, 4), [1]), lambda: S(r(3, 4), [])],
    "aten.sum.default": [lambda: S(r(3, 4)), lambda: S(ints(5, 3, 4), dtype=F64)],
    "aten.mean.dim": [lambda: S(r(3, 4, 5), [1]), lambda: S(r(3, 4, 5), [-1, 0], True)],
    "aten.mean.default": [lambda: S(r(3, 4))],
    "aten.prod.dim_int": [lambda: S(pos(3, 4), 1), lambda: S(pos(3, 4), 0, True)],
    "aten.prod.default": [lambda: S(pos(3, 4))],
    "aten.amax.default": [lambda: S(r(3, 4, 5), [1]), lambda: S(r(3, 4), [], True)],
    "aten.amin.default": [lambda: S(r(3, 4, 5), [0, 2])],
    "aten.max.default": [lambda: S(r(3, 4))],
    "aten.min.default": [lambda: S(r(3, 4))],
    "aten.max.dim": [lambda: S(r(3, 4, 5), 1), lambda: S(r(3, 4), -1, True)],
    "aten.min.dim": [lambda: S(r(3, 4, 5), 2)],
    "aten.argmax.default": [lambda: S(r(3, 4), 1), lambda: S(r(3, 4)), lambda: S(r(3, 4), None, True)],
    "aten.argmin.default": [lambda: S(r(3, 4), 0, True)],
    "aten.var.correction": [lambda: S(r(3, 4, 5), [1]), lambda: S(r(3, 4), None, correction=0, keepdim=True)],
    "aten.std.correction": [lambda: S(r(3, 4, 5), [2], correction=1)],
    "aten.var_mean.correction": [lambda: S(r(3, 4, 5), [1, 2], correction=0)],
    "aten.any.dim": [lambda: S(mask(3, 4), 1)],
    "aten.any.dims": [lambda: S(mask(3, 4, 2), [0, 2], True)],
    "aten.any.default": [lambda: S(mask(3, 4))],
    "aten.all.dim": [lambda: S(mask(3, 4), 0)],
    "aten.all.dims": [lambda: S(mask(3, 4, 2), [1])],
    "aten.all.default": [lambda: S(mask(3, 4) | True)],
    "aten.cumsum.default": [lambda: S(r(3, 4), 1), lambda: S(ints(4, 5), 0)],
    "aten.logsumexp.default": [lambda: S(r(3, 4, 5), [1, 2])],
    "aten._softmax.default": [lambda: S(r(3, 4, 5), -1, False), lambda: S(r(3, 4), 0, False)],
    "aten._log_softmax.default": [lambda: S(r(3, 4), 1, False)],
    # shapes, views and copies
    "aten.view.default": [lambda: S(r(3, 4), [2, 6]), lambda: S(r(3, 4), [-1])],
    "aten._unsafe_view.default": [lambda: S(r(3, 4), [4, 3])],
    "aten.reshape.default": [lambda: S(r(3, 4), [2, -1])],
    "aten.view_copy.default": [lambda: S(r(3, 4), [12])],
    "aten.permute.default": [lambda: S(r(2, 3, 4), [2, 0, 1])],
    "aten.permute_copy.default": [lambda: S(r(2, 3, 4), [1, 2, 0])],
    "aten.transpose.int": [lambda: S(r(2, 3, 4), 0, -1)],
    "aten.t.default": [lambda: S(r(3, 4))],
    "aten.expand.default": [lambda: S(r(3, 1), [2, 3, 4]), lambda: S(r(3, 1), [-1, 5])],
    "aten.expand_copy.default": [lambda: S(r(1, 4), [3, 4])],
    "aten.squeeze.dims": [lambda: S(r(3, 1, 4, 1), [1, -1]), lambda: S(r(3, 1, 4), [0])],
    "aten.squeeze.dim": [lambda: S(r(3, 1, 4), 1)],
    "aten.squeeze.default": [lambda: S(r(1, 3, 1, 4))],
    "aten.unsqueeze.default": [lambda: S(r(3, 4), 1), lambda: S(r(3, 4), -1)],
    "aten.cat.default": [lambda: S([r(2, 3), r(4, 3)]), lambda: S([r(2, 3), r(2, 1)], 1),
                         lambda: S([r(2, 3), torch.zeros(0, dtype=F64)], 0)],
    "aten.stack.default": [lambda: S([r(2, 3), r(2, 3)], 1)],
    "aten.slice.Tensor": [lambda: S(r(5, 6), 1, 1, 4), lambda: S(r(5, 6), 0, -3, 9223372036854775807, 2),
                          lambda: S(r(5, 6))],
    "aten.slice_copy.Tensor": [lambda: S(r(5, 6), 1, 0, 3)],
    "aten.slice_scatter.default": [lambda: S(r(5, 6), r(5, 2), 1, 1, 5, 2)],
    "aten.select.int": [lambda: S(r(3, 4, 5), 1, 2), lambda: S(r(3, 4), 0, -1)],
    "aten.select_copy.int": [lambda: S(r(3, 4), 1, 0)],
    "aten.select_scatter.default": [lambda: S(r(3, 4), r(3), 1, 2)],
    "aten.split_with_sizes.default": [lambda: S(r(7, 3), [2, 5]), lambda: S(r(3, 8), [4, 4], 1)],
    "aten.split_with_sizes_copy.default": [lambda: S(r(7, 3), [3, 4])],
    "aten.split.Tensor": [lambda: S(r(7, 3), 3)],
    "aten.split_copy.Tensor": [lambda: S(r(3, 7), 4, 1)],
    "aten.unbind.int": [lambda: S(r(3, 4), 1)],
    "aten.unbind_copy.int": [lambda: S(r(3, 4))],
    "aten.index.Tensor": [lambda: S(r(5, 6), [None, ints(6, 4)]), lambda: S(r(5, 6, 7), [ints(5, 3), None, ints(7, 3)]),
                          lambda: S(r(5, 6), [ints(5, 2, 3)])],
    "aten._unsafe_index.Tensor": [lambda: S(r(5, 6), [None, ints(6, 4)])],
    "aten.index_put.default": [lambda: S(r(5, 6), [torch.tensor([0, 3])], r(2, 6)),
                               lambda: S(r(5, 6), [torch.tensor([0, 3, 0]), torch.tensor([1, 2, 1])], r(3), True)],
    "aten._unsafe_index_put.default": [lambda: S(r(5, 6), [torch.tensor([4, 1])], r(2, 6))],
    "aten.index_select.default": [lambda: S(r(5, 6), 1, ints(6, 4))],
    "aten.gather.default": [lambda: S(r(4, 5), 1, ints(5, 4, 3)), lambda: S(r(4, 5), 0, ints(4, 2, 5))],
    "aten.scatter.src": [lambda: S(r(4, 5), 1, torch.stack([torch.randperm(5)[:3] for _ in range(4)]), r(4, 3))],
    "aten.scatter.value": [lambda: S(r(4, 5), 0, torch.stack([torch.randperm(4)[:2] for _ in range(5)], 1), 1.5)],
    "aten.scatter_add.default": [lambda: S(r(4, 5), 1, ints(5, 4, 3), r(4, 3))],
    "aten.embedding.default": [lambda: S(r(10, 4), ints(10, 3, 5)),
                               lambda: S(r(10, 4), torch.tensor([[1, 2, 1], [0, 1, 9]]), 1)],
    # interpolation: sizes, scale factors (a given scale takes precedence over the size ratio), align_corners
    "aten.upsample_nearest1d.default": [lambda: S(r(2, 3, 5), [8]), lambda: S(r(2, 3, 5), [7], 1.5)],
    "aten.upsample_nearest1d.vec": [lambda: S(r(2, 3, 5), None, [1.7]), lambda: S(r(2, 3, 5), [3], None)],
    "aten.upsample_nearest2d.default": [lambda: S(r(2, 3, 4, 5), [7, 9]),
                                        lambda: S(r(2, 3, 4, 5), [8, 10], 2.0, 2.0),
                                        lambda: S(r(2, 3, 6, 5), [4, 3])],
    "aten.upsample_nearest2d.vec": [lambda: S(r(2, 3, 4, 5), None, [2.0, 1.5]),
                                    lambda: S(r(2, 3, 4, 5), None, [1.7, 2.3]),
                                    lambda: S(r(2, 3, 4, 5), [3, 7], None)],
    "aten.upsample_nearest3d.default": [lambda: S(r(1, 2, 3, 4, 2), [5, 6, 4])],
    "aten.upsample_nearest3d.vec": [lambda: S(r(1, 2, 3, 4, 2), None, [2.0, 1.5, 1.0])],
    "aten.upsample_linear1d.default": [lambda: S(r(2, 3, 5), [9], False), lambda: S(r(2, 3, 5), [9], True),
                                       lambda: S(r(2, 3, 5), [8], False, 1.7)],
    "aten.upsample_linear1d.vec": [lambda: S(r(2, 3, 5), None, False, [1.7])],
    "aten.upsample_bilinear2d.default": [lambda: S(r(2, 3, 4, 5), [7, 9], False),
                                         lambda: S(r(2, 3, 4, 5), [7, 9], True),
                                         lambda: S(r(2, 3, 4, 5), [6, 8], False, 1.7, 1.6),
                                         lambda: S(r(2, 3, 6, 5), [3, 5], False)],
    "aten.upsample_bilinear2d.vec": [lambda: S(r(2, 3, 4, 5), None, False, [1.7, 2.0]),
                                     lambda: S(r(2, 3, 4, 5), None, True, [2.0, 2.5]),
                                     lambda: S(r(2, 3, 4, 5), [7, 3], False, None),
                                     lambda: S(r(2, 3, 4, 5), [1, 1], True, None)],
    "aten.upsample_trilinear3d.default": [lambda: S(r(1, 2, 3, 4, 2), [5, 6, 4], False),
                                          lambda: S(r(1, 2, 3, 4, 2), [5, 6, 3], True)],
    "aten.upsample_trilinear3d.vec": [lambda: S(r(1, 2, 3, 4, 2), None, False, [2.0, 1.5, 1.3])],
    "aten._upsample_bilinear2d_aa.default": [lambda: S(r(2, 3, 8, 9), [3, 4], False),
                                             lambda: S(r(2, 3, 4, 5), [7, 9], True)],
    "aten._upsample_bilinear2d_aa.vec": [lambda: S(r(2, 3, 8, 9), None, False, [0.4, 0.5])],
    "aten._upsample_bicubic2d_aa.default": [lambda: S(r(2, 3, 8, 9), [3, 4], False)],
    "aten._upsample_bicubic2d_aa.vec": [lambda: S(r(2, 3, 8, 9), None, True, [0.4, 0.6])],
    # nn.Bilinear's product, and other expand/sum patterns
    "aten._trilinear.default": [lambda: S(r(3, 4), r(2, 4, 5), r(3, 5), [1, 3], [0], [1, 2], [2, 3]),
                                lambda: S(r(3, 4), r(3, 4), r(3, 4), [], [], [], [1]),
                                lambda: S(r(3, 4), r(4, 5), r(3, 5), [2], [0], [1], [1, 2])],
    # bags of embeddings: sum (an empty bag), mean, max, per-sample weights, include_last_offset, padding_idx
    "aten._embedding_bag.default": [
        lambda: S(r(10, 3), ints(10, 8), torch.tensor([0, 3, 3, 5])),
        lambda: S(r(10, 3), ints(10, 8), torch.tensor([0, 3, 3, 5]), False, 1),
        lambda: S(r(10, 3), torch.randperm(10)[:8], torch.tensor([0, 3, 3, 5]), False, 2),
        lambda: S(r(10, 3), ints(10, 8), torch.tensor([0, 2, 5]), False, 0, False, r(8)),
        lambda: S(r(10, 3), ints(10, 8), torch.tensor([0, 2, 5, 8]), False, 1, False, None, True),
        lambda: S(r(10, 3), torch.tensor([1, 2, 1, 0, 4, 1, 3, 1]), torch.tensor([0, 3, 6]), False, 1, False,
                  None, False, 1),
        lambda: S(r(10, 3), torch.tensor([1, 2, 1, 0, 4, 1, 3, 1]), torch.tensor([0, 3, 6]), False, 2, False,
                  None, False, 1)],
    "aten._embedding_bag_forward_only.default": [
        lambda: S(r(10, 3), ints(10, 8), torch.tensor([0, 3, 3, 5]), False, 1)],
    "aten.constant_pad_nd.default": [lambda: S(r(2, 3, 4), [1, 2]), lambda: S(r(2, 3, 4), [1, -1, 2, 0], 0.5)],
    "aten.reflection_pad1d.default": [lambda: S(r(2, 3, 5), [2, 1])],
    "aten.reflection_pad2d.default": [lambda: S(r(2, 3, 5, 4), [1, 2, 2, 1])],
    "aten.reflection_pad3d.default": [lambda: S(r(1, 2, 4, 4, 5), [1, 1, 2, 0, 1, 2])],
    "aten.replication_pad1d.default": [lambda: S(r(2, 3, 5), [2, 1])],
    "aten.replication_pad2d.default": [lambda: S(r(2, 3, 5, 4), [1, 2, 2, 1])],
    "aten.replication_pad3d.default": [lambda: S(r(1, 2, 4, 4, 5), [1, 1, 2, 0, 1, 2])],
    "aten.flip.default": [lambda: S(r(3, 4, 5), [0, 2])],
    "aten.roll.default": [lambda: S(r(3, 4), [1, -2], [0, 1]), lambda: S(r(3, 4), [5])],
    "aten.repeat.default": [lambda: S(r(2, 3), [2, 1, 3])],
    "aten.tril.default": [lambda: S(r(4, 5)), lambda: S(r(2, 4, 5), -1)],
    "aten.triu.default": [lambda: S(r(4, 5), 1)],
    "aten._to_copy.default": [lambda: S(r(3, 4) * 4, dtype=torch.int64), lambda: S(ints(5, 3), dtype=F64),
                              lambda: S(r(3, 4), dtype=F64), lambda: S(mask(3, 4), dtype=torch.int64)],
    "aten.copy.default": [lambda: S(r(3, 4), r(4)), lambda: S(torch.zeros(3, dtype=torch.int64), r(3) * 5)],
    # factories
    "aten.full.default": [lambda: S([2, 3], 1.5), lambda: S([2, 3], 0, dtype=F64), lambda: S([3], 4),
                          lambda: S([2], True)],
    "aten.zeros.default": [lambda: S([2, 3]), lambda: S([2], dtype=torch.int64)],
    "aten.ones.default": [lambda: S([2, 3])],
    "aten.empty.memory_format": [lambda: S([2, 3], dtype=F64)],
    "aten.empty_strided.default": [lambda: S([2, 3], [3, 1], dtype=F64)],
    "aten.full_like.default": [lambda: S(r(2, 3), 0.5), lambda: S(r(2, 3), 2, dtype=torch.int64)],
    "aten.fill.Scalar": [lambda: S(r(2, 3), 2.5)],
    "aten.fill.Tensor": [lambda: S(r(2, 3), torch.tensor(-1.0, dtype=F64))],
    "aten.zeros_like.default": [lambda: S(r(2, 3))],
    "aten.empty_like.default": [lambda: S(r(2, 3))],
    "aten.ones_like.default": [lambda: S(ints(4, 2, 3))],
    "aten.new_zeros.default": [lambda: S(r(2, 3), [4])],
    "aten.new_empty.default": [lambda: S(r(2, 3), [4])],
    "aten.new_empty_strided.default": [lambda: S(r(2, 3), [2, 2], [2, 1])],
    "aten.new_ones.default": [lambda: S(r(2, 3), [4], dtype=torch.int64)],
    "aten.new_full.default": [lambda: S(r(2, 3), [4, 1], 3.5)],
    "aten.scalar_tensor.default": [lambda: S(2.5), lambda: S(3, dtype=torch.int64)],
    "aten.arange.start_step": [lambda: S(-1, 9, 2), lambda: S(0.5, 3.0, 0.25)],
    "aten.arange.start": [lambda: S(2, 7)],
    "aten.arange.default": [lambda: S(5), lambda: S(4, dtype=F64)],
    # the translator's own marker: where the torch forward cuts the gradient
    "ntk_bench_reference.stop_gradient.default": [lambda: S(r(3, 4))],
}

# Python operators on sizes: the rule is the operator itself.
PYTHON_OPS = [name for name in R.RULES if not name.startswith(("aten.", "ntk_bench_reference."))]
# Outputs whose values are unspecified (uninitialised memory): shapes and dtypes are compared, not values.
UNINITIALISED = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
                 "aten.new_empty.default", "aten.new_empty_strided.default"}


# Arguments torch does not differentiate (running statistics), by position.
NOT_DIFFERENTIATED = {"aten._native_batch_norm_legit_no_training.default": {3, 4},
                      "aten.native_batch_norm.default": {3, 4}}
# The outputs torch differentiates, for ops returning more (a norm's saved statistics are not).
DIFFERENTIATED_OUTPUTS = {"aten.native_layer_norm.default": {0}, "aten.native_group_norm.default": {0},
                          "aten._native_batch_norm_legit_no_training.default": {0},
                          "aten.native_batch_norm.default": {0}}
# Gradient checks torch cannot make: the functional copy has no derivative of its own (in a model, copy_'s
# gradient goes to the source, as the rule's does).
NO_TORCH_GRADIENT = {"aten.copy.default", "ntk_bench_reference.stop_gradient.default",
                     "aten._embedding_bag_forward_only.default"}
# torch's hardsigmoid backward multiplies by a float32 1/6 (3e-8 off); the rule's exact 1/6 is checked to that.
GRADIENT_TOLERANCE = {"aten.hardsigmoid.default": 1e-7}


def torch_op(name: str):
    from ntk_bench.reference import translate

    translate._stop_gradient_op()  # (registers the translator's marker op with torch)
    namespace, op, overload = name.split(".")
    packet = getattr(getattr(torch.ops, namespace), op, None)
    return getattr(packet, overload, None) if packet is not None else None


CASES = [pytest.param(name, i, id=f"{name}-{i}") for name in sorted(SAMPLES) for i in range(len(SAMPLES[name]))]


def test_every_rule_has_a_sample():
    untested = sorted(n for n in R.RULES if n not in SAMPLES and n not in PYTHON_OPS)
    assert not untested, f"rules without a sample in SAMPLES: {untested}"
    assert not [n for n in SAMPLES if n not in R.RULES], "samples for rules that do not exist"


@pytest.mark.parametrize("name", PYTHON_OPS)
def test_python_operator_rules(name):
    """Python's operators on sizes: the rule computes what the function the graph names computes."""
    module, attr = name.rsplit(".", 1)
    real = getattr(importlib.import_module(module), attr)
    unary = ("neg", "ceil", "floor", "sqrt", "sym_float", "sym_int", "sym_not")
    args = ((1, 2, 3), 1) if attr == "getitem" else (7,) if attr in unary else (7, 3)
    if attr == "sym_not":
        args = (True,)
    assert R.RULES[name](*args) == real(*args)


def _leaves(value):
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _float_tensors(args, kwargs):
    """Paths of the floating tensors among the arguments (into lists too)."""
    paths = []

    def walk(value, path):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            paths.append(path)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, path + (i,))

    for i, a in enumerate(args):
        walk(a, ("args", i))
    for k, v in kwargs.items():
        walk(v, ("kwargs", k))
    return paths


def _replace(args, kwargs, paths, values):
    args, kwargs = list(args), dict(kwargs)

    def put(container, path, value):
        if len(path) == 1:
            container[path[0]] = value
            return container
        inner = list(container[path[0]])
        container[path[0]] = type(container[path[0]])(put(inner, path[1:], value))
        return container

    for path, value in zip(paths, values):
        if path[0] == "args":
            put(args, path[1:], value)
        else:
            put(kwargs, path[1:], value)
    return tuple(args), kwargs


def _close(jax_value, torch_value, what, tol=1e-12):
    if isinstance(jax_value, R.MISSING):
        return
    if not isinstance(torch_value, torch.Tensor):
        assert jax_value == torch_value, f"{what}: {jax_value} != {torch_value}"
        return
    got = np.asarray(jax_value)
    expected = torch_value.detach().numpy()
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != torch's {expected.shape}"
    kinds = {np.dtype(bool): "b"}
    assert kinds.get(got.dtype, got.dtype.kind) == kinds.get(expected.dtype, expected.dtype.kind) or \
        (got.dtype.kind in "iu" and expected.dtype.kind in "iu"), f"{what}: dtype {got.dtype} vs torch's {expected.dtype}"
    if expected.dtype.kind == "f":
        finite = np.isfinite(expected)
        assert np.array_equal(finite, np.isfinite(got)), f"{what}: non-finite entries differ"
        scale = max(float(np.max(np.abs(expected[finite]), initial=0.0)), 1e-300)
        err = float(np.max(np.abs(got[finite] - expected[finite]), initial=0.0)) / scale
        assert err <= tol, f"{what}: relative error {err:.2e}"
    else:
        np.testing.assert_array_equal(got, expected, err_msg=what)


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the translation computes every float in one dtype: float64 here
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("name,i", CASES)
def test_rule_matches_torch(name, i, float64_default):
    import jax

    op = torch_op(name)
    if op is None:
        pytest.skip(f"{name} does not exist in torch {torch.__version__}")
    torch.manual_seed(0)
    args, kwargs = SAMPLES[name][i]()
    expected = op(*args, **kwargs)
    rule = R.RULES[name]
    with R.computing_in(np.float64):
        got = rule(*R.to_jax(args), **{k: R.to_jax(v) for k, v in kwargs.items()})
    exp_leaves = _leaves(expected)
    got_leaves = _leaves(got)
    assert len(got_leaves) == len(exp_leaves), f"{name}: {len(got_leaves)} outputs, torch {len(exp_leaves)}"
    for k, (g, e) in enumerate(zip(got_leaves, exp_leaves)):
        if name in UNINITIALISED:
            assert np.asarray(g).shape == tuple(e.shape)
            continue
        _close(g, e, f"{name} output {k}")

    # Gradients: a vector-Jacobian product with a random cotangent, wrt every floating input.
    paths = [p for p in _float_tensors(args, kwargs)
             if not (p[0] == "args" and p[1] in NOT_DIFFERENTIATED.get(name, ()))]
    outputs = [k for k, (g, e) in enumerate(zip(got_leaves, exp_leaves))
               if isinstance(e, torch.Tensor) and e.is_floating_point() and not isinstance(g, R.MISSING)
               and k in DIFFERENTIATED_OUTPUTS.get(name, {k})]
    if not paths or not outputs or name in UNINITIALISED or name in NO_TORCH_GRADIENT:
        return
    torch.manual_seed(1)
    cotangents = [torch.randn(exp_leaves[k].shape, dtype=F64) for k in outputs]
    inputs = [_get(args, kwargs, p).detach().clone().requires_grad_(True) for p in paths]
    t_args, t_kwargs = _replace(args, kwargs, paths, inputs)
    t_out = _leaves(op(*t_args, **t_kwargs))
    total = sum((t_out[k] * c).sum() for k, c in zip(outputs, cotangents) if t_out[k].requires_grad)
    if isinstance(total, torch.Tensor) and total.requires_grad:
        t_grads = torch.autograd.grad(total, inputs, allow_unused=True)
    else:  # (detach: no gradient at all)
        t_grads = [None] * len(inputs)
    t_grads = [torch.zeros_like(x) if g is None else g for g, x in zip(t_grads, inputs)]

    def f(*floats):
        a, kw = _replace(R.to_jax(args), {k: R.to_jax(v) for k, v in kwargs.items()}, paths, floats)
        with R.computing_in(np.float64):
            out = _leaves(rule(*a, **kw))
        return [out[k] for k in outputs]

    with R.computing_in(np.float64):
        primals = [R.to_jax(x.detach()) for x in inputs]
        _, vjp = jax.vjp(f, *primals)
        j_grads = vjp([R.to_jax(c) for c in cotangents])
    for p, g, e in zip(paths, j_grads, t_grads):
        _close(g, e, f"{name} gradient wrt {p}", tol=GRADIENT_TOLERANCE.get(name, 1e-10))


def _get(args, kwargs, path):
    value = args[path[1]] if path[0] == "args" else kwargs[path[1]]
    for i in path[2:]:
        value = value[i]
    return value


def test_float_dtype_follows_the_computation():
    """A float32 computation stays float32: torch float dtypes in the graph mean the computation's dtype."""
    with R.computing_in(np.float32):
        assert R.RULES["aten.full.default"]([2], 1.5).dtype == np.float32
        assert R.RULES["aten.arange.start_step"](0.0, 1.0, 0.5).dtype == np.float32
        assert R.RULES["aten._to_copy.default"](R.to_jax(torch.ones(2, dtype=torch.int64)),
                                               dtype=R.jax_dtype(torch.float64)).dtype == np.float32
        assert R.to_jax(torch.ones(2, dtype=torch.float64)).dtype == np.float32
    with R.computing_in(np.float64):
        assert R.RULES["aten.full.default"]([2], 1.5).dtype == np.float64


def test_missing_outputs_are_marked():
    with R.computing_in(np.float64):
        out = R.RULES["aten.max_pool2d_with_indices.default"](R.to_jax(torch.randn(1, 1, 4, 4)), [2, 2])
    assert isinstance(out[1], R.MISSING) and "indices" in out[1].what


def test_stop_gradient_has_no_gradient():
    """The marker of a ``torch.no_grad()`` block's outputs: the value passes, the gradient does not."""
    import jax

    with R.computing_in(np.float64):
        x = R.to_jax(torch.randn(3, 4, dtype=F64))
        rule = R.RULES["ntk_bench_reference.stop_gradient.default"]
        np.testing.assert_array_equal(np.asarray(rule(x)), np.asarray(x))
        grad = jax.grad(lambda v: (rule(v) * v).sum())(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(x))  # d(sg(v)·v)/dv = sg(v): only the right factor
