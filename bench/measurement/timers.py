"""Timers: a call's time over blocks of calls, and two calls timed in alternating blocks (free of the machine's
drift). Both with torch.utils.benchmark's Timer (CUDA synchronised, all CPU threads); ``timing`` has the
clocks a run can choose."""

from __future__ import annotations

import statistics
import time

import torch


def _timer(fn):
    """torch.utils.benchmark's Timer for ``fn()`` with all CPU threads (its default is one)."""
    # imported here, not at the top: it takes a third of a second and warns about CUDA_HOME where there is no
    # CUDA, and only timing needs it
    from torch.utils import benchmark

    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def time_blocks(fn, budget_s: float):
    """(median, IQR, calls, per-block times) of ``fn``'s run time over repeated blocks of calls, in seconds per call.

    torch.utils.benchmark's Timer times each block (CUDA synchronised, with all
    CPU threads); blocks are sized so that at least 5 fit the budget, and run
    until the budget is spent. A call longer than the budget is timed 5 times:
    the per-block times are what ``compare`` tests two runs with, and its rank
    test needs 5 blocks a side to reach p < 0.01 (3 never reach 0.1).
    """
    timer = _timer(fn)
    one = timer.timeit(1).median
    min_repeats = 5
    number = max(1, int(budget_s / min_repeats / max(one, 1e-9)))
    times = [one] if number == 1 else []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_repeats or (time.perf_counter() < deadline and one < budget_s):
        times.append(timer.timeit(number).median)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0], len(times) * number, times


def time_call(fn, budget_s: float):
    """(median, IQR, calls) of ``fn``'s run time (``time_blocks`` without the blocks)."""
    return time_blocks(fn, budget_s)[:3]


MIN_PAIRS = 20


def time_paired(fn_a, fn_b, budget_s: float):
    """(median of a, median of b, median of the ratios a/b) over alternating blocks of calls.

    Two functions timed minutes apart see different machines (a shared VM's
    speed drifts by tens of percent); timed in alternating blocks of the same
    number of calls (a b, then b a, ...), each pair sees the same one. At least
    ``MIN_PAIRS`` pairs (as many of each order), more while the budget lasts: on a
    busy machine a single pair's ratio swings by more than the differences worth
    reporting, while the median over many pairs of identical code stays near 1.
    """
    ta, tb = _timer(fn_a), _timer(fn_b)
    one = max(ta.timeit(1).median, tb.timeit(1).median)
    number = max(1, int(budget_s / 40 / max(one, 1e-9)))  # about 20 pairs of short blocks: a robust median
    a, b = [], []
    deadline = time.perf_counter() + budget_s
    while len(a) < MIN_PAIRS or (time.perf_counter() < deadline and 2 * one * number < budget_s):
        first, second = (ta, tb) if len(a) % 2 == 0 else (tb, ta)
        t1, t2 = first.timeit(number).median, second.timeit(number).median
        a.append(t1 if first is ta else t2)
        b.append(t2 if first is ta else t1)
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))
