"""The model's checks run once per model state (``core.unchanged``): every change a later call must see is injected
after a call that cached the verdict, and the next call must refuse or decline as a first call would."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ntk_bench import implementations
from ntk_bench.implementations import UnsupportedModelError
from ntk_bench.implementations.core import unchanged
from ntk_bench.implementations.core.validation import IllDefinedKernelError


def _model(dropout=False):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.0) if dropout else nn.Identity(),
                         nn.Linear(8, 2)).double().eval()


X = torch.randn(3, 4, dtype=torch.float64)


def _first_call(name="explicit_mlp", dropout=False):
    model = _model(dropout)
    plugin = implementations.get(name)
    plugin.compute(model, X)
    plugin.compute(model, X)  # (the second call reuses the verdict)
    return model, plugin


def test_train_mode_after_a_cached_call_is_still_refused():
    model, plugin = _first_call("jacobian_contraction", dropout=True)
    model[2].p = 0.5
    plugin.compute(model, X)  # eval mode: dropout off, still well defined
    model.train()
    with pytest.raises(IllDefinedKernelError, match="drops units at random"):
        plugin.compute(model, X)


def test_a_dropout_rate_changed_in_train_mode_is_refused():
    model, plugin = _first_call("jacobian_contraction", dropout=True)
    model.train()  # p = 0: a train-mode Dropout that drops nothing is well defined
    plugin.compute(model, X)
    model[2].p = 0.25
    with pytest.raises(IllDefinedKernelError, match="drops units at random"):
        plugin.compute(model, X)


def test_a_hook_added_after_a_cached_call_makes_explicit_mlp_decline():
    model, plugin = _first_call()
    handle = model[0].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(UnsupportedModelError, match="hooks"):
        plugin.compute(model, X)
    handle.remove()
    plugin.compute(model, X)


@pytest.mark.parametrize("change", ["replace a layer", "swap a parameter for a buffer", "parametrize"])
def test_structural_changes_after_a_cached_call_are_seen(change):
    model, plugin = _first_call()
    if change == "replace a layer":
        model[1] = nn.LayerNorm(8).double()
        match = "LayerNorm"
    elif change == "swap a parameter for a buffer":
        model[0].weight.requires_grad_(False)
        match = "every parameter must require grad"
    else:
        torch.nn.utils.parametrizations.weight_norm(model[0])
        match = "computed from other parameters|Linear"
    with pytest.raises(UnsupportedModelError, match=match):
        plugin.compute(model, X)


def test_state_sees_rebinding_even_to_an_equal_value_and_not_parameter_values():
    model = _model(dropout=True)
    before = unchanged.state(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # values: not part of the state
    assert unchanged.same(before, unchanged.state(model))
    model[2].p = float("0.0")  # a new object, even if equal: a change (conservative)
    assert not unchanged.same(before, unchanged.state(model))


def test_the_verdict_cache_keeps_no_model_alive():
    import gc
    import weakref

    model, _ = _first_call()
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
