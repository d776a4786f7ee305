"""Hangs and orphans of the runner and its executors, each injected: a worker that closes its answers but runs on,
a frozen reference under ``--timeout``, a plugin's child in a session of its own, a closed terminal (SIGHUP), and
the runner killed (SIGTERM, SIGKILL) under every executor with no process of its tree left behind.

Faults come from the plugins in ``tests/helpers/runner_faults.py``; deadlines are tens of seconds (a loaded
machine), and every wait polls until its deadline rather than sleeping a fixed time.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ntk_bench.bench import sweeps
from ntk_bench.bench.execution import runner
from ntk_bench.bench.execution.executors import process, proctree
from ntk_bench.bench.measurement import references
from tests.helpers.runner_helpers import HELPERS, ROOT, cli_env, seed_reference, start_cli

SMOKE_ARCH = {"name": "mlp", "params": {"in_features": 4, "width": 8, "depth": 1}, "N": [3], "O": [2]}


def _sweep_file(folder: Path, impls, timeout_s=600) -> Path:
    f = folder / "sweep.json"
    f.write_text(json.dumps({"name": "faults", "impls": impls, "time_budget_s": 0.01, "timeout_s": timeout_s,
                             "arch": [SMOKE_ARCH]}))
    return f


def _wait_for(predicate, timeout=120.0, what="a condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _gone(procs, timeout) -> list[psutil.Process]:
    """The processes of ``procs`` still running (zombies count as gone) after waiting up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if proctree.alive((p.pid, p.create_time()))] if procs else []
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _describe(procs) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            out.append(str(p.pid))
    return out


# -- a worker that never answers and never exits; a frozen reference; a child out of the worker's session ----------

def test_closed_answer_pipe_frozen_reference_and_setsid_grandchild_all_end_within_the_timeout(
        tmp_path, fault_plugins, monkeypatch):
    """A 4 s timeout (what ``--timeout 4`` gives every case): the reference hangs (it got 900 s, whatever the
    timeout), a worker closes its answer pipe and sleeps on (the runner waited for its exit forever), a plugin
    starts a child with setsid and hangs (the child outlived the timeout kill). The run ends, every case has its
    row, and the setsid child is dead."""
    monkeypatch.setattr(process, "EXIT_GRACE_S", 3.0)
    monkeypatch.setenv("NTKB_TEST_FREEZE_REFERENCE", "1")  # in the workers: this process imported the module before
    monkeypatch.setenv("NTKB_TEST_PIDFILE", str(tmp_path / "child.pid"))
    monkeypatch.setenv("NTKB_TEST_SLEEP_S", "3600")
    cases = sweeps.expand({"name": "faults", "impls": ["fault_closed_pipe", "fault_setsid_child", "explicit_mlp"],
                           "time_budget_s": 0.01, "timeout_s": 4, "arch": [SMOKE_ARCH]})
    t0 = time.monotonic()
    summary = runner.run(cases, tmp_path / "run", "faults", plugins=("runner_faults",))
    took = time.monotonic() - t0
    rows = {r["impl"]: r for r in summary.rows.values()}
    assert set(rows) == {"fault_closed_pipe", "fault_setsid_child", "explicit_mlp"}
    record = references.read_reference_record(cases[0].problem, tmp_path / "run")
    assert record["status"] == "timeout" and "within 4 s" in record["error"], record
    assert rows["explicit_mlp"]["status"] == "unchecked"  # computed, the reference having failed
    closed = rows["fault_closed_pipe"]
    assert closed["status"] == "error" and "closed its answer channel" in closed["error"], closed
    assert rows["fault_setsid_child"]["status"] == "timeout"
    child = int((tmp_path / "child.pid").read_text())
    assert not _gone([psutil.Process(child)] if psutil.pid_exists(child) else [], timeout=30), \
        "the plugin's setsid child survived its worker's timeout kill"
    # four worker start-ups, the 4 s timeout twice, 3 s of grace for the closed pipe: nothing near 900 s
    assert took < 300, took


def test_kill_tree_reaches_a_child_in_its_own_session_and_a_grandchild_of_it(tmp_path):
    """``kill_tree`` on a process whose child left its session (setsid) and started one more: all three die."""
    import subprocess

    script = ("import subprocess, sys, time\n"
              "c = subprocess.Popen([sys.executable, '-c', 'import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, \"-c\", \"import time; time.sleep(600)\"]); time.sleep(600)'], "
              "start_new_session=True)\n"
              "print(c.pid, flush=True); time.sleep(600)\n")
    root = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        child = psutil.Process(int(root.stdout.readline()))
        _wait_for(lambda: child.children(), timeout=60, what="the grandchild to start")
        tree = [psutil.Process(root.pid), child, *child.children()]
        assert child.pid in [p.pid for p in psutil.Process(root.pid).children(recursive=True)]
        assert {proctree.kill_tree(root.pid).__len__()} == {3}
        root.wait(timeout=30)
        assert not _gone(tree, timeout=30)
    finally:
        if root.poll() is None:
            root.kill()
            root.wait()


# -- the runner killed: nothing of its tree survives, under every executor ---------------------------------------

def _start(kind: str, d: Path, sweep: Path) -> subprocess.Popen:
    env = cli_env(NTKB_TEST_PIDFILE=d / "pid")
    if kind == "local":  # the CLI itself, for its lines and exit codes
        return start_cli("run", "--sweep", sweep, "--out", d / "run", "--plugin", "runner_faults", "--no-progress",
                         env=env)
    return subprocess.Popen([sys.executable, str(HELPERS / "executor_runner.py"), kind, str(sweep), str(d / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _runner_dies_with_nothing_left(kind: str, signals, tmp_path: Path, smoke_reference: Path) -> dict:
    """Start a runner per signal under ``kind``, each with a worker in a case that hangs; once every worker runs,
    snapshot each runner's process tree, send the signal, and assert the whole tree is gone within a minute.
    Returns {signal: (exit code, stderr)}."""
    runs = {}
    try:
        for sig in signals:
            d = tmp_path / sig.name
            d.mkdir()
            seed_reference(smoke_reference, d / "run")
            runs[sig] = (d, _start(kind, d, _sweep_file(d, ["fault_started"])))
        trees = {}
        for sig, (d, proc) in runs.items():
            pidfile = d / "pid"
            _wait_for(lambda pidfile=pidfile, proc=proc: (pidfile.exists() and pidfile.read_text().strip())
                      or proc.poll() is not None,
                      timeout=240, what=f"the {kind} worker of the {sig.name} runner to start its case")
            assert proc.poll() is None, proc.communicate()
            worker = psutil.Process(int(pidfile.read_text()))
            tree = psutil.Process(proc.pid).children(recursive=True)
            assert worker.pid in [p.pid for p in tree], (kind, _describe(tree))  # its worker is in its tree
            trees[sig] = tree
        out = {}
        for sig, (d, proc) in runs.items():
            proc.send_signal(sig)
        for sig, (d, proc) in runs.items():
            _, err = proc.communicate(timeout=120)
            out[sig] = (proc.returncode, err)
            left = _gone(trees[sig], timeout=60)
            assert not left, f"{kind}, runner killed by {sig.name}: still running 60 s later: {_describe(left)}"
        return out
    finally:  # whatever failed, leave nothing behind
        for _, proc in runs.values():
            if proc.poll() is None:
                proctree.kill_tree(proc.pid)
                proc.wait()


def test_local_workers_die_with_the_runner_and_sighup_is_sigterm(tmp_path, smoke_reference):
    """SIGTERM, SIGKILL and SIGHUP (a closed terminal: it killed the runner with exit 129 and no resume line):
    nothing of the runner's tree survives; SIGHUP, like SIGTERM, keeps the rows and prints the tally and the
    command that resumes."""
    out = _runner_dies_with_nothing_left("local", [signal.SIGTERM, signal.SIGKILL, signal.SIGHUP], tmp_path,
                                         smoke_reference)
    assert out[signal.SIGKILL][0] == -9
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGHUP, 129)):
        rc, err = out[sig]
        assert rc == code, (sig.name, err)
        assert f"interrupted ({sig.name}): 0 of 1 cases done; resume with: ntk-bench run" in err and "--resume" in err
        assert "of 1 cases:" in err  # the tally


@pytest.mark.slurm
def test_submitit_local_tasks_and_workers_die_with_the_runner(tmp_path, smoke_reference):
    """submitit's local executor: its controller, the task and the task's worker survived the runner (alive 60 s
    later), SIGTERM or SIGKILL. The task watches the runner and ends its worker and itself."""
    pytest.importorskip("submitit")
    _runner_dies_with_nothing_left("submitit-local", [signal.SIGTERM, signal.SIGKILL], tmp_path, smoke_reference)


@pytest.mark.ray
def test_a_local_ray_cluster_and_its_workers_die_with_the_runner(tmp_path, smoke_reference):
    """A Ray cluster the runner started (its GCS, raylet, Ray workers, our worker under a Ray worker): all gone
    after SIGTERM or SIGKILL of the runner."""
    pytest.importorskip("ray")
    _runner_dies_with_nothing_left("ray", [signal.SIGTERM, signal.SIGKILL], tmp_path, smoke_reference)


# -- Ray: its head lost; a cluster of `ray start` reached by --address ------------------------------------------

def _ray_small():
    from tests.helpers.executor_runner import OPTIONS

    return OPTIONS["ray"]["init_kwargs"]


@pytest.mark.ray
def test_losing_rays_head_stops_the_run_keeping_its_rows(tmp_path, smoke_reference, fault_plugins, monkeypatch):
    """The GCS of the run's Ray cluster is SIGKILLed while a case runs: Ray ended the runner itself (a hard exit
    of its driver: no tally, no resume line). Now the driver is a process of its own: the runner stops as after
    SIGTERM, with the finished case's row kept, none for the lost one, and nothing of the cluster left."""
    pytest.importorskip("ray")
    from ntk_bench.bench.execution.executors.ray_executor import RayExecutor

    run_dir = tmp_path / "run"
    seed_reference(smoke_reference, run_dir)
    monkeypatch.setenv("NTKB_TEST_PIDFILE", str(tmp_path / "pid"))
    monkeypatch.setenv("RAY_gcs_rpc_server_reconnect_timeout_s", "10")  # Ray's wait for a lost GCS: 60 s
    cases = sweeps.expand({"name": "faults", "impls": ["explicit_mlp", "fault_started"], "time_budget_s": 0.01,
                           "timeout_s": 600, "arch": [SMOKE_ARCH]})
    ex = RayExecutor(run_dir, init_kwargs=_ray_small())
    driver = psutil.Process(ex._driver.proc.pid)
    killed = []

    def kill_the_head():
        deadline = time.monotonic() + 240
        while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in driver.children(recursive=True):
            if p.name().startswith("gcs_server"):
                killed.append(driver.children(recursive=True))
                p.kill()

    import threading

    killer = threading.Thread(target=kill_the_head, daemon=True)
    killer.start()
    summary = runner.run(cases, run_dir, "faults", executor=ex, plugins=("runner_faults",))
    killer.join(timeout=60)
    assert killed, "the GCS was not found: the test did not inject its fault"
    assert summary.interrupted and summary.interrupted.startswith("ray executor lost"), summary.interrupted
    rows = {r["impl"]: r for r in runner.read_results(run_dir / "results.jsonl")[1]}
    assert list(rows) == ["explicit_mlp"] and rows["explicit_mlp"]["status"] == "ok"
    assert not _gone([driver, *killed[0]], timeout=60)
    # another caller of the executor (kernel_matrix waits on its futures) gets an answer, not a wait for ever
    from ntk_bench.bench.execution.executors import Job

    assert ex.submit(Job("case", cases[0], 60.0)).result(timeout=10)["executor_lost"]


@pytest.mark.ray
def test_ray_start_and_address_connect_with_the_clusters_token(tmp_path, monkeypatch):
    """``ray start --head`` with a token in ``~/.ray/auth_token`` (any earlier local ``ray.init`` writes one) makes
    a cluster that requires it; given its address, the driver connected without the token and was refused unless
    RAY_AUTH_MODE=token was set. Now it connects as Ray does to a cluster it finds by itself."""
    pytest.importorskip("ray")
    import shutil
    import socket
    import tempfile

    from ntk_bench.bench.execution.executors.ray_executor import RayExecutor

    ray_bin = Path(sys.executable).with_name("ray")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    subprocess.run([str(ray_bin), "get-auth-token", "--generate"], capture_output=True, timeout=120, check=True)
    assert (home / ".ray" / "auth_token").exists()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ntkb-ray-", dir="/tmp")  # Ray's socket paths must stay short
    with open(tmp_path / "head.log", "w") as log:
        head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                                 "--include-dashboard=false", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
                                 "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)
    try:
        def listening():
            with socket.socket() as c:
                return c.connect_ex(("127.0.0.1", port)) == 0 or head.poll() is not None

        _wait_for(listening, timeout=180, what="the Ray head to listen")
        assert head.poll() is None, (tmp_path / "head.log").read_text()
        ex = RayExecutor(tmp_path / "run", address=f"127.0.0.1:{port}")
        try:
            assert ex.cpu_slots == 1
        finally:
            ex.close()
    finally:
        head.terminate()
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proctree.kill_tree(head.pid)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
