"""The worker process: reads one job per line on stdin, answers one JSON line per job.

It first makes sure it dies with its parent (``prctl(PR_SET_PDEATHSIG,
SIGKILL)`` on Linux, and a thread polling the parent everywhere), pins itself
to the cores and thread count its executor gave it (``NTK_BENCH_CPUS``,
``NTK_BENCH_THREADS``), keeps freed memory for reuse (``_keep_freed_memory``),
imports torch and the harness, and writes its ready
signal ``{"ready": {...}}``: the executor counts a job's timeout from there
(the registry and every plugin module are imported before it).
Everything else the job prints (libraries' chatter included) goes to stderr,
which the executor sends to a log file, so the answer channel stays clean.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time

from ntk_bench.envvars import env

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    parent = int(env("PARENT_PID", os.getppid()))
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)

    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _pin() -> dict:
    """Apply the executor's core and thread settings before torch is imported; return what they are."""
    cpus = env("CPUS")
    if cpus:
        try:
            os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
        except (AttributeError, OSError, ValueError):
            pass
    from ..measurement.machine import default_threads

    # the cores this worker owns, never more: more threads than cores wait for each other
    threads = env("THREADS") or str(default_threads())
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = threads
    return {"threads": int(threads) if threads else None}


# name: (glibc's mallopt parameter: M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD; value)
KEEP_FREED_MEMORY = {"mmap_threshold": (-3, 32 << 20), "trim_threshold": (-1, 1 << 30), "top_pad": (-2, 256 << 20)}


def _keep_freed_memory() -> str | None:
    """glibc's malloc told to keep freed memory for the next allocation instead of returning it to the system.

    By default each buffer over a few MB is mapped afresh and given back when freed, so every call of a kernel
    page-faults its intermediates in again: on the tutorial CNN at N=16, 13k page faults and about 20% of a
    call. PyTorch's CPU tuning guide recommends an allocator that keeps them (jemalloc, tcmalloc); this does the
    same with glibc's own settings (mmap threshold 32 MiB, the most it takes, trim threshold 1 GiB, top pad
    256 MiB), for every plugin and peer of the worker alike. ``NTK_BENCH_MALLOC=default`` leaves glibc as it is.
    What was set goes into the rows (``worker_malloc``)."""
    if env("MALLOC", "") == "default" or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return None
    done = [f"{k}={v}" for k, (param, v) in KEEP_FREED_MEMORY.items() if mallopt(param, v) == 1]
    return "glibc " + " ".join(done) if done else None


def _warm_up() -> None:
    """Import what every job uses, so that this start-up is not charged to the first job's timeout: the registry,
    its entry points and every plugin module; the cost model's FlopCounterMode (its first use imports
    torch._dynamo: seconds), torch.func and the benchmark timer, each used once on a 2x2 Linear. A plugin that
    fails to import fails its own cases."""
    import torch

    from ntk_bench import implementations
    from ntk_bench.implementations.core import costs

    from ..measurement.timers import time_blocks

    for name in implementations.names(None):
        try:
            implementations.get(name)
        except Exception:  # said by the cases that use it
            pass
    model, x = torch.nn.Linear(2, 2), torch.zeros(1, 2)
    costs.cost_stats(model, x)
    fn = lambda: implementations.get("jacobian_contraction").compute(model, x)  # noqa: E731
    time_blocks(fn, 1e-3)


def main() -> None:
    _die_with_parent()
    pinned = _pin()
    malloc = _keep_freed_memory()
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # fd 1 now points at the log: stray prints cannot corrupt the answers
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner decides what a Ctrl-C stops
    import socket

    import torch

    from ..measurement import sysinfo
    from ..measurement.environment import code_sha1
    from ..store.rundir import dumps
    from .executors.base import run_job

    if pinned["threads"]:
        torch.set_num_threads(pinned["threads"])
    _warm_up()
    ready = {"pid": os.getpid(), "host": socket.gethostname(), "cpu_affinity": sysinfo.cpu_affinity(),
             "threads": torch.get_num_threads(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
             "code_sha1": code_sha1(), "malloc": malloc}
    answers.write(dumps({"ready": ready}) + "\n")
    for line in sys.stdin:
        job = json.loads(line)
        row = run_job(job, job.pop("run_dir"))
        answers.write(dumps(row) + "\n")


if __name__ == "__main__":
    main()
