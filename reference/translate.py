"""Translate a torch model into a JAX function with the same weights, op by op over a torch.fx graph.

``to_jax(model)`` returns ``(apply_fn, params)`` with ``apply_fn(params, x)``
computing ``model(x)`` in JAX, ``params`` a dict of float64 arrays keyed by the
torch parameter names (trainable parameters only; buffers become constants).
Layouts stay torch's (NCHW activations, OIHW kernels), so no weight is
transposed. An op with no rule raises ``UnsupportedOpError`` naming it.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


class UnsupportedOpError(NotImplementedError):
    """The translator has no JAX rule for an op of the model's graph."""


def _jax():
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax import lax

    return jax, jnp, lax


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _flatten(jnp, x, start_dim=0, end_dim=-1):
    nd = x.ndim
    start, end = start_dim % nd, end_dim % nd
    return jnp.reshape(x, x.shape[:start] + (-1,) + x.shape[end + 1 :])


def _conv2d(lax, x, w, b, stride, padding, dilation, groups):
    if isinstance(padding, str):
        pad = padding.upper()
    else:
        pad = [(p, p) for p in _pair(padding)]
    y = lax.conv_general_dilated(
        x, w, window_strides=_pair(stride), padding=pad, rhs_dilation=_pair(dilation),
        feature_group_count=groups, dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    return y if b is None else y + b[None, :, None, None]


def _pool2d(lax, jnp, x, kind, kernel, stride, padding):
    k = _pair(kernel)
    s = _pair(stride if stride else kernel)
    p = [(0, 0), (0, 0)] + [(q, q) for q in _pair(padding)]
    if kind == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1) + k, (1, 1) + s, p)
    summed = lax.reduce_window(x, 0.0, lax.add, (1, 1) + k, (1, 1) + s, p)
    return summed / (k[0] * k[1])


def _gelu(jax, jnp, x, approximate="none"):
    return jax.nn.gelu(x, approximate=(approximate == "tanh"))


class _Translator:
    def __init__(self, model: nn.Module):
        self.jax, self.jnp, self.lax = _jax()
        self.model = model
        try:
            self.graph = torch.fx.symbolic_trace(model).graph
        except Exception as exc:  # fx raises many types for untraceable code
            raise UnsupportedOpError(f"torch.fx cannot trace {type(model).__name__}: {exc}") from exc
        self.modules = dict(model.named_modules())
        self.trainable = {k for k, p in model.named_parameters() if p.requires_grad}
        self.constants = {
            k: self.jnp.asarray(v.detach().cpu().double().numpy())
            for k, v in [*model.named_parameters(), *model.named_buffers()]
            if k not in self.trainable
        }
        # Fail now, not at the first call, on an op without a rule.
        for node in self.graph.nodes:
            if node.op == "call_module":
                self._module_rule(self.modules[node.target])
            elif node.op == "call_function":
                self._function_rule(node.target)
            elif node.op == "call_method":
                self._method_rule(node.target)

    # -- rules ---------------------------------------------------------------
    def _module_rule(self, m):
        jax, jnp, lax = self.jax, self.jnp, self.lax
        rules = {
            nn.Linear: lambda m, w, x: x @ w["weight"].T + (w["bias"] if "bias" in w else 0),
            nn.Conv2d: lambda m, w, x: _conv2d(lax, x, w["weight"], w.get("bias"), m.stride, m.padding, m.dilation, m.groups),
            nn.ReLU: lambda m, w, x: jax.nn.relu(x),
            nn.Tanh: lambda m, w, x: jnp.tanh(x),
            nn.Sigmoid: lambda m, w, x: jax.nn.sigmoid(x),
            nn.GELU: lambda m, w, x: _gelu(jax, jnp, x, m.approximate),
            nn.SiLU: lambda m, w, x: jax.nn.silu(x),
            nn.LeakyReLU: lambda m, w, x: jnp.where(x > 0, x, m.negative_slope * x),
            nn.Identity: lambda m, w, x: x,
            nn.Flatten: lambda m, w, x: _flatten(jnp, x, m.start_dim, m.end_dim),
            nn.MaxPool2d: lambda m, w, x: _pool2d(lax, jnp, x, "max", m.kernel_size, m.stride, m.padding),
            nn.AvgPool2d: lambda m, w, x: _pool2d(lax, jnp, x, "avg", m.kernel_size, m.stride, m.padding),
        }
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise UnsupportedOpError(f"Conv2d with padding_mode={m.padding_mode!r}")
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and (m.ceil_mode or getattr(m, "dilation", 1) not in (1, (1, 1))):
            raise UnsupportedOpError(f"{type(m).__name__} with ceil_mode or dilation")
        if isinstance(m, nn.AvgPool2d) and not m.count_include_pad and m.padding not in (0, (0, 0)):
            raise UnsupportedOpError("AvgPool2d with count_include_pad=False and padding")
        if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == (1, 1):
            return lambda m, w, x: jnp.mean(x, axis=(2, 3), keepdims=True)
        rule = rules.get(type(m))
        if rule is None:
            raise UnsupportedOpError(f"no JAX translation for module {type(m).__name__}")
        return rule

    def _function_rule(self, fn):
        jax, jnp = self.jax, self.jnp
        rules = {
            operator.add: lambda a, b: a + b,
            operator.sub: lambda a, b: a - b,
            operator.mul: lambda a, b: a * b,
            operator.truediv: lambda a, b: a / b,
            operator.neg: lambda a: -a,
            operator.getitem: lambda a, i: a[i],
            torch.add: lambda a, b: a + b,
            torch.mul: lambda a, b: a * b,
            torch.relu: jax.nn.relu,
            F.relu: lambda x, inplace=False: jax.nn.relu(x),
            torch.tanh: jnp.tanh,
            F.tanh: jnp.tanh,
            torch.sigmoid: jax.nn.sigmoid,
            F.sigmoid: jax.nn.sigmoid,
            F.gelu: lambda x, approximate="none": _gelu(jax, jnp, x, approximate),
            F.silu: lambda x, inplace=False: jax.nn.silu(x),
            torch.flatten: lambda x, start_dim=0, end_dim=-1: _flatten(jnp, x, start_dim, end_dim),
            torch.cat: lambda ts, dim=0: jnp.concatenate(ts, axis=dim),
        }
        if fn not in rules:
            raise UnsupportedOpError(f"no JAX translation for function {getattr(fn, '__name__', fn)}")
        return rules[fn]

    def _method_rule(self, name):
        jax, jnp = self.jax, self.jnp
        rules = {
            "relu": lambda x: jax.nn.relu(x),
            "tanh": lambda x: jnp.tanh(x),
            "sigmoid": lambda x: jax.nn.sigmoid(x),
            "flatten": lambda x, start_dim=0, end_dim=-1: _flatten(jnp, x, start_dim, end_dim),
            "view": lambda x, *shape: jnp.reshape(x, shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape),
            "reshape": lambda x, *shape: jnp.reshape(x, shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape),
            "add": lambda a, b: a + b,
            "mul": lambda a, b: a * b,
            "mean": lambda x, dim=None, keepdim=False: jnp.mean(x, axis=dim, keepdims=keepdim),
            "sum": lambda x, dim=None, keepdim=False: jnp.sum(x, axis=dim, keepdims=keepdim),
            "size": lambda x, dim=None: x.shape if dim is None else x.shape[dim],
        }
        if name not in rules:
            raise UnsupportedOpError(f"no JAX translation for tensor method .{name}()")
        return rules[name]

    # -- evaluation ----------------------------------------------------------
    def __call__(self, params, x):
        env = {}

        def load(arg):
            return torch.fx.node.map_arg(arg, lambda n: env[n.name])

        def attr(qualname):
            return params[qualname] if qualname in self.trainable else self.constants[qualname]

        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node.name] = x
            elif node.op == "get_attr":
                env[node.name] = attr(node.target)
            elif node.op == "call_module":
                m = self.modules[node.target]
                w = {k: attr(f"{node.target}.{k}" if node.target else k)
                     for k, v in m.named_parameters(recurse=False) if v is not None}
                args = load(node.args)
                env[node.name] = self._module_rule(m)(m, w, *args)
            elif node.op == "call_function":
                env[node.name] = self._function_rule(node.target)(*load(node.args), **load(node.kwargs))
            elif node.op == "call_method":
                env[node.name] = self._method_rule(node.target)(*load(node.args), **load(node.kwargs))
            elif node.op == "output":
                return load(node.args[0])
        raise RuntimeError("fx graph has no output node")


def to_jax(model: nn.Module):
    """``(apply_fn, params)``: the model as a JAX function of its float64 trainable parameters."""
    translator = _Translator(model)
    _, jnp, _ = translator.jax, translator.jnp, translator.lax
    params = {
        k: jnp.asarray(np.asarray(p.detach().cpu().double().numpy()))
        for k, p in model.named_parameters() if p.requires_grad
    }
    return translator, params
