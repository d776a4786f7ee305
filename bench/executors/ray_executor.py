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

Rows come back through Ray's object store and only the runner writes
results.jsonl; the workers read and write the references in the run directory,
which must be on storage every node sees (a shared file system), or the cluster
a single node. The nodes need the same ntk_bench (the runner passes its own
folder on ``PYTHONPATH`` through the job's runtime environment, which is enough
on shared storage).
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import Job, JobFuture, error_row
from .process import run_isolated, worker_pythonpath
from .queued import QueuedExecutor

MAX_RETRIES = 3


class RayExecutor(QueuedExecutor):
    name = "ray"

    def __init__(self, run_dir: Path, address: str | None = None, cpus_per_task: int = 1,
                 max_retries: int = MAX_RETRIES, init_kwargs: dict | None = None):
        super().__init__()
        import ray

        self.run_dir = Path(run_dir).resolve()
        self.cpus_per_task = cpus_per_task
        self._owns = False
        if not ray.is_initialized():
            path = worker_pythonpath()
            kwargs = {"address": address, "log_to_driver": False,
                      "runtime_env": {"env_vars": {"PYTHONPATH": path}}, **(init_kwargs or {})}
            ray.init(**kwargs)
            self._owns = True
        resources = ray.cluster_resources()
        self.cpu_slots = max(1, int(resources.get("CPU", 1) // cpus_per_task))
        self.gpu_slots = int(resources.get("GPU", 0))
        self.slots = self.cpu_slots
        self._remote = ray.remote(max_retries=max_retries, retry_exceptions=False)(run_isolated)

    def _fits(self, job: Job, inflight: list[Job]) -> bool:
        if len(inflight) >= self.cpu_slots:
            return False
        if job.device != "cpu":
            return sum(j.device != "cpu" for j in inflight) < self.gpu_slots
        return True

    def _launch(self, futures: list[JobFuture]) -> list[object]:
        refs = []
        for fut in futures:
            gpu = 1 if fut.job.device != "cpu" else 0
            refs.append(self._remote.options(num_cpus=self.cpus_per_task, num_gpus=gpu).remote(
                fut.job.wire(), str(self.run_dir), self.cpus_per_task, True))
        return refs

    def _poll(self, handles: dict[JobFuture, object]) -> list[tuple[JobFuture, dict]]:
        import ray

        by_ref = {ref: fut for fut, ref in handles.items()}
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        out = []
        for ref in ready:
            fut = by_ref[ref]
            try:
                row = ray.get(ref)
            except ray.exceptions.OutOfMemoryError as exc:
                row = error_row("oom", f"Ray's memory monitor killed the task: {str(exc).splitlines()[0][:300]}")
            except ray.exceptions.TaskCancelledError:
                row = error_row("killed", "the Ray task was cancelled")
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
                row = error_row("killed", f"the Ray worker died {MAX_RETRIES + 1} times under this task "
                                          f"({type(exc).__name__})")
            except ray.exceptions.RayError as exc:
                row = error_row("error", f"Ray: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            out.append((fut, row))
        return out

    def _cancel(self, fut: JobFuture, handle: object) -> None:
        import ray

        ray.cancel(handle, force=True)

    def close(self) -> None:
        super().close()
        if self._owns:
            import ray

            ray.shutdown()

    def describe(self) -> dict:
        return {"executor": self.name, "slots": self.slots, "cpus_per_task": self.cpus_per_task,
                "gpu_slots": self.gpu_slots}
