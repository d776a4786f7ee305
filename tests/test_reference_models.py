"""Models the reference once got wrong or could not translate: a ``torch.no_grad()`` branch, interpolation,
``nn.Bilinear``, ``nn.EmbeddingBag``, transformers' GPT-2 and T5 (built from tiny configs, random weights), and
timm's efficientnet_b0's compile time. Each kernel is checked against a float64 torch brute force
(``tests/bruteforce.py``: one ``autograd.grad`` per sample and output)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bruteforce
from problems import rel_err

pytestmark = pytest.mark.usefixtures("nt_available")
F64 = torch.float64


class FrozenTeacher(nn.Module):
    """A student whose output is gated by a teacher branch computed under ``torch.no_grad()`` (or detached)."""

    def __init__(self, how: str = "no_grad"):
        super().__init__()
        self.how = how
        self.student = nn.Linear(4, 6)
        self.teacher = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        if self.how == "no_grad":
            with torch.no_grad():
                gate = torch.tanh(self.teacher(x))
        elif self.how == "set_grad_enabled":
            with torch.set_grad_enabled(False):
                gate = torch.tanh(self.teacher(x))
        else:
            gate = torch.tanh(self.teacher(x)).detach()
        return self.head(torch.tanh(self.student(x)) * gate + gate)


@pytest.mark.parametrize("how", ["no_grad", "set_grad_enabled", "detach"])
def test_a_no_grad_branch_contributes_no_gradient(how):
    """The teacher's parameters get no gradient in torch; neither do they in neural-tangents."""
    from ntk_bench import reference

    torch.manual_seed(0)
    model = FrozenTeacher(how).double()
    x1, x2 = torch.randn(3, 4, dtype=F64), torch.randn(2, 4, dtype=F64)
    k = reference.ntk(model, x1, x2, quick_compile=True)
    assert rel_err(k, bruteforce.ntk(model, x1, x2)) <= 1e-12


def test_without_the_gradient_stops_the_kernel_is_wrong(monkeypatch):
    """Injected fault: the translator forgets the no_grad block (as torch's decompositions do when they inline
    it). The forward still matches, so only the kernel shows it: the teacher's parameters then count."""
    from ntk_bench import reference
    from ntk_bench.reference import translate

    monkeypatch.setattr(translate, "_mark_gradient_stops", lambda program: 0)
    torch.manual_seed(0)
    model = FrozenTeacher("no_grad").double()
    x = torch.randn(3, 4, dtype=F64)
    assert reference.supports(model, x) is None
    assert rel_err(reference.ntk(model, x, quick_compile=True), bruteforce.ntk(model, x)) > 1e-2
