"""The Gram GEMMs' library (``core.onednn``): oneDNN's GEMM only where a plugin's backend trial chose it
(``enabled(True)``), MKL's otherwise, eager and compiled alike; the compiled kernel's large GEMMs make that
choice when they run (``ntk_bench::linear``), so ``explicit_mlp_compiled`` follows its trial as the eager kernel does.
On some CPUs one library's GEMM takes half the other's time: a choice nobody made would be a silent slowdown."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ntk_bench import implementations
from ntk_bench.bench.measurement import bruteforce
from ntk_bench.bench.measurement.problems import rel_err
from ntk_bench.implementations.core import onednn

pytestmark = pytest.mark.skipif(onednn._LINEAR is None or not torch.backends.mkldnn.is_available(),
                                reason="no oneDNN linear in this build")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Every call of oneDNN's linear, by its input's shape."""
    calls, real = [], onednn._LINEAR

    def recorded(x, *args):
        calls.append(tuple(x.shape))
        return real(x, *args)

    monkeypatch.setattr(onednn, "_LINEAR", recorded)
    return calls


def test_a_gram_takes_onednn_only_where_a_plugin_chose_it(onednn_calls):
    a, b = torch.randn(6, 5), torch.randn(4, 5)
    with torch.no_grad():
        plain = onednn.gram(a, b)
        assert onednn_calls == []  # (no choice made: MKL's, as before any trial)
        with onednn.enabled(False):
            onednn.gram(a, b)
        assert onednn_calls == []
        with onednn.enabled(True):
            chosen = onednn.gram(a, b)
            with onednn.enabled(False):  # (a trial's other side, nested)
                onednn.gram(a, b)
        assert onednn_calls == [(6, 5)]
        onednn.gram(a, b)
        assert onednn_calls == [(6, 5)]  # the choice ends with its block
        strided = torch.randn(5, 4).t()  # (rows not in place: MKL's, no copy into oneDNN's layout)
        with onednn.enabled(True):
            across = onednn.gram(a, strided)
        assert onednn_calls == [(6, 5)]
    assert rel_err(chosen, a @ b.T) <= 1e-6 and rel_err(plain, a @ b.T) <= 1e-6
    assert rel_err(across, a @ strided.T) <= 1e-6


@pytest.mark.compile
def test_the_compiled_kernels_large_gemms_follow_the_trials_choice_when_they_run(onednn_calls, monkeypatch):
    """explicit_mlp_compiled, compiled once: with the choice fixed to oneDNN its large GEMMs (forward, backward and
    Gram) run oneDNN's; fixed to MKL, none does; small ones are Inductor's either way. The kernel is right both ways."""
    monkeypatch.setattr(onednn, "COMPILED_MIN_MACS", 4096)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    x = torch.randn(12, 40)
    plugin = implementations.get("explicit_mlp_compiled")
    expected = bruteforce.ntk(model.double(), x.double(), None, "full")
    model.float()
    kernels = {}
    for use in (True, False):
        onednn_calls.clear()
        with onednn.fixed_choice(use):
            kernels[use] = plugin.compute(model, x)
            assert plugin.info().compiled, plugin.info().fallback
            onednn_calls.clear()
            plugin.compute(model, x)  # (the compiled kernel alone: the first call also ran the eager one)
        assert bool(onednn_calls) == use, onednn_calls
    for k in kernels.values():
        assert rel_err(k, expected) <= 1e-5
