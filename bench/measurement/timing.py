"""The clocks a run can time with: ``wall`` (elapsed time) and ``cpu`` (this process's CPU time, one thread).

On a shared machine the wall time of a call includes the time it waited for a core that another process held;
the process's CPU time does not, and with one compute thread no thread waits for another. ``--clock cpu`` times
every call that way (the regression gate's timer); the row says which clock its times are on (``clock``).
On a GPU the CPU clock would miss the device's work: CUDA cases keep the wall clock.
"""

from __future__ import annotations

import contextlib
import statistics
import time

CLOCKS = ("wall", "cpu")
CPU_CLOCK_THREADS = 1  # torch's threads on the CPU clock: one, so that no thread waits for another


def clock(name: str, device: str = "cpu"):
    """(timer, its name in the rows) for ``--clock``: process CPU time on the CPU, wall time otherwise (a run's and
    the regression gate's, so that both time alike)."""
    if name not in CLOCKS:
        raise ValueError(f"--clock must be one of {', '.join(sorted(CLOCKS))}, got {name!r}")
    if name == "cpu" and not str(device).startswith("cuda"):
        return time.process_time, "process_time"
    return time.perf_counter, "perf_counter"


def clock_for(name: str, device: str = "cpu"):
    """The timer function of clock ``name`` for a case on ``device`` (``time.perf_counter`` or ``process_time``)."""
    return clock(name, device)[0]


@contextlib.contextmanager
def threads_for(name: str):
    """Inside: the torch thread count the clock needs (one for ``cpu``), the previous count restored after."""
    import torch

    before = torch.get_num_threads()
    if name == "cpu":
        torch.set_num_threads(CPU_CLOCK_THREADS)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def time_blocks(fn, budget_s: float, timer=time.process_time, sync=None):
    """(median, IQR, calls, per-block times) of ``fn`` in seconds per call on ``timer``, as ``timers.time_blocks``:
    blocks sized so that at least 5 fit the budget, run until it is spent; a call longer than it timed 5 times."""
    def block(number):
        t0 = timer()
        for _ in range(number):
            fn()
        if sync is not None:
            sync()
        return (timer() - t0) / number

    one = block(1)
    min_repeats = 5  # as timers.time_blocks: compare's rank test needs 5 blocks a side
    number = max(1, int(budget_s / min_repeats / max(one, 1e-9)))
    times = [one] if number == 1 else []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_repeats or (time.perf_counter() < deadline and one < budget_s):
        times.append(block(number))
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0], len(times) * number, times
