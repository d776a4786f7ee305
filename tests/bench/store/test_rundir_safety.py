"""A run directory from someone else, and bad files and settings: each fault injected.

Links and other non-files where ntk-bench writes (the lock, results.jsonl, worker.log, summary.md, results.csv,
figures, references), a results.jsonl that is not ntk-bench's or of a later format, a stale or tampered reference,
a folder holding a ``numpy.py``, the user's pinning variables, bad calibration files, and what the report makes of
long, clashing, NaN and hostile values.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ntk_bench.bench import cli, sweeps
from ntk_bench.bench.execution import runner
from ntk_bench.bench.execution.executors import process
from ntk_bench.bench.measurement import envcheck, one_case, references
from ntk_bench.bench.output import plots, report
from ntk_bench.bench.store import rundir, safefs
from tests.bench.execution.test_runner_faults import FakeExecutor, cases_of
from tests.helpers.runner_helpers import ROOT, cli_env

VICTIM_TEXT = "the user's own file\nlast line without a newline"


@pytest.fixture
def victim(tmp_path):
    """A file outside the run directory that a link inside it points at; it must stay as it was."""
    path = tmp_path / "elsewhere" / "precious.txt"
    path.parent.mkdir()
    path.write_text(VICTIM_TEXT)
    yield path
    assert path.read_text() == VICTIM_TEXT, "a file outside the run directory was changed"


def header_line(**extra) -> str:
    return json.dumps({"header": {"sweep": "s", "format_version": 1, **extra}}) + "\n"


# -- links and non-files in the run directory ------------------------------------------------------------------

def test_a_linked_lock_or_results_file_is_refused_and_its_target_untouched(tmp_path, victim):
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.LOCK).symlink_to(victim)
    with pytest.raises(rundir.RunDirError, match="symbolic link"):
        rundir.RunLock(run).acquire()
    with pytest.raises(rundir.RunDirError, match="symbolic link"):
        runner.run(cases_of(["structured"]), run, "s", executor=FakeExecutor(run))
    (run / rundir.LOCK).unlink()
    (run / rundir.RESULTS).symlink_to(victim)  # its unterminated last line would be cut by the torn-tail repair
    for resume in (False, True):
        with pytest.raises(rundir.RunDirError, match="symbolic link"):
            runner.run(cases_of(["structured"]), run, "s", executor=FakeExecutor(run), resume=resume)
    with pytest.raises(rundir.RunDirError, match="symbolic link"):
        rundir.ResultsFile(run / rundir.RESULTS).open()
    (run / rundir.RESULTS).unlink()
    (run / rundir.RESULTS).symlink_to(tmp_path / "nowhere")  # a dangling link is created through, too
    with pytest.raises(rundir.RunDirError, match="symbolic link"):
        runner.run(cases_of(["structured"]), run, "s", executor=FakeExecutor(run))
    assert not (tmp_path / "nowhere").exists()


def test_a_results_file_that_is_a_directory_or_a_fifo_gets_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    (run / rundir.RESULTS).mkdir(parents=True)
    with pytest.raises(rundir.RunDirError, match="is a directory"):
        runner.run(cases_of(["structured"]), run, "s", executor=FakeExecutor(run), resume=True)
    assert cli.main(["report", str(run), "--out", str(tmp_path / "out")]) == cli.EXIT_USAGE
    assert "not a regular file" in capsys.readouterr().err
    fifo_run = tmp_path / "fifo"
    fifo_run.mkdir()
    os.mkfifo(fifo_run / rundir.RESULTS)  # opened for writing, it would block until a reader came
    with pytest.raises(rundir.RunDirError, match="FIFO"):
        runner.run(cases_of(["structured"]), fifo_run, "s", executor=FakeExecutor(fifo_run), resume=True)


def test_a_linked_worker_log_is_refused(tmp_path, victim):
    log_path = tmp_path / "worker.log"
    log_path.symlink_to(victim)
    with pytest.raises(safefs.UnsafeFileError, match="symbolic link"):
        process.WorkerProcess(log_path).start()
    with pytest.raises(safefs.UnsafeFileError):
        safefs.open_append(log_path)


def test_report_never_writes_through_links_and_names_figures_by_digest(tmp_path, victim):
    from tests.bench.output.test_report import PARAMS, row, write_run

    run = write_run(tmp_path / "run", [header_line().strip(), row("structured"), row("explicit_mlp")])
    config = "mlp" + report._short_params(PARAMS)
    for name in ("summary.md", "results.csv", report.figure_name(config)):
        out = tmp_path / f"out-{name}"
        out.mkdir()
        (out / name).symlink_to(victim)
        with pytest.raises(safefs.UnsafeFileError, match="symbolic link"):
            report.write_report(run, out)
    report.write_report(run, tmp_path / "clean")
    assert (tmp_path / "clean" / report.figure_name(config)).is_file()


# -- not ntk-bench's file, a later format --------------------------------------------------------------------

def test_a_results_file_that_is_not_ntk_benchs_is_refused_without_force(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    foreign = "date,value\n2026-01-01,3\n"
    (run / rundir.RESULTS).write_text(foreign)
    for resume in (False, True):
        with pytest.raises(rundir.RunDirError, match="not an ntk-bench results file.*--resume --force"):
            runner.run(cases_of(["structured"]), run, "s", executor=FakeExecutor(run), resume=resume)
    assert (run / rundir.RESULTS).read_text() == foreign
    runner.run(cases_of(["structured"]), run, "s", executor=FakeExecutor(run), resume=True, force=True)
    text = (run / rundir.RESULTS).read_text()
    assert text.startswith(foreign) and f'"format_version": {rundir.FORMAT_VERSION}' in text


def test_the_format_version_is_written_and_a_later_one_refused_everywhere(tmp_path, capsys):
    run = tmp_path / "run"
    runner.run(cases_of(["structured"]), run, "s", executor=FakeExecutor(run))
    header, rows = rundir.read_results(run / rundir.RESULTS)
    assert header["format_version"] == rundir.FORMAT_VERSION and len(rows) == 1
    future = tmp_path / "future"
    future.mkdir()
    (future / rundir.RESULTS).write_text(header_line(format_version=rundir.FORMAT_VERSION + 1)
                                         + json.dumps(rows[0]) + "\n")
    before = (future / rundir.RESULTS).read_text()
    with pytest.raises(rundir.RunDirError, match=f"format {rundir.FORMAT_VERSION + 1} .*newer ntk-bench"):
        runner.run(cases_of(["structured", "explicit_mlp"]), future, "s", executor=FakeExecutor(future),
                   resume=True, force=True)
    assert (future / rundir.RESULTS).read_text() == before  # never extended
    assert cli.main(["report", str(future), "--out", str(tmp_path / "rep")]) == cli.EXIT_USAGE
    assert cli.main(["calibrate", str(future), "--out", str(tmp_path / "cal.json")]) == cli.EXIT_USAGE
    from ntk_bench.bench.output import compare

    assert compare.main([str(run), str(future)]) == 2
    err = capsys.readouterr().err
    assert err.count("newer ntk-bench") == 3 and "Traceback" not in err
    assert not (tmp_path / "rep" / "summary.md").exists() and not (tmp_path / "cal.json").exists()


# -- references ----------------------------------------------------------------------------------------------

FACTORY = """import torch

def make(out=2):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.{act}(), torch.nn.Linear(6, out))
"""


def _factory_case(path: Path, impl="jacobian_contraction"):
    spec = {"name": "mine", "impls": [impl], "modes": ["full"], "dtypes": ["float64"], "devices": ["cpu"],
            "time_budget_s": 0.01, "timeout_s": 60,
            "arch": [{"factory": f"{path}:make", "N": [3], "O": [2], "inputs": {"shape": [4]}}]}
    return sweeps.expand(spec)[0]


def test_a_changed_model_never_meets_its_old_reference(tmp_path, monkeypatch):
    """Tanh -> ReLU in the factory's file, same problem, same run directory: the old reference is not used (the
    case is checked against a new one) instead of every case being a false mismatch."""
    from ntk_bench.bench.zoo import architectures

    # the harness's float64 reference (neural-tangents' would do as well, in more time)
    monkeypatch.setattr(references, "_nt_reason", lambda model, example: "test: the harness's reference")
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY.format(act="Tanh"))
    case = _factory_case(factory)
    run = tmp_path / "run"
    assert references.ensure_reference(case.problem, run)["status"] == "ok"
    assert one_case.run_case(case, run)["status"] == "ok"
    factory.write_text(FACTORY.format(act="ReLU"))
    monkeypatch.setattr(architectures, "_FILE_MODULES", {})  # a new process would import the file afresh
    monkeypatch.setattr(references, "_DIGESTS", {})
    assert not references.reference_ok(case.problem, run)
    assert one_case.run_case(case, run)["status"] == "unchecked"  # not a mismatch against the Tanh kernel
    assert references.ensure_reference(case.problem, run)["status"] == "ok"
    row = one_case.run_case(case, run)
    assert row["status"] == "ok" and row["rel_err"] < 1e-10
    assert len(list((run / "references").glob("*.pt"))) == 2  # one per model, side by side


def test_a_changed_weight_changes_the_reference_key(tmp_path, monkeypatch):
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY.format(act="Tanh"))
    problem = _factory_case(factory).problem
    first = references.model_digest(problem)
    factory.write_text(FACTORY.format(act="Tanh").replace("manual_seed(0)", "manual_seed(1)"))
    from ntk_bench.bench.zoo import architectures

    monkeypatch.setattr(architectures, "_FILE_MODULES", {})
    monkeypatch.setattr(references, "_DIGESTS", {})
    assert references.model_digest(problem) != first


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_tampered_reference_never_runs_its_pickle(tmp_path, monkeypatch):
    """A .pt whose sha1 was rewritten in its record, loaded with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 set."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY.format(act="Tanh"))
    problem = _factory_case(factory).problem
    run = tmp_path / "run"
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"kernel": _Payload(str(marker))}, buf)
    data = buf.getvalue()
    path = references._reference_path(problem, run)
    path.parent.mkdir(parents=True)
    path.with_suffix(".pt").write_bytes(data)
    references.write_reference_record(problem, run, {"status": "ok", "sha1": hashlib.sha1(data).hexdigest(),
                                                  "block": [3, 3], "source": "harness:x"})
    record, kernel = references.load_reference(problem, run)
    assert kernel is None and record["status"] == "error" and "unreadable" in record["error"]
    assert not marker.exists()


def test_a_linked_references_folder_is_refused(tmp_path):
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY.format(act="Tanh"))
    problem = _factory_case(factory).problem
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "theirs").mkdir()
    (run / "references").symlink_to(tmp_path / "theirs")
    with pytest.raises(safefs.UnsafeFileError, match="not a directory"):
        references.ensure_reference(problem, run)
    assert not list((tmp_path / "theirs").iterdir())


# -- the import path -----------------------------------------------------------------------------------------

SHADOW = "open({marker!r}, 'a').write('{name}\\n')\nraise ImportError('the shadowing {name}.py was imported')\n"


def _shadowed_folder(tmp_path) -> tuple[Path, Path]:
    folder = tmp_path / "downloaded"
    folder.mkdir()
    marker = tmp_path / "imported"
    for name in ("numpy", "pydantic", "jax", "pandas"):
        (folder / f"{name}.py").write_text(SHADOW.format(marker=str(marker), name=name))
    return folder, marker


def test_the_runner_does_not_import_from_the_current_directory(tmp_path):
    folder, marker = _shadowed_folder(tmp_path)
    env = cli_env()
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "ntk_bench", "list"], check=False, cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists(), marker.read_text()


def test_a_worker_does_not_import_from_the_current_directory(tmp_path, monkeypatch):
    folder, marker = _shadowed_folder(tmp_path)
    monkeypatch.chdir(folder)
    worker = process.WorkerProcess(tmp_path / "worker.log")
    try:
        ready = worker.start()
    finally:
        worker.stop()
    assert ready["pid"] > 0
    assert not marker.exists(), marker.read_text()
    assert str(folder) not in process.worker_pythonpath().split(os.pathsep)


def test_plugin_puts_the_current_directory_on_the_path_and_says_so(tmp_path, monkeypatch, caplog):
    from ntk_bench import implementations

    (tmp_path / "my_cwd_plugin.py").write_text(
        "from ntk_bench.implementations.plugins.jacobian_contraction import JacobianContraction\n\n\n"
        "class Mine(JacobianContraction):\n    name = 'my_cwd_plugin'\n\n\nplugin = Mine()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.setattr(process, "PLUGIN_PATHS", [])
    with caplog.at_level(logging.INFO, logger="ntk_bench"):
        cli._load_plugins([])
        assert str(tmp_path) not in sys.path and not caplog.records
        try:
            cli._load_plugins(["my_cwd_plugin"])
        finally:
            implementations.unregister("my_cwd_plugin")
            sys.modules.pop("my_cwd_plugin", None)
    assert str(tmp_path) in sys.path and process.PLUGIN_PATHS == [str(tmp_path)]
    assert str(tmp_path) in process.worker_pythonpath().split(os.pathsep)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "current directory" in lines[0] and str(tmp_path) in lines[0]


# -- the environment -----------------------------------------------------------------------------------------

def test_the_users_pinning_is_checked_recorded_and_said(tmp_path, monkeypatch):
    monkeypatch.setenv("NTK_BENCH_THREADS", "1")
    notes = []

    class Notes(runner.Reporter):
        def note(self, message, level=logging.WARNING):
            notes.append(message)

    runner.run(cases_of(["structured"]), tmp_path / "a", "s", executor=FakeExecutor(tmp_path / "a"),
               reporter=Notes())
    header, _ = rundir.read_results(tmp_path / "a" / rundir.RESULTS)
    assert header["worker_env"] == {"NTK_BENCH_THREADS": "1"} and header["cpu_threads"] == 1
    assert any("NTK_BENCH_THREADS=1" in n and "every worker" in n for n in notes)
    monkeypatch.delenv("NTK_BENCH_THREADS")
    with pytest.raises(runner.RunDirError, match="worker_env"):  # a resume without it: another environment
        runner.run(cases_of(["structured"]), tmp_path / "a", "s", executor=FakeExecutor(tmp_path / "a"),
                   resume=True)
    for var, value in (("NTK_BENCH_THREADS", "two"), ("NTK_BENCH_THREADS", "0"), ("NTK_BENCH_CPUS", "0,x"),
                       ("NTK_BENCH_CPUS", "100000"), ("NTK_BENCH_WORKER_STARTUP_S", "abc"),
                       ("NTK_BENCH_WORKER_STARTUP_S", "nan"), ("NTK_BENCH_WORKER_STARTUP_S", "-1")):
        monkeypatch.setenv(var, value)
        with pytest.raises(ValueError, match=f"{var}={value!r}"):
            runner.run(cases_of(["structured"]), tmp_path / "b", "s", executor=FakeExecutor(tmp_path / "b"))
        monkeypatch.delenv(var)
    assert not (tmp_path / "b").exists()
    assert envcheck.startup_seconds({"NTK_BENCH_WORKER_STARTUP_S": "12.5"}) == 12.5


def test_a_bad_startup_limit_is_a_usage_error_of_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NTK_BENCH_WORKER_STARTUP_S", "abc")
    (tmp_path / "factory.py").write_text(FACTORY.format(act="Tanh"))
    code = cli.main(["run", "--model", f"{tmp_path}/factory.py:make", "--input-shape", "4", "--out",
                     str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and "NTK_BENCH_WORKER_STARTUP_S='abc'" in err and "Traceback" not in err


# -- calibration files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, words", [
    ("{not json", "not JSON"),
    ('["cpu"]', "dictionary"),
    ('{"cpu": {"structured": {"overhead_s": -1, "s_per_flop": 1e-10}}}', "greater than or equal to 0"),
    ('{"cpu": {"structured": {"overhead_s": NaN, "s_per_flop": 1e-10}}}', "finite"),
    ('{"cpu": {"structured": {"overhead_s": 0.001}}}', "s_per_flop"),
    ('{"tpu": {"structured": {"overhead_s": 0.001, "s_per_flop": 1e-10}}}', "tpu"),
    ('{"cpu": {"structured": 3}}', "structured"),
])
def test_a_bad_calibration_file_falls_back_with_one_warning(tmp_path, monkeypatch, text, words):
    from ntk_bench.implementations.plugins import auto

    bad = tmp_path / "cal.json"
    bad.write_text(text)
    monkeypatch.setenv(auto.CALIBRATION_ENV, str(bad))
    with pytest.warns(auto.CalibrationWarning) as caught:
        table = auto.load_calibration()
    assert table == json.loads(auto.CALIBRATION_FILE.read_text())  # the packaged constants, untouched
    message = str(caught[0].message)
    assert words in message and str(bad) in message and "\n" not in message
    assert words in envcheck.calibration_problem() and "packaged constants" in envcheck.calibration_problem()
    with pytest.warns(auto.CalibrationWarning):
        assert auto.Auto().calibration["cpu"]  # auto still predicts


def test_calibrate_refuses_a_non_json_out_and_says_when_nothing_was_fitted(tmp_path, capsys):
    from tests.bench.output.test_report import row, write_run

    run = write_run(tmp_path / "run", [header_line().strip(), row("structured")])  # no est_flops: nothing to fit
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, not JSON\n")
    assert cli.main(["calibrate", str(run), "--out", str(notes)]) == cli.EXIT_USAGE
    assert notes.read_text() == "my notes, not JSON\n"
    assert cli.main(["calibrate", str(run), "--out", str(tmp_path / "new.json")]) == cli.EXIT_FAILED
    assert not (tmp_path / "new.json").exists()
    err = capsys.readouterr().err
    assert "not JSON" in err and "nothing to fit" in err and "Traceback" not in err
    rows = [row("structured", n=n, est_flops=1e6 * n, time_median_s=1e-3 + 1e-9 * n) for n in (2, 4, 8)]
    write_run(tmp_path / "run2", [header_line().strip(), *rows])
    assert cli.main(["calibrate", str(tmp_path / "run2"), "--out", str(tmp_path / "new.json")]) == cli.EXIT_OK
    from ntk_bench.implementations.plugins import auto

    assert auto.read_calibration(tmp_path / "new.json")["cpu"]["structured"]["cases"] == 3


# -- the report: long, clashing, NaN and hostile values; the CLI's lines ------------------------------------

def test_clashing_and_long_configurations_and_a_nan_row_still_give_a_report(tmp_path):
    from tests.bench.output.test_report import row, write_run

    params = [{"depth": 1, "tag": "a.b"}, {"depth": 1, "tag": "a,b"}, {"depth": 1, "tag": "x" * 300}]
    rows = [row("structured", arch_params=json.dumps(p), case_id=f"c{k}") for k, p in enumerate(params)]
    bad = '{"case_id": "nan", "impl": "structured", "arch": "mlp", "N": NaN, "status": "ok"}'
    inf_m = row("explicit_mlp", M=float("inf"), case_id="infm")
    run = write_run(tmp_path / "run", [header_line().strip(), *rows, bad, inf_m])
    summary = report.write_report(run, tmp_path / "out")
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png") if p.name != "time_vs_predicted_flops.png")
    assert len(pngs) == 4 and all(len(p) < 100 for p in pngs)  # three configurations + the inf-M row's
    text = summary.read_text()
    assert all(f"]({p})" in text for p in pngs) and "1 rows lack impl, arch or N" in text
    assert report.figure_name("mlp(tag=a.b)") != report.figure_name("mlp(tag=a,b)")


def test_hostile_text_stays_text_in_summary_md(tmp_path):
    from tests.bench.output.test_report import row, write_run

    hostile = {"tag": "<script>alert(1)</script>|![x](https://evil.example/t.png)"}
    rows = [row("structured", arch_params=json.dumps(hostile)),
            row("<iframe src=//evil>", status="error", error="boom\n# Injected heading\n| a | b |"),
            row("explicit_mlp", status="mismatch", rel_err=0.5)]
    run = write_run(tmp_path / "run", [header_line(sweep="<img src=x onerror=alert(1)>").strip(), *rows])
    text = report.write_report(run, tmp_path / "out").read_text()
    for bad in ("<script", "<iframe", "<img", "\n# Injected"):
        assert bad not in text, bad
    assert not re.search(r"(?<!\\)\]\(https://evil", text)  # no link or image: its brackets escaped
    assert "&lt;script&gt;" in text and "\\# Injected" in text
    for line in text.splitlines():
        if line.startswith("|") and "---" not in line:  # every table row has as many cells as its header
            cells = line.replace("\\|", "").count("|")
            assert cells == line.replace("\\|", "").count("|") and cells >= 2
    tables = [block for block in text.split("\n\n") if block.startswith("|")]
    for block in tables:
        counts = {ln.replace("\\|", "").count("|") for ln in block.splitlines()}
        assert len(counts) == 1, block


def test_report_and_compare_out_errors_are_one_line_with_the_usage_code(tmp_path, capsys, monkeypatch):
    from ntk_bench.bench.output import compare
    from tests.bench.output.test_report import row, write_run

    run = write_run(tmp_path / "run", [header_line().strip(), row("structured"), row("explicit_mlp")])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert cli.main(["report", str(run), "--out", str(a_file)]) == cli.EXIT_USAGE
    assert compare.main([str(run), str(run), "--out", str(a_file)]) == 2  # not 1, the failed gate's code
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    assert cli.main(["report", str(run), "--out", str(dangling)]) == cli.EXIT_USAGE
    (tmp_path / "factory.py").write_text(FACTORY.format(act="Tanh"))
    assert cli.main(["run", "--model", f"{tmp_path}/factory.py:make", "--input-shape", "4", "--out",
                     str(dangling), "--no-progress"]) == cli.EXIT_USAGE
    real_open = os.open

    def read_only(path, flags, *a, **k):  # a read-only file system under out/ (root ignores chmod)
        if str(path).startswith(str(tmp_path / "ro")) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", read_only)
    assert cli.main(["report", str(run), "--out", str(tmp_path / "ro")]) == cli.EXIT_USAGE
    assert compare.main([str(run), str(run), "--out", str(tmp_path / "ro")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("is a file, not a directory") == 2
    assert err.count("which does not exist") == 2 and err.count("read-only file system") == 2


def test_plots_kinds_come_from_the_rows_without_the_registry():
    plots.IS_PEER.pop("someones_routine", None)
    assert not plots.is_peer("someones_routine")
    plots.IS_PEER["someones_routine"] = True
    try:
        assert plots.is_peer("someones_routine")
    finally:
        plots.IS_PEER.pop("someones_routine")
