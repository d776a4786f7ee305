"""The local executor: worker subprocesses on this machine, one per slot, each pinned to its cores or its GPU.

Default: one slot, one worker, as it always was. ``workers=N`` gives N CPU
slots pinned to disjoint sets of this process's cores (``sched_setaffinity``,
and as many torch threads as cores); ``devices=["cuda:0", "cuda:1"]`` gives
one slot per GPU, its worker seeing that GPU alone (``CUDA_VISIBLE_DEVICES``).
A slot takes the first queued job it can run (a CPU slot CPU cases, a GPU slot
``cuda`` and its own ``cuda:K`` cases; references anywhere), so rows arrive in
the order jobs finish.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path

from ...measurement import sysinfo
from .base import Executor, Job, JobFuture, cancel_all, error_row
from .process import WorkerProcess

log = logging.getLogger("ntk_bench.runner")


@dataclasses.dataclass
class Slot:
    """One worker's place: ``takes`` the jobs it runs (``any``, ``cpu`` or ``cuda``), pinned to ``cpus`` or to GPU
    ``gpu`` where given; ``label`` names its log and its rows' worker."""

    label: str
    takes: str  # "any" | "cpu" | "cuda"
    cpus: tuple[int, ...] | None = None  # cores to pin the worker to
    gpu: int | None = None  # the GPU index this slot's cases run on (logical, as torch numbers them here)

    def accepts(self, job: Job) -> bool:
        if job.task == "reference" or self.takes == "any":
            return True
        if self.takes == "cpu":
            return job.device == "cpu"
        return job.device != "cpu" and (self.gpu is None or job.device in ("cuda", f"cuda:{self.gpu}"))

    def env(self) -> dict:
        """The environment variables its worker starts with: the cores to pin to, and for a GPU slot that GPU alone
        (``CUDA_VISIBLE_DEVICES``, the caller's numbering kept) and its index."""
        env = {}
        if self.cpus is not None:
            env["NTK_BENCH_CPUS"] = ",".join(map(str, self.cpus))
        if self.gpu is not None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [v.strip() for v in visible.split(",")] if visible else None
            env["CUDA_VISIBLE_DEVICES"] = ids[self.gpu] if ids and self.gpu < len(ids) else str(self.gpu)
            env["NTK_BENCH_GPU"] = str(self.gpu)
        return env


def split_cores(cores: list[int], n: int) -> list[tuple[int, ...]]:
    """``n`` disjoint, nearly equal runs of ``cores`` (shared round-robin when there are fewer cores than n)."""
    if n <= len(cores):
        size, extra = divmod(len(cores), n)
        out, i = [], 0
        for k in range(n):
            step = size + (1 if k < extra else 0)
            out.append(tuple(cores[i:i + step]))
            i += step
        return out
    return [(cores[k % len(cores)],) for k in range(n)]


def plan_slots(workers: int = 1, devices: list[str] | None = None, cuda_cases: bool = False) -> list[Slot]:
    """The slots for ``workers`` CPU workers and the GPUs in ``devices`` (``cuda:K`` entries)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    gpus = []
    for d in devices or []:
        if d == "cpu":
            continue
        if not d.startswith("cuda:") or not d[5:].isdigit():
            raise ValueError(f"--devices: {d!r} is not cuda:K or cpu")
        gpus.append(int(d[5:]))
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--devices names a GPU twice: {devices}")
    if not gpus and workers == 1:
        return [Slot("worker", "any")]
    slots = [Slot(f"cuda:{g}", "cuda", gpu=g) for g in gpus]
    if not gpus and cuda_cases:
        slots.append(Slot("cuda", "cuda"))
    if workers == 1:
        slots.append(Slot("cpu", "cpu"))
    else:
        cores = sysinfo.cpu_affinity() or list(range(os.cpu_count() or 1))
        if workers > len(cores):
            log.warning("%d CPU workers on %d cores: workers share cores, and their times interfere", workers, len(cores))
        slots += [Slot(f"cpu{k}", "cpu", cpus=c) for k, c in enumerate(split_cores(cores, workers))]
    return slots


class LocalExecutor(Executor):
    """Worker subprocesses on this machine, one per slot (see the module docstring); ``cpu_env``: variables for the
    workers that run CPU cases (a CUDA slot's worker times the GPU on the wall clock)."""

    name = "local"

    def __init__(self, run_dir: Path, workers: int = 1, devices: list[str] | None = None, cuda_cases: bool = False,
                 slots: list[Slot] | None = None, cpu_env: dict[str, str] | None = None):
        self.run_dir = Path(run_dir)
        self.slot_list = slots or plan_slots(workers, devices, cuda_cases)
        self.slots = len(self.slot_list)
        single = len(self.slot_list) == 1
        # Workers pinned to disjoint cores count each other in the load average: they weigh it against the cores
        # the run's workers own together (machine.load_cores), not their own.
        pinned = {c for s in self.slot_list if s.cpus for c in s.cpus}
        env = {"NTK_BENCH_RUN_CORES": str(len(pinned))} if pinned else {}
        self.workers = {
            s.label: WorkerProcess(self.run_dir / ("worker.log" if single else f"worker-{s.label.replace(':', '')}.log"),
                                   {**env, **((cpu_env or {}) if s.takes != "cuda" else {}), **s.env()}, label=s.label)
            for s in self.slot_list
        }
        self._queue: list[JobFuture] = []
        self._cv = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []

    def _start_threads(self) -> None:
        if not self._threads:
            for slot in self.slot_list:
                t = threading.Thread(target=self._serve, args=(slot,), name=f"slot-{slot.label}", daemon=True)
                t.start()
                self._threads.append(t)

    def submit(self, job: Job) -> JobFuture:
        """Queue ``job`` for the first slot that takes it; ValueError when none of the slots runs its device."""
        if not any(s.accepts(job) for s in self.slot_list):
            raise ValueError(f"no worker of this executor runs {job.device} jobs ({job.id}): slots "
                             f"{[s.label for s in self.slot_list]}")
        fut = JobFuture(job)
        with self._cv:
            self._queue.append(fut)
            self._start_threads()
            self._cv.notify_all()
        return fut

    def _next(self, slot: Slot) -> JobFuture | None:
        with self._cv:
            while True:
                fut = next((f for f in self._queue if slot.accepts(f.job)), None)
                if fut is not None:
                    self._queue.remove(fut)
                    if fut.set_running_or_notify_cancel():
                        fut.started_at, fut.where = time.time(), slot.label
                        return fut
                    continue
                if self._closed:
                    return None
                self._cv.wait()

    def _serve(self, slot: Slot) -> None:
        worker = self.workers[slot.label]
        while True:
            fut = self._next(slot)
            if fut is None:
                return
            try:
                row = worker.run(fut.job, self.run_dir)
            except Exception as exc:  # the executor's own failure must still give the runner a row
                row = error_row("error", f"executor: {type(exc).__name__}: {exc}")
            fut.finish(row, slot.label)

    def cancel_pending(self) -> int:
        """Cancel the queued jobs; return how many."""
        with self._cv:
            pending, self._queue = self._queue, []
        return cancel_all(pending)

    def kill_running(self) -> None:
        """Cancel the queued jobs and stop every worker: the rows of the jobs they were running are lost."""
        self.cancel_pending()
        for worker in self.workers.values():
            worker.stop()

    def close(self) -> None:
        """Let the slots' threads run what is still queued and end (a minute each at most), then close the workers."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=60)
        for worker in self.workers.values():
            worker.close()

    def describe(self) -> dict:
        """The executor's settings for the run header: name, slots and each worker's label, jobs, cores and GPU."""
        return {"executor": self.name, "slots": self.slots,
                "workers": [{"label": s.label, "takes": s.takes, "cpus": s.cpus, "gpu": s.gpu} for s in self.slot_list]}
