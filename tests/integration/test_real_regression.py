"""scripts/real_regression.py: its cases are the `real` sweep's, its baseline reads the committed 11-23 run, its
band is the runner's."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ROOT / "results" / "2026-11-23-real-cpu-4"


def _script():
    spec = importlib.util.spec_from_file_location("real_regression", ROOT / "scripts" / "real_regression.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cases_are_the_real_sweeps():
    rr = _script()
    sweep = tomllib.loads((ROOT / "bench" / "sweeps" / "real.toml").read_text())
    swept = {(a["name"], tuple(sorted(a.get("params", {}).items())), a["N"][0], a.get("O", [None])[0])
             for a in sweep["arch"]}
    for arch, params, n, _, _ in rr.CASES.values():
        rest = tuple(sorted((k, v) for k, v in params.items() if k != "out"))
        assert (arch, rest, n, params.get("out")) in swept
    assert len(rr.CASES) == len(sweep["arch"])


def test_band_and_verdict_match_the_runners():
    from ntk_bench.bench.measurement import paired

    rr = _script()
    for xs in ([1.0], [0.9, 1.1, 1.0], [0.5 + 0.07 * i for i in range(15)], [1.2, 0.8, 1.05, 0.97, 1.3, 0.6, 1.0]):
        assert rr.median_band(xs) == pytest.approx(paired.median_band(xs))
    assert rr._verdict((0.8, 0.7, 0.95)) == "faster"
    assert rr._verdict((1.1, 1.02, 1.3)) == "slower"
    assert rr._verdict((1.0, 0.9, 1.1)) == "same within band"


@pytest.mark.skipif(not (BASELINE / "results.csv").exists(), reason="baseline run absent")
def test_baseline_ratios_from_the_committed_run():
    rr = _script()
    base = rr.baseline(BASELINE)
    assert set(base) == set(rr.CASES)
    assert base["tutorial_cnn"]["ratio"] == pytest.approx(0.08403 / 0.21166, rel=1e-3)
    assert base["lstm"]["ours_s"] == pytest.approx(0.076488, rel=1e-4)
    for b in base.values():
        assert b["blocks_range"][0] <= b["ratio"] <= b["blocks_range"][1]
