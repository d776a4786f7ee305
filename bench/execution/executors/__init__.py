"""Executors run jobs (cases and references) and hand back result rows, as futures.

``submit(job) -> JobFuture``; the runner waits on the futures as they complete
and appends each row as it arrives. A failure of a job is a row with its status
(``timeout``, ``oom``, ``killed``, ``error``), never an exception, on every
executor:

- ``local`` (:class:`LocalExecutor`, the default): worker subprocesses on this
  machine, one per slot (``workers`` CPU slots pinned to disjoint cores, one
  slot per GPU in ``devices``); one worker by default.
- ``ray`` (:class:`RayExecutor`): a task per job on a Ray cluster.
- ``slurm`` / ``submitit-local`` / ``submitit-debug`` (:class:`SubmititExecutor`):
  job arrays through submitit.
- ``inline`` (:class:`InlineExecutor`): in the runner's own process, for
  debugging a plugin (no isolation, no timeouts).

Every job runs in a worker subprocess (``process.WorkerProcess``) that starts,
signals ready, and is killed and replaced when a job crashes it or passes its
timeout; what it runs is ``base.run_job``, the plain functions of
``bench.measurement`` (``one_case.run_case``, ``references.ensure_reference``), so no executor touches the plugins,
the cases or the report.
"""

from __future__ import annotations

from pathlib import Path

from .base import Executor, InlineExecutor, Job, JobFuture, error_row, run_job
from .local import LocalExecutor, Slot, plan_slots

EXECUTORS = ("local", "ray", "slurm", "submitit-local", "submitit-debug", "inline")


def make_executor(kind: str, run_dir: Path, **options) -> Executor:
    """An executor by name, with its options (see each class); unknown options are an error."""
    if kind == "local":
        return LocalExecutor(run_dir, **options)
    if kind == "inline":
        return InlineExecutor(run_dir, **options)
    if kind == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(run_dir, **options)
    if kind in ("slurm", "submitit-local", "submitit-debug"):
        from .submitit_executor import SubmititExecutor

        return SubmititExecutor(run_dir, cluster={"slurm": "slurm", "submitit-local": "local",
                                                  "submitit-debug": "debug"}[kind], **options)
    raise ValueError(f"unknown executor {kind!r}; valid: {', '.join(EXECUTORS)}")


__all__ = ["EXECUTORS", "Executor", "InlineExecutor", "Job", "JobFuture", "LocalExecutor", "Slot", "error_row", "make_executor",
           "plan_slots", "run_job"]
