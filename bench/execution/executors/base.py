"""Jobs, their futures, and the executor interface (no torch here: a cluster task imports this alone).

A :class:`Job` is a case or a problem's reference, with its timeout and the
outside plugin modules the worker must load; it travels as plain JSON
(:meth:`Job.wire`). ``Executor.submit(job)`` returns a :class:`JobFuture`
whose result is the row (a failure of the job is a row with its status, never
an exception); the runner waits on the futures as they complete
(``concurrent.futures.wait`` / ``as_completed``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import socket
import time
import traceback
from pathlib import Path

from ntk_bench.envvars import env

from ...sweeps import Case, Problem


@dataclasses.dataclass(frozen=True)
class Job:
    task: str  # "case" | "reference" | "tile" (a row band of a dataset's kernel: ``tiles.run_band``)
    #          | "paired" (a group's ok cases timed side by side: bench/measurement/paired.py)
    payload: Case | Problem | dict
    timeout_s: float
    plugins: tuple[str, ...] = ()  # outside plugin modules (--plugin) the worker loads first

    @property
    def id(self) -> str:
        if self.task == "tile":
            return self.payload["id"]
        return self.payload.id if self.task in ("case", "paired") else f"reference/{self.payload.id}"

    @property
    def device(self) -> str:
        """Where the job computes: a case's, a tile's or a paired group's device; references are float64 on the
        CPU."""
        if self.task == "tile":
            return self.payload["device"]
        return self.payload.device if self.task in ("case", "paired") else "cpu"

    def wire(self) -> dict:
        payload = self.payload if self.task == "tile" else \
            self.payload.to_dict() if self.task == "paired" else dataclasses.asdict(self.payload)
        return {"task": self.task, "payload": payload, "timeout_s": self.timeout_s, "plugins": list(self.plugins)}

    @classmethod
    def from_wire(cls, d: dict) -> "Job":
        task = d["task"]
        if task == "tile":
            return cls("tile", dict(d["payload"]), float(d["timeout_s"]), tuple(d.get("plugins", ())))
        if task == "paired":
            from ...measurement.paired import PairedGroup

            payload = PairedGroup.from_dict(d["payload"])
        else:
            payload = Case.from_dict(d["payload"]) if task == "case" else Problem.from_dict(d["payload"])
        return cls(task, payload, float(d["timeout_s"]), tuple(d.get("plugins", ())))


class JobFuture(concurrent.futures.Future):
    """A job's future: ``result()`` is its row. ``started_at`` / ``finished_at`` (wall clock) and ``where`` (the
    worker) are set by the executor, so the runner can tell which jobs ran beside each other."""

    def __init__(self, job: Job):
        super().__init__()
        self.job = job
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.where: str | None = None

    def finish(self, row: dict, where: str | None = None) -> None:
        self.finished_at = time.time()
        if where is not None:
            self.where = where
        if not self.done():
            self.set_result(row)


class ExecutorLost(RuntimeError):
    """The executor's engine is gone (a cluster's head, the driver process): no job in flight will answer."""


class Executor:
    """Runs jobs and hands back rows. ``slots``: how many jobs run at once (for the ETA)."""

    name = "executor"
    slots = 1

    def submit(self, job: Job) -> JobFuture:
        raise NotImplementedError

    def cancel_pending(self) -> int:
        """Cancel the jobs not started yet; return how many."""
        return 0

    def kill_running(self) -> None:
        """Stop the running jobs now (a second Ctrl-C, SIGTERM): their rows are lost, their workers killed."""

    def close(self) -> None:
        """Wait for nothing more: release the workers (after the runner has its rows)."""

    def failure(self) -> str | None:
        """Why this executor can run nothing more (its engine lost), or None: the runner then stops, keeping its
        rows, as after SIGTERM."""
        return None

    def describe(self) -> dict:
        return {"executor": self.name, "slots": self.slots}


def cancel_all(futures) -> int:
    """Cancel futures not started yet; return how many. (``concurrent.futures.wait`` counts a cancelled future as
    done only once it is told so, as an executor's worker would: ``set_running_or_notify_cancel``.)"""
    n = 0
    for fut in futures:
        if fut.cancel():
            fut.set_running_or_notify_cancel()
            n += 1
    return n


def error_row(status: str, error: str, **extra) -> dict:
    return {"status": status, "error": error[:1000], **extra}


_LOADED_PLUGINS: set[str] = set()


def _load_plugins(modules) -> None:
    from ntk_bench import implementations

    for module in modules:
        if module not in _LOADED_PLUGINS:
            implementations.load_module(module)
            _LOADED_PLUGINS.add(module)


def run_job(wire: dict, run_dir: str | Path) -> dict:
    """Run one job in this process (what a worker calls); any failure comes back as a row, never raised.

    Loads the job's outside plugins first (the same modules the runner loaded), and when this worker was pinned
    to one GPU (``CUDA_VISIBLE_DEVICES`` set by the executor, ``NTK_BENCH_GPU`` its index) runs a ``cuda:K`` case
    on the one device it sees.
    """
    try:
        job = Job.from_wire(wire)
        _load_plugins(job.plugins)
        from ...measurement import failures, one_case, references

        if job.task == "reference":
            return references.ensure_reference(job.payload, Path(run_dir))
        if job.task == "tile":
            from ..tiles import run_band

            return run_band(job.payload)
        with _cpu_clock_cores(job):
            gpu = env("GPU")
            if job.task == "paired":
                from ...measurement import paired

                group = job.payload
                if gpu is not None and group.device.startswith("cuda"):  # the one device this worker sees
                    group = dataclasses.replace(group, cases=tuple(dataclasses.replace(c, device="cuda:0")
                                                                   for c in group.cases))
                return paired.run_paired(group, Path(run_dir))
            case = job.payload
            if gpu is not None and case.device.startswith("cuda"):
                case = dataclasses.replace(case, device="cuda:0")
            row = one_case.run_case(case, Path(run_dir))
            if gpu is not None and case.device.startswith("cuda"):
                row["gpu"] = int(gpu)
            return row
    except Exception as exc:  # a job that could not even run (a plugin module that fails, a bad payload)
        last = traceback.format_exc().strip().splitlines()[-1]
        from ...measurement import failures, one_case, references

        return error_row(failures.status_of(exc), f"{type(exc).__name__}: {exc}"[:500], traceback_tail=last[:300])


@contextlib.contextmanager
def _cpu_clock_cores(job: Job):
    """A job timed on the CPU clock times torch on one thread, so neural-tangents computes on one core too
    (``reference.xla_threads_held``: ``NTK_BENCH_XLA_THREADS=1`` unless the environment says otherwise), whichever
    executor runs it: a worker of this machine, the runner's own process, a Ray task or a SLURM job. The cores the
    process was given are noted first (``machine.cores``): the load average is still weighed against them. Other
    jobs: nothing."""
    case = job.payload.first if job.task == "paired" else job.payload
    if job.task not in ("case", "paired") or case.clock != "cpu" or case.device != "cpu":
        yield
        return
    from ntk_bench import reference

    from ...measurement import machine, timing

    machine.cores()
    # (torch at its thread count first: the hold checks against it)
    with timing.threads_for("cpu"), reference.xla_threads_held(timing.CPU_CLOCK_THREADS):
        yield


def host() -> str:
    return socket.gethostname()


class InlineExecutor(Executor):
    """Jobs run in the runner's own process, one at a time, when submitted: no isolation and no timeouts (a job
    that crashes takes the runner with it). For debugging a plugin (a breakpoint in it stops here) and for tests."""

    name = "inline"

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def submit(self, job: Job) -> JobFuture:
        fut = JobFuture(job)
        fut.set_running_or_notify_cancel()
        fut.started_at, fut.where = time.time(), "inline"
        fut.finish(run_job(job.wire(), self.run_dir))
        return fut
