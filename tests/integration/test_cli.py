"""The command line: a line per case as it goes, exit codes that gate CI, Ctrl-C, a one-off run of your own model,
outside plugins reaching the worker, calibrate into a file you name, --version."""

from __future__ import annotations

import json
import signal
import textwrap
import time

import pytest

from ntk_bench import __version__
from ntk_bench.bench import cli as cli_module
from ntk_bench.bench.execution import runner
from tests.helpers.runner_helpers import cli, cli_env, seed_reference, start_cli

SMOKE_ARCH = {"name": "mlp", "params": {"in_features": 4, "width": 8, "depth": 1}, "N": [3], "O": [2]}


def _sweep(folder, impls, name="s"):
    f = folder / f"{name}.json"
    f.write_text(json.dumps({"name": name, "impls": impls, "time_budget_s": 0.01, "timeout_s": 120,
                             "arch": [SMOKE_ARCH]}))
    return f


def main(capsys, *args) -> tuple[int, str]:
    """``ntk-bench ARGS`` in this process: (exit code, stderr)."""
    try:
        code = cli_module.main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_version_and_bad_arguments_are_one_line(capsys):
    out = cli("--version")  # the installed entry: python -m ntk_bench
    assert out.returncode == 0 and out.stdout.strip() == f"ntk-bench {__version__}"
    for args, message in [(["--timeout", "nan"], "--timeout: expected a positive finite number of seconds"),
                          (["--memory-budget", "0"], "--memory-budget: expected a positive finite number of GiB"),
                          (["--workers", "0"], "--workers: expected a positive integer"),
                          (["--fail-on", "mismatch,bogus"], "--fail-on: unknown status bogus"),
                          (["--retry-failed"], "--retry-failed goes with --resume"),
                          (["--sweep", "/"], "/: is a directory, not a sweep file")]:
        code, err = main(capsys, "run", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_a_run_reports_each_case_and_its_exit_code_gates_ci(tmp_path, smoke_reference, fault_plugins, capsys):
    """A mismatching plugin from outside (--plugin, loaded by the worker too): a line per case, the tally, exit 1;
    --fail-on none lets it pass; --require-reference fails rows checked only against the harness."""
    run_dir = tmp_path / "run"
    seed_reference(smoke_reference, run_dir)
    sweep = _sweep(tmp_path, ["explicit_mlp", "fault_wrong"])
    code, err = main(capsys, "run", "--sweep", sweep, "--out", run_dir, "--plugin", "runner_faults")
    assert code == 1, err
    lines = err.splitlines()
    ok = next(line for line in lines if line.startswith("[") and " ok " in line)
    assert ok.startswith(("[1/2]", "[2/2]")) and " ± " in ok and "explicit_mlp/mlp(" in ok and "ETA" in ok
    assert any(line.startswith(("[1/2] mismatch", "[2/2] mismatch")) and "fault_wrong/" in line for line in lines)
    assert any("2 of 2 cases: 1 ok, 1 mismatch; this run: 2 row(s)" in line for line in lines)
    assert any(line.startswith("error: 1 mismatch (--fail-on error,mismatch); e.g. fault_wrong/") for line in lines)
    code, err = main(capsys, "run", "--sweep", sweep, "--out", run_dir, "--plugin", "runner_faults", "--resume",
                     "--fail-on", "none", "--require-reference")
    assert code == 0 and "nothing to do" in err, err
    # the same run, against a harness reference: --require-reference fails it
    header, rows = runner.read_results(run_dir / "results.jsonl")
    path = run_dir / "results.jsonl"
    path.write_text("\n".join(json.dumps(o) for o in [{"header": header}] + [
        {**r, "reference": "harness:jacobian_contraction:float64:cpu"} for r in rows]) + "\n")
    code, err = main(capsys, "run", "--sweep", sweep, "--out", run_dir, "--plugin", "runner_faults", "--resume",
                     "--fail-on", "none", "--require-reference")
    assert code == 1 and "2 computed row(s) not checked against neural-tangents" in err


def test_ctrl_c_finishes_the_running_case_says_how_to_resume_and_exits_130(tmp_path, smoke_reference, fault_plugins,
                                                                         capsys):
    run_dir = tmp_path / "run"
    seed_reference(smoke_reference, run_dir)
    sweep = _sweep(tmp_path, ["fault_started", "explicit_mlp"])
    pidfile = tmp_path / "pid"
    proc = start_cli("run", "--sweep", sweep, "--out", run_dir, "--plugin", "runner_faults",
                     env=cli_env(NTKB_TEST_PIDFILE=pidfile, NTKB_TEST_SLEEP_S=1))
    try:
        deadline = time.monotonic() + 180
        while not pidfile.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # the test failed: leave no runner behind (its worker dies with it)
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "finishing the running case(s)" in err and "Traceback" not in err
    resume = next(line for line in err.splitlines() if "resume with:" in line)
    assert "interrupted (SIGINT): 1 of 2 cases done" in resume and resume.rstrip().endswith("--resume")
    _, rows = runner.read_results(run_dir / "results.jsonl")
    assert [(r["impl"], r["status"]) for r in rows] == [("fault_started", "ok")]  # finished, not killed
    command = resume.split("resume with: ", 1)[1].split()[1:]  # the same arguments, with --resume
    code, err = main(capsys, *command)
    assert code == 0, err
    assert sorted(r["impl"] for r in runner.read_results(run_dir / "results.jsonl")[1]) == ["explicit_mlp",
                                                                                          "fault_started"]


def test_a_one_off_run_of_your_own_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "net.py").write_text(textwrap.dedent('''
        from torch import nn

        def make(width=4):
            return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 2))

        def broken():
            raise ValueError("no such layer")
    '''))
    monkeypatch.chdir(tmp_path)
    code, err = main(capsys, "run", "--model", "net.py:make", "--input-shape", "5", "--param", "width=3", "--N", "3",
                     "--impls", "structured,explicit_mlp", "--out", tmp_path / "run", "--no-progress")
    assert code == 0, err
    header, rows = runner.read_results(tmp_path / "run" / "results.jsonl")
    assert header["sweep"] == "make" and {r["status"] for r in rows} == {"ok"}
    assert {r["arch"] for r in rows} == {"make"} and {r["P"] for r in rows} == {5 * 3 + 3 + 3 * 2 + 2}
    assert all(r["factory"] == f"{(tmp_path / 'net.py').resolve()}:make" for r in rows)
    for args, message in [(["--model", "net.py:broken", "--input-shape", "5"],
                           "error: broken(): cannot build the model: ValueError: no such layer"),
                          (["--model", "nothere.py:make", "--input-shape", "5"], "no such file"),
                          (["--model", "net.py:make"], "the factory returned a model alone; give its inputs")]:
        code, err = main(capsys, "run", *args, "--out", tmp_path / "bad")
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], err
        assert not (tmp_path / "bad").exists()  # before any work


def test_an_internal_value_error_shows_its_traceback_with_v(tmp_path, monkeypatch, capsys):
    """A ValueError from inside (a bug, not bad input) is one error line as usual, and with -v its traceback too."""
    def broken(*args, **kwargs):
        raise ValueError("an internal slip")

    monkeypatch.setattr(runner, "run", broken)
    sweep = _sweep(tmp_path, ["explicit_mlp"])
    code, err = main(capsys, "run", "--sweep", sweep, "--out", tmp_path / "run", "--no-progress")
    assert code == 2 and "error: an internal slip" in err and "Traceback" not in err, err
    code, err = main(capsys, "-v", "run", "--sweep", sweep, "--out", tmp_path / "run2", "--no-progress")
    assert code == 2 and "error: an internal slip" in err, err
    assert "Traceback (most recent call last)" in err and "in broken" in err, err


def test_calibrate_writes_only_where_told(tmp_path, monkeypatch):
    from ntk_bench.bench.measurement import calibrate as calibrate_module

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"case_id": f"c{i}", "impl": "structured", "arch": "mlp", "arch_params": "{}", "N": i, "M": i,
             "x2": "x1", "mode": "full", "dtype": "float32", "device": "cpu", "status": "ok", "est_flops": 1e6 * i,
             "time_median_s": 1e-3 + 1e-9 * 1e6 * i} for i in range(1, 5)]  # rows as the row schema has them
    (run_dir / "results.jsonl").write_text("\n".join(json.dumps(o) for o in [{"header": {}}] + rows) + "\n")
    with pytest.raises(SystemExit) as exit_info:  # --out is required: never into the package
        cli_module.main(["calibrate", str(run_dir)])
    assert exit_info.value.code == 2
    assert cli_module.main(["calibrate", str(run_dir), "--out", str(tmp_path)]) == 2  # a directory
    out = tmp_path / "cal.json"
    assert cli_module.main(["calibrate", str(run_dir), "--out", str(out)]) == 0
    fitted = json.loads(out.read_text())["cpu"]["structured"]
    assert fitted["cases"] == 4 and fitted["s_per_flop"] == pytest.approx(1e-9, rel=1e-3)
    assert calibrate_module  # the module the command uses


def test_compare_is_a_subcommand_imported_only_when_used():
    import importlib.util

    out = cli("compare", "--help")
    if importlib.util.find_spec("ntk_bench.bench.output.compare") is None:
        assert out.returncode == 2 and "compare is unavailable" in out.stderr
    else:
        assert out.returncode == 0 and "usage: ntk-bench compare" in out.stdout
    assert cli("--help").returncode == 0


def test_list_names_plugins_peers_architectures_and_sweeps(capsys):
    assert cli_module.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "plugins (ours): jacobian_contraction" in out and "peers: " in out
    assert "nt_structured_derivatives" in out and "smoke" in out and "resnet18" in out
