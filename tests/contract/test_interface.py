"""The registry, the unsupported-model reasons, and clear errors for bad input, for every plugin."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ntk_bench import implementations
from ntk_bench.bench.measurement.problems import EXPECTED_UNSUPPORTED
from ntk_bench.bench.zoo import architectures
from ntk_bench.implementations import UnsupportedModelError

BUILTIN = ["jacobian_contraction", "ntk_vector_products", "autograd_loop",
           "explicit_mlp", "backpack_batchgrad", "backpack_sqrtggn", "structured", "auto"]
ALL = implementations.names()


def test_registry_lists_the_builtin_plugins():
    assert implementations.names()[: len(BUILTIN)] == BUILTIN
    for name in BUILTIN:
        assert implementations.get(name).name == name


def test_unknown_plugin_name_lists_valid_ones():
    with pytest.raises(KeyError, match="valid names: jacobian_contraction, ntk_vector_products"):
        implementations.get("no_such_plugin")


def test_register_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        implementations.register(implementations.get("autograd_loop"))


@pytest.mark.parametrize("arch", ["mlp", "tutorial_cnn", "cnn", "resnet_tiny"])
@pytest.mark.parametrize("plugin_name", BUILTIN)
def test_supports_declines_exactly_the_expected_models(plugin_name, arch):
    small = {"mlp": dict(in_features=4, width=5), "cnn": dict(channels=2), "resnet_tiny": dict(channels=2)}
    model = architectures.build(arch, **small.get(arch, {})).model
    plugin = implementations.get(plugin_name)
    reason = plugin.supports(model)
    expected = EXPECTED_UNSUPPORTED.get((plugin_name, arch))
    if expected is None:
        assert reason is None, f"{plugin_name} should support {arch}: {reason}"
    else:
        assert reason is not None and expected in reason and reason.startswith(plugin_name)
        x = torch.randn(2, *architectures.build(arch, **small.get(arch, {})).input_shape)
        with pytest.raises(UnsupportedModelError, match=expected):
            plugin.compute(model, x)


def test_explicit_mlp_names_the_offending_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    assert "BatchNorm1d" in implementations.get("explicit_mlp").supports(model)


def test_sqrtggn_names_a_layer_backpack_does_not_know():
    model = nn.Sequential(nn.Linear(3, 4), nn.Hardswish(), nn.Linear(4, 2))
    assert "Hardswish" in implementations.get("backpack_sqrtggn").supports(model)


def _mlp():
    return architectures.build("mlp", in_features=4, width=5, depth=1, out=2).model


BAD_INPUTS = {
    "feature shapes differ": (lambda: (torch.randn(3, 4), torch.randn(2, 5), "full"), ValueError, "different per-sample shapes"),
    "empty batch": (lambda: (torch.randn(0, 4), None, "full"), ValueError, "empty batch"),
    "empty x2": (lambda: (torch.randn(2, 4), torch.randn(0, 4), "full"), ValueError, "x2 is an empty batch"),
    "NaN": (lambda: (torch.tensor([[0.0, float("nan"), 1.0, 2.0]]), None, "full"), ValueError, "NaN or inf"),
    "inf in x2": (lambda: (torch.randn(2, 4), torch.full((2, 4), float("inf")), "full"), ValueError, "x2 contains NaN or inf"),
    "inf and -inf": (lambda: (torch.tensor([[float("inf"), -float("inf"), 0.0, 1.0]]), None, "full"), ValueError,
                     "x1 contains NaN or inf"),
    "unknown mode": (lambda: (torch.randn(2, 4), None, "diag"), ValueError, "unknown mode 'diag'"),
    "integer inputs": (lambda: (torch.ones(2, 4, dtype=torch.int64), None, "full"), TypeError,
                       "dtype torch.int64 and the model's forward fails on it"),
    "complex inputs": (lambda: (torch.ones(2, 4, dtype=torch.complex64), None, "full"), TypeError, "real floating-point"),
    "x1 and x2 dtypes differ": (lambda: (torch.ones(2, 4), torch.ones(2, 4, dtype=torch.float64), "full"), TypeError,
                                "x2 has dtype torch.float64"),
    "dtype mismatch": (lambda: (torch.randn(2, 4, dtype=torch.float64), None, "full"), TypeError, "dtype torch.float64"),
    "other device": (lambda: (torch.empty(2, 4, device="meta"), None, "full"), ValueError, "is on meta"),
    "unbatched": (lambda: (torch.randn(4), None, "full"), ValueError, "must be batched"),
    "not a tensor": (lambda: ([[1.0, 2.0, 3.0, 4.0]], None, "full"), TypeError, "must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("plugin_name", ALL)
def test_bad_input_gets_a_clear_error(plugin_name, case):
    make, error, message = BAD_INPUTS[case]
    x1, x2, mode = make()
    with pytest.raises(error, match=message):
        implementations.get(plugin_name).compute(_mlp(), x1, x2, mode=mode)


def test_finite_inputs_whose_sum_overflows_are_accepted():
    """The NaN/inf check sums first; a sum that overflows on finite inputs is rechecked element by element."""
    from ntk_bench.implementations.core.validation import validate_inputs

    x = torch.full((2, 4), 3e38)
    assert torch.isinf(x.sum())
    validate_inputs(_mlp(), x, None, "full")


@pytest.mark.parametrize("plugin_name", ALL)
def test_model_without_parameters_is_an_error(plugin_name):
    with pytest.raises(ValueError, match="no trainable parameters"):
        implementations.get(plugin_name).compute(nn.Sequential(nn.ReLU()), torch.randn(2, 3))


@pytest.mark.parametrize("plugin_name", ALL)
def test_model_output_must_be_two_dimensional(plugin_name):
    with pytest.raises(ValueError, match=r"shape \(N, O\)"):
        implementations.get(plugin_name).compute(nn.Sequential(nn.Linear(3, 2), nn.Flatten(0)), torch.randn(2, 3))


@pytest.mark.parametrize("plugin_name", ALL)
def test_train_mode_and_grads_survive(plugin_name):
    model = _mlp().train()
    grads = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    implementations.get(plugin_name).compute(model, torch.randn(3, 4), mode="trace")
    assert model.training
    assert all(p.grad is g and bool((g == 7).all()) for p, g in zip(model.parameters(), grads))
