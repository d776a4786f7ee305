"""SLURM through submitit (``--executor slurm``), and submitit's local executor (``--executor submitit-local``).

The jobs that can start together are submitted as one job array (submitit's
``executor.batch()``), grouped by what they ask for (GPUs, time limit), at
most ``max_parallel`` in flight (also SLURM's ``--array`` parallelism). Each
SLURM task runs its job in a worker subprocess (``process.run_isolated``): a
case that crashes, hangs or runs out of memory is a row with that status, the
timeout counts from that worker's ready signal; SLURM's own time limit
(``timeout_min``, at least the job's timeout and the start-up limit) is the
backstop, and a task SLURM kills or fails is a row too. submitit's files (the
pickled job, its logs, the pickled row) live in ``RUN/submitit``; only the
runner writes results.jsonl. The run directory must be on storage the compute
nodes see (it always is for submitit's own files).

``submitit-local`` runs the same code path with submitit's ``LocalExecutor`` (a
process per job on this machine): the tests use it.
"""

from __future__ import annotations

import math
from pathlib import Path

from .base import Job, JobFuture, error_row
from .process import STARTUP_TIMEOUT_S, package_root, run_isolated
from .queued import QueuedExecutor


class SubmititExecutor(QueuedExecutor):
    poll_s = 0.5

    def __init__(self, run_dir: Path, cluster: str = "slurm", partition: str | None = None, gpus_per_task: int = 1,
                 cpus_per_task: int = 1, time_limit_min: float | None = None, max_parallel: int = 64,
                 mem_gb: float | None = None, slurm_params: dict | None = None):
        super().__init__()
        import submitit

        self.run_dir = Path(run_dir).resolve()
        self.cluster = cluster
        self.name = "slurm" if cluster == "slurm" else f"submitit-{cluster}"
        self.gpus_per_task = gpus_per_task
        self.cpus_per_task = cpus_per_task
        self.time_limit_min = time_limit_min
        self.slots = max_parallel
        self._ex = submitit.AutoExecutor(folder=self.run_dir / "submitit" / "%j", cluster=cluster)
        setup = [f"export PYTHONPATH={package_root()}:${{PYTHONPATH:-}}"]
        params = {"cpus_per_task": cpus_per_task, "slurm_array_parallelism": max_parallel,
                  "slurm_setup": setup, "local_setup": setup, "name": "ntk-bench"}
        if partition:
            params["slurm_partition"] = partition
        if mem_gb:
            params["mem_gb"] = mem_gb
        for key, value in (slurm_params or {}).items():
            params[key if key.startswith("slurm_") else f"slurm_{key}"] = value
        self._ex.update_parameters(**params)

    def _timeout_min(self, job: Job) -> int:
        need = math.ceil((job.timeout_s + STARTUP_TIMEOUT_S + 60) / 60)
        return max(need, math.ceil(self.time_limit_min or 0))

    def _launch(self, futures: list[JobFuture]) -> list[object]:
        groups: dict[tuple, list[int]] = {}
        for i, fut in enumerate(futures):
            gpus = self.gpus_per_task if fut.job.device != "cpu" else 0
            groups.setdefault((gpus, self._timeout_min(fut.job)), []).append(i)
        handles: list[object] = [None] * len(futures)
        for (gpus, minutes), idx in groups.items():
            self._ex.update_parameters(gpus_per_node=gpus, timeout_min=minutes)
            with self._ex.batch():  # one job array
                jobs = [self._ex.submit(run_isolated, futures[i].job.wire(), str(self.run_dir), self.cpus_per_task)
                        for i in idx]
            for i, job in zip(idx, jobs):
                handles[i] = job
        return handles

    def _poll(self, handles: dict[JobFuture, object]) -> list[tuple[JobFuture, dict]]:
        import submitit

        out = []
        for fut, job in handles.items():
            if not job.done():
                continue
            try:
                row = job.result()
            except submitit.core.utils.UncompletedJobError as exc:  # SLURM's time limit, a preemption, a cancel
                row = error_row("killed", f"{self.name} job {job.job_id} did not complete ({job.state}): "
                                          f"{str(exc).splitlines()[0][:300]}")
            except submitit.core.utils.FailedJobError as exc:
                row = error_row("error", f"{self.name} job {job.job_id} failed: "
                                         f"{' | '.join(str(exc).strip().splitlines()[-3:])[:500]}")
            except Exception as exc:  # submitit could not read the result back
                row = error_row("error", f"{self.name} job {job.job_id}: {type(exc).__name__}: {exc}"[:500])
            if isinstance(row, dict):
                row.setdefault("slurm_job_id", str(job.job_id))
            out.append((fut, row))
        return out

    def _cancel(self, fut: JobFuture, handle: object) -> None:
        handle.cancel(check=False)

    def describe(self) -> dict:
        return {"executor": self.name, "slots": self.slots, "gpus_per_task": self.gpus_per_task,
                "cpus_per_task": self.cpus_per_task, "time_limit_min": self.time_limit_min}
