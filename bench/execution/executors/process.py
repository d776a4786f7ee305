"""A worker subprocess: started, told its jobs one at a time, killed and replaced when a job fails it.

Every executor runs a job the same way (:class:`WorkerProcess`): the local
executor keeps one per slot; a Ray task or a submitit job starts one inside
itself (:func:`run_isolated`), so a crash is a row there too.

- **Ready signal**: the worker imports torch and the harness, then writes
  ``{"ready": ...}``; start-up has its own limit (``NTK_BENCH_WORKER_STARTUP_S``,
  300 s) and a job's timeout counts from the moment it is sent to a ready
  worker, so a replaced worker's start-up is never charged to the next case.
- **No orphans**: the worker asks the kernel for SIGKILL when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``), checks that the parent did not die before
  that, and polls its parent as well; it runs in its own session, so a Ctrl-C
  at the terminal reaches only the runner, which decides.
- **Kills named for what is known**: a worker that dies by SIGKILL is ``oom``
  only when the kernel's OOM counter (this cgroup's, else the system's) went
  up while it ran, and ``killed`` otherwise; a crash by a signal of its own
  (SIGSEGV, SIGABRT, ...) or an exit code is ``error``; the last lines the
  worker logged during the job are in the row.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ...measurement import envcheck, sysinfo
from ...store import safefs
from . import proctree
from .base import Job, error_row, host

STARTUP_TIMEOUT_S = envcheck.startup_seconds_or_default()  # a bad value is refused by the runner before any work
# How long a worker that ended its answers (closed the pipe) may take to exit before it is killed: an exit after
# the end of the output is immediate unless the process is stuck.
EXIT_GRACE_S = 10.0
# The row fields (``store.row.Row``) that come from the worker's ready message, and the message's keys they take.
WORKER_FIELDS = {"cpu_affinity": "cpu_affinity", "worker_host": "host", "worker_threads": "threads",
                 "worker_malloc": "malloc"}
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}


def worker_pythonpath() -> str:
    """PYTHONPATH for a worker: the package's folder, the current directory only when ``--plugin`` put it on the
    runner's path (``PLUGIN_PATHS``), then the user's PYTHONPATH."""
    return os.pathsep.join(p for p in (package_root(), *PLUGIN_PATHS, os.environ.get("PYTHONPATH", "")) if p)


# Folders the runner's --plugin put on its own sys.path: its workers get them too.
PLUGIN_PATHS: list[str] = []
# Python puts the current directory first on a ``-m`` module's path; ``-P`` (3.11+) leaves it out, so that a
# pydantic.py or jax.py in the folder the run was started from is never imported.
_SAFE_PATH = ["-P"] if sys.version_info >= (3, 11) else []


def worker_command() -> list[str]:
    """The worker's command line, the current directory not on its import path."""
    if _SAFE_PATH:
        return [sys.executable, *_SAFE_PATH, "-m", "ntk_bench.bench.execution.worker"]
    return [sys.executable, "-c", "import sys; del sys.path[0]; import runpy; "
            "runpy.run_module('ntk_bench.bench.execution.worker', run_name='__main__', alter_sys=True)"]


def package_root() -> str:
    """The folder to put on PYTHONPATH so that ``ntk_bench`` imports in a child (a checkout or site-packages)."""
    from ntk_bench.version import package_parent

    return str(package_parent())


class WorkerStartError(RuntimeError):
    """A worker subprocess that exited or timed out before its ready signal, or whose first line was not that
    signal; the message names which, with the worker log's last lines where there are some."""


class WorkerProcess:
    """One worker subprocess (``python -m ntk_bench.bench.execution.worker``), replaced after a crash or a timeout."""

    def __init__(self, log_path: Path, env: dict | None = None, label: str = "worker"):
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.label = label
        self.proc: subprocess.Popen | None = None
        self.ready: dict | None = None
        self._buf = b""

    # -- life ----------------------------------------------------------------------

    def alive(self) -> bool:
        """Whether the worker subprocess is running."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> dict:
        """Start the worker and wait for its ready signal; WorkerStartError (with its log's last lines) if not."""
        self.stop()
        env = {**os.environ, **self.env, "PYTHONPATH": worker_pythonpath(), "NTK_BENCH_PARENT_PID": str(os.getpid()),
               "PYTHONUNBUFFERED": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self._log_size()
        with safefs.open_append(self.log_path) as log:
            self.proc = subprocess.Popen(worker_command(), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True,
                                         bufsize=0, close_fds=True)
        self._buf = b""
        line = self._read_line(time.monotonic() + STARTUP_TIMEOUT_S)
        if line is None or line == b"":
            code = self.proc.poll()
            self.stop()
            what = f"did not start within {STARTUP_TIMEOUT_S:g} s" if line is None else f"exited at start-up ({code})"
            raise WorkerStartError(f"worker {what}{self._log_tail(offset)}")
        try:
            msg = json.loads(line)
            self.ready = msg["ready"]
        except (ValueError, KeyError, TypeError):
            self.stop()
            raise WorkerStartError(f"worker's first line was not its ready signal: {line[:200]!r}") from None
        return self.ready

    def stop(self) -> None:
        """Kill the worker and every process it started, in its session or in one of their own (from any thread)."""
        proc, self.proc, self.ready = self.proc, None, None
        if proc is not None:
            if proc.poll() is None:
                proctree.kill_tree(proc.pid)
            else:  # its children may live on in its group
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass

    def close(self) -> None:
        """Let the worker finish (end of its input), then stop it."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        self.stop()

    # -- a job ----------------------------------------------------------------------

    def run(self, job: Job, run_dir: str | Path) -> dict:
        """The job's row: the worker's answer, or ``timeout`` / ``killed`` / ``oom`` / ``error`` when it gave none."""
        startup_s = None
        if not self.alive():
            t0 = time.monotonic()
            try:
                self.start()
            except (WorkerStartError, OSError) as exc:
                return error_row("error", f"worker failed to start: {exc}")
            startup_s = time.monotonic() - t0
        row = self._run(job, run_dir)
        if startup_s is not None:
            row["worker_startup_s"] = startup_s  # not the job's: its timeout counted from the ready signal
        return row

    def _run(self, job: Job, run_dir) -> dict:
        offset = self._log_size()
        oom_before = sysinfo.oom_kill_count()
        message = json.dumps({**job.wire(), "run_dir": str(run_dir)}) + "\n"
        started = time.monotonic()
        self._write(message.encode(), started + job.timeout_s)
        line = self._read_line(started + job.timeout_s)
        if line is None:
            self.stop()
            return error_row("timeout", f"no result within {job.timeout_s:g} s of the job's start "
                                        "(the worker's start-up not counted); worker killed")
        if line == b"":
            return self._death_row(oom_before, offset)
        try:
            row = json.loads(line)
        except ValueError:
            self.stop()
            return error_row("error", f"the worker's answer was not JSON: {line[:200]!r}")
        if isinstance(self.ready, dict):
            row.setdefault("worker", self.label)
            for field, key in WORKER_FIELDS.items():
                if key in self.ready:
                    row.setdefault(field, self.ready[key])
        return row

    def _write(self, data: bytes, deadline: float) -> None:
        """Send ``data`` to the worker, waiting for room in its pipe no later than ``deadline``."""
        try:
            fd = self.proc.stdin.fileno()
            while data:
                _, ready, _ = select.select([], [fd], [], max(0.0, min(deadline - time.monotonic(), 1.0)))
                if ready:
                    data = data[os.write(fd, data[:select.PIPE_BUF]):]
                elif time.monotonic() >= deadline:
                    return  # a worker that reads nothing: the read below times out
        except (BrokenPipeError, OSError, ValueError, AttributeError):
            pass  # it died (or was stopped) between jobs: the read below sees the end and says how

    def _read_line(self, deadline: float) -> bytes | None:
        """The next line from the worker; b"" when it ended (or was stopped), None at the deadline."""
        proc = self.proc
        if proc is None:
            return b""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                fd = proc.stdout.fileno()
                ready, _, _ = select.select([fd], [], [], min(left, 1.0))
                if not ready:
                    continue
                chunk = os.read(fd, 1 << 16)
            except (OSError, ValueError):  # stopped from another thread: its pipe is closed
                return b""
            if not chunk:
                return b""
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line or self._read_line(deadline)

    def _death_row(self, oom_before, offset: int) -> dict:
        """Name how the worker died, from its exit status and the kernel's OOM counter."""
        proc, self.proc = self.proc, None
        if proc is None:
            return error_row("killed", "worker stopped by the runner")
        try:
            code = proc.wait(timeout=EXIT_GRACE_S)
        except subprocess.TimeoutExpired:  # it closed its answers but runs on: it will never say anything
            self.proc = proc
            self.stop()
            return error_row("error", f"the worker closed its answer channel without answering and was still "
                                      f"running {EXIT_GRACE_S:g} s later; killed{self._log_tail(offset)}")
        tail = self._log_tail(offset)
        if code < 0:
            sig = signal.Signals(-code)
            if sig == signal.SIGKILL:
                after = sysinfo.oom_kill_count()
                if oom_before is not None and after is not None and after[0] > oom_before[0]:
                    return error_row("oom", f"worker killed by the kernel's OOM killer ({after[1]}: oom_kill "
                                            f"{oom_before[0]} -> {after[0]}){tail}", oom_killed=True)
                known = (f"not by the OOM killer: {oom_before[1]} oom_kill unchanged at {oom_before[0]}"
                         if oom_before is not None and after is not None else "cause unknown: no OOM counter readable")
                return error_row("killed", f"worker killed by SIGKILL ({known}){tail}")
            if sig in CRASH_SIGNALS:
                return error_row("error", f"worker crashed with {sig.name}{tail}")
            return error_row("killed", f"worker killed by {sig.name}{tail}")
        return error_row("error", f"worker exited with code {code}{tail}")

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _log_tail(self, offset: int, lines: int = 4) -> str:
        """The last lines the worker logged since ``offset`` (its traceback's end), for the row."""
        try:
            text = safefs.read_bytes(self.log_path, offset)[-8192:].decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        kept = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
        return f"; {self.log_path.name}: " + " | ".join(kept) if kept else ""


# -- inside a cluster task -------------------------------------------------------------------

_PERSISTENT: dict[tuple, WorkerProcess] = {}
_RUNNING: set[WorkerProcess] = set()  # this process's workers, killed if the runner dies
_WATCHED: set[tuple] = set()


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def runner_identity() -> dict:
    """Who runs the sweep (host, boot, pid, start time), for :func:`watch_runner` in a task on the same host."""
    pid, created = proctree.process_identity()
    return {"host": host(), "boot": _boot_id(), "pid": pid, "created": created}


def watch_runner(runner: dict | None) -> None:
    """In a cluster task on the runner's own host (submitit's local executor, a local Ray cluster): when the
    runner is gone, however it died, kill this task's workers and end the task. A task on another host cannot
    see the runner (nor one in another pid namespace: the runner must be visible when the watch starts): there
    the cluster's own cancellation is what stops it."""
    if not runner or runner.get("host") != host() or runner.get("boot") != _boot_id():
        return
    identity = (int(runner["pid"]), float(runner["created"]))
    if identity in _WATCHED or identity[0] == os.getpid() or not proctree.alive(identity):
        return
    _WATCHED.add(identity)

    def on_death():
        try:
            for worker in [*_RUNNING, *_PERSISTENT.values()]:
                worker.stop()
        finally:
            os._exit(1)

    proctree.watch_process(identity, on_death, name="runner-watch")


def _log_path(run_dir: str) -> Path:
    name = f"worker-{host()}-{os.getpid()}.log"
    for folder in (Path(run_dir) / "logs", Path(tempfile.gettempdir()) / "ntk-bench-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder / name
        except OSError:
            continue
    return Path(tempfile.gettempdir()) / name


def run_isolated(wire: dict, run_dir: str, threads: int | None = None, persistent: bool = False,
                 runner: dict | None = None) -> dict:
    """Run a job in a worker subprocess of this process (a Ray task, a submitit job) and return its row.

    ``persistent``: keep the worker for the next job this process runs (a Ray worker runs many tasks); it is
    replaced after a crash or a timeout as in the local executor, and started again if the GPU this process was
    given changes. ``runner``: :func:`runner_identity` of the runner, watched when it is on this host.
    """
    watch_runner(runner)
    env = {}
    if threads:
        env["NTK_BENCH_THREADS"] = str(int(threads))
    key = (str(run_dir), os.environ.get("CUDA_VISIBLE_DEVICES"), threads)
    worker = _PERSISTENT.pop(key, None) if persistent else None
    if worker is None:
        worker = WorkerProcess(_log_path(run_dir), env, label=f"{host()}:{os.getpid()}")
    _RUNNING.add(worker)
    try:
        row = worker.run(Job.from_wire(wire), run_dir)
    finally:
        _RUNNING.discard(worker)
        if persistent:
            _PERSISTENT[key] = worker
        else:
            worker.close()
    row.setdefault("executor_host", host())
    return row


def run_isolated_many(wires: list[dict], run_dir: str, threads: int | None = None,
                      runner: dict | None = None) -> list[dict]:
    """Run several jobs one after the other in one worker subprocess (replaced after a job that kills it): a
    SLURM task that amortises its worker's start-up over several cases. One row per job, in order.
    ``runner`` as in :func:`run_isolated`."""
    watch_runner(runner)
    env = {"NTK_BENCH_THREADS": str(int(threads))} if threads else {}
    worker = WorkerProcess(_log_path(run_dir), env, label=f"{host()}:{os.getpid()}")
    _RUNNING.add(worker)
    rows = []
    try:
        for wire in wires:
            row = worker.run(Job.from_wire(wire), run_dir)
            row.setdefault("executor_host", host())
            rows.append(row)
    finally:
        _RUNNING.discard(worker)
        worker.close()
    return rows
