"""Run a sweep: every case through an executor, each row appended to results.jsonl as it arrives.

``run(cases, out_dir, ...)`` checks everything before any work (each problem's
model built once, the devices, the run directory: its lock, and on ``resume``
that the file holds the same sweep, code and environment), then submits jobs
to the executor as their dependencies finish: a problem's float64 reference
before its cases, each group's ``auto`` case after our other plugins of the
group (auto is timed in alternating blocks against the fastest of them). Rows
are written as futures complete, in the order they finish.

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

from . import sweeps
from .executors import Executor, Job, JobFuture, LocalExecutor
from .rundir import (RESULTS, ResultsFile, RunDirError, RunLock, latest_rows, read_results, read_segments,
                     unwritable)
from .sweeps import Case, Problem

log = logging.getLogger("ntk_bench.runner")

# auto is timed in alternating blocks against every plugin of its case within this factor of the fastest one's
# separately measured time: which of them is really fastest, separate timings minutes apart cannot tell.
COMPARE_WITHIN = 1.25
MAX_COMPARED = 3
RETRY_STATUSES = ("timeout", "oom", "killed", "error", "unchecked")
STATUSES = ("ok", "mismatch", "unchecked", "unsupported", "timeout", "oom", "killed", "error")
# What must match for a resumed run to extend the file's last segment.
COMPARED = ("sweep", "sweep_sha1", "code_sha1", "user_code_sha1", "plugins", "torch", "numpy", "jax", "jaxlib",
            "neural_tangents", "backpack", "python", "device_name", "cuda", "cpu_count", "host")

__all__ = ["RunDirError", "RunSummary", "read_results", "read_segments", "run", "run_sweep"]


class RunExistsError(RunDirError, FileExistsError):
    """A results file is there and ``resume`` was not asked for."""


def _group(case: Case) -> tuple:
    """The cases that compute the same kernel the same way (all but the plugin)."""
    return case.problem.id, case.mode, case.dtype, case.device, case.memory_budget_bytes


def _near_fastest(times: dict[str, float]) -> tuple[str, ...]:
    """The plugins whose time is within COMPARE_WITHIN of the fastest, fastest first (at most MAX_COMPARED)."""
    if not times:
        return ()
    best = min(times.values())
    return tuple(sorted((i for i, t in times.items() if t <= COMPARE_WITHIN * best), key=times.get)[:MAX_COMPARED])


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
    """Seconds left, from the cost model's prediction for every case, scaled by how the finished ones went."""

    def __init__(self, predicted: dict[str, float], slots: int):
        self.predicted, self.slots = predicted, max(1, slots)
        self.actual_s = self.predicted_s = 0.0

    def done(self, case_id: str, wall_s: float) -> None:
        self.actual_s += wall_s
        self.predicted_s += self.predicted.get(case_id, 0.0)

    def left_s(self, case_ids) -> float | None:
        if not self.predicted:
            return None
        scale = min(10.0, max(0.1, self.actual_s / self.predicted_s)) if self.predicted_s > 0 else 1.0
        return scale * sum(self.predicted.get(c, 0.0) for c in case_ids) / self.slots


def predict_seconds(cases: list[Case], models: dict) -> dict[str, float]:
    """A case's predicted wall time: set-up, the warm-up and memory calls and the timing (auto's paired timings
    too), each call's time from auto's cost model and calibration; {} where the cost model cannot say."""
    try:
        from ntk_bench import implementations

        auto = implementations.get("auto")
    except Exception:  # no cost model here: the ETA counts cases instead
        return {}
    out = {}
    for case in cases:
        info = models.get(case.problem.model_key)
        p = case.problem
        device = "cuda" if case.device.startswith("cuda") else "cpu"
        call_s = case.time_budget_s
        if info is not None and info.stats is not None and case.impl not in info.declined:
            names = ([n for n in ("structured", "explicit_mlp", "jacobian_contraction") if n not in info.declined]
                     if case.impl == "auto" else [case.impl])
            budget = case.memory_budget_bytes or (8 << 30)
            guesses = []
            for name in names:
                try:
                    plugin = implementations.get(name if sweeps.kind_of(name) == "ours" else "jacobian_contraction")
                    guesses.append(auto.predict(plugin, info.stats, p.n, p.M, case.mode, p.m is None, device, budget)[0])
                except Exception:  # a plugin the cost model cannot cost on this model: leave it out
                    continue
            if guesses:
                call_s = min(guesses) * (3 if sweeps.kind_of(case.impl) == "peer" else 1)
        if info is not None and case.impl in info.declined:
            out[case.id] = 0.5
            continue
        seconds = 1.0 + 3 * call_s + max(case.time_budget_s, 5 * call_s)
        if case.impl == "auto":
            seconds += 3 * max(case.time_budget_s, 1.0)
        out[case.id] = seconds
    return out


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
    from . import measure

    return {**measure.environment(), "sweep": sweep_name, "sweep_sha1": sweeps.fingerprint(cases),
            "cases": len(cases), "plugins": list(plugins),
            "user_code_sha1": _files_sha1(sweeps.user_files(cases) + plugin_files(plugins))}


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
    models = models if models is not None else sweeps.check_models(cases)
    header = make_header(cases, sweep_name, plugins)
    summary = RunSummary(path, len(cases))

    def pending(latest: dict) -> list[Case]:
        return [c for c in cases if c.id not in latest
                or (retry_failed and latest[c.id].get("status") in RETRY_STATUSES)]

    def check_file(segments, latest) -> tuple[bool, bool]:
        """(a new segment needed, the file holds only a header)."""
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
        exists = path.exists() and path.stat().st_size > 0
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
            results.append({"header": {**header, **executor.describe(), "segment": len(segments)}})
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
    from . import measure

    start = time.monotonic()
    plugins = tuple(plugins)
    group_times: dict[tuple, dict[str, float]] = {}  # our plugins' ok times so far, per group

    def note_time(case: Case, row: dict) -> None:
        if case.impl != "auto" and sweeps.kind_of(case.impl) == "ours" and row.get("status") == "ok" \
                and not row.get("blocked_after_oom") and row.get("time_median_s") is not None:
            group_times.setdefault(_group(case), {})[case.impl] = row["time_median_s"]

    by_id = {c.id: c for c in cases}
    for cid, row in latest.items():
        note_time(by_id[cid], row)
    # dependencies: references first, auto after our other plugins of its group that are still to run
    refs_needed = {}
    for c in todo:
        if c.problem.id not in refs_needed:
            refs_needed[c.problem.id] = None if measure.reference_ok(c.problem, out_dir) else c.problem
    ref_done = {pid for pid, problem in refs_needed.items() if problem is None}
    # a reference may take as long as the longest of its cases: the sweep's timeout (or --timeout), nothing fixed
    ref_timeout: dict[str, float] = {}
    for c in cases:
        ref_timeout[c.problem.id] = max(ref_timeout.get(c.problem.id, 0.0), c.timeout_s)
    todo_ids = {c.id for c in todo}
    waits_for = {c.id: {o.id for o in todo if o.id != c.id and _group(o) == _group(c) and o.impl != "auto"
                        and sweeps.kind_of(o.impl) == "ours"} if c.impl == "auto" else set() for c in todo}
    finished: set[str] = set()
    queue = list(todo)
    ref_queue = [p for p in refs_needed.values() if p is not None]
    inflight: dict[JobFuture, tuple] = {}
    history: list[JobFuture] = []
    eta = _Eta(predict_seconds(todo, models), executor.slots)
    done_count = len(cases) - len(todo)
    reporter.start(len(cases), len(todo), executor.slots)

    def process(fut: JobFuture) -> None:
        nonlocal done_count
        kind, obj = inflight.pop(fut)
        if fut.cancelled():
            return
        row = fut.result()
        if row.get("executor_lost"):  # never ran to its end: no row, resume runs it
            return
        if kind == "reference":
            ref_done.add(obj.id)
            if row.get("status") != "ok":
                _reference_failed(obj, row, out_dir, reporter)
            return
        case: Case = obj
        if row.get("oom_killed") and not case.retry_blocked and case.memory_budget_bytes is None \
                and sweeps.kind_of(case.impl) != "peer" and not state.stop_requested:
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
        results.append(full)
        summary.ran += 1
        done_count += 1
        finished.add(case.id)
        todo_ids.discard(case.id)
        note_time(case, full)
        eta.done(case.id, full.get("case_wall_s") or 0.0)
        reporter.row(full, done_count, len(cases), eta.left_s(todo_ids))

    def keep_finished() -> None:
        """On a hard stop: write the rows that had arrived, before the running jobs are killed."""
        for fut in [f for f in inflight if f.done() and not f.cancelled()]:
            process(fut)

    state = _State()
    saved = _install_signals(state, reporter)
    try:
        while True:
            if not state.stop_requested:
                for problem in ref_queue:
                    fut = executor.submit(Job("reference", problem, ref_timeout[problem.id], plugins))
                    inflight[fut] = ("reference", problem)
                    history.append(fut)
                ref_queue = []
                for case in list(queue):
                    if case.problem.id in ref_done and not (waits_for[case.id] - finished):
                        if case.impl == "auto":
                            case = dataclasses.replace(case, compare_with=_near_fastest(
                                group_times.get(_group(case), {})))
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


def _reference_failed(problem: Problem, row: dict, out_dir: Path, reporter: Reporter) -> None:
    """Record why a problem's reference failed (its cases are then ``unchecked``; the next run tries again)."""
    from . import measure

    record = measure.read_reference_record(problem, out_dir)
    if record is None or record.get("status") == "ok":  # the job died before it could say why
        try:
            measure.write_reference_record(problem, out_dir, {"status": row.get("status", "error"),
                                                              "error": row.get("error", "no record")})
        except OSError as exc:
            reporter.note(f"cannot record the failed reference of {problem.id}: {exc}")
    reporter.note(f"the reference of {problem.id} failed ({row.get('status')}: {str(row.get('error'))[:200]}); its "
                  "cases are unchecked (--resume --retry-failed tries again)")


def _assemble(case: Case, row: dict, fut: JobFuture, history: list[JobFuture], models: dict, executor) -> dict:
    """The row as written: the worker's answer, the case's identity, what ran beside it, sizes for a crash."""
    from . import measure

    info = models.get(case.problem.model_key)
    size = {} if info is None else {"O": info.o, "P": info.p, "fp_flops": info.fp_flops}
    full = {**size, **row, **measure.case_fields(case)}
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
