"""scripts/load_vs_quiet.py on the two committed load runs (the same sweep on two clocks, different case sets)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
A, B = ROOT / "results" / "2026-12-07-quick-cpu-load", ROOT / "results" / "2026-12-07-quick-cpu-load-clock-cpu"


def _script():
    spec = importlib.util.spec_from_file_location("load_vs_quiet", ROOT / "scripts" / "load_vs_quiet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bands_overlap():
    lvq = _script()
    assert lvq.overlap((1.0, 0.9, 1.1), (1.2, 1.05, 1.3)) and not lvq.overlap((1.0, 0.9, 1.1), (1.5, 1.2, 1.8))


@pytest.mark.skipif(not (A / "paired.jsonl").exists() or not (B / "paired.jsonl").exists(), reason="runs absent")
def test_the_two_committed_load_runs(capsys):
    lvq = _script()
    rows, lines = lvq.compare(A, B)
    assert any("different clocks" in line for line in lines)
    groups = {r["group"] for r in rows}
    assert len(groups) == 15  # every paired group of both runs, matched by key
    # BackPACK's plugins were in A's sweep only: never compared
    assert not any(r["plugin"].startswith("backpack") for r in rows)
    for r in rows:
        assert r["agree"] == (r["a"][1] <= r["b"][2] and r["b"][1] <= r["a"][2])
        assert r["plugin"] != r["baseline"] and r["baseline"].startswith("nt_")
    # the 2-thread wall clock at load: ours many times slower against the peer than on one thread's CPU time
    assert sum(r["a"][0] > r["b"][0] for r in rows if not r["plugin"].startswith("nt_")) >= 0.9 * sum(
        not r["plugin"].startswith("nt_") for r in rows)
    for r in rows:  # each run's own medians' ratio: the plugin's separate median over the baseline's
        assert r["medians_ratio_a"] is None or r["medians_ratio_a"] > 0
    assert sum(r["medians_ratio_a"] is not None and r["medians_ratio_b"] is not None for r in rows) >= len(rows) // 2
    assert lvq.main([str(A), str(B)]) == 0 and "agree within their bands" in capsys.readouterr().out
    assert lvq.main([str(A), str(ROOT / "results" / "2026-12-07-structured-costs")]) == 2  # no group in common
