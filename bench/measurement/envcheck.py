"""The environment variables that reach every worker, checked before any work (one line for a bad value).

``NTK_BENCH_THREADS`` (torch threads) and ``NTK_BENCH_CPUS`` (cores to pin to)
are how an executor pins its workers; set by the user, they pin every worker
of the run (a slot's own setting wins): the runner says so in one line and
records them in the header (``worker_env``), and the header's ``cpu_threads``
is then the workers' thread count, as the rows' is.
``NTK_BENCH_WORKER_STARTUP_S`` is how long a worker may take to start.
``NTK_BENCH_XLA_THREADS`` is how many cores neural-tangents computes on in a worker (``reference``; a CPU-clock run
sets 1 where it is unset).
"""

from __future__ import annotations

import math
import os

from ntk_bench.envvars import env, positive_int

THREADS, CPUS, STARTUP = "NTK_BENCH_THREADS", "NTK_BENCH_CPUS", "NTK_BENCH_WORKER_STARTUP_S"
XLA_THREADS = "NTK_BENCH_XLA_THREADS"
DEFAULT_STARTUP_S = 300.0


def startup_seconds(environ=None) -> float:
    """``NTK_BENCH_WORKER_STARTUP_S`` as a positive finite number of seconds (300 when unset); ValueError naming the
    variable and its value otherwise."""
    text = env(STARTUP, environ=environ)
    if text is None or not text.strip():
        return DEFAULT_STARTUP_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{STARTUP}={text!r}: expected a positive number of seconds (a worker's start-up limit; "
                         f"default {DEFAULT_STARTUP_S:g})")
    return value


def startup_seconds_or_default() -> float:
    """``startup_seconds()``, or the default where the value is bad (the runner refuses such a run before it starts;
    this is for code that only needs a number)."""
    try:
        return startup_seconds()
    except ValueError:
        return DEFAULT_STARTUP_S


def worker_env(environ=None) -> dict[str, str]:
    """The pinning variables the user set (``NTK_BENCH_THREADS``, ``NTK_BENCH_CPUS``), checked; ValueError naming a
    bad one. Empty when neither is set."""
    environ = os.environ if environ is None else environ
    out = {}
    threads = env(THREADS, environ=environ)
    if threads is not None and threads.strip():
        if not threads.strip().isdigit() or int(threads) < 1:
            raise ValueError(f"{THREADS}={threads!r}: expected a positive integer (torch threads per worker)")
        out[THREADS] = str(int(threads))
    cpus = env(CPUS, environ=environ)
    if cpus is not None and cpus.strip():
        try:
            ids = [int(c) for c in cpus.split(",")]
        except ValueError:
            ids = []
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        if not ids or any(i < 0 for i in ids) or (allowed is not None and not set(ids) <= allowed):
            raise ValueError(f"{CPUS}={cpus!r}: expected comma-separated core ids among this process's cores "
                             f"({','.join(map(str, sorted(allowed))) if allowed else '?'})")
        out[CPUS] = ",".join(map(str, ids))
    return out


def xla_threads(environ=None) -> int | None:
    """``NTK_BENCH_XLA_THREADS`` as a positive whole number (None when unset); ValueError naming it otherwise."""
    return positive_int(XLA_THREADS, environ=environ)


def worker_threads(env: dict[str, str]) -> int | None:
    """The torch thread count a worker pinned by ``env`` (``worker_env()``) runs with, as the worker computes it."""
    if THREADS in env:
        return int(env[THREADS])
    if CPUS in env:
        return len(env[CPUS].split(","))
    return None


def calibration_problem(environ=None) -> str | None:
    """Why the calibration file ``NTK_BENCH_CALIBRATION`` names cannot be used (auto then takes its packaged
    constants), in one line; None when it is unset or fine."""
    path = env("CALIBRATION", environ=environ)
    if not path:
        return None
    from ntk_bench.implementations.plugins.auto import CalibrationError, read_calibration

    try:
        read_calibration(path)
    except CalibrationError as exc:
        return f"NTK_BENCH_CALIBRATION: {exc}: auto uses its packaged constants instead"
    return None
