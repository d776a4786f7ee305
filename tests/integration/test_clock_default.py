"""make bench's clock: the process's CPU time with one thread on a machine without CUDA (a shared CPU runner is the
common case, and there two wall-clock threads measure their waiting), the wall clock where CUDA is present."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ntk_bench.bench import cli as cli_module
from ntk_bench.bench.execution import runner

SMALL = {"name": "s", "impls": ["explicit_mlp"], "time_budget_s": 0.01, "timeout_s": 120,
         "arch": [{"name": "mlp", "params": {"in_features": 4, "width": 8, "depth": 1}, "N": [3], "O": [2]}]}


def test_auto_is_cpu_without_cuda_and_wall_with_it():
    assert cli_module.resolve_clock("auto", cuda_available=False) == "cpu"
    assert cli_module.resolve_clock("auto", cuda_available=True) == "wall"
    assert cli_module.resolve_clock("wall", cuda_available=False) == "wall"
    assert cli_module.resolve_clock("cpu", cuda_available=True) == "cpu"


def test_run_clock_auto_on_a_machine_without_cuda_records_the_cpu_clock(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # (the other way is resolve_clock's test above)
    expected = "cpu"
    f = tmp_path / "s.json"
    f.write_text(json.dumps(SMALL))
    code = cli_module.main(["run", "--sweep", str(f), "--out", str(tmp_path / "run"), "--executor", "inline",
                            "--clock", "auto", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    header, rows = runner.read_results(tmp_path / "run" / "results.jsonl")
    assert header["clock"] == expected and rows[0]["clock"] == expected
    assert f"clock: {expected} (--clock auto" in err


def test_make_bench_passes_clock_auto_by_default():
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert re.search(r"^CLOCK \?= auto$", makefile, re.MULTILINE)
    bench = makefile[makefile.index("\nbench:"):].split("\n\n")[0]
    assert "--clock $(CLOCK) $(BENCH_ARGS)" in bench  # BENCH_ARGS after it: a --clock there wins


@pytest.mark.parametrize("executor", ["local", "inline"])
def test_a_cpu_clock_run_times_neural_tangents_on_one_core(tmp_path, nt_available, executor):
    """The CPU clock times torch on one thread; neural-tangents' XLA, which sizes its pool by the process's cores,
    gets one core too (NTK_BENCH_XLA_THREADS=1 for every job timed on the CPU clock, whichever executor runs it: in
    the inline executor's process JAX has already started for the reference, unheld, and is held when the case
    runs), and its rows say so (``xla_threads``); a bad value of the variable is refused in one line before any
    work."""
    import os

    from tests.helpers.runner_helpers import cli, cli_env

    f = tmp_path / "s.json"
    f.write_text(json.dumps({**SMALL, "impls": ["nt_structured_derivatives"]}))
    env = {k: v for k, v in cli_env().items() if k != "NTK_BENCH_XLA_THREADS"}
    out = cli("run", "--sweep", f, "--out", tmp_path / "run", "--clock", "cpu", "--no-progress",
              "--executor", executor, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    _, rows = runner.read_results(tmp_path / "run" / "results.jsonl")
    assert rows[0]["status"] == "ok" and rows[0]["xla_threads"] == 1
    if len(os.sched_getaffinity(0)) >= 2:  # (held to one core: no more CPU than wall time)
        assert rows[0]["cpu_over_wall"] < 1.1
    # the load average is weighed against the cores the worker was given, not the one it was held to
    assert rows[0]["cores"] == len(os.sched_getaffinity(0)) and rows[0]["cpu_affinity"] == sorted(os.sched_getaffinity(0))
    bad = cli("run", "--sweep", f, "--out", tmp_path / "bad", "--clock", "cpu", env={**env, "NTK_BENCH_XLA_THREADS": "0"})
    assert bad.returncode == 2 and "NTK_BENCH_XLA_THREADS='0': expected a whole number, 1 or more" in bad.stderr
