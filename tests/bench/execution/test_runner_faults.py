"""Issue 14's faults, each injected: hangs, kills, crashes, concurrent runners, bad files, read-only and full disks.

Worker processes are real (the local executor); the faults come from the plugins in
``tests/helpers/runner_faults.py``, a ``sitecustomize`` that slows a worker's start-up, signals sent to real
processes, and (for the disk) a tiny tmpfs where this user may mount one, or ``os.write`` made to fail.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ntk_bench.bench import sweeps
from ntk_bench.bench.execution import runner
from ntk_bench.bench.execution.executors import InlineExecutor, JobFuture, LocalExecutor
from ntk_bench.bench.measurement import environment, memory, one_case, references, sysinfo
from ntk_bench.bench.store import rundir
from tests.helpers.runner_helpers import cli, cli_env, pid_alive, seed_reference, start_cli

SMOKE_ARCH = {"name": "mlp", "params": {"in_features": 4, "width": 8, "depth": 1}, "N": [3], "O": [2]}


def cases_of(impls, timeout_s=60.0, **spec):
    return sweeps.expand({"name": "smoke", "impls": impls, "time_budget_s": 0.01, "timeout_s": timeout_s,
                          "arch": [SMOKE_ARCH], **spec})


class FakeExecutor(InlineExecutor):
    """Rows made up from a table (impl -> status), without computing anything: for the runner's own logic."""

    name = "fake"

    def __init__(self, run_dir, statuses=None, reference="ok", filler=0):
        super().__init__(run_dir)
        self.statuses, self.reference, self.filler, self.jobs = statuses or {}, reference, filler, []

    def submit(self, job):
        self.jobs.append(job.id)
        fut = JobFuture(job)
        fut.set_running_or_notify_cancel()
        fut.started_at = time.time()
        if job.task == "reference":
            row = {"status": self.reference, "error": None if self.reference == "ok" else "injected"}
        elif job.task == "paired":  # a group's side-by-side rounds: a record with no rounds
            row = {"status": "ok", "times_s": {}, "median_s": {}}
        else:
            status = self.statuses.get(job.payload.impl, "ok")
            row = {"status": status, "time_median_s": 1e-3, "reference": "neural_tangents:structured_derivatives",
                   "rel_err": float("nan") if status == "mismatch" else 1e-9}
            if self.filler:  # a long row (a declared text field of the row schema)
                row["reference_note"] = "x" * self.filler
        fut.finish(row, "fake")
        return fut


def statuses(path) -> dict:
    return {cid: r["status"] for cid, r in rundir.latest_rows(runner.read_results(path)[1]).items()}


# a sitecustomize: the second Python process started with it (the worker replacing the hung one) starts 6 s late
SLOW_SECOND_START = """import os, time
from pathlib import Path
counter = Path({counter!r})
n = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(n))
if n == 2:
    time.sleep(6)
"""


# -- one run, every fault a worker can meet ------------------------------------------------------------------

def test_each_fault_is_named_and_none_poisons_the_next_case(tmp_path, smoke_reference, fault_plugins, monkeypatch):
    """A hang, a SIGKILL, an out-of-memory kill, an abort, an exception, a 1% error and NaNs; the worker that
    replaces the hung one takes longer to start (6 s more) than the timeout (4 s): every case after a fault still
    runs, in a fresh worker whose start-up is not charged to it. A SIGKILL is `oom` only when the kernel's OOM
    counter went up (here a file the OOM fault bumps, read in place of the kernel's), and the case is then run
    again blocked under a budget that fits the memory limit."""
    oom_counter = tmp_path / "oom_kills"
    oom_counter.write_text("0")
    monkeypatch.setenv("NTKB_TEST_OOM_COUNTER", str(oom_counter))
    monkeypatch.setattr(sysinfo, "oom_kill_count", lambda: (int(oom_counter.read_text() or 0), "memory.events (test)"))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_SECOND_START.format(counter=str(tmp_path / "starts")))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ["PYTHONPATH"]]))
    monkeypatch.setenv("NTKB_TEST_SLEEP_S", "600")
    run_dir = tmp_path / "run"
    seed_reference(smoke_reference, run_dir)
    impls = ["fault_sleep", "explicit_mlp", "fault_selfkill", "structured", "fault_oom_kill", "fault_abort",
             "fault_error", "fault_wrong", "fault_nan", "jacobian_contraction"]
    cases = cases_of(impls, timeout_s=4.0)
    summary = runner.run(cases, run_dir, "faults", plugins=("runner_faults",))
    rows = {r["impl"]: r for r in summary.rows.values()}
    assert {i: rows[i]["status"] for i in impls} == {
        "fault_sleep": "timeout", "explicit_mlp": "ok", "fault_selfkill": "killed", "structured": "ok",
        "fault_oom_kill": "ok", "fault_abort": "error", "fault_error": "error", "fault_wrong": "mismatch", "fault_nan": "mismatch",
        "jacobian_contraction": "ok"}
    assert "the worker's start-up not counted" in rows["fault_sleep"]["error"]
    assert rows["fault_sleep"]["O"] == 2 and rows["fault_sleep"]["P"] == 58  # sizes known without an answer
    assert rows["explicit_mlp"]["worker_startup_s"] > 6.0  # the replacement's start-up: longer than the timeout
    assert "worker killed by SIGKILL (not by the OOM killer" in rows["fault_selfkill"]["error"]
    oom = rows["fault_oom_kill"]
    assert oom["blocked_after_oom"] and 0 < oom["memory_budget_bytes"] <= sysinfo.cpu_memory_budget() * 1.5
    assert "the kernel's OOM killer" in oom["first_try_error"] and oom["rel_err"] <= 1e-4
    assert "SIGABRT" in rows["fault_abort"]["error"] and "about to abort" in rows["fault_abort"]["error"]  # the log's tail
    assert "fault_error: injected failure" in rows["fault_error"]["error"]
    assert 0.005 < rows["fault_wrong"]["rel_err"] < 0.02
    assert rows["fault_nan"]["rel_err"] is None and "NaN" in rows["fault_nan"]["error"]
    text = (run_dir / "results.jsonl").read_text()
    assert "NaN" not in text.replace('"error": "the kernel has NaN', "")  # strict JSON: no bare NaN token
    for line in text.splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_the_blocked_retry_budget_respects_the_cgroup_and_address_space_limits(monkeypatch):
    monkeypatch.setattr(sysinfo, "available_memory", lambda: 64 << 30)
    monkeypatch.setattr(sysinfo, "cgroup_memory_headroom", lambda: 2 << 30)
    monkeypatch.setattr(sysinfo, "address_space_headroom", lambda: None)
    assert sysinfo.cpu_memory_budget() == 1 << 30
    monkeypatch.setattr(sysinfo, "address_space_headroom", lambda: 1 << 30)
    assert memory.safe_memory_budget("cpu") == 1 << 29


def test_the_oom_counter_is_read_where_the_kernel_keeps_it():
    count = sysinfo.oom_kill_count()
    if count is None:
        pytest.skip("no cgroup memory.events / memory.oom_control and no /proc/vmstat oom_kill here")
    assert count[0] >= 0 and ("oom" in count[1] or "vmstat" in count[1])


# -- the run directory: lock, orphans ----------------------------------------------------------------------------

def _wait_for(predicate, timeout=120.0, what="a condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _sweep_file(folder: Path, impls) -> Path:
    f = folder / "sweep.json"
    f.write_text(json.dumps({"name": "hang", "impls": impls, "time_budget_s": 0.01, "timeout_s": 600,
                             "arch": [SMOKE_ARCH]}))
    return f


def test_a_second_runner_is_refused_and_no_worker_outlives_its_runner(tmp_path, smoke_reference):
    """Three runners, each with a worker computing a case that hangs: the first is SIGKILLed (after a second runner
    on its directory was refused with one line), the second gets SIGTERM, the third Ctrl-C twice. Every worker
    dies with its runner, and the dead runner's lock is released by the kernel."""
    runs = {}
    for how in ("SIGKILL", "SIGTERM", "SIGINT twice"):
        d = tmp_path / how.replace(" ", "_")
        d.mkdir()
        seed_reference(smoke_reference, d / "run")
        runs[how] = (d, start_cli("run", "--sweep", _sweep_file(d, ["fault_started"]), "--out", d / "run",
                                  "--plugin", "runner_faults", "--no-progress",
                                  env=cli_env(NTKB_TEST_PIDFILE=d / "pid")))
    try:
        _check_runners(runs)
    finally:  # whatever failed, leave no runner behind (their workers die with them)
        for _, proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _check_runners(runs) -> None:
    workers = {}
    for how, (d, proc) in runs.items():
        pidfile = d / "pid"
        _wait_for(lambda: (pidfile.exists() and pidfile.read_text().strip()) or proc.poll() is not None,
                  what=f"the worker of the {how} runner to start its case")
        assert proc.poll() is None, proc.communicate()
        workers[how] = int(pidfile.read_text())
    d, first = runs["SIGKILL"]
    second = cli("run", "--sweep", d / "sweep.json", "--out", d / "run", "--resume", "--plugin", "runner_faults",
                 "--no-progress")
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is in use by another runner" in errors[0] and f"pid {first.pid}" in errors[0]
    assert runner.read_results(d / "run" / "results.jsonl")[1] == []  # and it wrote nothing

    runs["SIGKILL"][1].send_signal(signal.SIGKILL)
    runs["SIGTERM"][1].send_signal(signal.SIGTERM)
    ctrl_c = runs["SIGINT twice"][1]
    ctrl_c.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert ctrl_c.poll() is None and pid_alive(workers["SIGINT twice"])  # the first Ctrl-C waits for the case
    ctrl_c.send_signal(signal.SIGINT)
    for how, (d, proc) in runs.items():
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == {"SIGKILL": -9, "SIGTERM": 143, "SIGINT twice": 130}[how], (how, err)
        if how != "SIGKILL":
            assert "0 of 1 cases done; resume with: ntk-bench run" in err and "--resume" in err
        _wait_for(lambda: not pid_alive(workers[how]), timeout=10, what=f"the worker to die with its runner ({how})")
    rundir.RunLock(runs["SIGKILL"][0] / "run").acquire().release()  # the kernel released the dead runner's lock


# -- resume: the same run, or nothing ------------------------------------------------------------------------------

def test_resume_refuses_another_sweep_code_or_environment_and_says_what_differs(tmp_path, monkeypatch):
    runner.run(cases_of(["structured", "explicit_mlp"]), tmp_path, "s", executor=FakeExecutor(tmp_path))
    with pytest.raises(runner.RunExistsError, match="--resume"):
        runner.run(cases_of(["structured"]), tmp_path, "s", executor=FakeExecutor(tmp_path))
    with pytest.raises(runner.RunDirError) as info:
        runner.run(cases_of(["structured", "autograd_loop"]), tmp_path, "s", executor=FakeExecutor(tmp_path),
                   resume=True)
    assert "the sweep's cases" in str(info.value) and "1 of the file's cases are not in this sweep" in str(info.value)
    assert "--force" in str(info.value)
    monkeypatch.setattr(environment, "code_sha1", lambda: "0123456789ab")
    real_env = environment.environment
    monkeypatch.setattr(environment, "environment", lambda: {**real_env(), "torch": "9.9", "host": "elsewhere"})
    with pytest.raises(runner.RunDirError) as info:
        runner.run(cases_of(["structured", "explicit_mlp"]), tmp_path, "s", executor=FakeExecutor(tmp_path),
                   resume=True, retry_failed=True)
    lines = str(info.value).splitlines()
    assert any(line.strip().startswith("code_sha1:") and "-> '0123456789ab'" in line for line in lines)
    assert any("torch:" in line and "'9.9'" in line for line in lines) and any("host:" in line for line in lines)
    # --force: a new segment with its own header; the rows of both read back, the last of a case winning
    ex = FakeExecutor(tmp_path, {"structured": "error"})
    runner.run(cases_of(["structured", "explicit_mlp", "autograd_loop"]), tmp_path, "s", executor=ex, resume=True,
               force=True, retry_failed=True)
    header, rows = runner.read_results(tmp_path / "results.jsonl")
    assert header["segment"] == 1 and len(header["segments"]) == 2 and header["torch"] == "9.9"
    assert [h["segment"] for h in header["segments"]] == [0, 1]
    assert sorted(r["impl"] for r in rows) == ["autograd_loop", "explicit_mlp", "structured"]  # ok rows not rerun


def test_a_header_only_file_never_gets_a_second_header(tmp_path):
    cases = cases_of(["structured"])
    runner.run(cases, tmp_path, "s", executor=FakeExecutor(tmp_path), deadline_s=-1)  # stops before any case
    for _ in range(2):
        runner.run(cases, tmp_path, "s", executor=FakeExecutor(tmp_path), resume=True)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert sum('"header"' in line for line in lines) == 1 and len(lines) == 2
    # --force on a header-only file replaces its header rather than adding one
    runner.run(cases_of(["explicit_mlp"]), tmp_path / "b", "s", executor=FakeExecutor(tmp_path / "b"),
               deadline_s=-1)
    runner.run(cases_of(["structured"]), tmp_path / "b", "s", executor=FakeExecutor(tmp_path / "b"), resume=True,
               force=True)
    lines = (tmp_path / "b" / "results.jsonl").read_text().splitlines()
    assert sum('"header"' in line for line in lines) == 1 and len(lines) == 2


def test_retry_failed_reruns_timeout_oom_killed_error_and_unchecked_rows_and_the_last_row_wins(tmp_path):
    impls = ["structured", "explicit_mlp", "jacobian_contraction", "autograd_loop", "ntk_vector_products",
             "backpack_batchgrad"]
    bad = {"explicit_mlp": "timeout", "jacobian_contraction": "oom", "autograd_loop": "error",
           "ntk_vector_products": "killed", "backpack_batchgrad": "unchecked"}
    cases = cases_of(impls)
    runner.run(cases, tmp_path, "s", executor=FakeExecutor(tmp_path, bad))
    again = FakeExecutor(tmp_path)
    assert runner.run(cases, tmp_path, "s", executor=again, resume=True).nothing_to_do and again.jobs == []
    again = FakeExecutor(tmp_path)
    summary = runner.run(cases, tmp_path, "s", executor=again, resume=True, retry_failed=True)
    assert sorted(j.split("/")[0] for j in again.jobs if not j.startswith(("reference", "paired"))) == sorted(bad)
    assert set(statuses(tmp_path / "results.jsonl").values()) == {"ok"} and summary.counts == {"ok": 6}
    assert len(runner.read_results(tmp_path / "results.jsonl")[1]) == 11


def test_a_failed_reference_is_not_cached_and_its_rows_are_unchecked_until_it_works(tmp_path, monkeypatch):
    cases = cases_of(["explicit_mlp"])
    real = references.reference_block
    monkeypatch.setattr(references, "reference_block", lambda *a: (_ for _ in ()).throw(RuntimeError("injected")))
    runner.run(cases, tmp_path, "s", executor=InlineExecutor(tmp_path))
    (row,) = runner.read_results(tmp_path / "results.jsonl")[1]
    assert row["status"] == "unchecked" and "RuntimeError: injected" in row["error"] and row["reference"] == "none"
    monkeypatch.setattr(references, "reference_block", real)
    runner.run(cases, tmp_path, "s", executor=InlineExecutor(tmp_path), resume=True, retry_failed=True)
    assert list(statuses(tmp_path / "results.jsonl").values()) == ["ok"]


def test_a_reference_job_that_dies_is_recorded_and_tried_again(tmp_path):
    cases = cases_of(["explicit_mlp"])
    runner.run(cases, tmp_path, "s", executor=FakeExecutor(tmp_path, {"explicit_mlp": "unchecked"}, reference="killed"))
    record = references.read_reference_record(cases[0].problem, tmp_path)
    assert record["status"] == "killed"
    ex = FakeExecutor(tmp_path)
    runner.run(cases, tmp_path, "s", executor=ex, resume=True, retry_failed=True)
    assert ex.jobs[0].startswith("reference/")  # not cached: asked for again


def test_a_damaged_reference_file_is_recomputed(tmp_path, smoke_reference):
    seed_reference(smoke_reference, tmp_path)
    problem = cases_of(["structured"])[0].problem
    assert references.reference_ok(problem, tmp_path)
    pt = next((tmp_path / "references").glob("*.pt"))
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])  # truncated
    assert not references.reference_ok(problem, tmp_path)
    record, kernel = references.load_reference(problem, tmp_path)
    assert kernel is None and "damaged" in record["error"]
    assert references.ensure_reference(problem, tmp_path)["status"] == "ok" and references.reference_ok(problem, tmp_path)


def test_unreadable_lines_are_skipped_with_a_warning_on_resume(tmp_path, caplog):
    cases = cases_of(["structured", "explicit_mlp"])
    runner.run(cases[:1], tmp_path, "s", executor=FakeExecutor(tmp_path), force=True)
    path = tmp_path / "results.jsonl"
    with open(path, "ab") as f:
        f.write(b'\xff\xfe{"case_id": "not utf-8"}\n[1, 2]\n42\n"text"\n')
    # resume the same sweep (cases[:1]) and, forced, with a second case
    runner.run(cases, tmp_path, "s", executor=FakeExecutor(tmp_path), resume=True, force=True)
    assert "skipped 4 unreadable line(s)" in caplog.text and "not UTF-8" in caplog.text
    assert "a JSON list, not an object" in caplog.text
    assert sorted(statuses(path)) == sorted(c.id for c in cases)


def test_strict_json_writes_nan_and_infinity_as_null():
    line = rundir.dumps({"a": float("nan"), "b": [float("inf"), 1.0], "c": {"d": -float("inf")}})
    assert json.loads(line) == {"a": None, "b": [None, 1.0], "c": {"d": None}}


# -- read-only and full disks ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def read_only(path: Path):
    """``path`` read-only for this process: a read-only bind mount where we may mount, else no write permission."""
    if os.geteuid() == 0:
        ok = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0 and \
            subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True).returncode == 0
        if not ok:
            subprocess.run(["umount", str(path)], capture_output=True)
            pytest.skip("root here cannot make a read-only mount")
        try:
            yield
        finally:
            subprocess.run(["umount", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        for p in [path, *path.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p in [path, *path.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
            path.chmod(mode)


def test_a_complete_run_resumes_read_only_and_an_incomplete_one_says_why_it_cannot(tmp_path):
    run_dir = tmp_path / "run"
    cases = cases_of(["structured", "explicit_mlp"])
    runner.run(cases[:1], run_dir, "s", executor=FakeExecutor(run_dir))
    runner.run(cases[:1], run_dir, "s", executor=FakeExecutor(run_dir), resume=True)  # the lock file exists
    (run_dir / rundir.LOCK).unlink()
    with read_only(run_dir):
        summary = runner.run(cases[:1], run_dir, "s", executor=FakeExecutor(run_dir), resume=True)
        assert summary.nothing_to_do and summary.counts == {"ok": 1}
        with pytest.raises(runner.RunDirError) as info:
            runner.run(cases, run_dir, "s", executor=FakeExecutor(run_dir), resume=True, force=True)
        assert str(info.value).startswith(f"cannot write to {run_dir.resolve()}") and "\n" not in str(info.value)


def test_a_run_directory_that_cannot_be_created_gets_one_line(tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    with read_only(parent):
        with pytest.raises(runner.RunDirError) as info:
            runner.run(cases_of(["structured"]), parent / "run", "s", executor=FakeExecutor(parent / "run"))
    assert str(info.value).startswith(f"cannot write to {parent / 'run'}")


def test_a_full_disk_stops_the_run_with_one_line_and_a_valid_file(tmp_path, monkeypatch):
    """os.write fails with ENOSPC after three rows: the run stops, saying so; no half line is left behind."""
    cases = cases_of(["structured", "explicit_mlp", "jacobian_contraction", "autograd_loop", "ntk_vector_products"])
    writes = {"n": 0}
    real_write = os.write

    def write(fd, data):
        if fd == getattr(write, "rows_fd", None):
            writes["n"] += 1
            if writes["n"] > 4:  # the header, then three rows
                real_write(fd, bytes(data)[:10])  # part of the line got out
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    real_open = rundir.ResultsFile.open

    def open_(self):
        out = real_open(self)
        write.rows_fd = self.fd
        return out

    monkeypatch.setattr(rundir.ResultsFile, "open", open_)
    monkeypatch.setattr(rundir.os, "write", write)
    with pytest.raises(runner.RunDirError) as info:
        runner.run(cases, tmp_path, "s", executor=FakeExecutor(tmp_path))
    assert "no space left on device" in str(info.value) and "3 row(s) written" in str(info.value)
    monkeypatch.undo()
    text = (tmp_path / "results.jsonl").read_text()
    assert text.endswith("\n") and len([json.loads(line) for line in text.splitlines()]) == 4
    rundir.RunLock(tmp_path).acquire().release()  # released on the way out


def test_a_real_full_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        cases = cases_of(["structured", "explicit_mlp", "jacobian_contraction", "autograd_loop", "ntk_vector_products",
                          "backpack_batchgrad", "backpack_sqrtggn"])
        with pytest.raises(runner.RunDirError) as info:
            runner.run(cases, disk, "s", executor=FakeExecutor(disk, filler=5000))
        assert "no space left on device" in str(info.value) and "\n" not in str(info.value)
        text = (disk / "results.jsonl").read_text()
        assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_cuda_sweep_on_a_machine_without_cuda_is_refused_before_any_work(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cases = cases_of(["structured"], devices=["cuda"])
    with pytest.raises(sweeps.SweepError, match="CUDA is not available here"):
        runner.run(cases, tmp_path / "run", "s")
    assert not (tmp_path / "run").exists()


def test_local_executor_refuses_a_device_it_has_no_worker_for(tmp_path):
    cases = cases_of(["structured"], devices=["cuda:1"])
    ex = LocalExecutor(tmp_path, devices=["cuda:0"])
    with pytest.raises(sweeps.SweepError, match="no worker of this executor runs cuda:1 cases"):
        runner.run(cases, tmp_path / "run", "s", executor=ex, check_devices=False)


def test_a_case_that_cannot_even_be_set_up_is_a_row_naming_why(tmp_path, monkeypatch):
    """A 320 GB allocation while building the problem is `oom` with its cause, not a crashed worker."""
    case = cases_of(["structured"])[0]

    def build(*args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 320000000000 bytes")

    monkeypatch.setattr(one_case, "build_problem", build)
    row = one_case.run_case(case, tmp_path)
    assert row["status"] == "oom" and row["error"].startswith("setting up the problem failed: RuntimeError")
    monkeypatch.setattr(one_case, "build_problem", lambda *a: (_ for _ in ()).throw(KeyError("no such layer")))
    row = one_case.run_case(case, tmp_path)
    assert row["status"] == "error" and "KeyError" in row["error"]


def test_a_row_with_an_undeclared_key_is_written_as_an_error_naming_it(tmp_path):
    class Undeclared(FakeExecutor):
        def submit(self, job):
            fut = super().submit(job)
            if job.task == "case":
                fut.result()["worker_hostname"] = "h"  # a key the row schema does not declare
            return fut

    runner.run(cases_of(["structured"]), tmp_path, "s", executor=Undeclared(tmp_path))
    (row,) = runner.read_results(tmp_path / "results.jsonl")[1]
    assert row["status"] == "error" and "worker_hostname" in row["error"] and "row schema" in row["error"]
