"""What the cluster executors share: a queue, at most ``capacity`` jobs launched at once, a thread that launches
and polls, and a backstop for a task that outlives its job's timeout.

Launching no more than the cluster can run at once makes a job's launch its
start (for the backstop and for the rows' ``concurrent`` column); the job's own
timeout is enforced inside the task (``process.run_isolated``, counted from its
worker's ready signal), the backstop only catches a task that never answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from .base import Executor, ExecutorLost, Job, JobFuture, cancel_all, error_row
from .process import STARTUP_TIMEOUT_S

log = logging.getLogger("ntk_bench.runner")
BACKSTOP_MARGIN_S = 60.0


class QueuedExecutor(Executor):
    """The base of the cluster executors (see the module docstring): a subclass implements ``_launch``, ``_poll`` and
    ``_cancel`` (and ``_fits`` for a capacity other than ``slots`` jobs); ``poll_s`` is how often the loop launches
    and polls."""

    poll_s = 0.2

    def __init__(self):
        self._queue: deque[JobFuture] = deque()
        self._inflight: dict[JobFuture, object] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: str | None = None

    # -- subclass hooks ---------------------------------------------------------------------

    def _fits(self, job: Job, inflight: list[Job]) -> bool:
        """Whether ``job`` can start next to ``inflight`` (the cluster's capacity)."""
        return len(inflight) < self.slots

    def _limit_s(self, fut: JobFuture, handle: object) -> float:
        """How long after its launch a job without an answer is cancelled."""
        return fut.job.timeout_s + STARTUP_TIMEOUT_S + BACKSTOP_MARGIN_S

    def _launch(self, futures: list[JobFuture]) -> list[object]:
        """Start these jobs (all at once: a job array); return a handle per job."""
        raise NotImplementedError

    def _poll(self, handles: dict[JobFuture, object]) -> list[tuple[JobFuture, dict]]:
        """The finished jobs among ``handles`` and their rows."""
        raise NotImplementedError

    def _cancel(self, fut: JobFuture, handle: object) -> None:
        """Stop a launched job."""

    # -- the loop ---------------------------------------------------------------------------------

    def _lost_row(self) -> dict:
        return error_row("killed", f"{self.name} executor lost: {self._failure}", executor_lost=True)

    def submit(self, job: Job) -> JobFuture:
        """Queue ``job`` for the launching thread (started on the first submit); once the executor is lost, the
        future is answered at once with a ``killed`` row."""
        fut = JobFuture(job)
        with self._lock:
            if self._failure is not None:  # nothing will run it: answered now
                fut.set_running_or_notify_cancel()
                fut.finish(self._lost_row())
                return fut
            self._queue.append(fut)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"{self.name}-executor", daemon=True)
                self._thread.start()
        return fut

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):  # the runner submits in bursts: they go out together (one array)
            try:
                self._step()
            except ExecutorLost as exc:  # nothing in flight will answer: the runner stops, writing no row for them
                log.error("%s executor: %s", self.name, exc)
                with self._lock:
                    self._failure = str(exc)
                    running, queued = list(self._inflight), list(self._queue)
                    self._inflight.clear()
                    self._queue.clear()
                for fut in running + [f for f in queued if f.set_running_or_notify_cancel()]:
                    fut.finish(self._lost_row())  # answered, so that no caller waits on them for ever
                return
            except Exception as exc:  # the engine failed (a lost connection): every job in flight gets a row
                log.error("%s executor: %s: %s", self.name, type(exc).__name__, exc)
                with self._lock:
                    lost = list(self._inflight)
                    self._inflight.clear()
                for fut in lost:
                    fut.finish(error_row("error", f"{self.name} executor: {type(exc).__name__}: {exc}"))

    def _step(self) -> None:
        with self._lock:
            running = [f.job for f in self._inflight]
            start = []
            for fut in list(self._queue):
                if self._fits(fut.job, running + [f.job for f in start]):
                    self._queue.remove(fut)
                    if fut.set_running_or_notify_cancel():
                        start.append(fut)
        if start:
            try:
                handles = self._launch(start)
            except ExecutorLost:
                with self._lock:
                    self._inflight.update((fut, None) for fut in start)
                raise
            except Exception as exc:  # the engine refused them: rows, not a lost sweep
                for fut in start:
                    fut.finish(error_row("error", f"{self.name}: submitting failed: {type(exc).__name__}: {exc}"))
                handles = []
            now = time.time()
            with self._lock:
                for fut, handle in zip(start, handles):
                    fut.started_at = now
                    self._inflight[fut] = handle
        with self._lock:
            current = dict(self._inflight)
        if not current:
            return
        for fut, row in self._poll(current):
            with self._lock:
                self._inflight.pop(fut, None)
            fut.finish(row)
        now = time.time()
        for fut, handle in current.items():
            limit = self._limit_s(fut, handle)
            if not fut.done() and fut.started_at is not None and now - fut.started_at > limit:
                self._cancel(fut, handle)
                with self._lock:
                    self._inflight.pop(fut, None)
                fut.finish(error_row("timeout", f"the {self.name} task gave no answer within {limit:g} s "
                                                "(the job's timeout, the worker's start-up and a margin); cancelled"))

    def cancel_pending(self) -> int:
        """Cancel the queued jobs not launched yet; return how many."""
        with self._lock:
            pending = list(self._queue)
            self._queue.clear()
        return cancel_all(pending)

    def kill_running(self) -> None:
        """Cancel the queued jobs and the launched ones (``_cancel``): the launched jobs' rows are lost."""
        self.cancel_pending()
        with self._lock:
            current = dict(self._inflight)
            self._inflight.clear()
        for fut, handle in current.items():
            try:
                self._cancel(fut, handle)
            except Exception:  # best effort: we are stopping
                pass
            fut.finish(error_row("killed", f"stopped by the runner ({self.name} task cancelled)"))

    def failure(self) -> str | None:
        """Why the executor can run nothing more (its engine lost: ``ExecutorLost`` in the loop), or None."""
        return self._failure

    def close(self) -> None:
        """Stop the launching thread (after the runner has its rows)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
