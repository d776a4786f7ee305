"""The compiled variants (``implementations.core.compiled``): against neural-tangents (the suite's check, model left as
found), the eager plugin and the brute force, on the zoo problems they support; and the faults the machinery
guards against, each injected: a compiled kernel that is wrong, one that cannot compile, a model changed between
calls (in place, a replaced parameter).

Each case compiles once (seconds to a minute each on a loaded machine): marked ``compile``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ntk_bench import implementations
from ntk_bench.bench.measurement import bruteforce
from ntk_bench.bench.measurement.problems import BY_ID, rel_err
from ntk_bench.implementations.core import compiled
from ntk_bench.implementations.core.base import NTKPlugin
from ntk_bench.implementations.core.tolerances import tolerance
from ntk_bench.implementations.plugins import compiled as variants
from tests.contract.test_correctness import check_against_reference

pytestmark = pytest.mark.compile

DTYPES = {"float64": torch.float64, "float32": torch.float32}
# (variant, problem, mode, dtype, whether it must compile): both kinds of output (O = 1, O > 1), x2 = None and
# separate, every mode once, both dtypes; structured does not compile today and must fall back, correct.
CASES = [
    ("explicit_mlp_compiled", "mlp-tanh-O2-N3M5", "full", "float64", True),
    ("explicit_mlp_compiled", "mlp-relu-O3-x2None", "trace", "float32", True),
    ("jacobian_contraction_compiled", "cnn-O4-N2M3", "full", "float64", True),
    ("jacobian_contraction_compiled", "mlp-relu-O1-N4M3", "diagonal", "float64", True),
    ("structured_compiled", "mlp-relu-O3-x2None", "full", "float64", False),
]


def test_variants_are_registered_but_not_in_the_default_lists():
    names = [p.name for p in variants.plugins]
    assert not set(names) & set(names_default := implementations.names()) and "auto" in names_default
    assert set(names) <= set(implementations.names("ours", compiled=True))
    assert all(implementations.get(v).origin == "ours" for v in names)


@pytest.mark.usefixtures("kernel_reference")
@pytest.mark.parametrize("name,problem_id,mode,dtype,must_compile", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_compiled_matches_reference_eager_and_brute_force(name, problem_id, mode, dtype, must_compile):
    plugin = implementations.get(name)
    problem = BY_ID[problem_id]
    # neural-tangents; the model as found. The same model below: a new model object would compile again.
    model, x1, x2, k = check_against_reference(plugin, problem, mode, DTYPES[dtype], "cpu")
    info = plugin.info()
    assert info is not None
    if must_compile:
        assert info.compiled, info.fallback
    else:
        assert not info.compiled and info.fallback
    assert rel_err(plugin.compute(model, x1, x2, mode=mode), k) <= tolerance(DTYPES[dtype])  # a second call
    if must_compile:
        assert plugin.info().compiled and plugin.info().compile_s is None  # not compiled again
    eager = plugin.base.compute(model, x1, x2, mode=mode)
    tol = tolerance(DTYPES[dtype])
    assert rel_err(k, eager) <= tol
    assert rel_err(k, bruteforce.ntk(model.double(), x1.double() if x1.is_floating_point() else x1,
                                     None if x2 is None else (x2.double() if x2.is_floating_point() else x2),
                                     mode)) <= tol


class _Faulty(NTKPlugin):
    """explicit_mlp whose pure kernel is ``fault`` applied to the right one."""

    def __init__(self, name, fault):
        self.name = name
        self.fault = fault
        self.inner = implementations.get("explicit_mlp")

    def supports(self, model):
        return self.inner.supports(model)

    def _kernel(self, model, x1, x2, mode):
        return self.inner._kernel(model, x1, x2, mode)

    def pure_kernel(self, model, x1, x2, mode):
        right = self.inner.pure_kernel(model, x1, x2, mode)
        return lambda m, x1, x2: self.fault(right(m, x1, x2))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double(), torch.randn(3, 4, dtype=torch.float64)


def _graph_break(k):
    if float(k.sum()) > -1e300:  # a host sync: fullgraph=True cannot compile it
        return k
    return -k


@pytest.mark.parametrize("fault,reason", [(lambda k: k * (1 + 1e-6), "differs from the eager one"),
                                          (_graph_break, "torch.compile failed")], ids=["wrong", "graph-break"])
def test_a_faulty_compiled_kernel_falls_back_to_eager_and_says_why(fault, reason):
    model, x = _mlp()
    plugin = compiled.CompiledPlugin(_Faulty("faulty", fault))
    eager = implementations.get("explicit_mlp").compute(model, x)
    for _ in range(2):  # the first call finds the fault; the second does not try again
        k = plugin.compute(model, x)
        assert torch.equal(k, eager)
        info = plugin.info()
        assert not info.compiled and reason in info.fallback


def test_the_compiled_kernel_follows_the_model():
    model, x = _mlp()
    plugin = implementations.get("explicit_mlp_compiled")
    eager = implementations.get("explicit_mlp")
    plugin.compute(model, x)
    assert plugin.info().compiled
    with torch.no_grad():  # in place: the same compiled kernel sees the new values
        model[0].weight.mul_(1.5)
    k = plugin.compute(model, x)
    assert plugin.info().compiled and plugin.info().compile_s is None
    assert rel_err(k, eager.compute(model, x)) <= 1e-10
    model[2].weight = nn.Parameter(torch.randn(2, 8, dtype=torch.float64))  # replaced: a new entry, checked again
    k = plugin.compute(model, x)
    assert rel_err(k, eager.compute(model, x)) <= 1e-10
    assert plugin.info().compiled and plugin.info().compile_s is not None
    model[1] = nn.Sigmoid()  # another activation: recompiled, still right
    k = plugin.compute(model, x)
    assert rel_err(k, eager.compute(model, x)) <= 1e-10
    assert rel_err(k, bruteforce.ntk(model, x, None, "full")) <= 1e-10


def test_the_cache_keeps_no_model_alive():
    import gc
    import weakref

    model, x = _mlp()
    plugin = implementations.get("explicit_mlp_compiled")
    plugin.compute(model, x)
    assert plugin.info().compiled
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_declined_model_is_declined_under_the_variants_name():
    plugin = implementations.get("explicit_mlp_compiled")
    reason = plugin.supports(nn.Sequential(nn.Conv2d(1, 1, 3)))
    assert reason.startswith("explicit_mlp_compiled:") and "Conv2d" in reason


@pytest.mark.parametrize("name", ["explicit_mlp_compiled", "jacobian_contraction_compiled"])
def test_a_symmetric_kernel_in_row_blocks_compiles(name, monkeypatch):
    """x2 = None from the blocks on and above the diagonal (as a large kernel is on the CPU) still compiles: the
    blocks are written into slices of the sum, which torch.compile takes only as assignments, not as out=."""
    from ntk_bench.implementations.core import contractions

    monkeypatch.setattr(contractions, "SYMMETRIC_SPLIT_MIN_ROWS_CPU", 1)
    monkeypatch.setattr(contractions, "SYMMETRIC_JACOBIAN_MIN_ROWS", 1)
    monkeypatch.setattr(contractions, "SYMMETRIC_BLOCK_MIN_ROWS", 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    plugin = implementations.get(name)
    k = plugin.compute(model, x)
    assert plugin.info().compiled, plugin.info().fallback
    assert rel_err(k, bruteforce.ntk(model, x, None, "full")) <= 1e-10
