"""structured on whole models: every zoo architecture and the cases that made it silently wrong before (in-place
activations, tied weights both ways, forward hooks, parametrizations), frozen layers, an (N,) output, int64
ids; against a brute-force float64 kernel (one autograd backward per sample and output). And what it declines,
naming the module.

Kernels are taken from ``_kernel`` (what the plugin computes; ``compute``'s input validation is base.py's).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from ntk_bench import implementations
from ntk_bench.bench.measurement.problems import rel_err
from ntk_bench.bench.zoo import architectures
from tests.implementations.structured.test_structured_rules import brute_force_kernel

D = torch.float64

# Small configurations of every zoo architecture (x1: 2 samples, x2: 3), and the zoo's options for in-place
# activations, tied weights, grouped/depthwise/dilated convs and every padding mode.
ZOO = {
    "mlp": dict(in_features=6, width=8, depth=2, out=3),
    "tutorial_cnn": {},
    "cnn": dict(channels=3, image=8, out=4),
    "resnet_tiny": dict(channels=2, image=6, out=3),
    "resnet18": dict(image=16, out=2),
    "mobilenet_v3_small": dict(image=8, out=2),
    "vit_tiny": dict(out=3),
    "text_transformer": dict(out=3),
    "lstm": dict(out=3),
    "gru": dict(out=3),
    "mlp_layernorm": dict(out=3),
    "cnn_groupnorm": dict(out=3),
    "cnn_batchnorm": dict(out=3),
    "conv1d_net": dict(out=3),
    "conv_variants": dict(out=3),
    "mlp_tied": dict(out=3),
}
OPTIONS = [
    ("mlp", dict(in_features=6, width=8, depth=2, out=3, inplace=True)),
    ("cnn", dict(channels=3, image=8, out=4, inplace=True)),
    ("mlp_tied", dict(out=3, how="weight")),
    ("conv_variants", dict(out=3, groups=4, padding_mode="reflect", dilation=2)),
    ("conv_variants", dict(out=3, padding_mode="circular", bias=False)),
    ("conv_variants", dict(out=3, padding_mode="replicate")),
]
CASES = [(name, params) for name, params in ZOO.items()] + OPTIONS


def _id(case):
    name, params = case
    extra = {k: v for k, v in params.items() if ZOO.get(name, {}).get(k) != v}
    return name + "".join(f"-{k}={v}" for k, v in extra.items())


def test_every_zoo_architecture_is_covered():
    assert set(architectures.names()) <= set(ZOO)


@functools.lru_cache(maxsize=None)
def _built(case_id):
    name, params = next(c for c in CASES if _id(c) == case_id)
    arch = architectures.build(name, dtype=D, **params)
    x1 = architectures.inputs(arch, 2, seed=1, dtype=D)
    x2 = architectures.inputs(arch, 3, seed=2, dtype=D)
    both = torch.cat([x1, x2])
    full = brute_force_kernel(arch.model, both)
    return arch.model, x1, x2, full


@pytest.mark.parametrize("case_id", [_id(c) for c in CASES])
def test_zoo_model_equals_brute_force(case_id):
    model, x1, x2, full = _built(case_id)
    plugin = implementations.get("structured")
    assert rel_err(plugin._kernel(model, x1, x2, "full"), full[:2, 2:]) <= 1e-10
    assert rel_err(plugin._kernel(model, x1, None, "trace"), torch.einsum("nmaa->nm", full[:2, :2])) <= 1e-10
    assert rel_err(plugin._kernel(model, x2, x1, "diagonal"), torch.einsum("nmaa->nma", full[2:, :2])) <= 1e-10


# -- the cases that were silently wrong, and the other special cases -----------------------------------------------

class Twice(nn.Module):
    """One Linear applied twice, a bias-free Linear sharing its weight with it, and a frozen output layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5, bias=False)
        self.b.weight = self.a.weight
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))))


class TiedEmbedding(nn.Module):
    """A language-model head tied to the embedding table, on int64 ids."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4, padding_idx=0)
        self.head = nn.Linear(4, 7)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).mean(1))


class Regression(nn.Module):
    """An (N,) output."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


class ParameterReadTwice(nn.Module):
    """A Linear called through its forward and its weight also read directly in the parent's forward: no call
    shows the second use (the plan's check against autograd catches it)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x) + nn.functional.linear(x, self.lin.weight)))


def _mlp(*extra):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), *extra, nn.Tanh(), nn.Linear(6, 3))


def _hooked(make_hook, pre=False):
    model = _mlp()
    (model[0].register_forward_pre_hook if pre else model[0].register_forward_hook)(make_hook)
    return model


def _parametrized(which):
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    if which == "old_weight_norm":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            first = torch.nn.utils.weight_norm(nn.Linear(5, 6))
    else:
        first = getattr(parametrizations, which)(nn.Linear(5, 6))
    return nn.Sequential(first, nn.Tanh(), nn.Linear(6, 3))


def _frozen():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    return model


class SparseEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4, sparse=True)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).mean(1))


class ScaledInPlace(nn.Module):
    """The output Linear's output scaled in place afterwards: its G is not the identity."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return self.net(x).mul_(2)


SPECIAL = {
    "output-scaled-in-place": ScaledInPlace,
    "sparse-embedding-int64": SparseEmbedding,
    "relu-inplace": lambda: _mlp(nn.ReLU(inplace=True)),
    "shared-module-and-tied-weight": Twice,
    "tied-embedding-head-int64": TiedEmbedding,
    "hook-changes-output": lambda: _hooked(lambda m, i, o: o * 2 + 1),
    "hook-changes-output-in-place": lambda: _hooked(lambda m, i, o: o.mul_(2)),
    "pre-hook-changes-input": lambda: _hooked(lambda m, i: (i[0] * 3,), pre=True),
    "weight_norm": lambda: _parametrized("weight_norm"),
    "spectral_norm": lambda: _parametrized("spectral_norm"),
    "old_weight_norm": lambda: _parametrized("old_weight_norm"),
    "frozen-weight": _frozen,
    "output-N": Regression,
    "parameter-read-twice": ParameterReadTwice,
}


@pytest.mark.parametrize("case", list(SPECIAL))
def test_special_case_equals_brute_force(case):
    torch.manual_seed(0)
    model = SPECIAL[case]().to(D).eval()
    g = torch.Generator().manual_seed(1)
    if case.endswith("int64"):
        x = torch.randint(0, 7, (5, 4), generator=g)
        x[0, 0] = 0  # the padding id
    else:
        x = torch.randn(5, 5, generator=g, dtype=D)
    full = brute_force_kernel(model, x)
    plugin = implementations.get("structured")
    for mode, x2, ref in (("full", x[2:], full[:2, 2:]), ("diagonal", None, torch.einsum("nmaa->nma", full[:2, :2]))):
        assert rel_err(plugin._kernel(model, x[:2], x2, mode), ref) <= 1e-10, mode


def test_an_in_place_change_the_plan_did_not_see_is_caught_and_recorded_again():
    """A recorded output changed in place only from the second call on (the plan was made without it): the version
    counter shows it and the call is recorded again with a clone."""

    class Sometimes(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(5, 6), nn.Linear(6, 3)
            self.in_place = False

        def forward(self, x):
            h = self.lin(x)
            h = h.tanh_() if self.in_place else h.tanh()
            return self.out(h)

    torch.manual_seed(0)
    model = Sometimes().to(D)
    x = torch.randn(4, 5, dtype=D)
    plugin = implementations.get("structured")
    plugin._kernel(model, x, None, "full")
    model.in_place = True
    assert rel_err(plugin._kernel(model, x, None, "full"), brute_force_kernel(model, x)) <= 1e-10
    assert next(e for e in plugin.plan(model, x).entries if e.module is model.lin).clone_out


def test_a_path_the_plan_did_not_see_is_planned_anew():
    """A module with parameters the discovery never saw called (a flag switched between calls picks the branch)
    trips the plan, which is made again on that call's batch; a model whose path depends on the batch size, which
    no per-sample kernel describes, is declined."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.small, self.large, self.out = nn.Linear(5, 4), nn.Linear(5, 4), nn.Linear(4, 2)
            self.use_large = False

        def forward(self, x):
            return self.out(torch.tanh((self.large if self.use_large or x.shape[0] > 8 else self.small)(x)))

    torch.manual_seed(0)
    model = Branchy().to(D)
    x = torch.randn(3, 5, dtype=D)
    plugin = implementations.get("structured")
    for use_large in (False, True, False):
        model.use_large = use_large
        assert rel_err(plugin._kernel(model, x, None, "full"), brute_force_kernel(model, x)) <= 1e-10
    with pytest.raises(implementations.UnsupportedModelError):
        plugin._kernel(model, x, torch.randn(9, 5, dtype=D), "full")


def test_compute_leaves_the_model_and_its_hooks_as_they_were():
    model = _hooked(lambda m, i, o: o * 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward_attrs = [("forward" in m.__dict__) for m in model.modules()]
    x = torch.randn(3, 5)
    implementations.get("structured").compute(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [("forward" in m.__dict__) for m in model.modules()] == forward_attrs
    assert len(model[0]._forward_hooks) == 1 and not model[0]._forward_pre_hooks


# -- declined, naming the module ------------------------------------------------------------------------------------

class MixesSamples(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 5))

    def forward(self, x):
        return x + (x - x.mean(0)) @ self.w


def test_a_module_mixing_the_samples_is_declined_by_name():
    model = nn.Sequential(nn.Linear(5, 5), MixesSamples(), nn.Linear(5, 2)).to(D)
    with pytest.raises(implementations.UnsupportedModelError, match=r"output of 1 \(MixesSamples\)"):
        implementations.get("structured")._kernel(model, torch.randn(3, 5, dtype=D), None, "full")


def test_structured_names_what_it_declines_before_running():
    plugin = implementations.get("structured")
    assert "2: BatchNorm1d normalises with batch statistics" in plugin.supports(
        nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    assert "0: Embedding with max_norm" in plugin.supports(nn.Sequential(nn.Embedding(5, 3, max_norm=1.0)))
    assert "scale_grad_by_freq" in plugin.supports(nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True)))
    scripted = nn.Sequential(torch.jit.script(nn.Linear(3, 4)), nn.Linear(4, 2))
    assert "0" in plugin.supports(scripted) and "TorchScript" in plugin.supports(scripted)
    assert plugin.supports(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 1))) is None


def test_which_rule_covers_what_in_a_vit():
    """ViT: the patch conv, Linears and LayerNorms by their rules; the class token and the positional embedding by
    taps on the ops that read them (expand, +); attention's two projections as linear ops; nothing covered twice."""
    arch = architectures.build("vit_tiny")
    x = architectures.inputs(arch, 2)
    plan = implementations.get("structured").plan(arch.model, x)
    kinds = {name: e.kind for e in plan.entries for name in [e.name]}
    assert kinds["the model (VisionTransformer)"] == "tap" and kinds["encoder"] == "tap"
    assert kinds["conv_proj"] == "conv" and kinds["encoder.ln"] == "norm"
    attention = "encoder.layers.encoder_layer_0.self_attention (F.linear on "
    assert kinds[attention + "in_proj_weight, in_proj_bias)"] == "linear_op"
    assert kinds[attention + "out_proj.weight, out_proj.bias)"] == "linear_op"
    assert "generic" not in kinds.values()
    covered = [id(p) for e in plan.entries for p in e.slots.values()]
    assert sorted(covered) == sorted(id(p) for p in arch.model.parameters()) and not plan.shared
