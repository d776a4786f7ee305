"""The pytest plugin (ntk_bench.bench.pytest_plugin): the ntk_registry marker parametrises over the registry, the
ntk_case fixture checks a plugin's kernel and times it through pytest-benchmark, and `ntk-bench compare` reads
pytest-benchmark's saved JSON with the same verdicts."""

from __future__ import annotations

import json
import os
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from ntk_bench.bench.output import compare

ROOT = Path(__file__).resolve().parents[2]

BENCHMARKS = '''
import pytest
from ntk_bench.bench.pytest_plugin import problem


@pytest.mark.ntk_registry
def test_speed(ntk_case, plugin):
    case = ntk_case(plugin, problem("mlp", N=4, in_features=8, width=16, depth=1, out=3), budget_s=0.02)
    assert case.row["status"] == "ok" and case.median_s > 0
'''

OFF_PLUGIN = '''
from ntk_bench import implementations
from ntk_bench.implementations.plugins.jacobian_contraction import JacobianContraction


class OffByOnePercent(JacobianContraction):
    name = "off_by_one_percent"

    def _kernel(self, model, x1, x2, mode):
        return 1.01 * super()._kernel(model, x1, x2, mode)


implementations.register(OffByOnePercent())
'''


def _plugin_args() -> list[str]:
    """-p for our plugin unless an install's pytest11 entry point loads it already (twice is an error)."""
    if any(ep.value == "ntk_bench.bench.pytest_plugin" for ep in entry_points(group="pytest11")):
        return []
    return ["-p", "ntk_bench.bench.pytest_plugin"]


@pytest.fixture
def bench_dir(pytester, monkeypatch):
    pytester.makepyfile(test_bench=BENCHMARKS, off_plugin=OFF_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return pytester


def test_the_marker_runs_a_test_per_registered_plugin(bench_dir):
    from ntk_bench import implementations

    result = bench_dir.runpytest_subprocess("--collect-only", "-q", "-p", "off_plugin", *_plugin_args())
    for name in [*implementations.names(), "off_by_one_percent"]:
        result.stdout.fnmatch_lines([f"*test_speed[[]{name}[]]*"])


@pytest.mark.serial
def test_ntk_case_checks_and_times_through_pytest_benchmark_and_compare_reads_it(bench_dir, capsys):
    """Two pytest sessions of the same benchmarks (pytest starts twice: serial, with the tests that time code)."""
    pytest.importorskip("pytest_benchmark")
    runs = []
    for name in ("a", "b"):
        out = bench_dir.path / f"{name}.json"
        result = bench_dir.runpytest_subprocess(
            "-p", "off_plugin", *_plugin_args(), "-k", "structured or jacobian_contraction or off_by_one",
            f"--benchmark-json={out}", "-p", "no:cacheprovider")
        outcomes = result.parseoutcomes()
        assert outcomes.get("passed") == 2 and outcomes.get("failed") == 1, result.stdout.str()
        result.stdout.fnmatch_lines(["*off_by_one_percent on mlp*kernel off by rel err 1.000e-02*"])
        runs.append(out)
    data = json.loads(runs[0].read_text())
    rows = {b["extra_info"]["ntk_bench"]["impl"]: b for b in data["benchmarks"]}
    assert set(rows) == {"structured", "jacobian_contraction"}
    row = rows["structured"]["extra_info"]["ntk_bench"]
    assert row["timer"] == "process_time" and row["rel_err"] < 1e-4 and len(row["time_blocks_s"]) == 10
    assert rows["structured"]["stats"]["rounds"] == 10
    run = compare.load(runs[0])
    assert set(run.df["impl"]) == {"structured", "jacobian_contraction"} and run.df["status"].eq("ok").all()
    parser = compare.add_arguments(__import__("argparse").ArgumentParser())
    # (the plumbing, not the noise: the gate tests judge two timings at 1.10)
    assert compare.run(parser.parse_args([str(runs[0]), str(runs[1]), "--strict", "--fail-above", "3"])) == 0
    assert "PASS" in capsys.readouterr().out


def test_compare_reads_any_pytest_benchmark_json(tmp_path, capsys):
    """Benchmarks not made by ntk_case: their rounds (--benchmark-save-data) as blocks, judged alike."""
    import numpy as np

    def saved(path, factor, seed):
        rng = np.random.default_rng(seed)
        benchmarks = []
        for i, name in enumerate(["test_a", "test_b", "test_c", "test_d", "test_e", "test_f"]):
            data = list(1e-3 * (i + 1) * (factor if name == "test_a" else 1) * np.exp(rng.normal(0, 0.02, 12)))
            benchmarks.append({"name": name, "fullname": f"tests/test_x.py::{name}", "group": None,
                               "options": {"timer": "time.perf_counter"}, "extra_info": {},
                               "stats": {"median": float(np.median(data)), "iqr": float(np.subtract(
                                   *np.percentile(data, [75, 25]))), "data": data, "rounds": 12}})
        path.write_text(json.dumps({"machine_info": {"cpu": {"brand_raw": "cpu"}}, "commit_info": {"id": "abc"},
                                    "benchmarks": benchmarks, "datetime": "now", "version": "5.3.1"}))
        return path

    a, same, slow = saved(tmp_path / "a.json", 1, 1), saved(tmp_path / "s.json", 1, 2), saved(tmp_path / "b.json", 2, 3)
    parser = compare.add_arguments(__import__("argparse").ArgumentParser())
    assert compare.run(parser.parse_args([str(a), str(same), "--strict"])) == 0
    assert compare.run(parser.parse_args([str(a), str(slow)])) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "test_a" in out
    (tmp_path / "bad.json").write_text(json.dumps({"hello": 1}))
    assert compare.run(parser.parse_args([str(a), str(tmp_path / "bad.json")])) == 2
    assert "neither a run directory nor pytest-benchmark's JSON" in capsys.readouterr().err
