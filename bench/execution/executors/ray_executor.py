"""Ray: a task per job on a Ray cluster (``--executor ray [--address HOST:PORT]``).

Each task runs its job in a worker subprocess of the Ray worker
(``process.run_isolated``, kept for the Ray worker's next task), so a case that
crashes, hangs or runs out of memory is a row with that status, exactly as in
the local executor, and the timeout counts from that subprocess's ready signal.
A CUDA case asks for ``num_gpus=1`` (Ray sets ``CUDA_VISIBLE_DEVICES``); every
task asks for ``cpus_per_task`` CPUs and its worker uses that many threads. A
Ray worker that dies under a task (killed, its node lost) is retried by Ray
(``max_retries``); only a task that keeps failing becomes a ``killed`` row. At
most as many tasks are in flight as the cluster has CPUs (and GPUs) for, so a
task starts when it is launched; one that never answers is cancelled
(``ray.cancel(force=True)``) after its timeout, the start-up limit and a margin.

The Ray driver (``ray.init`` and every call into Ray) runs in a subprocess of
the runner (:class:`_Driver`, this module run as a program), in a session of its
own: Ray ends a driver whose raylet or GCS is lost with a hard exit that Python
cannot catch, and that must not take the runner, its rows and its last lines
with it. When the driver is gone (or stops answering) the executor says so
(:meth:`failure`), and the runner stops as after SIGTERM: the rows it has are
kept, the tally and the command that resumes are printed. The driver dies with
the runner (``PR_SET_PDEATHSIG`` and a watch on its parent), and a cluster that
``ray.init`` started dies with the driver.

Authentication: Ray 2.60 turns token authentication on for a cluster that
``ray.init()`` starts, and for one that ``ray start --head`` starts when a token
already exists (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH``); a driver connecting to an address it is *given*
never turns it on by itself, and is refused by such a cluster. The driver
therefore does for an explicit ``--address`` what Ray does for a cluster it
finds on its own: with ``RAY_AUTH_MODE`` unset and a token available, it
connects with that token (a cluster without authentication accepts it too).

Rows come back through Ray's object store and only the runner writes
results.jsonl; the workers read and write the references in the run directory,
which must be on storage every node sees (a shared file system), or the cluster
a single node. The nodes need the same ntk_bench (the runner passes its own
folder on ``PYTHONPATH`` through the job's runtime environment, which is enough
on shared storage).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from . import proctree
from .base import ExecutorLost, Job, JobFuture, error_row
from .process import _SAFE_PATH, STARTUP_TIMEOUT_S, run_isolated, runner_identity, worker_pythonpath
from .queued import QueuedExecutor

MAX_RETRIES = 3
CALL_TIMEOUT_S = 120.0  # a driver that takes longer to answer a launch, a poll or a cancel is taken for lost


class RayExecutor(QueuedExecutor):
    """A Ray task per job, through a driver subprocess (see the module docstring); as many jobs in flight as the
    cluster has CPUs (and GPUs, for CUDA jobs) for."""

    name = "ray"

    def __init__(self, run_dir: Path, address: str | None = None, cpus_per_task: int = 1,
                 max_retries: int = MAX_RETRIES, init_kwargs: dict | None = None):
        super().__init__()
        self.run_dir = Path(run_dir).resolve()
        self.cpus_per_task = cpus_per_task
        path = worker_pythonpath()
        kwargs = {"address": address, "log_to_driver": False,
                  "runtime_env": {"env_vars": {"PYTHONPATH": path}}, **(init_kwargs or {})}
        self._driver = _Driver(path)
        try:
            resources = self._driver.call("init", timeout=STARTUP_TIMEOUT_S, kwargs=kwargs, max_retries=max_retries)
        except BaseException:
            self._driver.stop()
            raise
        self.cpu_slots = max(1, int(resources.get("CPU", 1) // cpus_per_task))
        self.gpu_slots = int(resources.get("GPU", 0))
        self.slots = self.cpu_slots
        self._runner = runner_identity()  # a task on this host dies with the runner, whatever the cluster does
        self._keys = 0

    def _fits(self, job: Job, inflight: list[Job]) -> bool:
        if len(inflight) >= self.cpu_slots:
            return False
        if job.device != "cpu":
            return sum(j.device != "cpu" for j in inflight) < self.gpu_slots
        return True

    def _launch(self, futures: list[JobFuture]) -> list[object]:
        jobs = []
        for fut in futures:
            self._keys += 1
            jobs.append([self._keys, fut.job.wire(), 1 if fut.job.device != "cpu" else 0])
        self._driver.call("launch", jobs=jobs, run_dir=str(self.run_dir), cpus=self.cpus_per_task,
                          runner=self._runner)
        return [key for key, _, _ in jobs]

    def _poll(self, handles: dict[JobFuture, object]) -> list[tuple[JobFuture, dict]]:
        by_key = {key: fut for fut, key in handles.items()}
        rows = self._driver.call("poll", keys=list(by_key))
        return [(by_key[key], row) for key, row in rows]

    def _cancel(self, fut: JobFuture, handle: object) -> None:
        self._driver.call("cancel", key=handle)

    def close(self) -> None:
        """Stop launching, then shut the driver down (and the cluster it started, if it started one)."""
        super().close()
        try:
            self._driver.call("shutdown", timeout=60)
        except (ExecutorLost, RuntimeError):
            pass
        self._driver.stop()

    def describe(self) -> dict:
        """The executor's settings for the run header: name, slots, CPUs per task and GPU slots."""
        return {"executor": self.name, "slots": self.slots, "cpus_per_task": self.cpus_per_task,
                "gpu_slots": self.gpu_slots}


class _Driver:
    """The Ray driver process, called one request at a time (JSON lines; each answer ``{"ok": ...}`` or
    ``{"error": ...}``); :class:`ExecutorLost` when it ends or does not answer in time."""

    def __init__(self, path: str):
        env = {**os.environ, "PYTHONPATH": path, "NTK_BENCH_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        # its own session: a Ctrl-C at the terminal reaches the runner alone, which decides; Ray's messages go
        # to the runner's stderr as before
        self.proc = subprocess.Popen([sys.executable, *_SAFE_PATH, "-m", "ntk_bench.bench.execution.executors.ray_executor"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True,
                                     bufsize=0, close_fds=True)
        self._lock = threading.Lock()
        self._buf = b""
        # The processes of a cluster this driver started (its descendants), seen every few seconds: when the
        # driver dies first they are nobody's children any more, and some of Ray's agents linger a minute or more.
        self._tree: dict[int, psutil.Process] = {}
        self._seen_at = 0.0

    def _remember(self) -> None:
        if time.monotonic() - self._seen_at > 2.0 and self.proc is not None:
            self._seen_at = time.monotonic()
            try:
                self._tree.update((p.pid, p) for p in psutil.Process(self.proc.pid).children(recursive=True))
            except psutil.Error:
                pass

    def call(self, op: str, timeout: float = CALL_TIMEOUT_S, **args):
        with self._lock:
            proc = self.proc
            if proc is None or proc.poll() is not None:
                raise ExecutorLost(self._ended())
            self._remember()
            deadline = time.monotonic() + timeout
            try:
                proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
            except (OSError, ValueError):
                raise ExecutorLost(self._ended()) from None
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ExecutorLost(f"the Ray driver gave no answer to {op!r} within {timeout:g} s")
                ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
                if ready:
                    chunk = os.read(proc.stdout.fileno(), 1 << 16)
                    if not chunk:
                        raise ExecutorLost(self._ended())
                    self._buf += chunk
            line, _, self._buf = self._buf.partition(b"\n")
            if op == "init":
                self._seen_at = 0.0
                self._remember()
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer["ok"]

    def _ended(self) -> str:
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        how = f"exit code {code}" if code is None or code >= 0 else f"signal {-code}"
        return f"the Ray driver process ended ({how}): the cluster's head or this node's raylet was lost " \
               "(Ray's own message is above)"

    def stop(self) -> None:
        """End the driver, and every process of its cluster still running (the driver's own or orphaned)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proctree.kill_tree(proc.pid)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        left = []
        for p in self._tree.values():
            try:
                if p.is_running():  # the same process (psutil checks its start time), not a reused pid
                    proctree.kill_tree(p.pid)
                    left.append(p)
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)


# -- the driver process ---------------------------------------------------------------------------------------

def _connect(kwargs: dict, max_retries: int):
    import ray

    address = kwargs.get("address") or None
    if address not in (None, "auto", "local") and "RAY_AUTH_MODE" not in os.environ:
        try:  # what ray.init does for a cluster it finds by itself (Ray's own rule: a token available)
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        except (ImportError, AttributeError):  # a Ray without token authentication
            pass
    ray.init(**kwargs)
    return ray.remote(max_retries=max_retries, retry_exceptions=False)(run_isolated)


def _row_of(ray, ref) -> dict:
    try:
        return ray.get(ref)
    except ray.exceptions.OutOfMemoryError as exc:
        return error_row("oom", f"Ray's memory monitor killed the task: {str(exc).splitlines()[0][:300]}")
    except ray.exceptions.TaskCancelledError:
        return error_row("killed", "the Ray task was cancelled")
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
        return error_row("killed", f"the Ray worker died {MAX_RETRIES + 1} times under this task "
                                   f"({type(exc).__name__})")
    except ray.exceptions.RayError as exc:
        return error_row("error", f"Ray: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")


def _serve() -> None:
    """The driver's loop: a request per line on stdin, an answer per line on the original stdout."""
    from ..lifeline import die_with_parent

    die_with_parent()
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # Ray's and the libraries' prints go to stderr: the answers stay clean
    sys.stdout = sys.stderr
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner decides what a Ctrl-C stops
    import ray

    remote, refs = None, {}
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "init":
                remote = _connect(req["kwargs"], req["max_retries"])
                result = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            elif op == "launch":
                for key, wire, gpus in req["jobs"]:
                    refs[key] = remote.options(num_cpus=req["cpus"], num_gpus=gpus).remote(
                        wire, req["run_dir"], req["cpus"], True, req["runner"])
                result = None
            elif op == "poll":
                by_ref = {refs[k]: k for k in req["keys"] if k in refs}
                ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0) if by_ref else ([], [])
                result = [[by_ref[ref], _row_of(ray, ref)] for ref in ready]
                for ref in ready:
                    refs.pop(by_ref[ref], None)
            elif op == "cancel":
                ref = refs.pop(req["key"], None)
                if ref is not None:
                    ray.cancel(ref, force=True)
                result = None
            elif op == "shutdown":
                ray.shutdown()
                answers.write(json.dumps({"ok": None}) + "\n")
                return
            else:
                raise ValueError(f"unknown request {op!r}")
            answers.write(json.dumps({"ok": result}, default=str) + "\n")
        except Exception as exc:  # said to the runner, which raises it there
            answers.write(json.dumps({"error": f"{type(exc).__name__}: {str(exc).strip()[:1000]}"}) + "\n")


if __name__ == "__main__":
    _serve()
