"""What the machine was doing while calls were timed, and whether it disturbed them (no torch here).

On a shared machine a time means little without the machine's state beside it: two torch threads on two cores
that other processes hold wait for each other, and the call's wall time grows while its CPU time does not.
:class:`Usage` measures a stretch of timed calls (wall time, this process's CPU time, its involuntary context
switches, the load average before and after); :func:`fields` turns that into a row's columns, with
``disturbed`` set to the reason when

- the process's CPU time was well under the wall time (``cpu_over_wall`` below ``MIN_CPU_OVER_WALL``, CPU
  cases only: a GPU call waits for the device, not for a core): the calls waited for a core;
- the load average was above the cores this process was given (``os.sched_getaffinity``), or, for workers of
  one run pinned to disjoint cores, all of theirs (``load_cores``): others wanted them;
- the machine's own speed changed while the calls were timed: a reference GEMM (:func:`speed_probe`), timed
  before and after, took over ``MAX_SPEED_CHANGE`` times longer at one end than at the other. A virtual machine
  whose host is shared changes speed with nothing in its load average to show it (docs/reports.md).

The run's own threads count in the load average: one worker with two threads on two cores, or two workers
with one thread each on a core each, do not disturb themselves.
"""

from __future__ import annotations

import os
import resource
import time

from ntk_bench.envvars import positive_int

# A CPU call whose process CPU time is below this fraction of its wall time spent the rest waiting for a core.
MIN_CPU_OVER_WALL = 0.8

FIELDS = ("load_avg_1m", "cpu_over_wall", "involuntary_switches", "cpu_threads", "cpu_affinity", "cores",
          "probe_before_s", "probe_after_s", "disturbed")
# The reference GEMM's time at one end of a timed stretch over its time at the other beyond which the machine's
# speed changed while it was timed: above the probe's own scatter on a quiet machine (docs/reports.md).
MAX_SPEED_CHANGE = 1.5


def cores() -> list[int] | None:
    """The CPUs this process was given (None where the system does not say): its affinity when first asked, which a
    worker does as it starts, after its executor pinned it. A later hold of the process to fewer cores, for
    neural-tangents' XLA at torch's thread count (``reference._start_cpu_backend``), is not counted: the load average
    is weighed against the cores the worker was given, as before the hold."""
    global _GIVEN
    if _GIVEN is None:
        try:
            _GIVEN = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return None
    return list(_GIVEN)


_GIVEN: list[int] | None = None


def load_cores() -> int | None:
    """The cores a load average is weighed against: this process's (``cores``), or where its executor runs several
    workers pinned to disjoint cores, all of theirs (``NTK_BENCH_RUN_CORES``): each worker's own thread is in the
    load average the others read."""
    owned = cores()
    n = len(owned) if owned else os.cpu_count()
    try:
        run = positive_int("RUN_CORES")
    except ValueError:  # (set by the local executor; a hand-made bad value is ignored, not a reason to lose a row)
        run = None
    return max(n or 0, run) if run else n


def default_threads() -> int:
    """The compute threads a worker uses by default: the cores it owns, never more."""
    owned = cores()
    return len(owned) if owned else (os.cpu_count() or 1)


def load_average() -> float | None:
    """The 1-minute load average (None where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def load_factor(threads: int | None = None, load: float | None = None, n_cores: int | None = None,
                one_thread_share: float | None = None) -> tuple[float, float | None, int]:
    """(how much slower than on an idle machine CPU-bound work of ``threads`` threads should run now, the load
    average, the cores this process may use); ``load`` and ``n_cores`` default to the machine's now.

    One thread (``--clock cpu``) runs ``1 / one_thread_share`` slower, the share of a core a busy thread was
    measured to get (:func:`one_thread_share`): the load average overstates what one thread loses where the
    scheduler shares the cores between sessions rather than between threads (Linux's autogroups), so the share
    is measured, not derived. Several threads wait for each other when any of them is off its core: for them,
    with the cores shared fairly among the load and our threads, a thread gets cores / (load + threads) of one,
    and no more than one. Without a load average or a measured share: 1."""
    owned = cores()
    n = n_cores or (len(owned) if owned else (os.cpu_count() or 1))
    threads = threads or default_threads()
    load = load_average() if load is None else load
    if threads == 1 and one_thread_share is not None and one_thread_share > 0:
        return max(1.0, 1.0 / min(1.0, one_thread_share)), load, n
    if load is None:
        return 1.0, None, n
    share = min(1.0, n / (load + threads))
    return max(1.0, min(threads, n) / (threads * share)), load, n


def one_thread_share(probe_s: float = 0.5) -> float | None:
    """The share of a core one busy thread of this process gets now: its CPU time over the wall time of a
    ``probe_s``-second busy loop (1.0 on an idle machine; None where the system has no process CPU clock)."""
    try:
        cpu0, wall0 = time.process_time(), time.perf_counter()
    except OSError:
        return None
    x = 0
    while time.perf_counter() - wall0 < probe_s:
        for i in range(2000):  # pure-Python busy work: it holds the GIL, so one thread of this process runs
            x += i
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return min(1.0, cpu / wall) if wall > 0 and cpu > 0 else None


def speed_probe(repeats: int = 5, timer=time.perf_counter) -> float | None:
    """Seconds of a fixed float32 GEMM (256 × 384 × 384, on the CPU, on one torch thread whatever the caller's
    count), the best of ``repeats`` after one uncounted call, on ``timer`` (``time.thread_time`` leaves out the
    time the thread waited for a core): how fast this machine computes now, to set beside the same probe at
    another time. None where torch cannot run it."""
    try:
        import torch

        threads = torch.get_num_threads()
        a = torch.ones(256, 384)
        b = torch.ones(384, 384)
        torch.set_num_threads(1)
        try:
            torch.mm(a, b)  # (warms the library up)
            best = None
            for _ in range(repeats):
                t0 = timer()
                torch.mm(a, b)
                t = timer() - t0
                best = t if best is None else min(best, t)
        finally:
            torch.set_num_threads(threads)
        return best
    except Exception:  # (the probe says how the machine was; its failure costs the row nothing)
        return None


class Usage:
    """Wall time, process CPU time and involuntary context switches of the code run inside ``with Usage() as u``;
    the load average is read at both ends (the larger is kept), and with ``probe`` the reference GEMM's time
    (:func:`speed_probe`) too."""

    def __init__(self, probe: bool = False):
        self.probe = probe
        self.probe_before_s = self.probe_after_s = None

    def __enter__(self) -> "Usage":
        if self.probe:
            self.probe_before_s = speed_probe()
        self.load_before = load_average()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self._ivcsw = ru.ru_nivcsw
        self._cpu = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu
        self.involuntary_switches = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - self._ivcsw
        loads = [v for v in (self.load_before, load_average()) if v is not None]
        self.load = max(loads) if loads else None
        if self.probe:
            self.probe_after_s = speed_probe()


def disturbed(cpu_over_wall: float | None, load: float | None, n_cores: int | None, device: str = "cpu",
              probes: tuple[float | None, float | None] = (None, None)) -> str | None:
    """Why a stretch of timed calls was disturbed, or None when nothing says it was; ``probes``: the reference
    GEMM's seconds before and after it (CPU cases)."""
    why = []
    if device == "cpu" and cpu_over_wall is not None and cpu_over_wall < MIN_CPU_OVER_WALL:
        why.append(f"CPU time {cpu_over_wall:.0%} of wall time")
    if load is not None and n_cores and load > n_cores:
        why.append(f"load {load:.1f} on {n_cores} core(s)")
    before, after = probes
    if device == "cpu" and before and after and max(before, after) > MAX_SPEED_CHANGE * min(before, after):
        why.append(f"the machine's speed changed while timed (a reference GEMM took {before * 1e3:.3g} ms before, "
                   f"{after * 1e3:.3g} ms after)")
    return "; ".join(why) or None


def fields(usage: Usage, threads: int | None, device: str = "cpu") -> dict:
    """A row's machine columns for the timed calls measured by ``usage`` (see the module docstring)."""
    owned = cores()
    ratio = usage.cpu_s / usage.wall_s if usage.wall_s > 0 else None
    probes = (getattr(usage, "probe_before_s", None), getattr(usage, "probe_after_s", None))
    return {
        "load_avg_1m": usage.load,
        "cpu_over_wall": ratio,
        "involuntary_switches": usage.involuntary_switches,
        "cpu_threads": threads,
        "cpu_affinity": owned,
        "cores": len(owned) if owned else os.cpu_count(),
        "probe_before_s": probes[0],
        "probe_after_s": probes[1],
        "disturbed": disturbed(ratio, usage.load, load_cores(), "cpu" if str(device).startswith("cpu") else "cuda",
                               probes),
    }


ADVICE = ("their times are not to be trusted: run again on a quieter machine (stop other work, or fewer "
          "--workers), or with --clock cpu (process CPU time, one thread), and compare paired ratios only")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def disturbed_line(rows, paired=()) -> str:
    """The summary's first line: how many timed rows (and paired groups) were disturbed, and what to do."""
    timed = [r for r in rows if _is_number(r.get("cpu_over_wall"))]
    bad = [r for r in timed if isinstance(r.get("disturbed"), str) and r["disturbed"]]
    groups = [p for p in paired if _is_number(p.get("cpu_over_wall"))]
    bad_groups = [p for p in groups if isinstance(p.get("disturbed"), str) and p["disturbed"]]
    loads = [r["load_avg_1m"] for r in timed + groups if _is_number(r.get("load_avg_1m"))]
    load = f" (load average {min(loads):.1f} to {max(loads):.1f})" if loads else ""
    also = f", and {len(bad_groups)} of {len(groups)} paired groups" if groups else ""
    if not timed:
        return "**Timing: the rows do not record the machine's state** (a run from before it was recorded)."
    load += _speed_spread(timed + groups)
    if not bad and not bad_groups:
        nor = f", nor any of {len(groups)} paired groups" if groups else ""
        return f"**Timing: none of {len(timed)} timed rows was disturbed**{nor}{load}.{_more_cores(timed)}"
    if all(r.get("clock") == "cpu" for r in timed):  # waiting for a core is not in these times already
        return (f"**Timing: {len(bad)} of {len(timed)} timed rows ran on a busy machine{also}**{load}: they are "
                "CPU times on one thread, so waiting for a core is not counted, but other work still shared the "
                "caches and memory bandwidth: compare paired ratios only, or run again on a quieter machine."
                f"{_more_cores(timed)}")
    return f"**Timing: {len(bad)} of {len(timed)} timed rows were disturbed{also}**{load}: {ADVICE}.{_more_cores(timed)}"


def _speed_spread(rows) -> str:
    """", the machine's own speed varying …" where the reference GEMM (``probe_*_s``) took over
    ``MAX_SPEED_CHANGE`` times longer at its slowest than at its fastest over the run; empty otherwise. Times
    taken minutes apart then differ by as much whatever the code: compare paired ratios only."""
    probes = [r[k] for r in rows for k in ("probe_before_s", "probe_after_s") if _is_number(r.get(k)) and r[k] > 0]
    if len(probes) < 2 or max(probes) <= MAX_SPEED_CHANGE * min(probes):
        return ""
    return (f"; the machine's own speed varied by {max(probes) / min(probes):.1f}× over the run (a reference GEMM "
            f"took {min(probes) * 1e3:.3g} to {max(probes) * 1e3:.3g} ms): times taken apart are not comparable, "
            "paired ratios are")


def _more_cores(rows) -> str:
    """A sentence for neural-tangents rows whose XLA computed on more cores than torch had threads (``xla_threads``
    above ``cpu_threads``): they were not timed at the same thread count; empty when there are none."""
    more = [r for r in rows if _is_number(r.get("xla_threads")) and _is_number(r.get("cpu_threads"))
            and r["xla_threads"] > r["cpu_threads"]]
    if not more:
        return ""
    return (f" {len(more)} neural-tangents row(s) computed on more cores than torch had threads (`xla_threads` above "
            "`cpu_threads`): they are not at the same thread count as ours; set NTK_BENCH_XLA_THREADS to the "
            "threads (a CPU-clock run of the local executor does).")
