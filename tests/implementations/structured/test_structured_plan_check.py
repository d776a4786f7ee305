"""structured's check of its plan (``Structured._check``): a right plan passes; a rule that drops or doubles a
use, mixes the samples of a batch or takes the wrong dimension for the batch is caught, on models with several
outputs (the check runs one "output" wide: these are the errors it must still see)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ntk_bench import implementations
from ntk_bench.implementations.structured.rules.linear import LinearRule

D = torch.float64


class Tokens(nn.Module):
    """A Linear on (N, S, K) positions, then the positions summed: the batch dimension is the first, not the second."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)).sum(1))


def _plan(model, x):
    from ntk_bench.implementations.structured import plan as plan_module

    return plan_module.discover(model, x)


def _bad(model, x):
    plugin = implementations.get("structured")
    plan = _plan(model, x)
    return {plan.names.get(id(p), "?") for p in plugin._check(plan, model, x)}


def test_a_right_plan_passes():
    torch.manual_seed(0)
    assert _bad(Tokens().to(D), torch.randn(3, 3, 4, dtype=D)) == set()
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    assert _bad(mlp, torch.randn(5, 4, dtype=D)) == set()
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4)).to(D)
    assert _bad(cnn, torch.randn(3, 2, 4, 4, dtype=D)) == set()


def _faulty(fault):
    original = LinearRule.side

    def side(self, use, grads, checking=False):
        s = original(self, use, grads, checking)
        return fault(s) if self.module.in_features == 4 else s
    return side


# (PatchSide: x (N, 1, K, S), g (O, N, 1, C, S))
FAULTS = {
    "a doubled use": lambda s: type(s)(s.x, 2 * s.g),
    "mixed samples": lambda s: type(s)(s.x.roll(1, 0), s.g),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_wrong_rule_is_caught(fault, monkeypatch):
    torch.manual_seed(0)
    model, x = Tokens().to(D), torch.randn(3, 3, 4, dtype=D)  # (N = S: the wrong layout has the right shapes)
    monkeypatch.setattr(LinearRule, "side", _faulty(FAULTS[fault]))
    assert _bad(model, x) >= {"lin.weight"}


def test_a_plan_with_the_wrong_batch_dimension_is_caught():
    """The plan taking the positions for the batch (the rule consistent with it: the same numbers summed over all
    samples and positions, only the per-sample weights fall on the positions)."""
    torch.manual_seed(0)
    model, x = Tokens().to(D), torch.randn(3, 3, 4, dtype=D)
    plan = _plan(model, x)
    entry = next(e for e in plan.entries if e.module is model.lin)
    entry.in_dims = [(1,) for _ in entry.in_dims]
    entry.out_dims = [(1,) for _ in entry.out_dims]
    bad = {plan.names.get(id(p), "?") for p in implementations.get("structured")._check(plan, model, x)}
    assert bad >= {"lin.weight"}


def test_a_missing_use_is_caught():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):  # the weight's second use is no module call
            return torch.tanh(self.lin(x)) @ self.lin.weight.t()

    torch.manual_seed(0)
    model, x = Twice().to(D), torch.randn(3, 4, dtype=D)
    assert _bad(model, x) >= {"lin.weight"}
    # compute routes the weight to the generic rule and gets the kernel right
    plugin = implementations.get("structured")
    got = plugin.compute(model, x)
    from tests.implementations.structured.test_structured_rules import brute_force_kernel

    assert torch.allclose(got, brute_force_kernel(model, x), atol=1e-10, rtol=1e-9)
