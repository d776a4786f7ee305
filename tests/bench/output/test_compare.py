"""`ntk-bench compare A B`: noise-aware verdicts and a CI exit code (the same code passes, a slowdown fails)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from ntk_bench.bench import sweeps
from ntk_bench.bench.output import compare

PARAMS = json.dumps({"depth": 1, "in_features": 4, "out": 2, "width": 8})
IMPLS = ("structured", "explicit_mlp", "jacobian_contraction", "autograd_loop", "ntk_vector_products", "auto")


def row(impl, n, t, blocks=None, status="ok", iqr=None):
    r = {"case_id": f"{impl}/mlp/N={n}/M=x1/full/float32/cpu", "impl": impl, "arch": "mlp", "arch_params": PARAMS,
         "N": n, "M": n, "x2": "x1", "mode": "full", "dtype": "float32", "device": "cpu", "O": 2, "status": status}
    if status in ("ok", "mismatch"):
        r["time_median_s"] = float(np.median(blocks)) if blocks is not None else t
        r["time_iqr_s"] = float(np.subtract(*np.percentile(blocks, [75, 25]))) if blocks is not None else iqr
        if blocks is not None:
            r["time_blocks_s"] = [float(b) for b in blocks]
    return r


def blocks(t, seed, k=15, sigma=0.02):
    """``k`` per-block times around ``t``, a tight spread (2%)."""
    return t * np.exp(np.random.default_rng(seed).normal(0, sigma, k))


def write(path: Path, rows) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    lines = [{"header": {"sweep": "t", "cpu_count": 2}}] + list(rows)
    (path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def synthetic(tmp_path, name, factor=1.0, seed=0, only=None, **kw):
    """A run of 12 cases with tight blocks; ``factor`` slows the cases ``only`` names (all by default)."""
    rows = []
    for i, impl in enumerate(IMPLS):
        for n in (4, 8):
            f = factor if only is None or (impl, n) in only else 1.0
            rows.append(row(impl, n, None, blocks(1e-3 * (i + 1) * n * f, seed * 1000 + i * 10 + n), **kw))
    return write(tmp_path / name, rows)


def run_compare(a, b, *extra, out=None):
    parser = compare.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(a), str(b), *extra] + ([] if out is None else ["--out", str(out)]))
    return compare.run(args)


def verdicts(a, b, **kw):
    from ntk_bench.bench.output import report

    res, shift = compare.compare_frames(report.load_run(a).df, report.load_run(b).df, **kw)
    return res.set_index("case_id"), shift


def test_synthetic_same_passes_and_two_fold_slower_fails(tmp_path, capsys):
    a = synthetic(tmp_path, "a", seed=1)
    same = synthetic(tmp_path, "same", seed=2)  # the same times, other noise
    slow = synthetic(tmp_path, "slow", factor=2.0, seed=3)
    assert run_compare(a, same, "--fail-above", "1.10") == 0
    assert "PASS" in capsys.readouterr().out
    assert run_compare(a, slow, "--fail-above", "1.10", out=tmp_path / "cmp") == 1
    text = capsys.readouterr().out
    assert "**FAIL**" in text and "12 slower" in text and "The median case is" in text
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 5000
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("# ntk-bench compare")
    res, _ = verdicts(a, slow)
    assert set(res["verdict"]) == {"slower"} and res["fail"].all() and (res["p"] < 1e-4).all()
    assert run_compare(a, slow, "--relative") == 1  # a 2x shift is beyond what --relative takes for the machine's
    assert "beyond --max-shift" in capsys.readouterr().out


def test_one_case_two_fold_slower_fails_alone(tmp_path):
    a = synthetic(tmp_path, "a", seed=1)
    b = synthetic(tmp_path, "b", factor=2.0, seed=2, only={("structured", 8)})
    res, shift = verdicts(a, b)
    assert shift.applied == pytest.approx(1.0, abs=0.03)
    assert res["fail"].sum() == 1 and res.loc["structured/mlp/N=8/M=x1/full/float32/cpu", "verdict"] == "slower"
    assert set(res.drop("structured/mlp/N=8/M=x1/full/float32/cpu")["verdict"]) == {"same"}
    assert run_compare(a, b) == 1
    # 1.05x slower, tight blocks: significant, but not by more than the factor
    assert run_compare(a, synthetic(tmp_path, "c", factor=1.05, seed=3, only={("structured", 8)})) == 0


def test_a_uniform_slowdown_fails_unless_relative_takes_it_for_the_machine(tmp_path):
    a = synthetic(tmp_path, "a", seed=1)
    busy = synthetic(tmp_path, "busy", factor=1.3, seed=2)
    res, shift = verdicts(a, busy)
    assert shift.applied == 1 and res["fail"].all(), "a uniform 1.3x slowdown must fail by default"
    assert run_compare(a, busy) == 1
    res, shift = verdicts(a, busy, relative=True)
    assert shift.applied == pytest.approx(1.3, rel=0.02) and set(res["verdict"]) == {"same"}
    assert run_compare(a, busy, "--relative") == 0
    assert run_compare(a, busy, "--relative", "--max-shift", "1") == 1


def test_noise_decides_between_same_and_slower(tmp_path):
    """The same 1.5x slowdown of one case: a verdict with tight blocks, none with blocks that overlap."""
    def runs(sigma, name):
        a = write(tmp_path / f"{name}a", [row(i, 4, None, blocks(1e-3, s, sigma=sigma)) for s, i in enumerate(IMPLS)])
        b = write(tmp_path / f"{name}b", [row(i, 4, None, blocks(1e-3 * (1.5 if i == "structured" else 1), s + 50,
                                                                 sigma=sigma)) for s, i in enumerate(IMPLS)])
        return verdicts(a, b)[0].set_index("impl").loc["structured"]

    assert runs(0.02, "tight")["verdict"] == "slower"
    assert runs(0.6, "noisy")["verdict"] == "same"
    # Without blocks: bands from the interquartile ranges.
    a = write(tmp_path / "iqr_a", [row(i, 4, 1e-3, iqr=1e-5) for i in IMPLS])
    b = write(tmp_path / "iqr_b", [row(i, 4, 2e-3 if i == "auto" else 1e-3, iqr=1e-5) for i in IMPLS])
    res = verdicts(a, b)[0].set_index("impl")
    assert res.loc["auto", "method"] == "IQR" and res.loc["auto", "fail"]
    b2 = write(tmp_path / "iqr_c", [row(i, 4, 2e-3 if i == "auto" else 1e-3, iqr=3e-3) for i in IMPLS])
    assert verdicts(a, b2)[0].set_index("impl").loc["auto", "verdict"] == "same"


def test_status_changes_and_missing_cases(tmp_path):
    base = [row(i, 4, 1e-3, iqr=1e-5) for i in IMPLS]
    a = write(tmp_path / "a", base + [row("backpack_batchgrad", 4, None, status="error"),
                                      row("backpack_sqrtggn", 4, None, status="unsupported"),
                                      row("autograd_loop", 16, 1e-3, iqr=1e-5)])
    b_rows = base[:-2] + [row("ntk_vector_products", 4, None, status="mismatch"),  # no time: a wrong kernel
                          row("auto", 4, None, status="oom"),
                          row("backpack_batchgrad", 4, 1e-3, iqr=1e-5),
                          row("backpack_sqrtggn", 4, None, status="unsupported"),
                          row("explicit_mlp", 32, 1e-3, iqr=1e-5)]
    b = write(tmp_path / "b", b_rows)
    res, _ = verdicts(a, b)
    assert res.loc[res["impl"] == "auto", "why"].item() == "status ok → oom"
    assert res.loc[res["impl"] == "ntk_vector_products", "fail"].item()
    assert res.loc[res["impl"] == "auto", "fail"].item()
    assert not res.loc[res["impl"] == "backpack_batchgrad", "fail"].item()  # error → ok: fixed, not a failure
    assert res.loc[res["impl"] == "backpack_sqrtggn", "why"].item() == "unsupported in both"
    assert res.loc["autograd_loop/mlp/N=16/M=x1/full/float32/cpu", "why"] == "only in A"
    assert res.loc["explicit_mlp/mlp/N=32/M=x1/full/float32/cpu", "why"] == "only in B"
    assert set(res.loc[~res["fail"] & (res["verdict"] == "n/a"), "impl"]) >= {"backpack_sqrtggn", "autograd_loop"}
    assert len(res) == 10
    assert run_compare(a, b) == 1
    # Cases only on one side alone never fail the gate.
    assert run_compare(write(tmp_path / "c", base), write(tmp_path / "d", base[:3])) == 0


def test_unusable_input_exits_2(tmp_path, capsys):
    a = write(tmp_path / "a", [row(i, 4, 1e-3, iqr=1e-5) for i in IMPLS])
    empty = write(tmp_path / "empty", [])
    assert run_compare(a, tmp_path / "missing") == 2
    assert run_compare(a, empty) == 2
    assert run_compare(a, a, "--fail-above", "0.5") == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "has no result rows" in err and "--fail-above must be" in err
    assert run_compare(a, a) == 0  # a run against itself


def test_rows_timed_with_different_clocks_are_not_compared(tmp_path):
    a = write(tmp_path / "a", [row(i, 4, 1e-3, iqr=1e-5) for i in IMPLS])
    b = write(tmp_path / "b", [{**row(i, 4, 3e-3, iqr=1e-5), "timer": "process_time"} for i in IMPLS])
    res, _ = verdicts(a, b)
    assert set(res["verdict"]) == {"n/a"}
    assert set(res["why"]) == {"not judged: timed differently (wall clock → process_time)"}
    assert run_compare(a, b) == 0
    assert run_compare(a, b, "--strict") == 1


def test_the_regression_gate_writes_a_run_compare_reads(tmp_path):
    """benchmarks/regression.py (make benchmark-save / -compare): a results file with per-block CPU times."""
    import subprocess
    import sys

    root = Path(__file__).parents[3]
    sweep = tmp_path / "tiny.toml"
    sweep.write_text('name = "tiny"\nimpls = ["structured", "explicit_mlp"]\ntime_budget_s = 0.02\n'
                     '[[arch]]\nname = "cnn"\nparams = { channels = 2, image = 8 }\nN = [2]\nO = [2]\n')
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "regression.py"), "--out", str(out),
                           "--sweep", str(sweep), "--processes", "2", "--rounds", "1", "--blocks", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    header, rows = lines[0]["header"], {r["impl"]: r for r in lines[1:]}
    assert header["timer"] == "process_time" and header["processes"] == 2 and header["torch_threads"] == 1
    assert rows["explicit_mlp"]["status"] == "unsupported" and "Conv2d" in rows["explicit_mlp"]["error"]
    ok = rows["structured"]
    assert ok["status"] == "ok" and ok["rel_err"] < 1e-4 and len(ok["time_blocks_s"]) == 6
    assert ok["cpu_threads"] == 1 and ok["time_median_s"] > 0
    assert run_compare(out, out) == 0


def test_the_regression_gate_marks_a_wrong_kernel_and_a_model_that_fails_to_build(monkeypatch):
    from ntk_bench import implementations
    from ntk_bench.bench.measurement import gate

    class TwiceTheKernel(implementations.NTKPlugin):
        name = "twice_the_kernel"

        def _kernel(self, model, x1, x2, mode):
            return 2 * implementations.get("jacobian_contraction")._kernel(model, x1, x2, mode)

    problem = sweeps.Problem("mlp", (("depth", 1), ("in_features", 4), ("out", 2), ("width", 8)), 3, None)
    implementations.register(TwiceTheKernel())
    try:
        wrong = gate.prepare(sweeps.Case("twice_the_kernel", problem, "full", "float32", "cpu"), 0.01, 3)
    finally:
        implementations.unregister("twice_the_kernel")
    assert wrong.row["status"] == "mismatch" and wrong.row["rel_err"] == pytest.approx(1.0)
    bad = sweeps.Problem("mlp", (("depth", 1), ("in_features", 4), ("out", 2), ("width", 8), ("activation", "nope")),
                         3, None)
    row = gate.prepare(sweeps.Case("structured", bad, "full", "float32", "cpu"), 0.01, 3)
    assert row["status"] == "error" and "nope" in row["error"]


def test_the_rank_test_needs_five_blocks_a_side_to_reach_one_percent():
    assert compare.rank_test_floor(3, 3) == pytest.approx(0.1)
    assert compare.rank_test_floor(5, 3) == pytest.approx(2 / 56)
    assert compare.min_blocks(0.01) == 5 and compare.min_blocks(0.05) == 4
    assert compare.rank_test_floor(5, 5) < 0.01 <= compare.rank_test_floor(4, 5)


def test_three_blocks_a_side_still_catch_a_three_fold_slowdown_but_are_not_judged(tmp_path, capsys):
    """A call longer than the budget used to get 3 blocks, which no rank test at 0.01 can call slower: the band
    decides, the case says it was not judged, and --strict fails on it."""
    a = synthetic(tmp_path, "a", seed=1)
    few_a = write(tmp_path / "fa", [row("structured", 4, None, blocks(1e-2, 7, k=3))] +
                  [row(i, 4, None, blocks(1e-3, s, k=9)) for s, i in enumerate(IMPLS[1:])])
    few_b = write(tmp_path / "fb", [row("structured", 4, None, blocks(3e-2, 8, k=3))] +
                  [row(i, 4, None, blocks(1e-3, s + 30, k=9)) for s, i in enumerate(IMPLS[1:])])
    res, _ = verdicts(few_a, few_b)
    s = res.set_index("impl").loc["structured"]
    assert s["verdict"] == "slower" and s["fail"] and not s["judged"] and "not judged: 3/3 blocks" in s["method"]
    assert res.set_index("impl").drop("structured")["judged"].all()
    assert run_compare(few_a, few_b) == 1
    same_b = write(tmp_path / "sb", [row("structured", 4, None, blocks(1e-2, 9, k=3))] +
                   [row(i, 4, None, blocks(1e-3, s + 60, k=9)) for s, i in enumerate(IMPLS[1:])])
    capsys.readouterr()
    assert run_compare(few_a, same_b) == 0
    assert "1 not judged" in capsys.readouterr().out
    assert run_compare(few_a, same_b, "--strict") == 1
    assert "**FAIL** (--fail-above 1.1, --strict)" in capsys.readouterr().out
    assert run_compare(a, synthetic(tmp_path, "a2", seed=2), "--strict") == 0  # 15 blocks a side: all judged


def test_runs_with_no_or_few_cases_in_common_exit_2(tmp_path, capsys):
    mlp = [row(i, 4, None, blocks(1e-3, s)) for s, i in enumerate(IMPLS)]
    other = [{**r, "case_id": r["case_id"].replace("mlp", "cnn")} for r in mlp]
    a, b = write(tmp_path / "a", mlp), write(tmp_path / "b", other)
    assert run_compare(a, b) == 2
    assert "only 0 of the 12 cases are in both" in capsys.readouterr().err
    assert run_compare(a, write(tmp_path / "c", mlp[:2] + other[2:])) == 2  # 2 of 10
    assert "only 2 of the 10 cases" in capsys.readouterr().err
    assert run_compare(a, write(tmp_path / "d", mlp[:3])) == 0  # 3 of 6: half
