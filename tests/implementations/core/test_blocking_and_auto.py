"""Blocking gives the same kernel as one piece; auto picks a supported plugin and says why."""

from __future__ import annotations

import pytest
import torch

from ntk_bench import implementations
from ntk_bench.bench.measurement.problems import BY_ID, rel_err
from ntk_bench.implementations.core.costs import cost_stats
from ntk_bench.implementations.core.tiling import tile_size
from tests.conftest import supported_model

BLOCK_PROBLEMS = ["mlp-relu-O3-x2None", "cnn-O4-N2M3", "resnet_tiny-O3-x2None"]


def _budget_for_tiles(plugin, model, x1, x2, mode, edge=2):
    """A budget that fits an edge x edge tile but not the whole kernel (in the smallest chunks, for a plugin
    that also chunks its work inside)."""
    stats = cost_stats(model, x1[:1])
    plugin = plugin.with_budget(1)
    return int(plugin.estimate(stats, edge, edge, mode, False).bytes) + 1


@pytest.mark.parametrize("mode", implementations.MODES)
@pytest.mark.parametrize("problem_id", BLOCK_PROBLEMS)
@pytest.mark.parametrize("plugin_name", [n for n in implementations.names() if n != "auto"])
def test_blocked_equals_unblocked(plugin_name, problem_id, mode, monkeypatch):
    problem = BY_ID[problem_id]
    plugin = implementations.get(plugin_name)
    model = supported_model(plugin, problem)
    x1, x2 = problem.inputs()
    x1 = torch.cat([x1, x1[:1] * 0.5])  # 4 or 5 rows: a ragged last tile
    whole = plugin.compute(model, x1, x2, mode=mode)
    calls = []
    original = type(plugin)._kernel
    monkeypatch.setattr(type(plugin), "_kernel", lambda self, *a: calls.append(a[1].shape[0]) or original(self, *a))
    budget = _budget_for_tiles(plugin, model, x1, x2, mode)
    tiled = plugin.compute(model, x1, x2, mode=mode, memory_budget_bytes=budget)
    assert len(calls) > 1 and max(calls) <= 2, calls
    assert tiled.shape == whole.shape
    assert rel_err(tiled, whole) <= 1e-12


def test_symmetric_kernel_computes_each_pair_of_tiles_once(monkeypatch):
    problem = BY_ID["mlp-relu-O3-x2None"]
    plugin = implementations.get("jacobian_contraction")
    model, (x1, _) = problem.model(), problem.inputs()  # N = 4 -> tiles of 2: 3 pairs, not 4
    calls = []
    original = type(plugin)._kernel
    monkeypatch.setattr(type(plugin), "_kernel", lambda self, m, a, b, mode: calls.append(b is None) or original(self, m, a, b, mode))
    budget = _budget_for_tiles(plugin, model, x1, None, "full")
    out = plugin.compute(model, x1, mode="full", memory_budget_bytes=budget)
    assert calls == [True, False, True]
    assert torch.equal(out[2:4, 0:2], out[0:2, 2:4].permute(1, 0, 3, 2))  # the mirrored tile


def test_budget_too_small_names_the_plugin():
    problem = BY_ID["mlp-relu-O3-x2None"]
    with pytest.raises(MemoryError, match="jacobian_contraction: a memory budget of 10 bytes is too small"):
        implementations.get("jacobian_contraction").compute(problem.model(), problem.inputs()[0], memory_budget_bytes=10)


def test_tile_size_is_whole_problem_when_it_fits():
    problem = BY_ID["cnn-O4-N2M3"]
    model, (x1, _) = problem.model(), problem.inputs()
    stats = cost_stats(model, x1[:1])
    assert tile_size(implementations.get("structured"), stats, 7, 5, "full", 1 << 40, False) == 7


@pytest.mark.parametrize("problem_id, allowed", [
    ("mlp-relu-O3-N4M3", None),
    ("tutorial_cnn-O10-N2M3", {"jacobian_contraction", "structured", "backpack_batchgrad", "ntk_vector_products", "autograd_loop"}),
])
def test_auto_picks_a_supported_plugin_and_says_why(problem_id, allowed):
    problem = BY_ID[problem_id]
    model, (x1, x2) = problem.model(), problem.inputs()
    auto = implementations.get("auto")
    auto.compute(model, x1, x2, mode="full")
    name, why = auto.last_choice
    assert implementations.get(name).supports(model) is None
    assert allowed is None or name in allowed
    assert why.startswith(name) and "predicted" in why and "P=" in why


def test_auto_blocks_under_a_small_budget():
    problem = BY_ID["mlp-relu-O3-x2None"]
    model, (x1, _) = problem.model(), problem.inputs()
    auto = implementations.get("auto")
    whole = auto.compute(model, x1)
    picked = implementations.get(auto.last_choice[0])
    budget = _budget_for_tiles(picked, model, x1, None, "full")
    tiled = auto.compute(model, x1, memory_budget_bytes=budget)
    assert "blocked" in auto.last_choice[1]
    assert rel_err(tiled, whole) <= 1e-12


def test_cost_stats_marks_the_output_linear():
    """The Linear whose output is the model's has G = I (structured adds its term without a GEMM): its cost view
    says so."""
    from torch import nn

    structured = implementations.get("structured")
    x = torch.randn(1, 5)
    plain = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))  # (the stats hold their model weakly)
    assert [layer.is_output for _, layer in structured.layers(cost_stats(plain, x))] == [False, True]
    squashed = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.Tanh())
    assert not any(layer.is_output for _, layer in structured.layers(cost_stats(squashed, x)))


def _timed_trial_setup(monkeypatch, close: bool):
    """A fresh auto on a small MLP whose two cheapest candidates are made to look close (or far) in the cost
    model, the predicted-cheaper one slowed by 0.25 s a call (more than a loaded machine adds to a small call);
    every dispatch counted."""
    import time

    from ntk_bench.implementations.plugins.auto import Auto

    problem = BY_ID["mlp-relu-O3-N4M3"]
    model, (x1, x2) = problem.model(), problem.inputs()
    auto = Auto()
    ranked = auto.rank(model, x1, x2, "full", None)
    (a, *_), (b, *_) = ranked[:2]
    fake = [(a, f"{a.name}: predicted", None, 0.010), (b, f"{b.name}: predicted", None, 0.012 if close else 1.0)]
    monkeypatch.setattr(auto, "rank", lambda *args, **kwargs: fake + ranked[2:])
    calls = {a.name: 0, b.name: 0}

    def counted(plugin, delay):
        original = plugin.dispatch

        def dispatch(*args):
            calls[plugin.name] += 1
            time.sleep(delay)
            return original(*args)
        monkeypatch.setattr(plugin, "dispatch", dispatch)

    counted(a, 0.25)
    counted(b, 0.0)
    return auto, model, x1, x2, a, b, calls


def test_auto_tries_two_close_candidates_over_its_first_calls_and_keeps_the_faster(monkeypatch):
    """The first call runs the cost model's pick alone (it costs what the pick costs); calls 2-4 run b, a, b, each
    one's second call timed; from then on the faster alone."""
    auto, model, x1, x2, a, b, calls = _timed_trial_setup(monkeypatch, close=True)
    k = auto.compute(model, x1, x2)
    assert calls == {a.name: 1, b.name: 0} and auto.last_choice[0] == a.name
    assert "in turn" in auto.last_choice[1]
    kernels = [auto.compute(model, x1, x2) for _ in range(3)]
    assert calls == {a.name: 2, b.name: 2}
    name, why = auto.last_choice
    assert name == b.name and "timed over the first calls" in why
    auto.compute(model, x1, x2)  # no second trial: the faster one alone
    assert calls == {a.name: 2, b.name: 3} and auto.last_choice[0] == b.name
    assert auto.choose(model, x1, x2)[0] is b
    ref = a.compute(model, x1, x2)
    assert all(rel_err(kk, ref) <= 1e-12 for kk in [k, *kernels])


def test_auto_trusts_the_cost_model_when_the_predictions_are_far_apart(monkeypatch):
    auto, model, x1, x2, a, b, calls = _timed_trial_setup(monkeypatch, close=False)
    auto.compute(model, x1, x2)
    assert auto.last_choice[0] == a.name and calls == {a.name: 1, b.name: 0}


def test_cost_stats_counts_the_fused_rnn_ops():
    """FlopCounterMode has no formula for aten::lstm / gru: the cost model counts their GEMMs from the shapes."""
    from torch import nn

    class Tagger(nn.Module):
        def __init__(self, cls):
            super().__init__()
            self.rnn, self.head = cls(6, 8, batch_first=True, num_layers=2), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    x = torch.randn(1, 5, 6)
    for cls, gates in ((nn.LSTM, 4), (nn.GRU, 3)):
        model = Tagger(cls)
        stats = cost_stats(model, x)
        gemms = 5 * 2 * gates * 8 * ((6 + 8) + (8 + 8))  # steps x 2·gates·H·(in + H), two layers
        assert gemms <= stats.fp_flops <= 1.5 * gemms + 2 * 8 * 3
        generic = [layer for _, layer in implementations.get("structured").layers(stats) if layer.kind == "generic"]
        assert len(generic) == 1 and gemms <= generic[0].flops <= 1.5 * gemms
