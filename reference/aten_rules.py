"""One JAX rule per core-ATen op: the vocabulary of the torch.export translator.

``RULES`` maps an op's name (``"aten.addmm.default"``, ``"operator.getitem"``)
to a function taking the op's arguments as the graph passes them (tensors as
JAX arrays, torch dtypes already mapped by :func:`jax_dtype`) and returning
what the op returns (an array, a tuple for multi-output ops, a Python number
for symbolic sizes). Keyword names follow the ATen schemas. Rules emit the
primitives neural-tangents' structured derivatives recognise: matrix products
as ``dot_general``, convolutions as ``conv_general_dilated``, bias additions as
broadcasts, sums over windows as ``reduce_window_sum``.

Floating-point tensors are computed in one dtype, :func:`float_dtype` (float64
for the reference, float32 when neural-tangents is timed in float32): a torch
float dtype in an op's arguments means that dtype.

An output a rule does not compute (the indices of a max pool, the saved
statistics of a norm) is :data:`MISSING`; the translator refuses a graph that
uses one. Each rule is checked against torch in float64, values and gradients
(``tests/reference/test_reference_rules.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import operator

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from jax import lax  # noqa: E402

RULES: dict = {}

_FLOAT = contextvars.ContextVar("ntk_bench_reference_float", default=jnp.float64)
# The model's own float dtype (None: unknown); a graph's float dtype of lower precision is a cast the model makes.
_MODEL_FLOAT = contextvars.ContextVar("ntk_bench_reference_model_float", default=None)


class _Missing:
    """An output a rule does not compute; using it is an error the translator reports."""

    def __init__(self, what: str):
        self.what = what

    def __repr__(self) -> str:
        return f"<not computed: {self.what}>"


MISSING = _Missing


def float_dtype():
    """The dtype floating-point tensors are computed in."""
    return _FLOAT.get()


@contextlib.contextmanager
def computing_in(dtype, model_dtype: torch.dtype | None = None):
    """Compute floating-point tensors in ``dtype`` (a numpy/JAX dtype) inside the block; ``model_dtype``: the
    model's own float dtype, below whose precision a float dtype of the graph is kept (:func:`jax_dtype`)."""
    token = _FLOAT.set(jnp.dtype(dtype).type)
    model_token = _MODEL_FLOAT.set(model_dtype)
    try:
        yield
    finally:
        _MODEL_FLOAT.reset(model_token)
        _FLOAT.reset(token)


_TORCH_FLOATS = {torch.float64: jnp.float64, torch.float32: jnp.float32, torch.float16: jnp.float16,
                 torch.bfloat16: jnp.bfloat16}


def _eps(dtype) -> float:
    return float(jnp.finfo(dtype).eps)


def jax_dtype(dtype: torch.dtype):
    """The JAX dtype of a torch dtype. A float dtype means :func:`float_dtype` (the model's float32 computed in
    float64 for the reference), except one of lower precision than the model's own (``computing_in``'s
    ``model_dtype``): a cast the model makes on purpose (T5's layer norm computes in float32 inside a float64
    model), kept, so the translation rounds where torch does; never above :func:`float_dtype`."""
    if dtype.is_floating_point:
        model = _MODEL_FLOAT.get()
        if model not in _TORCH_FLOATS or dtype not in _TORCH_FLOATS or \
                _eps(_TORCH_FLOATS[dtype]) <= _eps(_TORCH_FLOATS[model]):
            return float_dtype()
        reduced = _TORCH_FLOATS[dtype]
        return reduced if _eps(reduced) > _eps(float_dtype()) else float_dtype()
    if dtype.is_complex:
        raise TypeError(f"complex tensors ({dtype}) are not supported")
    return {torch.bool: jnp.bool_, torch.int64: jnp.int64, torch.int32: jnp.int32, torch.int16: jnp.int16,
            torch.int8: jnp.int8, torch.uint8: jnp.uint8}[dtype]


def to_jax(value):
    """Torch tensors, dtypes and containers of them as JAX values (floats in :func:`float_dtype`)."""
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu()
        if array.is_floating_point():
            return jnp.asarray(array.double().numpy(), dtype=float_dtype())
        return jnp.asarray(array.numpy())
    if isinstance(value, torch.dtype):
        return jax_dtype(value)
    if isinstance(value, (list, tuple)):
        return type(value)(to_jax(v) for v in value)
    return value


def rule(*names: str):
    """Register the decorated function as the JAX rule of the named ops (``RULES``); ValueError for an op that
    already has one. A rule needs no docstring of its own: the ATen schema of the op it names is its contract."""

    def register(fn):
        for name in names:
            if name in RULES:
                raise ValueError(f"two rules for {name}")
            RULES[name] = fn
        return fn

    return register


# -- helpers ----------------------------------------------------------------------------------------------------

def _as_float(x):
    """x, or x converted to the float dtype when it is an integer/bool array (torch's true division etc.)."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(float_dtype())


def _default_dtype(value, dtype):
    if dtype is not None:
        return dtype
    if isinstance(value, bool):
        return jnp.bool_
    if isinstance(value, int):
        return jnp.int64
    return float_dtype()


def _dims(dim, ndim):
    """A reduction's dims: None or [] means all."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(ndim))
    if isinstance(dim, int):
        dim = [dim]
    return tuple(d % ndim if ndim else 0 for d in dim)


def _listify(v, n):
    v = [v] if isinstance(v, int) else list(v)
    return v * n if len(v) == 1 else v


def _sum_dtype(x, dtype):
    if dtype is not None:
        return x.astype(dtype)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(jnp.int64)
    return x


# -- symbolic sizes, asserts and Python operators on them ---------------------------------------------------------

@rule("aten.sym_size.int")
def sym_size(x, dim):
    return x.shape[dim]


@rule("aten.sym_numel.default")
def sym_numel(x):
    return math.prod(x.shape)


@rule("aten._assert_scalar.default", "aten.sym_constrain_range_for_size.default",
      "aten._assert_tensor_metadata.default", "aten.sym_constrain_range.default")
def no_op(*args, **kwargs):
    return None


_PYTHON_OPS = {
    "operator.getitem": operator.getitem, "operator.add": operator.add, "operator.sub": operator.sub,
    "operator.mul": operator.mul, "operator.floordiv": operator.floordiv, "operator.truediv": operator.truediv,
    "operator.mod": operator.mod, "operator.neg": operator.neg, "operator.pow": operator.pow,
    "operator.eq": operator.eq, "operator.ne": operator.ne, "operator.lt": operator.lt, "operator.le": operator.le,
    "operator.gt": operator.gt, "operator.ge": operator.ge, "math.ceil": math.ceil, "math.floor": math.floor,
    "math.sqrt": math.sqrt, "torch.sym_float": float, "torch.sym_int": int, "torch.sym_max": max,
    "torch.sym_min": min, "torch.sym_not": operator.not_,
}
RULES.update(_PYTHON_OPS)


# -- matrix products and convolutions -----------------------------------------------------------------------------

@rule("aten.mm.default", "aten.bmm.default", "aten.matmul.default", "aten.mv.default", "aten.dot.default")
def mm(self, other):
    return jnp.matmul(self, other)


def _scaled_sum(acc, product, beta, alpha):
    out = product if alpha == 1 else product * alpha
    if beta == 0:
        return out
    return out + (acc if beta == 1 else acc * beta)


@rule("aten.addmm.default", "aten.baddbmm.default")
def addmm(self, mat1, mat2, beta=1, alpha=1):
    """beta·self + alpha·(mat1 @ mat2): with the weight stored (in, out), the product is ``x @ W``."""
    return _scaled_sum(self, jnp.matmul(mat1, mat2), beta, alpha)


@rule("aten.linear.default")
def linear(input, weight, bias=None):
    out = jnp.matmul(input, weight.T)
    return out if bias is None else out + bias


_SPATIAL = {1: "H", 2: "HW", 3: "DHW"}


@rule("aten.convolution.default")
def convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """Convolutions of rank 1-3 in torch's layouts (NC..., OI...), as one ``conv_general_dilated``; a transposed
    convolution as the dilated-input convolution with the flipped, group-transposed kernel."""
    nd = input.ndim - 2
    if nd not in _SPATIAL:
        raise NotImplementedError(f"convolution over {nd} spatial dims")
    s = _SPATIAL[nd]
    stride, padding, dilation = _listify(stride, nd), _listify(padding, nd), _listify(dilation, nd)
    dn = lax.conv_dimension_numbers(input.shape, weight.shape, ("NC" + s, "OI" + s, "NC" + s))
    if not transposed:
        out = lax.conv_general_dilated(input, weight, stride, [(p, p) for p in padding], rhs_dilation=dilation,
                                       feature_group_count=groups, dimension_numbers=dn)
    else:
        kernel = weight.shape[2:]
        cin, cout_g = weight.shape[0], weight.shape[1]
        w = weight.reshape((groups, cin // groups, cout_g) + kernel).swapaxes(1, 2)
        w = jnp.flip(w.reshape((groups * cout_g, cin // groups) + kernel), axis=tuple(range(2, 2 + nd)))
        output_padding = _listify(output_padding, nd)
        pads = [(d * (k - 1) - p, d * (k - 1) - p + op)
                for k, p, d, op in zip(kernel, padding, dilation, output_padding)]
        dn = lax.conv_dimension_numbers(input.shape, w.shape, ("NC" + s, "OI" + s, "NC" + s))
        out = lax.conv_general_dilated(input, w, (1,) * nd, pads, lhs_dilation=stride, rhs_dilation=dilation,
                                       feature_group_count=groups, dimension_numbers=dn)
    if bias is not None:
        out = out + bias.reshape((1, -1) + (1,) * nd)
    return out


# -- normalisation ------------------------------------------------------------------------------------------------

def _affine(y, weight, bias, shape):
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


@rule("aten._native_batch_norm_legit_no_training.default")
def batch_norm_eval(input, weight, bias, running_mean, running_var, momentum, eps):
    shape = (1, -1) + (1,) * (input.ndim - 2)
    invstd = lax.rsqrt(running_var + eps)
    y = (input - running_mean.reshape(shape)) * invstd.reshape(shape)
    return (_affine(y, weight, bias, shape), MISSING("batch norm's saved mean"),
            MISSING("batch norm's saved inverse std"))


@rule("aten.native_batch_norm.default")
def native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps):
    if training:
        raise NotImplementedError("batch norm with batch statistics (training mode); call model.eval()")
    return batch_norm_eval(input, weight, bias, running_mean, running_var, momentum, eps)


@rule("aten.native_layer_norm.default")
def native_layer_norm(input, normalized_shape, weight, bias, eps):
    axes = tuple(range(input.ndim - len(normalized_shape), input.ndim))
    mean = jnp.mean(input, axis=axes, keepdims=True)
    centred = input - mean
    rstd = lax.rsqrt(jnp.mean(centred * centred, axis=axes, keepdims=True) + eps)
    y = centred * rstd
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, mean, rstd


@rule("aten.native_group_norm.default")
def native_group_norm(input, weight, bias, N, C, HxW, group, eps):
    n, c = input.shape[0], input.shape[1]
    grouped = input.reshape((n, group, -1))
    mean = jnp.mean(grouped, axis=-1, keepdims=True)
    centred = grouped - mean
    rstd = lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    y = (centred * rstd).reshape(input.shape)
    shape = (1, c) + (1,) * (input.ndim - 2)
    return _affine(y, weight, bias, shape), mean.reshape(n, group), rstd.reshape(n, group)


# -- pooling ------------------------------------------------------------------------------------------------------

def _pool_geometry(x, kernel, stride, padding, dilation, ceil_mode):
    """Per pooled dim: (kernel, stride, dilation, (pad_lo, pad_hi)) with torch's output size (ceil_mode included)."""
    nd = len(kernel) if not isinstance(kernel, int) else 1
    kernel = _listify(kernel, nd)
    stride = _listify(stride, nd) if stride else kernel  # ATen's empty stride means the kernel size
    padding, dilation = _listify(padding, nd), _listify(dilation, nd)
    dims = []
    for i, (k, s, p, d) in enumerate(zip(kernel, stride, padding, dilation)):
        length = x.shape[x.ndim - nd + i]
        span = length + 2 * p - d * (k - 1) - 1
        out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= length + p:
            out -= 1
        hi = (out - 1) * s + d * (k - 1) + 1 - length - p
        dims.append((k, s, d, (p, max(hi, 0)), out, length))
    return dims


def _window(x, dims):
    lead = x.ndim - len(dims)
    return ((1,) * lead + tuple(d[0] for d in dims), (1,) * lead + tuple(d[1] for d in dims),
            [(0, 0)] * lead + [d[3] for d in dims], (1,) * lead + tuple(d[2] for d in dims))


def _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode):
    dims = _pool_geometry(x, kernel_size, stride, padding, dilation, ceil_mode)
    window, strides, pads, dil = _window(x, dims)
    init = np.asarray(-np.inf if jnp.issubdtype(x.dtype, jnp.floating) else np.iinfo(x.dtype).min, x.dtype)
    if all(d == 1 for d in dil):
        # (a concrete numpy init value makes JAX pick its differentiable reduce_window_max, not the generic one)
        return lax.reduce_window(x, init, lax.max, window, strides, pads)
    # JAX cannot differentiate a dilated reduce_window max: the maximum over the window's strided slices
    padded = lax.pad(x, init, [(lo, hi, 0) for lo, hi in pads])
    lead = x.ndim - len(dims)
    out_shape = x.shape[:lead] + tuple(d[4] for d in dims)
    result = None
    for offsets in np.ndindex(*(d[0] for d in dims)):
        start = (0,) * lead + tuple(int(o) * d[2] for o, d in zip(offsets, dims))
        limit = tuple(s + (n - 1) * st + 1 for s, n, st in zip(start, out_shape, strides))
        part = lax.slice(padded, start, limit, strides)
        result = part if result is None else jnp.maximum(result, part)
    return result


@rule("aten.max_pool2d_with_indices.default", "aten.max_pool3d_with_indices.default")
def max_pool_with_indices(self, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    return (_max_pool(self, kernel_size, stride, padding, dilation, ceil_mode),
            MISSING("the indices of a max pool"))


@rule("aten.max_pool1d.default", "aten.max_pool2d.default", "aten.max_pool3d.default")
def max_pool(self, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    return _max_pool(self, kernel_size, stride, padding, dilation, ceil_mode)


def _avg_count(k, s, p, out, length, count_include_pad):
    """How many elements each output position of one pooled dim averages (torch's divisor)."""
    counts = []
    for o in range(out):
        start = o * s - p
        end = min(start + k, length + p)
        if count_include_pad:
            counts.append(end - start)
        else:
            counts.append(min(end, length) - max(start, 0))
    return np.asarray(counts, dtype=np.float64)


@rule("aten.avg_pool1d.default", "aten.avg_pool2d.default", "aten.avg_pool3d.default")
def avg_pool(self, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
             divisor_override=None):
    """A window sum (``reduce_window_sum``, which neural-tangents structures) over torch's divisor."""
    x = self
    dims = _pool_geometry(x, kernel_size, stride, padding, 1, ceil_mode)
    window, strides, pads, _ = _window(x, dims)
    summed = lax.reduce_window(x, np.asarray(0, x.dtype), lax.add, window, strides, pads)
    if divisor_override:
        return summed / divisor_override
    count = np.ones(())
    for k, s, _, (p, _), out, length in dims:
        count = np.multiply.outer(count, _avg_count(k, s, p, out, length, count_include_pad))
    if np.all(count == count.flat[0]):
        return summed / float(count.flat[0])
    return summed / jnp.asarray(count, summed.dtype)


def _adaptive_bounds(length, out):
    return [((i * length) // out, -(-((i + 1) * length) // out)) for i in range(out)]


@rule("aten._adaptive_avg_pool2d.default", "aten._adaptive_avg_pool3d.default",
      "aten.adaptive_avg_pool1d.default", "aten.adaptive_avg_pool2d.default")
def adaptive_avg_pool(self, output_size):
    """A mean over equal blocks where the size divides, else a product with torch's averaging matrix."""
    x = self
    nd = len(output_size)
    lead = x.ndim - nd
    for i, out in enumerate(output_size):
        axis, length = lead + i, x.shape[lead + i]
        if length % out == 0:
            x = jnp.mean(x.reshape(x.shape[:axis] + (out, length // out) + x.shape[axis + 1:]), axis=axis + 1)
        else:
            avg = np.zeros((length, out))
            for o, (start, end) in enumerate(_adaptive_bounds(length, out)):
                avg[start:end, o] = 1.0 / (end - start)
            x = jnp.moveaxis(jnp.tensordot(x, jnp.asarray(avg, x.dtype), axes=([axis], [0])), -1, axis)
    return x


@rule("aten.adaptive_max_pool1d.default", "aten.adaptive_max_pool2d.default", "aten.adaptive_max_pool3d.default")
def adaptive_max_pool(self, output_size):
    x = self
    lead = x.ndim - len(output_size)
    for i, out in enumerate(output_size):
        axis = lead + i
        parts = [lax.slice_in_dim(x, s, e, axis=axis).max(axis=axis, keepdims=True)
                 for s, e in _adaptive_bounds(x.shape[axis], out)]
        x = jnp.concatenate(parts, axis=axis)
    return x, MISSING("the indices of an adaptive max pool")


# -- activations and other elementwise ops ------------------------------------------------------------------------

def _unary(name, fn):
    RULES[f"aten.{name}.default"] = fn


for _name, _fn in {
    "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "exp": jnp.exp, "log": jnp.log,
    "log2": jnp.log2, "log10": jnp.log10, "log1p": jnp.log1p, "expm1": jnp.expm1, "sqrt": jnp.sqrt,
    "rsqrt": lax.rsqrt, "neg": jnp.negative, "abs": jnp.abs, "sign": jnp.sign, "sin": jnp.sin, "cos": jnp.cos,
    "tan": jnp.tan, "asin": jnp.arcsin, "acos": jnp.arccos, "atan": jnp.arctan, "sinh": jnp.sinh,
    "cosh": jnp.cosh, "asinh": jnp.arcsinh, "acosh": jnp.arccosh, "atanh": jnp.arctanh, "erf": lax.erf,
    "erfinv": lax.erf_inv, "floor": jnp.floor, "ceil": jnp.ceil, "round": jnp.round, "trunc": jnp.trunc,
    "isnan": jnp.isnan, "isinf": jnp.isinf, "isfinite": jnp.isfinite, "logical_not": jnp.logical_not,
    "reciprocal": lambda x: 1 / _as_float(x), "silu": jax.nn.silu,
    "hardsigmoid": lambda x: _clamp(x + 3, 0, 6) / 6, "hardswish": lambda x: x * _clamp(x + 3, 0, 6) / 6,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "bitwise_not": lambda x: jnp.logical_not(x) if x.dtype == jnp.bool_ else jnp.invert(x),
    "clone": lambda x, memory_format=None: x, "alias": lambda x: x, "lift_fresh_copy": lambda x: x,
    "detach": lax.stop_gradient,
}.items():
    _unary(_name, _fn)


@rule("ntk_bench_reference.stop_gradient.default")
def stop_gradient(x):
    """Where torch's forward cuts the gradient (a ``torch.no_grad()`` block's outputs, ``detach``), marked by
    the translator before torch's decompositions inline the block."""
    return lax.stop_gradient(x)


@rule("aten.gelu.default")
def gelu(self, approximate="none"):
    return jax.nn.gelu(self, approximate=approximate == "tanh")


@rule("aten.leaky_relu.default")
def leaky_relu(self, negative_slope=0.01):
    return jnp.where(self > 0, self, self * negative_slope)


@rule("aten.elu.default")
def elu(self, alpha=1, scale=1, input_scale=1):
    return scale * jnp.where(self > 0, self, alpha * jnp.expm1(self * input_scale))


@rule("aten.softplus.default")
def softplus(self, beta=1, threshold=20):
    return jnp.where(self * beta > threshold, self, jnp.log1p(jnp.exp(self * beta)) / beta)


@rule("aten.log_sigmoid_forward.default")
def log_sigmoid_forward(self):
    return jax.nn.log_sigmoid(self), MISSING("log_sigmoid's buffer")


def _clamp(x, lo, hi):
    """torch's clamp, gradient 1 on [lo, hi] inclusive (a where, not max/min, which split ties)."""
    if lo is not None:
        x = jnp.where(x < lo, jnp.asarray(lo, x.dtype) if not hasattr(lo, "shape") else lo, x)
    if hi is not None:
        x = jnp.where(x > hi, jnp.asarray(hi, x.dtype) if not hasattr(hi, "shape") else hi, x)
    return x


@rule("aten.clamp.default", "aten.clamp.Tensor")
def clamp(self, min=None, max=None):
    return _clamp(self, min, max)


@rule("aten.clamp_min.default", "aten.clamp_min.Tensor")
def clamp_min(self, min):
    return _clamp(self, min, None)


@rule("aten.clamp_max.default", "aten.clamp_max.Tensor")
def clamp_max(self, max):
    return _clamp(self, None, max)


@rule("aten.hardtanh.default")
def hardtanh(self, min_val=-1, max_val=1):
    return _clamp(self, min_val, max_val)


@rule("aten.add.Tensor", "aten.add.Scalar")
def add(self, other, alpha=1):
    return self + (other if alpha == 1 else other * alpha)


@rule("aten.sub.Tensor", "aten.sub.Scalar")
def sub(self, other, alpha=1):
    return self - (other if alpha == 1 else other * alpha)


@rule("aten.rsub.Tensor", "aten.rsub.Scalar")
def rsub(self, other, alpha=1):
    return other - (self if alpha == 1 else self * alpha)


@rule("aten.mul.Tensor", "aten.mul.Scalar")
def mul(self, other):
    return self * other


@rule("aten.div.Tensor", "aten.div.Scalar")
def div(self, other):
    return _as_float(self) / other


@rule("aten.div.Tensor_mode", "aten.div.Scalar_mode")
def div_mode(self, other, rounding_mode=None):
    if rounding_mode is None:
        return div(self, other)
    floating = any(jnp.issubdtype(jnp.result_type(v), jnp.floating) for v in (self, other))
    if rounding_mode == "floor":
        return jnp.floor(self / other) if floating else jnp.floor_divide(self, other)
    return jnp.trunc(self / other) if floating else lax.div(*jnp.broadcast_arrays(self, jnp.asarray(other, self.dtype)))


@rule("aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor", "aten.pow.Scalar")
def pow(self, exponent):
    if isinstance(exponent, (int, float)) and float(exponent) == 2.0:
        return self * self
    return jnp.power(self, exponent)


@rule("aten.remainder.Tensor", "aten.remainder.Scalar")
def remainder(self, other):
    return jnp.remainder(self, other)


@rule("aten.fmod.Tensor", "aten.fmod.Scalar")
def fmod(self, other):
    return jnp.fmod(self, other)


@rule("aten.atan2.default")
def atan2(self, other):
    return jnp.arctan2(self, other)


@rule("aten.maximum.default")
def maximum(self, other):
    return jnp.maximum(self, other)


@rule("aten.minimum.default")
def minimum(self, other):
    return jnp.minimum(self, other)


for _name, _fn in {"eq": jnp.equal, "ne": jnp.not_equal, "lt": jnp.less, "le": jnp.less_equal,
                   "gt": jnp.greater, "ge": jnp.greater_equal}.items():
    RULES[f"aten.{_name}.Tensor"] = RULES[f"aten.{_name}.Scalar"] = _fn
for _name, _fn in {"logical_and": jnp.logical_and, "logical_or": jnp.logical_or, "logical_xor": jnp.logical_xor,
                   "bitwise_and": jnp.bitwise_and, "bitwise_or": jnp.bitwise_or,
                   "bitwise_xor": jnp.bitwise_xor}.items():
    RULES[f"aten.{_name}.default" if _name.startswith("logical") else f"aten.{_name}.Tensor"] = _fn


@rule("aten.where.self")
def where(condition, self, other):
    return jnp.where(condition, self, other)


@rule("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def masked_fill(self, mask, value):
    return jnp.where(mask, jnp.asarray(value, self.dtype), self)


# -- reductions ---------------------------------------------------------------------------------------------------

@rule("aten.sum.dim_IntList", "aten.sum.default")
def sum_(self, dim=None, keepdim=False, dtype=None):
    return jnp.sum(_sum_dtype(self, dtype), axis=_dims(dim, self.ndim), keepdims=keepdim)


@rule("aten.mean.dim", "aten.mean.default")
def mean(self, dim=None, keepdim=False, dtype=None):
    x = self if dtype is None else self.astype(dtype)
    return jnp.mean(x, axis=_dims(dim, self.ndim), keepdims=keepdim)


@rule("aten.prod.dim_int", "aten.prod.default")
def prod(self, dim=None, keepdim=False, dtype=None):
    return jnp.prod(_sum_dtype(self, dtype), axis=_dims(dim, self.ndim), keepdims=keepdim)


@rule("aten.amax.default", "aten.max.default")
def amax(self, dim=(), keepdim=False):
    return jnp.max(self, axis=_dims(dim, self.ndim), keepdims=keepdim)


@rule("aten.amin.default", "aten.min.default")
def amin(self, dim=(), keepdim=False):
    return jnp.min(self, axis=_dims(dim, self.ndim), keepdims=keepdim)


@rule("aten.max.dim")
def max_dim(self, dim, keepdim=False):
    return jnp.max(self, axis=dim, keepdims=keepdim), jnp.argmax(self, axis=dim, keepdims=keepdim)


@rule("aten.min.dim")
def min_dim(self, dim, keepdim=False):
    return jnp.min(self, axis=dim, keepdims=keepdim), jnp.argmin(self, axis=dim, keepdims=keepdim)


@rule("aten.argmax.default")
def argmax(self, dim=None, keepdim=False):
    if dim is None:
        out = jnp.argmax(self.reshape(-1))
        return out.reshape((1,) * self.ndim) if keepdim else out
    return jnp.argmax(self, axis=dim, keepdims=keepdim)


@rule("aten.argmin.default")
def argmin(self, dim=None, keepdim=False):
    if dim is None:
        out = jnp.argmin(self.reshape(-1))
        return out.reshape((1,) * self.ndim) if keepdim else out
    return jnp.argmin(self, axis=dim, keepdims=keepdim)


def _correction(correction):
    return 1 if correction is None else correction


@rule("aten.var.correction")
def var(self, dim=None, correction=None, keepdim=False):
    return jnp.var(self, axis=_dims(dim, self.ndim), ddof=_correction(correction), keepdims=keepdim)


@rule("aten.std.correction")
def std(self, dim=None, correction=None, keepdim=False):
    return jnp.std(self, axis=_dims(dim, self.ndim), ddof=_correction(correction), keepdims=keepdim)


@rule("aten.var_mean.correction")
def var_mean(self, dim=None, correction=None, keepdim=False):
    axes = _dims(dim, self.ndim)
    return (jnp.var(self, axis=axes, ddof=_correction(correction), keepdims=keepdim),
            jnp.mean(self, axis=axes, keepdims=keepdim))


@rule("aten.any.dim", "aten.any.dims", "aten.any.default")
def any_(self, dim=None, keepdim=False):
    return jnp.any(self, axis=_dims(dim, self.ndim), keepdims=keepdim)


@rule("aten.all.dim", "aten.all.dims", "aten.all.default")
def all_(self, dim=None, keepdim=False):
    return jnp.all(self, axis=_dims(dim, self.ndim), keepdims=keepdim)


@rule("aten.cumsum.default")
def cumsum(self, dim, dtype=None):
    return jnp.cumsum(_sum_dtype(self, dtype), axis=dim)


@rule("aten.logsumexp.default")
def logsumexp(self, dim, keepdim=False):
    return jax.nn.logsumexp(self, axis=_dims(dim, self.ndim), keepdims=keepdim)


@rule("aten._softmax.default")
def softmax(self, dim, half_to_float=False):
    return jax.nn.softmax(self, axis=dim)


@rule("aten._log_softmax.default")
def log_softmax(self, dim, half_to_float=False):
    return jax.nn.log_softmax(self, axis=dim)


# -- shapes, views and copies -------------------------------------------------------------------------------------

@rule("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.view_copy.default")
def view(self, size):
    return jnp.reshape(self, tuple(size))


@rule("aten.permute.default", "aten.permute_copy.default")
def permute(self, dims):
    return jnp.transpose(self, tuple(dims))


@rule("aten.transpose.int")
def transpose(self, dim0, dim1):
    return jnp.swapaxes(self, dim0, dim1)


@rule("aten.t.default")
def t(self):
    return self.T


@rule("aten.expand.default", "aten.expand_copy.default")
def expand(self, size, implicit=False):
    lead = len(size) - self.ndim
    shape = tuple(self.shape[i - lead] if s == -1 else s for i, s in enumerate(size))
    return jnp.broadcast_to(self, shape)


@rule("aten.squeeze.dims", "aten.squeeze.dim", "aten.squeeze.default")
def squeeze(self, dim=None):
    dims = _dims(dim, self.ndim) if self.ndim else ()
    return jnp.squeeze(self, axis=tuple(d for d in dims if self.shape[d] == 1))


@rule("aten.unsqueeze.default")
def unsqueeze(self, dim):
    return jnp.expand_dims(self, dim if dim >= 0 else dim + self.ndim + 1)


@rule("aten.cat.default")
def cat(tensors, dim=0):
    arrays = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)] or list(tensors[:1])
    return jnp.concatenate(arrays, axis=dim % arrays[0].ndim)


@rule("aten.stack.default")
def stack(tensors, dim=0):
    return jnp.stack(tensors, axis=dim)


def _index_at(ndim, dim, index):
    return (slice(None),) * (dim % ndim) + (index,)


@rule("aten.slice.Tensor", "aten.slice_copy.Tensor")
def slice_(self, dim=0, start=None, end=None, step=1):
    return self[_index_at(self.ndim, dim, slice(start, end, step))]


@rule("aten.slice_scatter.default")
def slice_scatter(self, src, dim=0, start=None, end=None, step=1):
    return self.at[_index_at(self.ndim, dim, slice(start, end, step))].set(src.astype(self.dtype))


@rule("aten.select.int", "aten.select_copy.int")
def select(self, dim, index):
    return self[_index_at(self.ndim, dim, index)]


@rule("aten.select_scatter.default")
def select_scatter(self, src, dim, index):
    return self.at[_index_at(self.ndim, dim, index)].set(src.astype(self.dtype))


@rule("aten.split_with_sizes.default", "aten.split_with_sizes_copy.default")
def split_with_sizes(self, split_sizes, dim=0):
    bounds = np.cumsum([0] + list(split_sizes))
    return [lax.slice_in_dim(self, int(a), int(b), axis=dim % self.ndim) for a, b in zip(bounds[:-1], bounds[1:])]


@rule("aten.split.Tensor", "aten.split_copy.Tensor")
def split(self, split_size, dim=0):
    length = self.shape[dim]
    sizes = [min(split_size, length - i) for i in range(0, length, split_size)] or [0]
    return split_with_sizes(self, sizes, dim)


@rule("aten.unbind.int", "aten.unbind_copy.int")
def unbind(self, dim=0):
    return [jnp.take(self, i, axis=dim) for i in range(self.shape[dim])]


@rule("aten.index.Tensor", "aten._unsafe_index.Tensor")
def index(self, indices):
    return self[tuple(slice(None) if i is None else i for i in indices)]


@rule("aten.index_put.default", "aten._unsafe_index_put.default")
def index_put(self, indices, values, accumulate=False):
    at = self.at[tuple(slice(None) if i is None else i for i in indices)]
    return at.add(values) if accumulate else at.set(values.astype(self.dtype))


@rule("aten.index_select.default")
def index_select(self, dim, index):
    return jnp.take(self, index, axis=dim)


def _grid(index, dim):
    """Full coordinate arrays for ``index`` with axis ``dim`` replaced by ``index``'s values (gather/scatter)."""
    coords = list(jnp.meshgrid(*[jnp.arange(n) for n in index.shape], indexing="ij"))
    coords[dim % index.ndim] = index
    return tuple(coords)


@rule("aten.gather.default")
def gather(self, dim, index, sparse_grad=False):
    return self[_grid(index, dim)]


@rule("aten.scatter.src", "aten.scatter.value")
def scatter(self, dim, index, src=None, value=None):
    source = src if src is not None else value
    if hasattr(source, "shape") and source.ndim:
        source = source[tuple(slice(0, n) for n in index.shape)]
    return self.at[_grid(index, dim)].set(jnp.asarray(source, self.dtype))


@rule("aten.scatter_add.default")
def scatter_add(self, dim, index, src):
    return self.at[_grid(index, dim)].add(src[tuple(slice(0, n) for n in index.shape)])


@rule("aten.embedding.default")
def embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    """Rows of the table; torch's padding row gets no gradient, so neither does it here."""
    if scale_grad_by_freq:
        raise NotImplementedError("embedding with scale_grad_by_freq (a gradient that is not the forward's)")
    rows = jnp.take(weight, indices, axis=0)
    if padding_idx is None or padding_idx < 0:
        return rows
    return jnp.where((indices == padding_idx)[..., None], lax.stop_gradient(rows), rows)


@functools.lru_cache(maxsize=64)
def _resampling_matrix(name: str, axis: int, spatial: tuple, call: tuple) -> np.ndarray:
    """The (out, in) matrix an upsampling op applies along spatial ``axis`` of an input of ``spatial`` sizes.

    Every interpolation ATen offers (nearest, linear, cubic, antialiased) is separable, with weights that sum
    to one along each axis, so the op's own output on inputs that are one-hot along ``axis`` and constant along
    the others is that matrix. torch computes it: its conventions (half-pixel centres, ``align_corners``, a
    given scale factor taking precedence over the size ratio, nearest's float32 index arithmetic) are the op's,
    not a copy of them. (The other axes keep their sizes: the antialiased ops mis-handle a length-1 axis.)
    """
    op = _torch_op(name)
    length = spatial[axis]
    shape = (length, 1) + tuple(length if k == axis else 1 for k in range(len(spatial)))
    basis = torch.eye(length, dtype=torch.float64).reshape(shape).expand((length, 1) + spatial)
    with torch.no_grad():
        out = op(basis.contiguous(), *call)
    out = out[(slice(None), 0) + tuple(slice(None) if k == axis else 0 for k in range(len(spatial)))]
    return out.T.numpy()


def _torch_op(name: str):
    _, op, overload = name.split(".")
    return getattr(getattr(torch.ops.aten, op), overload)


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def _resampling_rule(name: str, nd: int):
    def resample(input, *args, **kwargs):
        arguments = _torch_op(name)._schema.arguments[1:]
        values = {**{a.name: a.default_value for a in arguments if a.has_default_value()},
                  **dict(zip([a.name for a in arguments], args)), **kwargs}
        call = tuple(_hashable(values.get(a.name)) for a in arguments)
        spatial = tuple(input.shape[input.ndim - nd:])
        x = input
        for axis in range(nd):
            dim = x.ndim - nd + axis
            matrix = _resampling_matrix(name, axis, spatial, call)
            x = jnp.moveaxis(jnp.tensordot(x, jnp.asarray(matrix, x.dtype), axes=([dim], [1])), -1, dim)
        return x

    resample.__doc__ = f"``{name}`` as one product per spatial axis with the op's interpolation matrix."
    return resample


for _op, _nd in {"upsample_nearest1d": 1, "upsample_nearest2d": 2, "upsample_nearest3d": 3,
                 "upsample_linear1d": 1, "upsample_bilinear2d": 2, "upsample_trilinear3d": 3,
                 "_upsample_bilinear2d_aa": 2, "_upsample_bicubic2d_aa": 2}.items():
    for _overload in ("default", "vec"):
        RULES[f"aten.{_op}.{_overload}"] = _resampling_rule(f"aten.{_op}.{_overload}", _nd)


@rule("aten._trilinear.default")
def trilinear(i1, i2, i3, expand1, expand2, expand3, sumdim, unroll_dim=1):
    """``nn.Bilinear``'s product: each input unsqueezed at its ``expand`` dims, multiplied, summed over
    ``sumdim``; as one einsum (dot_generals, no (N, O, I1, I2) intermediate)."""
    ndim = i1.ndim + len(expand1)
    letters = "abcdefghijklmnopqrstuvwxyz"[:ndim]
    sizes, subscripts = [1] * ndim, []
    for x, expand in zip((i1, i2, i3), (expand1, expand2, expand3)):
        dims = [d for d in range(ndim) if d not in set(expand)]
        subscripts.append("".join(letters[d] for d in dims))
        for d, n in zip(dims, x.shape):
            sizes[d] = max(sizes[d], n)
    kept = [d for d in range(ndim) if d not in set(sumdim)]
    present = set("".join(subscripts))
    y = jnp.einsum(",".join(subscripts) + "->" + "".join(letters[d] for d in kept if letters[d] in present),
                   i1, i2, i3)
    return y.reshape(tuple(sizes[d] for d in kept))  # (a dim no input has is of size 1)


@rule("aten._embedding_bag.default", "aten._embedding_bag_forward_only.default")
def embedding_bag(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                  per_sample_weights=None, include_last_offset=False, padding_idx=-1):
    """The bags' sums (mode 0, weighted by ``per_sample_weights``), means (1) or maxima (2) of the table's rows;
    an empty bag is zeros; rows at ``padding_idx`` are left out (of a mean's count too). The bags' bookkeeping
    outputs (offset2bag, sizes, the maxima's indices) are not computed."""
    if scale_grad_by_freq:
        raise NotImplementedError("embedding_bag with scale_grad_by_freq (a gradient that is not the forward's)")
    if indices.ndim != 1 or offsets.ndim != 1:
        raise NotImplementedError(f"embedding_bag with {indices.ndim}-D indices and {offsets.ndim}-D offsets")
    bags = offsets.shape[0] - (1 if include_last_offset else 0)
    positions = jnp.arange(indices.shape[0])
    bag = jnp.searchsorted(offsets, positions, side="right") - 1
    valid = bag < bags  # (with include_last_offset, torch's last bag runs to the end of the indices too)
    if padding_idx is not None and padding_idx >= 0:
        valid = valid & (indices != padding_idx)
    bag = jnp.where(valid, bag, bags)  # (an id past the last bag: dropped by the segment ops)
    rows = jnp.take(weight, indices, axis=0)
    if per_sample_weights is not None:
        if mode != 0:
            raise NotImplementedError("embedding_bag's per_sample_weights with a mode other than sum")
        rows = rows * per_sample_weights[:, None]
    if mode == 2:
        rows = jnp.where(valid[:, None], rows, -jnp.inf)
        out = jax.ops.segment_max(rows, bag, num_segments=bags)
        out = jnp.where(jnp.isneginf(out), jnp.zeros((), out.dtype), out)
    else:
        out = jax.ops.segment_sum(jnp.where(valid[:, None], rows, jnp.zeros((), rows.dtype)), bag,
                                  num_segments=bags)
        if mode == 1:
            count = jax.ops.segment_sum(valid.astype(out.dtype), bag, num_segments=bags)
            out = out / jnp.maximum(count, 1)[:, None]
    return (out, MISSING("embedding_bag's offset2bag"), MISSING("embedding_bag's bag sizes"),
            MISSING("embedding_bag's max indices"))


@rule("aten.constant_pad_nd.default")
def constant_pad_nd(self, pad, value=0):
    """``lax.pad`` (negative amounts crop), which neural-tangents structures."""
    config = [(0, 0, 0)] * self.ndim
    for i in range(len(pad) // 2):
        config[self.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1], 0)
    return lax.pad(self, jnp.asarray(value, self.dtype), config)


def _pad_mode(mode):
    def pad(self, padding):
        widths = [(0, 0)] * self.ndim
        for i in range(len(padding) // 2):
            widths[self.ndim - 1 - i] = (padding[2 * i], padding[2 * i + 1])
        return jnp.pad(self, widths, mode=mode)

    return pad


for _nd in (1, 2, 3):
    RULES[f"aten.reflection_pad{_nd}d.default"] = _pad_mode("reflect")
    RULES[f"aten.replication_pad{_nd}d.default"] = _pad_mode("edge")


@rule("aten.flip.default")
def flip(self, dims):
    return jnp.flip(self, axis=tuple(dims))


@rule("aten.roll.default")
def roll(self, shifts, dims=()):
    if not dims:
        return jnp.roll(self.reshape(-1), shifts).reshape(self.shape)
    return jnp.roll(self, tuple(shifts), axis=tuple(dims))


@rule("aten.repeat.default")
def repeat(self, repeats):
    return jnp.tile(self, tuple(repeats))


@rule("aten.tril.default")
def tril(self, diagonal=0):
    return jnp.tril(self, diagonal)


@rule("aten.triu.default")
def triu(self, diagonal=0):
    return jnp.triu(self, diagonal)


@rule("aten._to_copy.default")
def to_copy(self, dtype=None, **_):
    return self if dtype is None else self.astype(dtype)


@rule("aten.copy.default")
def copy(self, src, non_blocking=False):
    """The functional form of ``self.copy_(src)``: src, broadcast to self's shape and dtype."""
    return jnp.broadcast_to(src, self.shape).astype(self.dtype)


# -- tensor factories ---------------------------------------------------------------------------------------------

@rule("aten.full.default")
def full(size, fill_value, dtype=None, **_):
    return jnp.full(tuple(size), fill_value, _default_dtype(fill_value, dtype))


@rule("aten.zeros.default", "aten.empty.memory_format", "aten.empty_strided.default")
def zeros(size, *maybe_stride, dtype=None, **_):
    return jnp.zeros(tuple(size), dtype or float_dtype())


@rule("aten.ones.default")
def ones(size, dtype=None, **_):
    return jnp.ones(tuple(size), dtype or float_dtype())


@rule("aten.full_like.default")
def full_like(self, fill_value, dtype=None, **_):
    return jnp.full(self.shape, fill_value, dtype or self.dtype)


@rule("aten.fill.Scalar", "aten.fill.Tensor")
def fill(self, value):
    return jnp.broadcast_to(jnp.asarray(value, self.dtype), self.shape)


@rule("aten.zeros_like.default", "aten.empty_like.default")
def zeros_like(self, dtype=None, **_):
    return jnp.zeros(self.shape, dtype or self.dtype)


@rule("aten.ones_like.default")
def ones_like(self, dtype=None, **_):
    return jnp.ones(self.shape, dtype or self.dtype)


@rule("aten.new_zeros.default", "aten.new_empty.default", "aten.new_empty_strided.default")
def new_zeros(self, size, *maybe_stride, dtype=None, **_):
    return jnp.zeros(tuple(size), dtype or self.dtype)


@rule("aten.new_ones.default")
def new_ones(self, size, dtype=None, **_):
    return jnp.ones(tuple(size), dtype or self.dtype)


@rule("aten.new_full.default")
def new_full(self, size, fill_value, dtype=None, **_):
    return jnp.full(tuple(size), fill_value, dtype or self.dtype)


@rule("aten.scalar_tensor.default")
def scalar_tensor(s, dtype=None, **_):
    return jnp.asarray(s, dtype or float_dtype())


def _arange(start, end, step, dtype):
    if dtype is None:
        dtype = jnp.int64 if all(isinstance(v, int) for v in (start, end, step)) else float_dtype()
    return jnp.arange(start, end, step, dtype=dtype)


@rule("aten.arange.start_step")
def arange_start_step(start, end, step=1, dtype=None, **_):
    return _arange(start, end, step, dtype)


@rule("aten.arange.start")
def arange_start(start, end, dtype=None, **_):
    return _arange(start, end, 1, dtype)


@rule("aten.arange.default")
def arange(end, dtype=None, **_):
    return _arange(0, end, 1, dtype)


# The ops a translation may meet whose absence deserves a hint in the error.
HINTS = {
    "aten._native_batch_norm_legit.default": "BatchNorm with batch statistics: call model.eval()",
    "aten._native_batch_norm_legit_functional.default": "BatchNorm with batch statistics: call model.eval()",
    "aten._native_batch_norm_legit.no_stats": "BatchNorm with batch statistics: call model.eval()",
    "aten.native_dropout.default": "dropout in training mode: call model.eval()",
    "aten.bernoulli.p": "random numbers in the forward: the NTK of a random function is undefined",
    "aten.rand.default": "random numbers in the forward: the NTK of a random function is undefined",
    "aten.randn.default": "random numbers in the forward: the NTK of a random function is undefined",
}
