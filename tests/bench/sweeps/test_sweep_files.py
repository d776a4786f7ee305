"""The built-in sweeps are TOML files in the schema users write, and sweeps choose plugins by kind and tag."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ntk_bench import implementations
from ntk_bench.bench import sweeps
from ntk_bench.implementations.core.base import NTKPlugin

FIXTURE = json.loads((Path(__file__).parent / "builtin_sweeps_before_toml.json").read_text())
FOLDER = Path(sweeps.__file__).parent


def _digest(cases) -> tuple[int, str]:
    lines = sorted(f"{c.id}|{c.time_budget_s!r}|{c.timeout_s!r}" for c in cases)
    return len(lines), hashlib.sha1("\n".join(lines).encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(FIXTURE["sweeps"]))
def test_each_builtin_sweep_file_expands_to_the_cases_its_python_definition_had(name):
    want = FIXTURE["sweeps"][name]
    n, sha1 = _digest(sweeps.expand(sweeps.load(name)))
    assert n == want["cases"], f"{name}: {n} cases, the Python definition had {want['cases']}"
    assert sha1 == want["sha1"], f"{name}: the same number of cases, but not the same ones"


def test_the_builtin_sweeps_are_the_toml_files_read_as_a_user_file_is_read():
    files = sorted(FOLDER.glob("*.toml"))
    assert sorted(p.stem for p in files) == sorted(sweeps.SWEEPS)
    assert set(FIXTURE["sweeps"]) <= set(sweeps.SWEEPS)  # (sweeps added since, e.g. small, have no fixture)
    for path in files:
        as_user = sweeps.load(str(path))  # the path: the user's code path, not the built-in lookup
        assert [c.id for c in sweeps.expand(as_user)] == [c.id for c in sweeps.expand(sweeps.SWEEPS[path.stem])]


def test_the_builtin_sweeps_name_plugins_by_kind_and_tag_not_by_hand_lists():
    for path in FOLDER.glob("*.toml"):
        spec = sweeps.SWEEPS[path.stem]
        for impls in [spec.get("impls", [])] + [a.get("impls", []) for a in spec["arch"]]:
            plain = [s for s in impls if not s.startswith("-") and s not in ("all", "ours", "peers")
                     and not s.startswith("tag:")]
            assert len(plain) <= 1, f"{path.name}: a hand-written list of plugins {impls}"


def test_selectors_apply_left_to_right_in_the_registry_order():
    ours = implementations.names("ours")
    chosen, wrong = sweeps.select_plugins(["ours", "-tag:loop", "tag:neural_tangents"])
    assert wrong == []
    assert chosen == [n for n in ours if n != "autograd_loop"] + implementations.names(None, tag="neural_tangents")
    # removing a family then adding a plugin of it back
    chosen, _ = sweeps.select_plugins(["ours", "-tag:vector_products", "tag:neural_tangents"])
    assert "ntk_vector_products" not in chosen and "nt_ntk_vector_products" in chosen
    assert sweeps.select_plugins(["nt_*", "-nt_ntk_*"])[0] == ["nt_jacobian_contraction", "nt_structured_derivatives"]
    assert sweeps.select_plugins(["peers", "-tag:neural_tangents"])[0] == ["asdl", "nngeometry", "curvlinops",
                                                                           "laplace"]


@pytest.mark.parametrize("selectors, message", [
    (["tag:nosuch"], "no plugin carries the tag 'nosuch'"),
    (["zz_*"], "the pattern 'zz_*' matches no plugin"),
    (["structurd"], "unknown plugin 'structurd'"),
    (["structured", "structured"], "a plugin is named twice"),
    (["ours", "-ours"], "selects no plugin"),
])
def test_a_wrong_selector_is_one_line_naming_it(selectors, message):
    spec = {"name": "s", "impls": selectors, "arch": [{"name": "mlp", "N": [2]}]}
    with pytest.raises(sweeps.SweepError) as err:
        sweeps.expand(spec)
    assert any(message in line and line.startswith("sweep 's'") for line in err.value.problems), err.value.problems


def test_a_registered_plugin_joins_the_sweeps_that_select_its_kind_and_tag():
    class Mine(NTKPlugin):
        name = "mine_products"
        tags = frozenset({"vector_products"})

        def _kernel(self, *a, **k):  # never called here
            raise NotImplementedError

    implementations.register(Mine())
    try:
        assert "mine_products" in sweeps.select_plugins(["ours"])[0]
        assert "mine_products" in sweeps.select_plugins(["tag:vector_products"])[0]
        assert "mine_products" not in sweeps.select_plugins(["ours", "-tag:vector_products"])[0]
        quick = {c.impl for c in sweeps.expand(sweeps.SWEEPS["quick"])}
        assert "mine_products" in quick  # the quick sweep's MLP entry takes every plugin of ours but the families
    finally:
        implementations.unregister("mine_products")
