"""Before a run: how long the sweep should take, and which cases make it long.

:func:`announce` logs the predicted wall time of the cases still to run (auto's cost model for every call, the
set-up and timing around it, each group's paired rounds; ``runner.estimate``) and, when that exceeds
``WARN_ABOVE_S``, a warning naming the slowest cases and how to leave them out. The prediction is a cost model's:
on a busy machine the truth can be several times longer, and the progress line's ETA is refitted as cases
finish.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("ntk_bench")

WARN_ABOVE_S = 180.0  # "a few minutes"
SLOW_CASE_S = 20.0  # a case predicted to take this long is named in the warning
MAX_NAMED = 8


def _pending(cases, out: Path, resume: bool):
    """The cases a resumed run still has to do (all of them otherwise)."""
    path = Path(out) / "results.jsonl"
    if not resume or not path.exists():
        return cases
    from ..store.rundir import latest_rows, read_results

    try:
        done = set(latest_rows(read_results(path, warn=False)[1]))
    except (OSError, KeyError):
        return cases
    return [c for c in cases if c.id not in done]


def slowdown(cases) -> tuple[float, float | None, int, str]:
    """(how much slower than on an idle machine the sweep's CPU work should run now, the load average, the cores,
    a few words saying why): a sweep on the CPU clock times one torch thread, whose slowdown is measured now
    (``machine.one_thread_share``); a wall-clock sweep's workers run their default threads, which the load
    average's fair share predicts."""
    from ..measurement import machine

    one_thread = bool(cases) and all(getattr(c, "clock", "wall") == "cpu" for c in cases)
    if one_thread:
        share = machine.one_thread_share()
        factor, load, cores = machine.load_factor(1, one_thread_share=share)
        if share is not None:
            return factor, load, cores, f"one thread measured to get {share:.0%} of a core now"
    else:
        factor, load, cores = machine.load_factor()
    how = f"at the current load average, {load:.1f} on {cores} core(s)" if load is not None else "load unknown"
    return factor, load, cores, how


def describe(cases, models: dict, slots: int = 1) -> tuple[float, str, list[str]]:
    """(the predicted seconds, the estimate's line, the warning's lines: none when the run is predicted to take a
    few minutes at most)."""
    from ..cli import fmt_duration
    from . import runner

    total, per_case = runner.estimate(cases, models, slots)
    factor, _, _, how = slowdown(cases)
    total *= factor
    per_case = [(cid, s * factor) for cid, s in per_case]
    line = f"predicted duration: about {fmt_duration(total)} for {len(cases)} case(s) on {slots} worker(s)"
    if factor > 1.05:
        line += f" ({how}: {factor:.1f}x an idle machine's)"
    if total <= WARN_ABOVE_S:
        return total, line, []
    slow = [(cid, s) for cid, s in per_case if s >= SLOW_CASE_S]
    share = sum(s for _, s in slow) / max(1e-9, total * max(1, slots))
    warning = [f"this sweep is predicted to take about {fmt_duration(total)}"
               + (f"; {len(slow)} slow case(s) make {share:.0%} of it:" if slow else ".")]
    warning += [f"  {fmt_duration(s):>7}  {cid}" for cid, s in slow[:MAX_NAMED]]
    if len(slow) > MAX_NAMED:
        warning.append(f"  ... and {len(slow) - MAX_NAMED} more")
    impls = sorted({cid.split("/", 1)[0] for cid, _ in slow})
    if impls:
        warning.append(f"leave them out with --impls (slow here: {', '.join(impls)}), or stop at a time with "
                       "--deadline MIN and finish later with --resume")
    return total, line, warning


def announce(cases, models: dict, slots: int, out: Path, resume: bool = False) -> float:
    """Log the predicted duration of what is left to run, and a warning with the slow cases when it is long;
    return the prediction in seconds."""
    todo = _pending(cases, out, resume)
    if not todo:
        return 0.0
    try:
        total, line, warning = describe(todo, models, slots)
    except Exception as exc:  # a prediction must never stop a run: say why there is none
        log.info("no predicted duration: %s: %s", type(exc).__name__, exc)
        return 0.0
    log.info("%s", line)
    if warning:
        log.warning("%s", "\n".join(warning))
    return total
