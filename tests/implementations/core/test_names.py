"""One name per concept: the environment-variable helper (with its fallback to the old prefix), the tolerances."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

from ntk_bench.envvars import env, env_name


def test_env_reads_the_new_name_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert env("CUDA_GRAPHS", environ={"NTK_BENCH_CUDA_GRAPHS": "0"}) == "0"
        assert env("NTK_BENCH_CUDA_GRAPHS", environ={"NTK_BENCH_CUDA_GRAPHS": "0"}) == "0"
        assert env("CUDA_GRAPHS", "1", environ={}) == "1"
        assert env("CUDA_GRAPHS", environ={}) is None


def test_env_falls_back_to_the_old_prefix_with_a_warning_naming_both():
    with pytest.warns(DeprecationWarning, match="NTKBENCH_REQUIRE_REFERENCE.*NTK_BENCH_REQUIRE_REFERENCE"):
        assert env("REQUIRE_REFERENCE", environ={"NTKBENCH_REQUIRE_REFERENCE": "1"}) == "1"


def test_env_new_name_wins_over_the_old():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert env("REFERENCE", environ={"NTK_BENCH_REFERENCE": "harness", "NTKBENCH_REFERENCE": "nt"}) == "harness"


def test_env_reads_os_environ(monkeypatch):
    monkeypatch.delenv("NTK_BENCH_CUDA_GRAPHS", raising=False)
    monkeypatch.setenv("NTKBENCH_CUDA_GRAPHS", "0")
    with pytest.warns(DeprecationWarning):
        assert env("CUDA_GRAPHS", "1") == "0"
    assert env_name("CUDA_GRAPHS") == "NTK_BENCH_CUDA_GRAPHS"


def test_old_cuda_graphs_switch_still_turns_replay_off(monkeypatch):
    """The old spelling still reaches the code that reads it (the CUDA-graph cache), with the warning."""
    import torch

    from ntk_bench import implementations
    from ntk_bench.implementations.core import cuda_graphs

    cache = cuda_graphs.GraphCache(devices=("cpu",))
    plugin, x = implementations.get("structured"), torch.zeros(2, 3)
    monkeypatch.delenv("NTK_BENCH_CUDA_GRAPHS", raising=False)
    if not getattr(plugin, "capturable", False):
        pytest.skip("structured is not capturable")
    assert cache.applies(plugin, x)
    monkeypatch.setenv("NTKBENCH_CUDA_GRAPHS", "0")
    with pytest.warns(DeprecationWarning, match="NTK_BENCH_CUDA_GRAPHS"):
        assert not cache.applies(plugin, x)


# -- tolerances: one function, one module ---------------------------------------------------------------------

def test_tolerance_by_dtype_and_purpose():
    import numpy as np
    import torch

    from ntk_bench.implementations.core.tolerances import PURPOSES, tolerance

    assert tolerance(torch.float64) == tolerance("float64") == tolerance(np.dtype("float64")) == 1e-10
    assert tolerance(torch.float32) == tolerance("float32") == 1e-4
    assert tolerance(torch.float64, "repeat") == 1e-9 and tolerance(torch.float32, "repeat") == 1e-4
    assert tolerance(torch.float32, "gradient_sum") == 1e-3
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        assert tolerance(dtype, "jacobian_batching") == torch.finfo(dtype).eps ** 0.5
    for purpose in PURPOSES:
        # float64 is held at least as tightly as float32, and a lower precision never more loosely than float32
        assert tolerance(torch.float64, purpose) < tolerance(torch.float32, purpose)
        assert tolerance(torch.float16, purpose) >= tolerance(torch.float32, purpose)
    assert tolerance(torch.float16) == tolerance(torch.float32)  # never looser than float32 against the reference
    with pytest.raises(ValueError, match="unknown tolerance purpose 'exact'.*reference"):
        tolerance(torch.float64, "exact")


# A tolerance written inline, found in the syntax tree (so docstrings and comments may quote values): a small
# float literal (1e-19 to 0.1; smaller ones are floors against a division by zero) assigned to, or passed as, a name
# with "tol" in it (tol, rtol, atol=, TOLERANCE, tolerance), a table keyed by float32/float64 holding one, or one
# picked by a conditional expression on a dtype.
def _small_float(node) -> bool:
    return any(isinstance(n, ast.Constant) and type(n.value) is float and 1e-19 <= n.value <= 0.1
               for n in ast.walk(node))


def _is_inline_tolerance(node) -> bool:
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return node.value is not None and any("tol" in ast.unparse(t).lower() for t in targets) \
            and _small_float(node.value)
    if isinstance(node, ast.keyword):
        return node.arg is not None and "tol" in node.arg.lower() and _small_float(node.value)
    if isinstance(node, ast.Dict):
        return any(k is not None and any(w in ast.unparse(k) for w in ("float32", "float64")) and _small_float(v)
                   for k, v in zip(node.keys, node.values))
    if isinstance(node, ast.IfExp):
        return "dtype" in ast.unparse(node.test) and _small_float(node.body) and _small_float(node.orelse)
    return False


# The tolerance module itself, and the three checks of structured's package still written inline (they move to
# tolerance(dtype, "repeat" / "gradient_sum"); then this set goes).
_TOLERANCE_MODULE = Path("implementations/core/tolerances.py")


def _inline_tolerances(root: Path) -> list[str]:
    found = []
    for folder in ("implementations", "bench", "reference"):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root)
            if rel == _TOLERANCE_MODULE:
                continue
            text = path.read_text()
            lines = text.splitlines()
            found += sorted({f"{rel}:{n.lineno}: {lines[n.lineno - 1].strip()}"
                             for n in ast.walk(ast.parse(text)) if _is_inline_tolerance(n)})
    return found


def test_no_tolerance_is_picked_inline():
    """Every tolerance comes from implementations/core/tolerances.py (one function, by purpose and dtype)."""
    root = Path(__file__).resolve().parents[3]
    assert _inline_tolerances(root) == []


def test_the_inline_tolerance_check_finds_each_form(tmp_path):
    """The grep above is only worth something if it catches the forms tolerances were written in."""
    forms = ['rtol = 1e-9 if a.dtype == torch.float64 else 1e-4', 'TOLERANCE = {torch.float64: 1e-10}',
             'VERIFY_TOLERANCE = {"float32": 1e-4}', 'ok = torch.allclose(a, b, rtol=1e-5, atol=1e-8)',
             'tol = 1e-3', 'x = 1e-9 if t.dtype == torch.float64 else 1e-4']
    fine = ['atol = rtol * max(scale, 1e-30)', 'err = float(d.norm() / r.norm().clamp_min(1e-300))',
            'number = max(1, int(budget_s / max(one, 1e-9)))', 'tol = tolerance(a.dtype, "repeat")',
            'ok = tol <= 1e-4  # compared, not assigned', '"""measured in float64: 2e-2 to 0.4 relative error"""',
            'DEFAULT = {"cpu": {"overhead_s": 1e-3}}', 'if s >= 1e-3:\n    pass']
    (tmp_path / "bench").mkdir()
    for i, line in enumerate(forms + fine):
        (tmp_path / "bench" / f"m{i}.py").write_text(line + "\n")
    flagged = {f.split(": ", 1)[1] for f in _inline_tolerances(tmp_path)}
    forms = [f.splitlines()[0] for f in forms]
    assert flagged == set(forms)


# -- the registry as the only list of plugin names --------------------------------------------------------------

def test_registry_tags_select_auto_candidates_nt_peers_and_the_fast_set():
    from ntk_bench import implementations

    assert set(implementations.names(tag="auto")) == set(implementations.names()) - {"auto"}
    nt = implementations.names(None, tag="neural_tangents")
    assert nt == ["nt_jacobian_contraction", "nt_ntk_vector_products", "nt_structured_derivatives"]
    assert all(implementations.origin_of(n) == "peer" for n in nt)
    fast = implementations.names(None, tag="fast")
    assert {"structured", "auto", "laplace", *nt} <= set(fast)
    assert not set(fast) & {"autograd_loop", "asdl", "nngeometry", "curvlinops"}
    assert implementations.get("structured").tags == implementations.tags_of("structured")


def test_a_plugin_tagged_auto_joins_autos_candidates_after_the_built_ins():
    from torch import nn

    from ntk_bench import implementations
    from ntk_bench.implementations.plugins import auto

    class Mine(implementations.NTKPlugin):
        name, tags = "mine_for_auto", frozenset({"auto"})

        def _kernel(self, model, x1, x2, mode):
            raise AssertionError("not called")

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    before = [p.name for p in auto.Auto._candidates(model)]
    # the built-ins most specialised first (explicit_mlp takes this MLP)
    assert before[:3] == ["explicit_mlp", "structured", "jacobian_contraction"]
    implementations.register(Mine())
    try:
        assert [p.name for p in auto.Auto._candidates(model)] == [*before, "mine_for_auto"]
        assert "mine_for_auto" not in implementations.names(tag="fast")
    finally:
        implementations.unregister("mine_for_auto")


def test_a_plugins_origin_and_its_deprecated_name_kind():
    from ntk_bench import implementations

    assert implementations.get("asdl").origin == "peer" and implementations.get("structured").origin == "ours"
    assert implementations.origin_of("nt_jacobian_contraction") == "peer"
    with pytest.warns(DeprecationWarning, match="origin"):
        assert implementations.get("asdl").kind == "peer"
    with pytest.warns(DeprecationWarning, match="origin_of"):
        assert implementations.kind_of("asdl") == "peer"
    with pytest.warns(DeprecationWarning, match="origin"):
        assert implementations.names(kind="peer") == implementations.names("peer")

    with pytest.warns(DeprecationWarning, match=r"Old\.kind is deprecated: set origin = 'peer'"):
        class Old(implementations.NTKPlugin):  # a plugin written before kind became origin
            name, kind = "old_style_peer", "peer"
    assert Old().origin == "peer"


def test_a_compiled_variant_not_yet_imported_loads_from_the_table_and_tag_selectors_reach_it(monkeypatch):
    # The first lookup of a variant (a tag selector such as ``-tag:loop`` looks at every plugin's tags) goes through
    # the built-in table; it once held a bare module name there and every tag selector crashed.
    from ntk_bench import implementations

    variants = ("explicit_mlp_compiled", "jacobian_contraction_compiled", "structured_compiled")
    fresh = {n: p for n, p in implementations._registered.items() if n not in variants}
    monkeypatch.setattr(implementations, "_registered", fresh)
    assert set(implementations.names("ours", tag="compiled", compiled=True)) == set(variants)
    assert "autograd_loop" in implementations.names(tag="loop", compiled=True)
    assert implementations.get("structured_compiled").name == "structured_compiled"
