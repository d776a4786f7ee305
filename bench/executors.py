"""Executors run jobs (cases and references) and hand back result rows.

The interface is one method, ``run(job) -> dict``; a job is ``("case", Case)``
or ``("reference", Problem)``, and what it calls is ``bench.measure``'s plain
functions, so a cluster executor (submitit's ``executor.submit(run_job, ...)``,
Ray's ``ray.remote(run_job)``) needs no change to the plugins, the cases or the
report.

``LocalExecutor`` (the default) keeps one worker process and sends it one job
at a time; a job that crashes the worker, runs out of memory at the OS level or
passes its timeout is recorded with that status and the worker is replaced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from .sweeps import Case, Problem


class Executor(Protocol):
    def run(self, kind: str, payload: Case | Problem, timeout_s: float) -> dict: ...

    def close(self) -> None: ...


def run_job(kind: str, payload: dict, run_dir: str) -> dict:
    """Run one job in this process (what a worker, or a cluster task, calls)."""
    from . import measure

    if kind == "reference":
        p = payload
        problem = Problem(p["arch"], tuple(tuple(kv) for kv in p["arch_params"]), p["n"], p["m"])
        return measure.ensure_reference(problem, Path(run_dir))
    return measure.run_case(Case.from_dict(payload), Path(run_dir))


class LocalExecutor:
    """One isolated worker subprocess, replaced after a crash or a timeout."""

    def __init__(self, run_dir: Path, log_path: Path | None = None):
        self.run_dir = Path(run_dir)
        self.log_path = log_path or self.run_dir / "worker.log"
        self.proc: subprocess.Popen | None = None

    def _start(self):
        log = open(self.log_path, "a")
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ntk_bench.bench.worker", str(self.run_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
            env=env, start_new_session=True,
        )
        log.close()

    def _stop(self):
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None

    def run(self, kind: str, payload, timeout_s: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        proc = self.proc
        proc.stdin.write(json.dumps({"kind": kind, "payload": dataclasses.asdict(payload)}) + "\n")
        proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._stop()
                    return {"status": "timeout", "error": f"no result within {timeout_s:g} s; worker killed"}
                if sel.select(timeout=min(left, 1.0)):
                    line = proc.stdout.readline()
                    if line:
                        return json.loads(line)
                    code = proc.wait()
                    self.proc = None
                    if code == -signal.SIGKILL:  # the kernel's OOM killer sends SIGKILL
                        return {"status": "oom", "error": "worker killed by SIGKILL (out of memory)"}
                    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                    return {"status": "error", "error": f"worker crashed with {how}; see {self.log_path.name}"}
        finally:
            sel.close()

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._stop()
        self.proc = None
