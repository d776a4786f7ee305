"""Differential test: randomly composed small models (seeded), every plugin against a brute-force float64 kernel,
against neural-tangents through the reference, and so against each other. A failure names the seed; rebuild the
model with ``random_model(seed)`` from this file.

The models mix what real ones are made of: Linear (also over token positions), Conv2d with groups, dilation,
stride and every padding mode, BatchNorm in eval, LayerNorm, GroupNorm, activations (some in place), pooling,
residual sums, embeddings of integer ids, a module used twice, frozen layers, a Dropout in eval mode.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from ntk_bench import implementations
from ntk_bench.bench.measurement import bruteforce
from ntk_bench.bench.measurement.problems import rel_err
from ntk_bench.implementations import UnsupportedModelError

SEEDS = range(40)
ACTS = [lambda: nn.ReLU(), lambda: nn.ReLU(inplace=True), lambda: nn.Tanh(), lambda: nn.GELU(), lambda: nn.SiLU(),
        lambda: nn.Hardswish(), lambda: nn.Sigmoid()]


class Residual(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


class Twice(nn.Module):
    """The same block applied twice: its parameters are used twice."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(self.inner(x))


class MeanTokens(nn.Module):
    def forward(self, x):
        return x.mean(1)


def _randomise(module: nn.Module, rng: random.Random) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)


def _vector_blocks(rng, d):
    blocks = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["linear", "linear", "layernorm", "residual", "twice", "frozen", "dropout"])
        if kind == "linear":
            w = rng.choice([4, 6])
            blocks += [nn.Linear(d, w, bias=rng.random() < 0.8), rng.choice(ACTS)()]
            d = w
        elif kind == "layernorm":
            blocks.append(nn.LayerNorm(d, elementwise_affine=rng.random() < 0.8))
        elif kind == "residual":
            blocks.append(Residual(nn.Sequential(nn.Linear(d, d), nn.Tanh())))
        elif kind == "twice":
            blocks.append(Twice(nn.Sequential(nn.Linear(d, d), nn.Tanh())))
        elif kind == "frozen":
            frozen = nn.Linear(d, d)
            frozen.requires_grad_(False)
            blocks += [frozen, nn.Tanh()]
        else:
            blocks.append(nn.Dropout(0.3))
    return blocks, d


def _image_blocks(rng, c, size):
    blocks = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["conv", "conv", "norm", "pool", "residual"])
        if kind == "conv" and size >= 3:
            groups = rng.choice([1, 1, c]) if c > 1 else 1
            out = c * rng.choice([1, 2]) if groups > 1 else rng.choice([2, 3, 4])
            dilation, stride = rng.choice([1, 1, 2]), rng.choice([1, 1, 2])
            padding_mode = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
            pad = dilation if padding_mode != "zeros" or rng.random() < 0.7 else 0
            conv = nn.Conv2d(c, out, 3, stride=stride, padding=pad, dilation=dilation, groups=groups,
                             padding_mode=padding_mode, bias=rng.random() < 0.8)
            size = (size + 2 * pad - 2 * dilation - 1) // stride + 1
            if size < 1:
                continue
            blocks += [conv, rng.choice(ACTS)()]
            c = out
        elif kind == "norm":
            blocks.append(rng.choice([lambda: nn.BatchNorm2d(c), lambda: nn.GroupNorm(1, c)])())
        elif kind == "pool" and size >= 2:
            blocks.append(rng.choice([nn.MaxPool2d(2), nn.AvgPool2d(2)]))
            size //= 2
        elif kind == "residual":
            blocks.append(Residual(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.Tanh())))
    return blocks, c, size


def random_model(seed: int):
    """(model in float64 eval mode, x1, x2 or None) for the seed."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kind = rng.choice(["vector", "image", "tokens"])
    o = rng.choice([1, 2, 3])
    n, m = rng.choice([(2, 3), (3, None), (1, 2)])
    if kind == "vector":
        d0 = rng.choice([3, 5])
        blocks, d = _vector_blocks(rng, d0)
        model = nn.Sequential(*blocks, nn.Linear(d, o))
        shape, ids = (d0,), None
    elif kind == "image":
        c0, size0 = rng.choice([1, 2, 3]), rng.choice([5, 6])
        blocks, c, size = _image_blocks(rng, c0, size0)
        model = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(c * size * size, o))
        shape, ids = (c0, size0, size0), None
    else:
        vocab, seq, d = 7, rng.choice([2, 4]), rng.choice([3, 4])
        blocks, d_out = _vector_blocks(rng, d)
        model = nn.Sequential(nn.Embedding(vocab, d), *blocks, MeanTokens(), nn.Linear(d_out, o))
        shape, ids = (seq,), vocab
    _randomise(model, rng)
    model = model.double().eval()

    def draw(count, gen_seed):
        g = torch.Generator().manual_seed(gen_seed)
        if ids is not None:
            return torch.randint(0, ids, (count, *shape), generator=g)
        return torch.randn((count, *shape), generator=g, dtype=torch.float64)

    return model, draw(n, 2 * seed + 1), None if m is None else draw(m, 2 * seed + 2)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_plugin_agrees_with_brute_force_and_neural_tangents(seed):
    from ntk_bench import reference

    model, x1, x2 = random_model(seed)
    expected = bruteforce.ntk(model, x1, x2)
    failures, computed = [], []
    # every plugin and peer library; neural-tangents once, through the reference below (its peers are the same code)
    for name in [n for n in implementations.names(origin=None) if not n.startswith("nt_")]:
        plugin = implementations.get(name)
        if plugin.supports(model) is not None:
            continue
        if getattr(plugin, "known_inexact", lambda *a: None)(model, next(model.parameters()).dtype):
            # a peer's documented error (nngeometry's float32 buffers; tests/implementations/peers/test_peers.py
            # asserts it)
            continue
        try:
            k = plugin.compute(model, x1, x2)
        except UnsupportedModelError:
            continue
        except Exception as exc:  # the contract: a kernel or a decline, never another error
            failures.append(f"{name} raised {type(exc).__name__}: {exc}")
            continue
        computed.append(name)
        err = rel_err(k, expected)
        if err > 1e-10:
            failures.append(f"{name} rel err {err:.2e}")
    if reference.available() is None:
        try:
            nt = reference.ntk(model, x1, x2)
            err = rel_err(nt, expected)
            if err > 1e-10:
                failures.append(f"neural-tangents rel err {err:.2e}")
        except Exception as exc:
            failures.append(f"the reference raised {type(exc).__name__}: {exc}")
    assert not failures, f"seed {seed}: " + "; ".join(failures) + f"\n{model}"
    assert {"jacobian_contraction", "autograd_loop"} <= set(computed), f"seed {seed}: computed only by {computed}"
