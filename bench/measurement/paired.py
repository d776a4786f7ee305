"""Paired side-by-side timing: every plugin and peer that computed a problem, timed in one worker, in rounds.

Each case first runs in isolation (its status, first call, peak memory and agreement: a crash or an OOM is still
a row). Then, per group of cases that compute the same kernel the same way (problem, mode, dtype, device, memory
budget), the ones that were ``ok`` are timed again together (:func:`run_paired`, in a worker): each is set up
and called once, then rounds of one block each, in an order that rotates and reverses from round to round, until
the budget is spent (at least ``MIN_ROUNDS``). Each block is preceded by untimed calls of the same plugin for
``WARMUP_S`` (at least one call; the budget counts them): the plugin before it in the round leaves the caches,
the allocator's free lists and the page tables full of its own data, and the first calls after a large
neighbour run several times slower; timed from a cold start, a fast plugin's block would be charged for
whichever neighbour preceded it. A slower machine, another process starting, a drifting clock hit every plugin
of a round alike, so the ratio of two plugins' times in the same round measures the plugins, not
the moment; the median of those per-round ratios, with a distribution-free confidence band
(:func:`median_band`), is what every "X over Y" of the report is. Two medians from separate processes are
never divided by each other. Where a group holds more than our fastest and the fastest peer, those two are then
timed again by themselves (``final_times_s``, the same budget): a slow third party (a Jacobian contraction of
gigabytes) still leaves a fast plugin's first calls after it slower than the warm-up covers, and "ours against the
peers" compares just those two (:func:`ratio` with ``final``).

The records go to ``paired.jsonl`` in the run directory, one line per group (:func:`read_records`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import time
from pathlib import Path

from ..store.row import RowError, check_paired
from ..sweeps import Case

PAIRED = "paired.jsonl"
MIN_ROUNDS = 7  # the fewest rounds whose median has a 95% band inside the observed ratios (n = 6 is the least)
MAX_ROUNDS = 60
MIN_BLOCK_S = 0.002  # a block of fast calls lasts at least this long: the clock's resolution is far below it
WARMUP_S = 0.02  # untimed calls before each block last at least this long (and are at least one call)
BAND_LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class PairedGroup:
    """The ok cases of one group, to time side by side in one worker for ``budget_s`` seconds (at least
    ``MIN_ROUNDS`` rounds)."""

    cases: tuple[Case, ...]
    budget_s: float = 2.0

    @property
    def first(self) -> Case:
        return self.cases[0]

    @property
    def id(self) -> str:
        return group_id(self.first)

    @property
    def device(self) -> str:
        return self.first.device

    def to_dict(self) -> dict:
        return {"cases": [c.to_dict() for c in self.cases], "budget_s": self.budget_s}

    @classmethod
    def from_dict(cls, d: dict) -> "PairedGroup":
        return cls(tuple(Case.from_dict(c) for c in d["cases"]), float(d.get("budget_s", 2.0)))


def group_id(case: Case) -> str:
    """The key of the case's group (everything but the plugin)."""
    budget = "" if case.memory_budget_bytes is None else f"/budget={case.memory_budget_bytes}B"
    return f"paired/{case.problem.id}/{case.mode}/{case.dtype}/{case.device}{budget}"


def predict_seconds(call_s: list[float], budget_s: float, warmup_s: float = WARMUP_S) -> float:
    """A paired job's wall time: set-up and two warm-up calls each, then the rounds (the budget, or the minimum
    rounds when those take longer), each block after its untimed calls (``warmup_s``; none for 0)."""
    one_round = sum(max(t, MIN_BLOCK_S) + (max(t, warmup_s) if warmup_s > 0 else 0.0) for t in call_s)
    return 1.0 + 2 * sum(call_s) + max(budget_s, MIN_ROUNDS * one_round)


# -- the statistics ------------------------------------------------------------------------------

def predict_group_seconds(call_s: dict[str, float], budget_s: float, warmup_s: float = WARMUP_S,
                          origins: dict[str, str] | None = None, finals: bool = True) -> float:
    """A group's paired job's rounds: :func:`predict_seconds` of all its plugins (plugin -> seconds a call), then
    of its :func:`finalists` by themselves (``finals``: runs made before those rounds had none)."""
    pair = finalists(call_s, origins) if finals else None
    last = 0.0 if pair is None else predict_seconds([call_s[k] for k in pair], budget_s, warmup_s)
    return predict_seconds(list(call_s.values()), budget_s, warmup_s) + last


def median_band(values, level: float = BAND_LEVEL) -> tuple[float, float, float]:
    """(median, low, high) of ``values``: the band is the distribution-free confidence interval of the median at
    ``level`` (order statistics k and n+1-k, k from the binomial(n, 1/2) tail); with too few values for that
    level, the smallest and largest value."""
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_band: no values")
    med = statistics.median(xs)
    alpha = (1 - level) / 2
    k, tail = 0, 0.0
    while k < n // 2:  # the largest k with P(Binomial(n, 1/2) < k) <= alpha
        nxt = tail + math.comb(n, k) / 2 ** n
        if nxt > alpha:
            break
        tail, k = nxt, k + 1
    if k == 0:
        return med, xs[0], xs[-1]
    return med, xs[k - 1], xs[n - k]


def finalists(median_s: dict[str, float], origins: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(our fastest, the fastest peer) by their medians, where the group holds others too; None otherwise.
    ``origins``: plugin -> "ours" or "peer" (the registry's, where not given)."""
    from ..sweeps import origin_of

    if len(median_s) < 3:
        return None
    origin = {k: (origins or {}).get(k) or origin_of(k) for k in median_s}
    ours = [k for k in median_s if origin[k] != "peer"]
    peers = [k for k in median_s if origin[k] == "peer"]
    if not ours or not peers:
        return None
    return min(ours, key=median_s.get), min(peers, key=median_s.get)


def ratio(record: dict, a: str, b: str, final: bool = False) -> tuple[float, float, float] | None:
    """(median, low, high) of a's time over b's time in the same round, or None when either was not timed. From
    the rounds of all, or with ``final`` from the finalists' own rounds (``final_times_s``) where the record has
    both there (what "ours against the peers" reads: a table of every plugin keeps to one set of rounds)."""
    finals = (record.get("final_times_s") or {}) if final else {}
    times = finals if a in finals and b in finals else record.get("times_s") or {}
    ta, tb = times.get(a), times.get(b)
    if not ta or not tb:
        return None
    pairs = [x / y for x, y in zip(ta, tb) if y > 0]
    return median_band(pairs) if pairs else None


def fastest(record: dict, among=None) -> str | None:
    """The plugin with the smallest median time in the record (among ``among`` when given)."""
    med = {k: v for k, v in (record.get("median_s") or {}).items() if among is None or k in among}
    return min(med, key=med.get) if med else None


def fmt_ratio(band: tuple[float, float, float] | None) -> str:
    """``1.8× [1.6–2.1]``: the median ratio and its band."""
    if band is None:
        return ""
    med, lo, hi = band
    return f"{med:.3g}× [{lo:.3g}–{hi:.3g}]"


def read_records(run_dir: Path) -> dict[str, dict]:
    """paired id -> its last record in ``run_dir/paired.jsonl`` ({} when there is none; unreadable lines
    skipped). A record that does not match :class:`~ntk_bench.bench.store.row.PairedRecord` is kept (the
    summary reads what it can of it) with one warning for the file."""
    path = Path(run_dir) / PAIRED
    out: dict[str, dict] = {}
    off_schema = []
    try:
        data = path.read_bytes()
    except OSError:
        return out
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(obj, dict) and isinstance(obj.get("paired_id"), str):
            try:
                check_paired(obj)
            except RowError as exc:
                off_schema.append(str(exc))
            out[obj["paired_id"]] = obj
    if off_schema:
        logging.getLogger("ntk_bench").warning("%s: %d record(s) do not match the paired record's schema: %s", path,
                                               len(off_schema), "; ".join(off_schema[:2]))
    return out


# -- the measurement (in a worker) --------------------------------------------------------------

def _order(names: list[str], r: int) -> list[str]:
    """Round r's order: rotated by r // 2, reversed every other round (each plugin first in some round, and not
    always after the same one: with two plugins a rotation by r and a reversal would cancel)."""
    k = (r // 2) % len(names)
    order = names[k:] + names[:k]
    return order if r % 2 == 0 else order[::-1]


def time_rounds(calls: dict, budget_s: float, timer=time.perf_counter, min_rounds: int = MIN_ROUNDS,
                max_rounds: int = MAX_ROUNDS, sync=None, warmup_s: float = WARMUP_S,
                block_s: float = MIN_BLOCK_S) -> tuple[dict[str, list[float]], dict[str, int]]:
    """({name: per-round seconds per call}, {name: calls per block}) of the zero-argument ``calls``, timed in
    alternating rounds until ``budget_s`` is spent (at least ``min_rounds``, at most ``max_rounds``); a block is
    as many calls as last ``block_s``, and follows untimed calls of the same plugin lasting ``warmup_s`` (at least
    one; none for 0)."""
    names = list(calls)
    number = {}
    for name in names:  # calls per block: fast calls repeated so that a block outlasts the clock's resolution
        t0 = time.perf_counter()
        calls[name]()
        if sync is not None:
            sync()
        number[name] = max(1, math.ceil(block_s / max(time.perf_counter() - t0, 1e-9)))
    times: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.perf_counter() + budget_s
    r = 0
    while r < min_rounds or (r < max_rounds and time.perf_counter() < deadline):
        for name in _order(names, r):
            fn, n = calls[name], number[name]
            if warmup_s > 0:  # (until the time has passed: a count from one call would come from a cold one)
                end = time.perf_counter() + warmup_s
                while True:
                    fn()
                    if sync is not None:
                        sync()
                    if time.perf_counter() >= end:
                        break
            t0 = timer()
            for _ in range(n):
                fn()
            if sync is not None:
                sync()
            times[name].append((timer() - t0) / n)
        r += 1
    return times, number


def _final_rounds(times: dict, calls: dict, budget_s: float, timer, sync) -> tuple[dict | None, str | None]:
    """(the finalists' own rounds or None, why they failed or None): a failure there keeps the rounds of all."""
    from . import failures

    pair = finalists({k: statistics.median(v) for k, v in times.items()})
    if pair is None:
        return None, None
    try:
        return time_rounds({k: calls[k] for k in pair}, budget_s, timer, sync=sync)[0], None
    except Exception as exc:  # (memory, a plugin's failure on its n-th call): the ratio falls back to the rounds
        return None, failures.error_text(exc)[:300]


def run_paired(group: PairedGroup, run_dir: Path) -> dict:
    """Time the group's cases side by side (see the module docstring); return the record (never raises for a
    plugin's failure: it is left out, with its error)."""
    import torch

    from . import failures, machine, one_case, problem_build, timing

    first = group.first
    p = first.problem
    record = {"paired_id": group.id, "problem": p.id, "arch": p.arch,
              "arch_params": json.dumps(dict(p.arch_params), sort_keys=True), "N": p.n, "M": p.M,
              "x2": "x1" if p.m is None else "separate", "mode": first.mode, "dtype": first.dtype,
              "device": first.device, "memory_budget_bytes": first.memory_budget_bytes, "clock": first.clock,
              "case_ids": {c.impl: c.id for c in group.cases}, "budget_s": group.budget_s}
    t_start = time.perf_counter()
    try:
        _, model, x1, x2 = problem_build.build_problem(p, problem_build.DTYPES[first.dtype], first.device)
    except Exception as exc:  # the problem cannot be set up here: a record that says so
        return {**record, "status": failures.status_of(exc), "error": failures.error_text(exc)}
    calls, errors = {}, {}
    sync = torch.cuda.synchronize if first.device.startswith("cuda") else None
    with timing.threads_for(first.clock) as threads:
        for case in group.cases:
            try:
                fn, _ = one_case.kernel_fn(case, model, x1, x2, case.memory_budget_bytes)
                fn()  # set-up and compilation are the isolated run's first call, not the rounds'
                calls[case.impl] = fn
            except Exception as exc:  # it ran in its own case; here it is left out: say why, go on
                errors[case.impl] = failures.error_text(exc)[:300]
        if len(calls) < 2:
            return {**record, "status": "error", "errors": errors,
                    "error": "fewer than two plugins could be called side by side"}
        try:
            timer = timing.clock_for(first.clock, first.device)
            with machine.Usage(probe=not first.device.startswith("cuda")) as usage:
                times, number = time_rounds(calls, group.budget_s, timer, sync=sync)
                final, final_error = _final_rounds(times, calls, group.budget_s, timer, sync)
        except Exception as exc:  # one of them failed mid-rounds (memory beside the others): the record says so
            return {**record, "status": failures.status_of(exc), "errors": errors,
                    "error": failures.error_text(exc)}
    record.update(status="ok", impls=list(times), rounds=len(next(iter(times.values()))), number=number,
                  warmup_s=WARMUP_S, times_s=times, median_s={k: statistics.median(v) for k, v in times.items()},
                  errors=errors, wall_s=time.perf_counter() - t_start)
    if final is not None:
        record["final_times_s"] = final
    if final_error is not None:
        record["final_error"] = final_error
    record.update(machine.fields(usage, threads, first.device))
    return check_paired(record)
