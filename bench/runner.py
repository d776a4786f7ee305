"""Run a sweep: every case through an executor, each row appended to results.jsonl as it finishes.

The first line of results.jsonl is a header with the environment; every other
line is one case's row. Rows are flushed and fsynced one by one, so killing the
runner loses no finished row, and ``resume=True`` skips the cases already there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from . import measure
from .executors import Executor, LocalExecutor
from .sweeps import Case

REFERENCE_TIMEOUT_S = 900
# auto is timed in alternating blocks against every plugin of its case within this factor of the fastest one's
# separately measured time: which of them is really fastest, separate timings minutes apart cannot tell.
COMPARE_WITHIN = 1.25
MAX_COMPARED = 3


def _group(case: Case) -> tuple:
    """The cases that compute the same kernel the same way (all but the plugin)."""
    return case.problem.id, case.mode, case.dtype, case.device, case.memory_budget_bytes


def _near_fastest(times: dict[str, float]) -> tuple[str, ...]:
    """The plugins whose time is within COMPARE_WITHIN of the fastest, fastest first (at most MAX_COMPARED)."""
    if not times:
        return ()
    best = min(times.values())
    return tuple(sorted((i for i, t in times.items() if t <= COMPARE_WITHIN * best), key=times.get)[:MAX_COMPARED])


def read_results(path: Path) -> tuple[dict, list[dict]]:
    """(header, rows) of a results.jsonl; a torn last line (the runner killed mid-write) is dropped."""
    header, rows = {}, []
    for line in Path(path).read_text().splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "header" in obj:
            header = header or obj["header"]
        else:
            rows.append(obj)
    return header, rows


def _append(f, obj: dict) -> None:
    f.write(json.dumps(obj) + "\n")
    f.flush()
    os.fsync(f.fileno())


def run_sweep(cases: list[Case], out_dir: Path, sweep_name: str, executor: Executor | None = None,
              resume: bool = False, progress: bool = True, deadline_s: float | None = None) -> Path:
    """Run ``cases``, appending rows to ``out_dir/results.jsonl``; return that path.

    ``deadline_s``: start no case after this many seconds (a time-limited session);
    ``resume=True`` later runs the cases left.
    """
    start = time.monotonic()
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.jsonl"
    done: set[str] = set()
    if path.exists() and path.stat().st_size > 0:
        if not resume:
            raise FileExistsError(f"{path} already exists: pass --resume to continue that run, or another --out")
        header, rows = read_results(path)
        done = {r["case_id"] for r in rows}
        # Rewrite without a torn last line before appending to it.
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(o) + "\n" for o in [{"header": header}, *rows]))
        tmp.replace(path)
    todo = [c for c in cases if c.id not in done]
    by_id = {c.id: c for c in cases}
    group_times: dict[tuple, dict[str, float]] = {}  # our plugins' ok times so far, per group

    def note(case: Case, row: dict) -> None:
        if case.impl != "auto" and not case.impl.startswith("nt_") and row.get("status") == "ok" \
                and not row.get("blocked_after_oom"):
            group_times.setdefault(_group(case), {})[case.impl] = row["time_median_s"]

    if done:
        for r in read_results(path)[1]:
            if r.get("case_id") in by_id:
                note(by_id[r["case_id"]], r)
    executor = executor or LocalExecutor(out_dir)
    with open(path, "a") as f:
        if not done:
            _append(f, {"header": {**measure.environment(), "sweep": sweep_name, "cases": len(cases)}})
        bar = tqdm(total=len(cases), initial=len(cases) - len(todo), disable=not progress, unit="case",
                   dynamic_ncols=True)
        references: set[str] = set()
        try:
            for i, case in enumerate(todo):
                if deadline_s is not None and time.monotonic() - start > deadline_s:
                    print(f"deadline of {deadline_s:.0f} s reached: {len(todo) - i} of {len(cases)} cases left; "
                          f"run again with --resume to finish them", file=sys.stderr)
                    break
                bar.set_postfix_str(case.id, refresh=True)
                if case.problem.id not in references:
                    record = executor.run("reference", case.problem, REFERENCE_TIMEOUT_S)
                    if "block" not in record:  # the reference job itself failed or timed out
                        measure.write_reference_record(case.problem, out_dir, record)
                    references.add(case.problem.id)
                if case.impl == "auto":
                    case = dataclasses.replace(case, compare_with=_near_fastest(group_times.get(_group(case), {})))
                started = time.monotonic()
                row = executor.run("case", case, case.timeout_s)
                note(case, row)
                row["case_wall_s"] = time.monotonic() - started  # the whole case: set-up, checks and timing
                if "O" not in row:  # the worker never answered (timeout, crash): the model's size from here
                    row = {**measure.problem_size(case.problem), **row}
                _append(f, {**measure.case_fields(case), **row})
                bar.update()
        finally:
            bar.close()
            executor.close()
    return path
