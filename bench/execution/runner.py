"""Run a sweep: every case through an executor, each row appended to results.jsonl as it arrives.

``run(cases, out_dir, ...)`` checks everything before any work (each problem's
model built once, the devices, the run directory: its lock, and on ``resume``
that the file holds the same sweep, code and environment), then submits jobs
to the executor as their dependencies finish: a problem's float64 reference
before its cases, each group's ``auto`` case after our other plugins of the
group, and once every case of a group has its row, the group's ``ok`` cases
timed side by side in one worker (``paired``: the records go to paired.jsonl).
Rows are written as futures complete, in the order they finish.

- ``resume=True`` skips the cases that have a row; with ``retry_failed`` the
  ones whose last row is ``timeout``, ``oom``, ``killed``, ``error`` or
  ``unchecked`` run again (the last row of a case wins). A file from another
  sweep, code version or environment is refused, listing what differs;
  ``force=True`` appends a new segment with its own header. A run with nothing
  left to do needs no write access at all.
- A case the kernel's OOM killer ended is run once more, blocked under a budget
  that respects the worker's memory limits (``blocked_after_oom``).
- Ctrl-C (SIGINT) stops starting cases and lets the running ones finish their
  rows; a second Ctrl-C, SIGTERM or SIGHUP stops them now, as does the loss of
  the executor's engine (``Executor.failure``). Either way the workers die with
  the runner, and ``resume`` finishes the rest.
- Each row records what ran beside it (``concurrent``: the other jobs whose run
  overlapped it), where (``worker``, ``cpu_affinity``) and its whole wall time.

See ``rundir`` for the lock, the file format and what holds on shared storage.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from .. import sweeps
from ..measurement import envcheck
from ..store import safefs
from ..store.row import RowError, check_header, check_paired, check_row
from ..store.rundir import (
    FORMAT_VERSION,
    RESULTS,
    ResultsFile,
    RunDirError,
    RunLock,
    latest_rows,
    read_results,
    read_segments,
    unwritable,
)
from ..sweeps import Case, Problem
from .executors import Executor, Job, JobFuture, LocalExecutor

log = logging.getLogger("ntk_bench.runner")

RETRY_STATUSES = ("timeout", "oom", "killed", "error", "unchecked")
STATUSES = ("ok", "mismatch", "unchecked", "unsupported", "timeout", "oom", "killed", "error")
# What must match for a resumed run to extend the file's last segment.
COMPARED = ("sweep", "sweep_sha1", "clock", "code_sha1", "user_code_sha1", "plugins", "torch", "numpy", "jax", "jaxlib",
            "neural_tangents", "backpack", "python", "device_name", "cuda", "cpu_count", "host", "worker_env")

__all__ = ["RunDirError", "RunSummary", "read_results", "read_segments", "run", "run_sweep"]


class RunExistsError(RunDirError, FileExistsError):
    """A results file is there and ``resume`` was not asked for."""


def _group(case: Case) -> tuple:
    """The cases that compute the same kernel the same way (all but the plugin)."""
    return case.problem.id, case.mode, case.dtype, case.device, case.memory_budget_bytes


# -- reporting -----------------------------------------------------------------------------------

class Reporter:
    """What the runner tells as it goes; the CLI prints it (a line per case, or a bar), the default logs it."""

    def start(self, total: int, todo: int, slots: int) -> None:
        log.info("%d of %d cases to run on %d worker(s)", todo, total, slots)

    def row(self, row: dict, done: int, total: int, eta_s: float | None) -> None:
        log.debug("[%d/%d] %s %s", done, total, row.get("status"), row.get("case_id"))

    def note(self, message: str, level: int = logging.WARNING) -> None:
        log.log(level, "%s", message)

    def finish(self, summary: "RunSummary") -> None:
        pass


@dataclasses.dataclass
class RunSummary:
    path: Path
    total: int  # cases in the sweep
    ran: int = 0  # rows written by this run
    counts: dict = dataclasses.field(default_factory=dict)  # status -> cases, from each case's last row
    interrupted: str | None = None  # "SIGINT" (finished the running cases), "SIGINT twice", "SIGTERM", "SIGHUP",
    # or "<executor> executor lost: why"
    deadline_hit: bool = False
    nothing_to_do: bool = False
    left: int = 0  # cases without a row after this run
    elapsed_s: float = 0.0
    rows: dict = dataclasses.field(default_factory=dict)  # case id -> its last row (this sweep's cases)


class _Eta:
    """Seconds left: the cost model's prediction for every job still to run, refitted as jobs finish.

    Each plugin's predictions are scaled by how its finished cases went (its actual over predicted seconds),
    blended with the run's overall ratio while it has few finished cases; jobs of a plugin with none finished yet
    take the overall ratio. (A cost model that is 5x off on the peers and right on ours is corrected per plugin.)
    Then everything is scaled by the run's elapsed wall time over the jobs' own: what the jobs do not count (the
    references, workers starting again, the gaps between jobs) takes its share of what is left too.
    """

    def __init__(self, predicted: dict[str, float], slots: int, groups: dict[str, str] | None = None,
                 clock=time.monotonic):
        self.predicted, self.slots = dict(predicted), max(1, slots)
        self.groups = dict(groups or {})  # job id -> its plugin (or "paired")
        self.actual_s = self.predicted_s = 0.0
        self.by_group: dict[str, list[float]] = {}  # plugin -> [actual, predicted]
        self.clock, self.started = clock, clock()
        self.one_off_s = 0.0  # wall time of what happens once, mostly first: references, worker start-ups
        self.measured: set[str] = set()  # groups predicted from measured times, not the cost model

    def add(self, job_id: str, seconds: float, group: str, measured: bool = False) -> None:
        """A job the run learned of after it started (a group's paired timing); ``measured``: its prediction
        comes from this run's own times (scaled by nothing until jobs of its group have finished)."""
        self.predicted[job_id], self.groups[job_id] = seconds, group
        if measured:
            self.measured.add(group)

    def done(self, job_id: str, wall_s: float) -> None:
        p = self.predicted.get(job_id, 0.0)
        self.actual_s += wall_s
        self.predicted_s += p
        acc = self.by_group.setdefault(self.groups.get(job_id, "?"), [0.0, 0.0])
        acc[0] += wall_s
        acc[1] += p

    def one_off(self, seconds: float) -> None:
        """Time spent on something that does not recur in proportion to the jobs left (a reference, a worker's
        start-up): left out of the overhead."""
        self.one_off_s += max(0.0, seconds or 0.0)

    def overhead(self) -> float:
        """The run's elapsed wall time (on all its slots, one-off work left out) over the finished jobs' own wall
        time (at least 1)."""
        if self.actual_s <= 0:
            return 1.0
        elapsed = (self.clock() - self.started) * self.slots - self.one_off_s
        return min(5.0, max(1.0, elapsed / self.actual_s))

    def scale(self, group: str | None = None) -> float:
        overall = min(10.0, max(0.1, self.actual_s / self.predicted_s)) if self.predicted_s > 0 else 1.0
        if group in self.measured:
            overall = 1.0  # times measured in this run already carry the machine's state
        acc = self.by_group.get(group)
        if acc is None or acc[1] <= 0:
            return overall
        prior = self.predicted_s / max(1, len(self.by_group)) / 4  # the overall ratio's weight
        return min(20.0, max(0.05, (acc[0] + overall * prior) / (acc[1] + prior)))

    def left_s(self, job_ids) -> float | None:
        if not self.predicted:
            return None
        left = sum(self.scale(self.groups.get(j)) * self.predicted.get(j, 0.0) for j in job_ids)
        return left * self.overhead() / self.slots


# A peer's call over our cheapest plugin's predicted call, for the run's prediction only: the PyTorch NTK libraries
# build per-sample Jacobians with generic hooks (typical factors over jacobian_contraction in
# results/2026-11-23-peers-cpu); neural-tangents' and other peers: 3.
PEER_CALL_FACTOR = {"asdl": 15.0, "nngeometry": 15.0, "curvlinops": 10.0, "laplace": 5.0}


def _call_seconds(case: Case, info, auto) -> float:
    """One call's predicted seconds (auto's cost model and calibration); the case's time budget where it cannot
    say."""
    from ntk_bench import implementations

    p = case.problem
    device = "cuda" if case.device.startswith("cuda") else "cpu"
    if info is None or info.stats is None or case.impl in info.declined or auto is None:
        return case.time_budget_s
    names = ([n for n in ("structured", "explicit_mlp", "jacobian_contraction") if n not in info.declined]
             if case.impl == "auto" else [case.impl])
    budget = case.memory_budget_bytes or (8 << 30)
    guesses = []
    for name in names:
        try:
            plugin = implementations.get(name if sweeps.origin_of(name) == "ours" else "jacobian_contraction")
            guesses.append(auto.predict(plugin, info.stats, p.n, p.M, case.mode, p.m is None, device, budget)[0])
        except Exception:  # a plugin the cost model cannot cost on this model: leave it out
            continue
    if not guesses:
        return case.time_budget_s
    return min(guesses) * (PEER_CALL_FACTOR.get(case.impl, 3) if sweeps.origin_of(case.impl) == "peer" else 1)


def _auto():
    try:
        from ntk_bench import implementations

        return implementations.get("auto")
    except Exception:  # no cost model here: the ETA counts cases instead
        return None


def predict_seconds(cases: list[Case], models: dict) -> dict[str, float]:
    """A case's predicted wall time: set-up, the warm-up and memory calls and the timing, each call's time from
    auto's cost model and calibration; {} where the cost model cannot say."""
    auto = _auto()
    if auto is None:
        return {}
    out = {}
    for case in cases:
        info = models.get(case.problem.model_key)
        if info is not None and case.impl in info.declined:
            out[case.id] = 0.5
            continue
        call_s = _call_seconds(case, info, auto)
        out[case.id] = 1.0 + 3 * call_s + max(case.time_budget_s, 5 * call_s)
    return out


def measured_paired_seconds(rows: list[dict], budget_s: float, warmup_s: float | None = None,
                            finals: bool = True) -> float:
    """A group's paired job's predicted wall time from its cases' rows: each plugin's set-up and first call (its
    ``first_call_s``: a jit compile, a plan) and its rounds at its calls' wall time, with each block's untimed
    calls (``warmup_s``, default ``paired.WARMUP_S``), then the finalists' own rounds (``finals``: runs made before
    them had none). A CPU-clock median is turned into wall time by the row's ``cpu_over_wall``: on a busy machine
    the rounds wait for a core as the case's timed calls did, and a peer whose own threads ran beside the timed one
    (XLA's) took less wall time than CPU time."""
    from ..measurement import paired

    calls, origins = {}, {}
    for i, row in enumerate(rows):
        t = row["time_median_s"]
        share = row.get("cpu_over_wall")
        if row.get("clock") == "cpu" and share:
            t /= max(0.05, share)
        name = row.get("impl") or f"#{i}"
        calls[name], origins[name] = t, row.get("origin") or "ours"
    warmup = paired.WARMUP_S if warmup_s is None else warmup_s
    return paired.predict_group_seconds(calls, budget_s, warmup, origins, finals) + \
        sum(row.get("first_call_s") or 0.0 for row in rows)


def paired_budget(case: Case) -> float:
    """Seconds of side-by-side rounds for a group (at least ``paired.MIN_ROUNDS`` rounds whatever it is)."""
    return max(1.0, 10 * case.time_budget_s)


def predict_paired(cases: list[Case], models: dict) -> dict[str, float]:
    """Each group's paired timing's predicted wall time (the plugins that do not decline its model), its
    finalists' own rounds included."""
    from ..measurement import paired

    auto = _auto()
    calls: dict[str, dict[str, float]] = {}
    first: dict[str, Case] = {}
    for case in cases:
        info = models.get(case.problem.model_key)
        gid = paired.group_id(case)
        first.setdefault(gid, case)
        calls.setdefault(gid, {})
        if info is None or case.impl not in info.declined:
            calls[gid][case.impl] = _call_seconds(case, info, auto) if auto is not None else case.time_budget_s
    return {gid: paired.predict_group_seconds(c, paired_budget(first[gid])) for gid, c in calls.items() if len(c) >= 2}


def estimate(cases: list[Case], models: dict, slots: int = 1) -> tuple[float, list[tuple[str, float]]]:
    """(the sweep's predicted wall time in seconds on ``slots`` workers, [(case id, seconds)] slowest first)."""
    per_case = predict_seconds(cases, models)
    if not per_case:
        per_case = {c.id: 1.0 + 6 * c.time_budget_s for c in cases}
    total = sum(per_case.values()) + sum(predict_paired(cases, models).values())
    return total / max(1, slots), sorted(per_case.items(), key=lambda kv: -kv[1])


# -- the header and what a resume must match ------------------------------------------------------------

def _files_sha1(files) -> str | None:
    files = sorted({Path(f).resolve() for f in files if f is not None})
    if not files:
        return None
    digest = hashlib.sha1()
    for f in files:
        try:
            digest.update(str(f).encode() + b"\0" + f.read_bytes())
        except OSError:
            digest.update(str(f).encode() + b"\0missing")
    return digest.hexdigest()[:12]


def plugin_files(plugins) -> list[Path]:
    out = []
    for module in plugins:
        mod = sys.modules.get(module)
        if mod is not None and getattr(mod, "__file__", None):
            out.append(Path(mod.__file__))
    return out


def make_header(cases: list[Case], sweep_name: str, plugins=()) -> dict:
    from ..measurement import environment

    header = {"format_version": FORMAT_VERSION, **environment.environment(), "sweep": sweep_name,
              "sweep_sha1": sweeps.fingerprint(cases), "clock": cases[0].clock if cases else "wall",
              "cases": len(cases), "plugins": list(plugins),
              "user_code_sha1": _files_sha1(sweeps.user_files(cases) + plugin_files(plugins))}
    worker_env = envcheck.worker_env()
    if worker_env:  # the user's pinning reaches every worker: the header says so, and what the rows' threads are
        header["worker_env"] = worker_env
        header["cpu_threads"] = envcheck.worker_threads(worker_env)
    return header


def differences(old: dict, new: dict, cases: list[Case], rows: list[dict]) -> list[str]:
    """What differs between a file's header and this run's, one line each (the cases spelled out)."""
    lines = []
    for key in COMPARED:
        a, b = old.get(key), new.get(key)
        if a == b or (key in ("plugins",) and not a and not b):
            continue
        if key == "sweep_sha1":
            ids = {c.id for c in cases}
            theirs = {r["case_id"] for r in rows}
            extra, missing = sorted(theirs - ids), len(ids - theirs)
            detail = f" ({len(extra)} of the file's cases are not in this sweep" + \
                     (f", e.g. {extra[0]}" if extra else "") + f"; this sweep has {missing} case(s) the file has no " \
                     "row for; or their time budgets or model sources differ)"
            lines.append(f"the sweep's cases: {a} -> {b}{detail}")
        else:
            lines.append(f"{key}: {a!r} -> {b!r}")
    return lines


# -- the run ---------------------------------------------------------------------------------------------

class _Terminated(BaseException):
    """SIGTERM, SIGHUP (a closed terminal) or the executor's engine lost: stop now. Its argument: what happened."""


class _State:
    def __init__(self):
        self.stop_requested = False  # the first Ctrl-C: start nothing more


def _install_signals(state: _State, reporter: Reporter):
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_sigint(signum, frame):
        if state.stop_requested:
            raise KeyboardInterrupt
        state.stop_requested = True
        reporter.note("interrupted: finishing the running case(s); press Ctrl-C again to stop them now")

    def on_sigterm(signum, frame):
        raise _Terminated(signal.Signals(signum).name)

    return {sig: signal.signal(sig, handler)
            for sig, handler in ((signal.SIGINT, on_sigint), (signal.SIGTERM, on_sigterm), (signal.SIGHUP, on_sigterm))}


def _restore_signals(saved) -> None:
    for sig, handler in (saved or {}).items():
        signal.signal(sig, handler)


def _case_rows(path: Path, cases: list[Case], warn: bool = True) -> tuple[list[tuple[dict, list[dict]]], dict]:
    segments = read_segments(path, warn) if path.exists() else []
    ids = {c.id for c in cases}
    latest = {k: v for k, v in latest_rows([r for _, rows in segments for r in rows]).items() if k in ids}
    return segments, latest


def _summary_counts(latest: dict) -> dict:
    counts: dict[str, int] = {}
    for r in latest.values():
        counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
    return counts


def run(cases: list[Case], out_dir: Path, sweep_name: str, executor: Executor | None = None, resume: bool = False,
        force: bool = False, retry_failed: bool = False, deadline_s: float | None = None, plugins=(),
        reporter: Reporter | None = None, models: dict | None = None, check_devices: bool | None = None) -> RunSummary:
    """Run ``cases`` into ``out_dir/results.jsonl``; return what happened (see the module docstring).

    Raises ``sweeps.SweepError`` for a sweep that cannot run here (a model that cannot be built, a device this
    machine lacks) and ``RunDirError`` for a run directory that cannot be used, both before any work.
    ``check_devices``: check the cases' devices on this machine (default: when the executor is local).
    """
    t_start = time.monotonic()
    reporter = reporter or Reporter()
    out_dir = Path(out_dir)
    path = out_dir / RESULTS
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise sweeps.SweepError("the same case appears twice in the sweep")
    if check_devices or (check_devices is None and (executor is None or isinstance(executor, LocalExecutor))):
        sweeps.check_devices(cases)
    slots = getattr(executor, "slot_list", None)
    if slots is not None:
        lacking = sorted({c.device for c in cases if not any(s.accepts(Job("case", c, 1.0)) for s in slots)})
        if lacking:
            raise sweeps.SweepError(f"no worker of this executor runs {', '.join(lacking)} cases (workers: "
                                    f"{', '.join(s.label for s in slots)}); add them to --devices")
    envcheck.startup_seconds()  # ValueError naming a bad value, before any work
    calibration = envcheck.calibration_problem()
    if calibration:
        reporter.note(calibration)
    worker_env = envcheck.worker_env()
    if worker_env:
        reporter.note(f"{', '.join(f'{k}={v}' for k, v in worker_env.items())} from your environment: every worker of "
                      f"this run uses it (recorded in the header as worker_env)", logging.INFO)
    models = models if models is not None else sweeps.check_models(cases)
    header = make_header(cases, sweep_name, plugins)
    summary = RunSummary(path, len(cases))

    def pending(latest: dict) -> list[Case]:
        return [c for c in cases if c.id not in latest
                or (retry_failed and latest[c.id].get("status") in RETRY_STATUSES)]

    def check_file(segments, latest) -> tuple[bool, bool]:
        """(a new segment needed, the file holds only a header)."""
        if not any(h for h, _ in segments) and path.exists() and path.stat().st_size > 0 \
                and not (resume and force):
            raise RunDirError(f"{path} is not an ntk-bench results file (no header line reads): pass --resume --force "
                              "to keep it and append a new segment, or use another --out")
        if not segments:
            return True, False
        if not resume:
            raise RunExistsError(f"{path} already exists: pass --resume to continue that run, or another --out")
        old = segments[-1][0]
        all_rows = [r for _, rows in segments for r in rows]
        diffs = differences(old, header, cases, all_rows)
        if diffs and not force:
            raise RunDirError(f"{path} holds another run than this one; what differs:\n  " + "\n  ".join(diffs)
                              + "\npass --force to append a new segment with its own header, or use another --out")
        return bool(diffs), not all_rows

    try:
        exists = safefs.check_regular(path) and path.stat().st_size > 0
    except safefs.UnsafeFileError as exc:
        raise RunDirError(str(exc)) from None
    except OSError as exc:
        raise RunDirError(f"cannot read {path}: {exc.strerror or exc}") from None
    if exists:
        segments, latest = _case_rows(path, cases)
        check_file(segments, latest)
        if not pending(latest):
            summary.nothing_to_do, summary.rows = True, latest
            summary.counts = _summary_counts(latest)
            reporter.note(f"nothing to do: all {len(cases)} cases have a row in {path}", logging.INFO)
            reporter.finish(summary)
            return summary
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(unwritable(out_dir, exc)) from None
    lock = RunLock(out_dir).acquire()
    results = None
    own_executor = executor is None
    try:
        # Read again under the lock: another runner may have finished cases since.
        exists = path.exists() and path.stat().st_size > 0
        segments, latest = _case_rows(path, cases, warn=False) if exists else ([], {})
        new_segment, header_only = check_file(segments, latest)
        todo = pending(latest)
        results = ResultsFile(path).open()
        if header_only and new_segment:
            import os

            os.ftruncate(results.fd, 0)  # a header with no rows under it: replaced, never doubled
            segments = []
        if own_executor:
            executor = LocalExecutor(out_dir, cuda_cases=any(c.device != "cpu" for c in cases))
        if new_segment:
            results.append({"header": check_header({**header, **executor.describe(), "segment": len(segments)})})
        _schedule(cases, todo, latest, out_dir, executor, results, summary, reporter, models, plugins, deadline_s)
    except BaseException:
        if executor is not None:
            executor.kill_running()
        raise
    finally:
        if executor is not None:
            executor.close()
        if results is not None:
            results.close()
        lock.release()
    _, latest = _case_rows(path, cases, warn=False)
    summary.rows, summary.counts = latest, _summary_counts(latest)
    summary.left = sum(1 for c in cases if c.id not in latest)
    summary.elapsed_s = time.monotonic() - t_start
    reporter.finish(summary)
    return summary


def _schedule(cases, todo, latest, out_dir, executor, results, summary, reporter, models, plugins, deadline_s):
    """Submit jobs as their dependencies finish; write rows as they arrive."""
    from ..measurement import one_case, paired, references

    start = time.monotonic()
    plugins = tuple(plugins)
    group_times: dict[tuple, dict[str, float]] = {}  # our plugins' ok times so far, per group

    def note_time(case: Case, row: dict) -> None:
        if case.impl != "auto" and sweeps.origin_of(case.impl) == "ours" and row.get("status") == "ok" \
                and not row.get("blocked_after_oom") and row.get("time_median_s") is not None:
            group_times.setdefault(_group(case), {})[case.impl] = row["time_median_s"]

    by_id = {c.id: c for c in cases}
    for cid, row in latest.items():
        note_time(by_id[cid], row)
    # dependencies: references first, auto after our other plugins of its group that are still to run
    refs_needed = {}
    for c in todo:
        if c.problem.id not in refs_needed:
            refs_needed[c.problem.id] = None if references.reference_ok(c.problem, out_dir) else c.problem
    ref_done = {pid for pid, problem in refs_needed.items() if problem is None}
    # a reference may take as long as the longest of its cases: the sweep's timeout (or --timeout), nothing fixed
    ref_timeout: dict[str, float] = {}
    for c in cases:
        ref_timeout[c.problem.id] = max(ref_timeout.get(c.problem.id, 0.0), c.timeout_s)
    todo_ids = {c.id for c in todo}
    waits_for = {c.id: {o.id for o in todo if o.id != c.id and _group(o) == _group(c) and o.impl != "auto"
                        and sweeps.origin_of(o.impl) == "ours"} if c.impl == "auto" else set() for c in todo}
    finished: set[str] = set()
    queue = list(todo)
    ref_queue = [p for p in refs_needed.values() if p is not None]
    inflight: dict[JobFuture, tuple] = {}
    history: list[JobFuture] = []
    # paired timing: a group's ok cases side by side in one worker, once every case of the group has its row
    rows_now = dict(latest)
    group_of = {c.id: paired.group_id(c) for c in cases}
    members: dict[str, list[Case]] = {}
    for c in cases:
        members.setdefault(group_of[c.id], []).append(c)
    ran_now = {group_of[c.id] for c in todo}  # groups with a case to run: their paired timing is redone
    paired_done = {gid for gid in paired.read_records(out_dir) if gid not in ran_now}
    paired_file: list = []  # the open paired.jsonl, once there is a record to write
    predicted = predict_seconds(todo, models)
    groups = {c.id: c.impl for c in todo}
    eta = _Eta(predicted, executor.slots, groups)
    for gid, seconds in predict_paired([c for c in cases if group_of[c.id] not in paired_done], models).items():
        eta.add(gid, seconds, "paired, from the cost model")  # replaced by its measured prediction when submitted
    pending_paired = {gid for gid in eta.predicted if gid.startswith("paired/")}
    done_count = len(cases) - len(todo)
    reporter.start(len(cases), len(todo), executor.slots)

    def submit_paired(gid: str) -> None:
        """Time the group's ok cases side by side, when every case of it has a row and two or more are ok."""
        if gid in paired_done or state.stop_requested or any(c.id not in rows_now for c in members[gid]):
            return
        paired_done.add(gid)
        ok = [c for c in members[gid] if rows_now[c.id].get("status") == "ok"
              and rows_now[c.id].get("time_median_s") is not None and not rows_now[c.id].get("blocked_after_oom")]
        if len(ok) < 2:
            pending_paired.discard(gid)
            return
        calls = {c.impl: rows_now[c.id]["time_median_s"] for c in ok}
        firsts = sum(rows_now[c.id].get("first_call_s") or 0.0 for c in ok)
        budget = paired_budget(ok[0])
        group = paired.PairedGroup(tuple(ok), budget)
        eta.add(gid, measured_paired_seconds([rows_now[c.id] for c in ok], budget), "paired", measured=True)
        pending_paired.add(gid)
        timeout = max(c.timeout_s for c in ok) + firsts + 3 * paired.predict_group_seconds(calls, budget)
        fut = executor.submit(Job("paired", group, timeout, plugins))
        inflight[fut] = ("paired", group)
        history.append(fut)

    def write_paired(fut: JobFuture, group, record: dict) -> None:
        record = {**record, "paired_id": group.id}
        if fut.started_at is not None and fut.finished_at is not None:
            record["job_wall_s"] = fut.finished_at - fut.started_at - (record.get("worker_startup_s") or 0.0)
        record.setdefault("status", "error")
        try:
            record = check_paired(record)
        except RowError as exc:  # written as it is (its rounds are worth keeping), and said
            reporter.note(f"{group.id}: the paired record does not match its schema: {exc}")
        if not paired_file:
            paired_file.append(ResultsFile(out_dir / paired.PAIRED).open())
        paired_file[0].append(record)
        pending_paired.discard(group.id)
        eta.done(group.id, record.get("job_wall_s") or 0.0)

    def process(fut: JobFuture) -> None:
        nonlocal done_count
        task, obj = inflight.pop(fut)
        if fut.cancelled():
            return
        row = fut.result()
        if row.get("executor_lost"):  # never ran to its end: no row, resume runs it
            return
        eta.one_off(row.get("worker_startup_s") or 0.0)
        if task == "reference":
            if fut.started_at is not None and fut.finished_at is not None:
                eta.one_off(fut.finished_at - fut.started_at)
            ref_done.add(obj.id)
            if row.get("status") != "ok":
                _reference_failed(obj, row, out_dir, reporter)
            return
        if task == "paired":
            write_paired(fut, obj, row)
            return
        case: Case = obj
        if row.get("oom_killed") and not case.retry_blocked and case.memory_budget_bytes is None \
                and sweeps.origin_of(case.impl) != "peer" and not state.stop_requested:
            reporter.note(f"{case.id}: {row.get('error')}; running it again blocked under a budget that "
                          "fits this worker's memory limit", logging.INFO)
            retry = dataclasses.replace(case, retry_blocked=True)
            new = executor.submit(Job("case", retry, case.timeout_s, plugins))
            inflight[new] = ("case", retry)
            history.append(new)
            new.first_try = row
            return
        full = _assemble(case, row, fut, history, models, executor)
        first = getattr(fut, "first_try", None)
        if first is not None:
            full.update(blocked_after_oom=True, first_try_error=str(first.get("error"))[:300])
        try:
            full = check_row(full)
        except RowError as exc:  # a row our own code made wrong: kept as an error row that says so, the run goes on
            reporter.note(f"{case.id}: {exc}")
            full = check_row({**one_case.case_fields(case), "status": "error",
                              "error": f"the row did not match the row schema: {exc}"[:1000]})
        results.append(full)
        summary.ran += 1
        done_count += 1
        finished.add(case.id)
        todo_ids.discard(case.id)
        note_time(case, full)
        rows_now[case.id] = full
        eta.done(case.id, full.get("case_wall_s") or 0.0)
        submit_paired(group_of[case.id])
        reporter.row(full, done_count, len(cases), eta.left_s(todo_ids | pending_paired))

    def keep_finished() -> None:
        """On a hard stop: write the rows that had arrived, before the running jobs are killed."""
        for fut in [f for f in inflight if f.done() and not f.cancelled()]:
            process(fut)

    state = _State()
    saved = _install_signals(state, reporter)
    try:
        for gid in members:  # groups whose cases all have rows from before (a resumed run)
            submit_paired(gid)
        while True:
            if not state.stop_requested:
                for problem in ref_queue:
                    fut = executor.submit(Job("reference", problem, ref_timeout[problem.id], plugins))
                    inflight[fut] = ("reference", problem)
                    history.append(fut)
                ref_queue = []
                for case in list(queue):
                    if case.problem.id in ref_done and not (waits_for[case.id] - finished):
                        fut = executor.submit(Job("case", case, case.timeout_s, plugins))
                        inflight[fut] = ("case", case)
                        history.append(fut)
                        queue.remove(by_id[case.id])
            if not inflight:
                break
            done_futs, _ = concurrent.futures.wait(list(inflight), timeout=0.25,
                                                   return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done_futs:
                process(fut)
            lost = getattr(executor, "failure", lambda: None)()
            if lost:
                raise _Terminated(f"{executor.name} executor lost: {lost}")
            if not state.stop_requested and deadline_s is not None and time.monotonic() - start > deadline_s:
                state.stop_requested = True
                summary.deadline_hit = True
                executor.cancel_pending()
                reporter.note(f"deadline of {deadline_s:.0f} s reached: {len(todo_ids)} of {len(cases)} cases left; "
                              "run again with --resume to finish them")
            elif state.stop_requested and summary.interrupted is None and not summary.deadline_hit:
                summary.interrupted = "SIGINT"
                executor.cancel_pending()
        if state.stop_requested and summary.interrupted is None and not summary.deadline_hit:
            summary.interrupted = "SIGINT"
    except (KeyboardInterrupt, _Terminated) as exc:
        summary.interrupted = exc.args[0] if isinstance(exc, _Terminated) else "SIGINT twice"
        state.stop_requested = True
        keep_finished()
        executor.kill_running()
    finally:
        _restore_signals(saved)
        if paired_file:
            paired_file[0].close()


def _reference_failed(problem: Problem, row: dict, out_dir: Path, reporter: Reporter) -> None:
    """Record why a problem's reference failed (its cases are then ``unchecked``; the next run tries again)."""
    from ..measurement import references

    record = references.read_reference_record(problem, out_dir)
    if record is None or record.get("status") == "ok":  # the job died before it could say why
        try:
            references.write_reference_record(problem, out_dir, {"status": row.get("status", "error"),
                                                              "error": row.get("error", "no record")})
        except OSError as exc:
            reporter.note(f"cannot record the failed reference of {problem.id}: {exc}")
    reporter.note(f"the reference of {problem.id} failed ({row.get('status')}: {str(row.get('error'))[:200]}); its "
                  "cases are unchecked (--resume --retry-failed tries again)")


def _assemble(case: Case, row: dict, fut: JobFuture, history: list[JobFuture], models: dict, executor) -> dict:
    """The row as written: the worker's answer, the case's identity, what ran beside it, sizes for a crash."""
    from ..measurement import one_case

    info = models.get(case.problem.model_key)
    size = {} if info is None else {"O": info.o, "P": info.p, "fp_flops": info.fp_flops}
    full = {**size, **row, **one_case.case_fields(case)}
    if fut.started_at is not None and fut.finished_at is not None:
        # the whole case (set-up, checks and timing), not its worker's start-up
        full["case_wall_s"] = fut.finished_at - fut.started_at - (row.get("worker_startup_s") or 0.0)
        full["concurrent"] = sorted(
            h.job.id for h in history if h is not fut and h.started_at is not None
            and h.started_at < fut.finished_at and (h.finished_at is None or h.finished_at > fut.started_at))
    full["executor"] = executor.name
    if fut.where is not None:
        full.setdefault("worker", fut.where)
    full.setdefault("status", "error")
    return full


def run_sweep(cases: list[Case], out_dir: Path, sweep_name: str, executor: Executor | None = None,
              resume: bool = False, progress: bool = True, deadline_s: float | None = None, **kwargs) -> Path:
    """``run`` returning the results path; an interrupted run raises KeyboardInterrupt after its rows are written."""
    summary = run(cases, out_dir, sweep_name, executor=executor, resume=resume, deadline_s=deadline_s, **kwargs)
    if summary.interrupted:
        raise KeyboardInterrupt(summary.interrupted)
    return summary.path
