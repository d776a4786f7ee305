"""auto's first call on a fresh instance of an architecture it has measured skips the cost model's measuring
forward (stats reused by model structure and input shape), and only where the structure pins the forward down."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from ntk_bench import implementations
from ntk_bench.implementations.core.module_walks import _parameter_signature
from ntk_bench.implementations.plugins import auto as auto_mod

RUN = Path(__file__).resolve().parents[3] / "results" / "2026-12-07-auto-first-call" / "times.json"


@pytest.fixture
def counted(monkeypatch):
    """A fresh structure cache, and the measuring forwards auto runs counted."""
    monkeypatch.setattr(auto_mod, "_STATS_BY_STRUCTURE", OrderedDict())
    calls = []
    real = auto_mod.cost_stats

    def cost_stats(model, x):
        calls.append(model)
        return real(model, x)

    monkeypatch.setattr(auto_mod, "cost_stats", cost_stats)
    return calls


def _fresh_cnn(stride=1, seed=0):
    """A small CNN whose parameter shapes do not depend on its stride (the pooling fixes the Linear's input)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=stride, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 5)).eval()


def test_a_fresh_instance_of_a_measured_architecture_reuses_its_stats(counted):
    auto = auto_mod.Auto()
    x = torch.randn(4, 3, 8, 8)
    a, b = _fresh_cnn(seed=0), _fresh_cnn(seed=1)  # other weights, the same structure
    first = [(p.name, s) for p, _, _, s in auto.rank(a, x)]
    assert len(counted) == 1
    assert [(p.name, s) for p, _, _, s in auto.rank(b, x)] == first and len(counted) == 1
    auto.rank(b, torch.randn(4, 3, 16, 16))  # other input shapes: measured
    assert len(counted) == 2
    # the same parameter shapes with another stride: another forward, measured, other costs
    strided = _fresh_cnn(stride=2)
    assert _parameter_signature(strided) == _parameter_signature(a)
    assert auto_mod.structure_key(strided) != auto_mod.structure_key(a)
    other = auto.rank(strided, x)
    assert len(counted) == 3 and [s for *_, s in other] != [s for _, s in first]


def test_what_the_structure_cannot_pin_down_is_measured_on_the_model_itself(counted):
    x = torch.randn(2, 3, 8, 8)
    hooked = _fresh_cnn()
    hooked[1].register_forward_hook(lambda m, i, o: o * 2)
    closure = _fresh_cnn()
    scale = 3.0
    closure[1].post = lambda t: t * scale  # an attribute the key cannot compare
    assert auto_mod.structure_key(hooked) is None and auto_mod.structure_key(closure) is None
    for model in (hooked, closure):
        auto_mod.stats_by_structure(model, x[:1])
        auto_mod.stats_by_structure(model, x[:1])
    assert counted == [hooked, hooked, closure, closure] and not auto_mod._STATS_BY_STRUCTURE
    # train and eval run other forwards (a BatchNorm's batch statistics): other keys
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert auto_mod.structure_key(bn.train()) != auto_mod.structure_key(bn.eval())


def test_auto_still_picks_and_computes_on_a_fresh_instance(counted):
    from ntk_bench.bench.measurement.problems import rel_err

    auto = auto_mod.Auto()
    x = torch.randn(3, 3, 8, 8)
    auto.compute(_fresh_cnn(seed=0), x)
    model = _fresh_cnn(seed=2)
    out = auto.compute(model, x)
    pick = implementations.get(auto.last_choice[0])
    assert len(counted) == 1 and rel_err(out, pick.compute(model, x)) <= 1e-5


@pytest.mark.skipif(not RUN.exists(), reason="no committed measurement")
def test_the_committed_first_calls_are_within_the_bound():
    rows = json.loads(RUN.read_text())["rows"]
    assert {r["model"] for r in rows} >= {"mlp", "cnn", "cnn_batchnorm", "text_transformer", "resnet18"}
    for r in rows:
        assert len(r["ratios"]) >= 4 and r["median_ratio"] <= 1.5, r["model"]
