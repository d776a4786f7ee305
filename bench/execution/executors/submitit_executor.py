"""SLURM through submitit (``--executor slurm``), and submitit's local executor (``--executor submitit-local``).

The jobs that can start together are submitted as one job array (submitit's
``executor.batch()``), grouped by what they ask for (GPUs, time limit), at
most ``max_parallel`` tasks in flight (also SLURM's ``--array`` parallelism).
A task runs up to ``jobs_per_task`` jobs (1 by default; more amortise a task's
start-up: Python, torch, the queue) one after the other in a worker subprocess
(``process.run_isolated_many``): a case that crashes, hangs or runs out of
memory is a row with that status and the worker is replaced for the next, the
timeout counts from that worker's ready signal; SLURM's own time limit
(``timeout_min``: the chunk's timeouts and the start-up limit) is the backstop,
and a task SLURM kills or fails gives each of its jobs a row. submitit's files (the
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
from .process import STARTUP_TIMEOUT_S, package_root, run_isolated_many, runner_identity
from .queued import BACKSTOP_MARGIN_S, QueuedExecutor


class SubmititExecutor(QueuedExecutor):
    """Jobs as submitit job arrays on SLURM (``cluster='slurm'``) or on this machine (``'local'``, for the tests);
    see the module docstring."""

    poll_s = 0.5

    def __init__(self, run_dir: Path, cluster: str = "slurm", partition: str | None = None, gpus_per_task: int = 1,
                 cpus_per_task: int = 1, time_limit_min: float | None = None, max_parallel: int = 64,
                 mem_gb: float | None = None, slurm_params: dict | None = None, jobs_per_task: int = 1):
        super().__init__()
        import shutil

        import submitit

        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise RuntimeError("sbatch is not on this machine's PATH: run the sweep from a SLURM login node")

        self.run_dir = Path(run_dir).resolve()
        self.cluster = cluster
        self.name = "slurm" if cluster == "slurm" else f"submitit-{cluster}"
        self.gpus_per_task = gpus_per_task
        self.cpus_per_task = cpus_per_task
        self.time_limit_min = time_limit_min
        self.slots = max_parallel
        self.jobs_per_task = max(1, int(jobs_per_task))
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
        self._runner = runner_identity()  # a task on this host dies with the runner (submitit-local's do)

    def _fits(self, job: Job, inflight: list[Job]) -> bool:
        return len(inflight) < self.slots * self.jobs_per_task

    def _timeout_min(self, jobs: list[Job]) -> int:
        need = math.ceil((sum(j.timeout_s for j in jobs) + STARTUP_TIMEOUT_S + 60) / 60)
        return max(need, math.ceil(self.time_limit_min or 0))

    def _launch(self, futures: list[JobFuture]) -> list[object]:
        """Chunks of up to ``jobs_per_task`` jobs of one kind (CPU or GPU), submitted as one job array per
        (GPUs, time limit); a handle is (submitit job, the job's place in its chunk, the chunk's time limit)."""
        by_kind: dict[int, list[int]] = {}
        for i, fut in enumerate(futures):
            by_kind.setdefault(self.gpus_per_task if fut.job.device != "cpu" else 0, []).append(i)
        chunks: dict[tuple, list[list[int]]] = {}
        for gpus, idx in by_kind.items():
            # spread the jobs over as many tasks as may run at once, up to jobs_per_task in each
            n = max(1, min(len(idx), max(self.slots, math.ceil(len(idx) / self.jobs_per_task))))
            for k in range(n):
                part = idx[k::n]
                if part:
                    minutes = self._timeout_min([futures[i].job for i in part])
                    chunks.setdefault((gpus, minutes), []).append(part)
        handles: list[object] = [None] * len(futures)
        for (gpus, minutes), parts in chunks.items():
            self._ex.update_parameters(gpus_per_node=gpus, timeout_min=minutes)
            with self._ex.batch():  # one job array
                jobs = [self._ex.submit(run_isolated_many, [futures[i].job.wire() for i in part], str(self.run_dir),
                                        self.cpus_per_task, self._runner) for part in parts]
            for part, job in zip(parts, jobs):
                for place, i in enumerate(part):
                    handles[i] = (job, place, minutes * 60)
        return handles

    def _limit_s(self, fut: JobFuture, handle: object) -> float:
        return handle[2] + BACKSTOP_MARGIN_S

    def _poll(self, handles: dict[JobFuture, object]) -> list[tuple[JobFuture, dict]]:
        import submitit

        out, results = [], {}
        for fut, (job, place, _) in handles.items():
            if not job.done():
                continue
            if job.job_id not in results:
                try:
                    results[job.job_id] = job.result()
                except submitit.core.utils.UncompletedJobError as exc:  # SLURM's time limit, a preemption, a cancel
                    results[job.job_id] = error_row("killed", f"{self.name} job {job.job_id} did not complete "
                                                              f"({job.state}): {str(exc).splitlines()[0][:300]}")
                except submitit.core.utils.FailedJobError as exc:
                    results[job.job_id] = error_row("error", f"{self.name} job {job.job_id} failed: "
                                                             f"{' | '.join(str(exc).strip().splitlines()[-3:])[:500]}")
                except Exception as exc:  # submitit could not read the result back
                    results[job.job_id] = error_row("error", f"{self.name} job {job.job_id}: "
                                                             f"{type(exc).__name__}: {exc}"[:500])
            result = results[job.job_id]
            row = dict(result[place]) if isinstance(result, list) else dict(result)
            row.setdefault("slurm_job_id", str(job.job_id))
            out.append((fut, row))
        return out

    def _cancel(self, fut: JobFuture, handle: object) -> None:
        handle[0].cancel(check=False)

    def describe(self) -> dict:
        """The executor's settings for the run header: name, slots and what each task asks for."""
        return {"executor": self.name, "slots": self.slots, "jobs_per_task": self.jobs_per_task,
                "gpus_per_task": self.gpus_per_task,
                "cpus_per_task": self.cpus_per_task, "time_limit_min": self.time_limit_min}
