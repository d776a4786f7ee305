"""Faults injected into the plugins' machinery: a vmap that returns wrong numbers without raising, a cost model
whose measuring forward fails, torch.func errors on wrapped or old-style models; each call still computes the
right kernel or declines naming the cause."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ntk_bench import implementations
from ntk_bench.bench.measurement import bruteforce
from ntk_bench.bench.measurement.problems import rel_err
from ntk_bench.implementations.core import declines, wrappers
from ntk_bench.implementations.core.tolerances import tolerance
from ntk_bench.implementations.plugins import auto as auto_module
from tests.helpers.zoo_extra import OldStyleFunctionNet


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def test_jacobian_contraction_never_returns_a_vmapped_jacobian_its_loop_disagrees_with(monkeypatch):
    real_vmap = torch.func.vmap
    calls = []

    def wrong_vmap(fn, *args, **kwargs):  # a batching rule that is off without raising (as PReLU's was)
        batched = real_vmap(fn, *args, **kwargs)

        def run(*inputs):
            calls.append(1)
            return {k: v + 0.1 for k, v in batched(*inputs).items()}

        return run

    model, x = _mlp(), torch.randn(3, 4, dtype=torch.float64)
    monkeypatch.setattr(torch.func, "vmap", wrong_vmap)
    plugin = implementations.get("jacobian_contraction")
    for x1, x2 in [(x, None), (x[:2], x)]:
        k = plugin.compute(model, x1, x2)
        assert rel_err(k, bruteforce.ntk(model, x1, x2)) <= tolerance(torch.float64)
    assert calls == [1]  # vmapped once, found wrong, looped from then on


def test_jacobian_contraction_keeps_vmap_where_it_agrees():
    model, x = _mlp(), torch.randn(3, 4, dtype=torch.float64)
    from ntk_bench.implementations.core.module_walks import _VMAP_FAILS

    k = implementations.get("jacobian_contraction").compute(model, x)
    assert rel_err(k, bruteforce.ntk(model, x)) <= tolerance(torch.float64)
    assert not _VMAP_FAILS.get(model)


def test_auto_goes_on_at_unknown_cost_when_its_measuring_forward_fails(monkeypatch):
    def failing(model, x):
        raise RuntimeError("A leaf node was passed to _will_engine_execute_node but we are currently running "
                           "autograd.grad()")

    monkeypatch.setattr(auto_module, "cost_stats", failing)
    plugin = auto_module.Auto()
    model, x = _mlp(), torch.randn(3, 4, dtype=torch.float64)
    k = plugin.compute(model, x)
    assert rel_err(k, bruteforce.ntk(model, x)) <= tolerance(torch.float64)
    _, why = plugin.last_choice
    assert "cost unknown" in why and "_will_engine_execute_node" in why


@pytest.mark.parametrize("plugin_name", ["jacobian_contraction", "ntk_vector_products", "curvlinops", "laplace"])
def test_an_old_style_autograd_function_is_declined_by_name(plugin_name):
    plugin = implementations.get(plugin_name)
    if plugin.supports(nn.Linear(1, 1)) is not None:
        pytest.skip(plugin.supports(nn.Linear(1, 1)))
    torch.manual_seed(0)
    model = OldStyleFunctionNet().double().eval()
    with pytest.raises(implementations.UnsupportedModelError,
                       match=rf"{plugin_name}: autograd.Function tests.helpers.zoo_extra.OldStyleSquare has no setup_context"):
        plugin.compute(model, torch.randn(3, 5, dtype=torch.float64))


def test_data_parallel_is_unwrapped_and_its_stateless_api_error_named():
    outer = nn.DataParallel(_mlp())
    assert wrappers.unwrap(outer) is outer.module
    x = torch.randn(2, 4, dtype=torch.float64)
    k = implementations.get("jacobian_contraction").compute(outer, x)
    assert rel_err(k, bruteforce.ntk(outer.module, x)) <= tolerance(torch.float64)
    # torch.func's refusal, where it still meets one, names the wrapper
    error = RuntimeError("The stateless API can't be used with nn.DataParallel module")
    assert "'the model itself' is one" in declines.transform_problem(error, outer, x)


def test_an_unrecognised_torch_func_error_passes_unchanged():
    with pytest.raises(RuntimeError, match="something else"):
        with declines.transform_declines("jacobian_contraction", _mlp(), torch.randn(1, 4, dtype=torch.float64)):
            raise RuntimeError("something else")
