"""Compare two runs case by case: ``ntk-bench compare RUN_A RUN_B [--fail-above 1.10] [--out DIR]``.

A run is a run directory (``ntk-bench run``, ``python -m ntk_bench.bench.measurement.gate``) or pytest-benchmark's saved
JSON (``load_pytest_benchmark``: the ``ntk_case`` fixture's rows, or any benchmark).

For every case (matched by ``case_id``) the ratio B/A of the median times and a
band around it that accounts for the measured noise:

- both rows have ``time_blocks_s`` (the seconds per call of each timing block):
  a 95% bootstrap band of the ratio of the medians (the blocks resampled), and
  a two-sided Mann–Whitney rank test of the two sets of blocks (scipy);
- otherwise, interval arithmetic on the interquartile ranges:
  [(B − IQR_B/2)/(A + IQR_A/2), (B + IQR_B/2)/(A − IQR_A/2)].

The blocks of one run all see the machine of that moment; two runs minutes
apart see different machines (a shared VM's speed drifts by tens of percent,
more when other processes hold its cores), and nothing inside a run measures
that. By default the ratios are judged as measured (right on a quiet, dedicated
machine, where a shift of every case is the code's: a uniform slowdown must not
pass unseen). On a shared machine, ``--relative`` divides them, with at least 5
cases timed in both, by their median over all cases (the common shift, taken as
the machine's speed) up to ``--max-shift`` (1.5): a shift of every case beyond
that still counts against the cases. The median shift is printed either way.
``--noise-floor F`` widens every band by the factor 1 + F for the rest of the
run-to-run noise.

Each case gets a verdict: ``slower`` (its band above 1 and, where there are
blocks, the rank test below ``--alpha``), ``faster`` (likewise below 1),
``same`` (within the noise) or ``n/a`` (missing on one side, or not ok on
either). The band decides; the rank test guards it against a band a few
outlying blocks drew. A case with blocks too few for the rank test to reach
``--alpha`` at all (``min_blocks``: 5 a side at 0.01) is judged from its band
alone and marked *not judged* (so are cases with medians only, or timed with
different clocks); ``--strict`` fails on any such case.

Exit code 1 when a case is slower with its whole band above ``--fail-above``,
when a case ok in A is not ok in B (an error, a mismatch, out of memory, a
timeout ...), or with ``--strict`` when a case timed in both could not be
judged; 2 for unusable input (no case in both runs, or fewer than half of the
cases: runs of different sweeps); else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from ..measurement.rank_test import DEFAULT_ALPHA, min_blocks, rank_test_floor
from ..store import safefs
from ..store.rundir import unwritable
from . import plots, report

VERDICTS = ("slower", "faster", "same", "n/a")
DEFAULT_NOISE_FLOOR = 0.10  # run-to-run noise besides a common shift (the README: "Comparing two runs")
DEFAULT_MAX_SHIFT = 1.5
MIN_CASES_FOR_SHIFT = 5
BOOTSTRAP = 2000
MIN_BLOCKS = 3
MIN_SHARED = 0.5  # of the cases in either run: fewer in both is two different sweeps, not a comparison
OK = "ok"


def _blocks(v) -> np.ndarray | None:
    if isinstance(v, str):
        import json

        try:
            v = json.loads(v)
        except ValueError:
            return None
    if not isinstance(v, (list, tuple, np.ndarray)):
        return None
    a = np.asarray([x for x in v if isinstance(x, (int, float)) and not isinstance(x, bool)], dtype=float)
    a = a[np.isfinite(a) & (a > 0)]
    return a if len(a) >= MIN_BLOCKS else None


def bootstrap_band(a: np.ndarray, b: np.ndarray, seed: int, n: int = BOOTSTRAP,
                   confidence: float = 0.95) -> tuple[float, float]:
    """The ``confidence`` band of median(b)/median(a), resampling each side's blocks ``n`` times."""
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, len(a), (n, len(a)))], axis=1)
    mb = np.median(b[rng.integers(0, len(b), (n, len(b)))], axis=1)
    r = mb / ma
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(r, tail)), float(np.percentile(r, 100 - tail))


def iqr_band(ta: float, ia: float, tb: float, ib: float) -> tuple[float, float]:
    """The ratio's band from the two medians and their interquartile ranges (interval arithmetic)."""
    ia = 0.0 if not np.isfinite(ia) else ia
    ib = 0.0 if not np.isfinite(ib) else ib
    lo = max(tb - ib / 2, 0.0) / (ta + ia / 2)
    hi = (tb + ib / 2) / (ta - ia / 2) if ta - ia / 2 > 0 else math.inf
    return lo, hi


def _label(r: pd.Series, varying: list[str]) -> str:
    parts = [str(r["impl"]), f"{r['config']}" + (f" O={r['O']:g}" if pd.notna(r["O"]) else ""), str(r["size"])]
    parts += [str(r[c]) for c in varying if str(r[c])]
    return " · ".join(parts)


@dataclasses.dataclass
class Shift:
    """How B's speed differs from A's over every case timed in both."""

    cases: int  # cases timed in both
    median: float  # the median ratio B/A over them (1 when there are none)
    spread: float  # their robust spread around it: 1.4826 · MAD of log(B/A), as a factor (exp)
    applied: float  # what the ratios were divided by (1: none)
    note: str


def common_shift(ratios: np.ndarray, relative: bool, max_shift: float) -> Shift:
    """The median ratio over the cases, taken for the machine's speed when ``relative`` is on and there are
    ``MIN_CASES_FOR_SHIFT`` cases or more, capped at ``max_shift`` (a larger shift is left to the cases)."""
    r = ratios[np.isfinite(ratios) & (ratios > 0)]
    if len(r) == 0:
        return Shift(0, 1.0, 1.0, 1.0, "no case timed in both runs")
    logs = np.log(r)
    med = float(np.median(logs))
    spread = float(np.exp(1.4826 * np.median(np.abs(logs - med)))) if len(r) >= 3 else 1.0
    m = float(np.exp(med))
    if not relative:
        return Shift(len(r), m, spread, 1.0, "ratios as measured (--relative would divide them by their median)")
    if len(r) < MIN_CASES_FOR_SHIFT:
        return Shift(len(r), m, spread, 1.0, f"ratios as measured: fewer than {MIN_CASES_FOR_SHIFT} cases timed "
                                             "in both to tell the machine's speed")
    applied = float(np.clip(m, 1 / max_shift, max_shift))
    note = (f"ratios divided by the median ratio {m:.3g} (the machine's speed between the runs)" if applied == m else
            f"ratios divided by {applied:.3g}: the median ratio {m:.3g} is beyond --max-shift {max_shift:g}, "
            "so the rest is counted against the cases")
    return Shift(len(r), m, spread, applied, note)


def compare_frames(a: pd.DataFrame, b: pd.DataFrame, fail_above: float = 1.10,
                   noise_floor: float = DEFAULT_NOISE_FLOOR, alpha: float = DEFAULT_ALPHA, relative: bool = False,
                   max_shift: float = DEFAULT_MAX_SHIFT) -> tuple[pd.DataFrame, Shift]:
    """One row per case in A or B: medians, ratio B/A, its relative value (÷ the common shift), the band of that,
    the rank test's p, the verdict and whether it fails the gate (``fail``, with ``why``); and the shift."""
    from scipy.stats import mannwhitneyu

    a = a.set_index("case_id", drop=False)
    b = b.set_index("case_id", drop=False)
    ids = list(a.index) + [i for i in b.index if i not in a.index]
    both = pd.concat([a, b[~b.index.isin(a.index)]])
    varying = [c for c in ("mode", "dtype", "device", "budget") if both[c].astype(str).nunique() > 1]
    out = []
    for cid in ids:
        ra = a.loc[cid] if cid in a.index else None
        rb = b.loc[cid] if cid in b.index else None
        r = ra if ra is not None else rb
        row = {"case_id": cid, "case": _label(r, varying), "impl": r["impl"],
               "status A": None if ra is None else ra["status"], "status B": None if rb is None else rb["status"],
               "A": np.nan, "IQR A": np.nan, "B": np.nan, "IQR B": np.nan, "B/A": np.nan, "relative": np.nan,
               "low": np.nan, "high": np.nan, "p": np.nan, "method": "", "verdict": "n/a", "fail": False, "why": "",
               "judged": False, "_blocks": None}
        out.append(row)
        if ra is None or rb is None:
            row["why"] = "only in B" if ra is None else "only in A"
            continue
        ok_a = ra["status"] == OK and pd.notna(ra["time_median_s"]) and ra["time_median_s"] > 0
        ok_b = rb["status"] == OK and pd.notna(rb["time_median_s"]) and rb["time_median_s"] > 0
        row.update({"A": ra["time_median_s"], "IQR A": ra["time_iqr_s"], "B": rb["time_median_s"],
                    "IQR B": rb["time_iqr_s"]})
        if not (ok_a and ok_b):
            row["why"] = f"status {ra['status']} → {rb['status']}" if ra["status"] != rb["status"] \
                else f"{ra['status']} in both"
            if ra["status"] == OK and rb["status"] != OK:
                row["fail"] = True
            continue
        timers = [r.get("timer") if isinstance(r.get("timer"), str) else "wall clock" for r in (ra, rb)]
        if timers[0] != timers[1]:
            row["why"] = f"not judged: timed differently ({timers[0]} → {timers[1]})"
            continue
        ta, tb = float(ra["time_median_s"]), float(rb["time_median_s"])
        row["B/A"] = tb / ta
        ba, bb = _blocks(ra.get("time_blocks_s")), _blocks(rb.get("time_blocks_s"))
        if ba is not None and bb is not None:
            row["low"], row["high"] = bootstrap_band(ba, bb, seed=zlib.crc32(str(cid).encode()))
            row.update(method=f"blocks {len(ba)}/{len(bb)}", _blocks=(ba, bb))
        elif pd.notna(ra["time_iqr_s"]) or pd.notna(rb["time_iqr_s"]):
            row["low"], row["high"] = iqr_band(ta, float(ra["time_iqr_s"]), tb, float(rb["time_iqr_s"]))
            row.update(method="IQR", judged=True)
        else:
            row["low"] = row["high"] = tb / ta
            row["method"] = "not judged: medians only, no noise measured"
    shift = common_shift(np.array([r["B/A"] for r in out], dtype=float), relative, max_shift)
    widen = 1 + max(noise_floor, 0.0)
    for row in out:
        if not np.isfinite(row["B/A"]):
            continue
        row["relative"] = row["B/A"] / shift.applied
        lo, hi = row["low"] / shift.applied / widen, row["high"] / shift.applied * widen
        row.update(low=lo, high=hi)
        p = None
        if row["_blocks"] is not None:
            ba, bb = row["_blocks"]
            p = row["p"] = float(mannwhitneyu(bb / shift.applied, ba, alternative="two-sided").pvalue)
            floor = rank_test_floor(len(ba), len(bb))
            if floor < alpha:
                row["judged"] = True
            else:  # the test cannot guard: the band alone decides, and the case says it was not judged
                p = None
                row["method"] = (f"not judged: {len(ba)}/{len(bb)} blocks, the rank test needs "
                                 f"{min_blocks(alpha)} a side to reach p < {alpha:g} (its floor here {floor:.2g})")
        significant = p is None or p < alpha
        if lo > 1 and significant:
            row["verdict"] = "slower"
        elif hi < 1 and significant:
            row["verdict"] = "faster"
        else:
            row["verdict"] = "same"
        if row["verdict"] == "slower" and lo > fail_above:
            row["fail"] = True
            row["why"] = f"slower by more than {fail_above:g}× (band from {lo:.3g})"
    return pd.DataFrame(out).drop(columns="_blocks"), shift


def _fmt_t(t, iqr) -> str:
    if not (isinstance(t, float) and np.isfinite(t)):
        return ""
    s = report._fmt_time(t)
    return s + (f" ± {report._fmt_iqr(iqr, t)}" if isinstance(iqr, float) and np.isfinite(iqr) else "")


def table(res: pd.DataFrame, shift: Shift | None = None) -> pd.DataFrame:
    """The comparison as strings, the failures first, then the slower, faster, same and n/a cases."""
    order = {"slower": 1, "faster": 2, "same": 3, "n/a": 4}
    res = res.assign(_k=[0 if f else order[v] for f, v in zip(res["fail"], res["verdict"])])
    res = res.sort_values(["_k", "relative"], ascending=[True, False], kind="stable")
    cols = {
        "case": res["case"],
        **{side: [_fmt_t(t, i) if st == OK else str(st or "—")
                  for t, i, st in zip(res[side], res[f"IQR {side}"], res[f"status {side}"])] for side in ("A", "B")},
        "B/A": [f"{x:.3g}" if np.isfinite(x) else "" for x in res["B/A"]],
    }
    if shift is not None and shift.applied != 1:
        cols[f"÷ {shift.applied:.3g}"] = [f"{x:.3g}" if np.isfinite(x) else "" for x in res["relative"]]
    cols.update({
        "band": [f"{lo:.3g}–{hi:.3g}" if np.isfinite(lo) else "" for lo, hi in zip(res["low"], res["high"])],
        "p": [f"{p:.2g}" if np.isfinite(p) else "" for p in res["p"]],
        "verdict": [("FAIL: " if f else "") + v for f, v in zip(res["fail"], res["verdict"])],
        "note": [w or m for w, m in zip(res["why"], res["method"])],
    })
    return pd.DataFrame(cols)


def unjudged(res: pd.DataFrame) -> pd.Series:
    """The cases ok in both runs whose verdict lacks the evidence for one (what ``--strict`` fails on)."""
    ok = (res["status A"] == OK) & (res["status B"] == OK)
    return ok & ~res["judged"].astype(bool)


def counts_line(res: pd.DataFrame) -> str:
    """One line of the verdict counts (slower, faster, same, n/a), the failing cases and the cases not judged."""
    c = res["verdict"].value_counts()
    line = ", ".join(f"{int(c.get(v, 0))} {v}" for v in VERDICTS) + f"; {int(res['fail'].sum())} failing"
    n = int(unjudged(res).sum())
    return line + (f"; {n} not judged (too few blocks or no noise measured)" if n else "")


def shared_cases(a: pd.DataFrame, b: pd.DataFrame) -> tuple[int, int]:
    """(cases in both runs, cases in either)."""
    ia, ib = set(a["case_id"]), set(b["case_id"])
    return len(ia & ib), len(ia | ib)


def plot(res: pd.DataFrame, path: Path, fail_above: float, title: str, shift: Shift) -> bool:
    """The relative ratio per case (log scale) with its band, coloured by verdict. False: nothing to plot."""
    r = res[np.isfinite(res["relative"])]
    order = {"slower": 0, "faster": 1, "same": 2}
    r = r.assign(_k=[order[v] for v in r["verdict"]]).sort_values(["_k", "relative"], ascending=[True, False],
                                                                   kind="stable").iloc[::-1]
    if r.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    colors = {"slower": "#d62728", "faster": "#2ca02c", "same": "#7f7f7f"}
    height = 1.9 + 0.2 * len(r)
    fig, ax = plt.subplots(figsize=(11, height))
    y = np.arange(len(r))
    lo = np.clip(r["low"].to_numpy(float), 1e-2, None)
    hi = np.clip(r["high"].to_numpy(float), None, 1e2)
    for yi, l, h, m, v, f in zip(y, lo, hi, r["relative"], r["verdict"], r["fail"]):
        c = colors[v]
        ax.plot([l, h], [yi, yi], color=c, linewidth=3, alpha=0.45, solid_capstyle="butt")
        ax.plot([m], [yi], marker="D" if f else "o", color=c, markersize=7 if f else 5,
                markeredgecolor="black" if f else c, linestyle="none")
    ax.axvline(1, color="black", linewidth=0.8)
    ax.axvline(fail_above, color="#d62728", linewidth=0.9, linestyle="--")
    ax.set_xscale("log")
    left, right = min(lo.min(), 1 / fail_above) / 1.1, max(hi.max(), fail_above) * 1.1
    ax.set_xlim(left, right)
    ticks = [t for t in (0.01, 0.1, 0.2, 0.5, 0.8, 0.9, 1, 1.1, 1.25, 1.5, 2, 3, 5, 10, 100) if left <= t <= right]
    if right / left > 20:
        ticks = [t for t in ticks if t in (0.01, 0.1, 0.5, 1, 2, 10, 100) or t == fail_above]
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(ticks + [fail_above]))))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(y)
    ax.set_yticklabels(r["case"], fontsize=7)
    ax.set_ylim(-0.7, len(r) - 0.3)
    ax.grid(True, axis="x", alpha=0.3)
    rel = "" if shift.applied == 1 else f" ÷ {shift.applied:.3g} (the common shift)"
    ax.set_xlabel(f"time B / time A{rel}: the dot the ratio of the medians, the bar its noise band", fontsize=9)
    ax.set_title(title, fontsize=10)
    handles = [Line2D([], [], color=colors[v], marker="o", linewidth=3, alpha=0.7, label=v)
               for v in ("slower", "faster", "same")]
    handles += [Line2D([], [], color="#7f7f7f", marker="D", markeredgecolor="black", linestyle="none",
                       label="fails the gate"),
                Line2D([], [], color="#d62728", linestyle="--", label=f"--fail-above {fail_above:g}")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.45 / height, 1, 1))
    plots.save(fig, path)  # never through a link
    plt.close(fig)
    return True


def load_pytest_benchmark(path: Path) -> report.Run:
    """A run from pytest-benchmark's saved JSON (``--benchmark-autosave``, ``--benchmark-json``): a benchmark timed
    by the ``ntk_case`` fixture gives the runner's row it kept in ``extra_info``; any other benchmark a row of its
    own (its name for the case, its median and IQR, its rounds as blocks where ``--benchmark-save-data`` kept
    them), judged alike."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path} is neither a run directory nor pytest-benchmark's JSON (no 'benchmarks' list)")
    rows = []
    for b in data["benchmarks"]:
        mine = (b.get("extra_info") or {}).get("ntk_bench")
        if isinstance(mine, dict):
            rows.append(dict(mine))
            continue
        stats = b.get("stats") or {}
        timer = str((b.get("options") or {}).get("timer", "perf_counter")).rsplit(".", 1)[-1]
        # (a benchmark is one case of unknown size: N = M = 1, which the report's row checks accept)
        rows.append({"case_id": b.get("fullname") or b.get("name"), "impl": b.get("name"), "arch": "pytest",
                     "arch_params": "{}", "N": 1, "M": 1, "mode": "", "dtype": "", "device": "", "status": OK,
                     "time_median_s": stats.get("median"), "time_iqr_s": stats.get("iqr"),
                     "time_blocks_s": stats.get("data"), "timer": timer})
    machine = data.get("machine_info") or {}
    header = {"sweep": f"pytest-benchmark {data.get('version', '')}".strip(), "started": data.get("datetime"),
              "device_name": (machine.get("cpu") or {}).get("brand_raw"), "python": machine.get("python_version"),
              "git_commit": (data.get("commit_info") or {}).get("id")}
    df, duplicates, incomplete = report.frame(rows)
    return report.Run([header], df, duplicates, 0, incomplete)


def load(path) -> report.Run:
    """A run directory (or its results.jsonl), or pytest-benchmark's saved JSON."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return load_pytest_benchmark(path)
    return report.load_run(path)


def _header_note(ha: dict, hb: dict) -> list[str]:
    keys = ("device_name", "torch", "cpu_threads", "cuda", "numpy", "python")
    diff = [f"{k}: {ha.get(k)} → {hb.get(k)}" for k in keys if ha.get(k) != hb.get(k)]
    return [f"The runs differ in their environment ({'; '.join(diff)}): the ratios include that.", ""] if diff else []


def _load_note(ha: dict, hb: dict) -> list[str]:
    """A run's header may record the load average before and after (the regression gate's does)."""
    out = []
    for name, h in (("A", ha), ("B", hb)):
        load, cpus = h.get("load_average"), h.get("cpu_count")
        if isinstance(load, list) and cpus and any(isinstance(x, (int, float)) and x > cpus for x in load):
            out.append(f"{name} ran with a load average of {' → '.join(str(x) for x in load)} on {cpus} CPUs: "
                       "other processes shared the machine, so its times are noisier than usual.")
    return out + [""] if out else []


def _threads_note(a: pd.DataFrame, b: pd.DataFrame) -> list[str]:
    if "cpu_threads" not in a or "cpu_threads" not in b:
        return []
    ta, tb = sorted(set(a["cpu_threads"].dropna().astype(int))), sorted(set(b["cpu_threads"].dropna().astype(int)))
    if ta and tb and ta != tb:
        return [f"The runs used different CPU thread counts (A {ta}, B {tb}): the ratios include that.", ""]
    return []


def markdown(res: pd.DataFrame, shift: Shift, run_a: Path, run_b: Path, ha: dict, hb: dict, fail_above: float,
             noise_floor: float, alpha: float, plotted: bool, notes: list[str] = (), strict: bool = False) -> str:
    """The comparison as Markdown (compare.md): both runs' headers, the verdict with the flags that decided it, the
    common shift, and the cases by verdict."""
    lines = [f"# ntk-bench compare: {run_a} → {run_b}", "",
             f"A: {report._header_line(ha)}  ", f"B: {report._header_line(hb)}", ""]
    lines += _header_note(ha, hb) + _load_note(ha, hb) + list(notes)
    failed = bool(res["fail"].any()) or bool(strict and unjudged(res).any())
    flags = f"--fail-above {fail_above:g}" + (", --strict" if strict else "")
    lines += [f"**{'FAIL' if failed else 'PASS'}** ({flags}): {counts_line(res)}.", ""]
    if shift.cases:
        lines += [f"Over the {shift.cases} cases timed in both, B/A has median {shift.median:.3g} and spreads by "
                  f"×{shift.spread:.3g} around it (1.4826 · median absolute deviation of the log ratios); "
                  f"{shift.note}.", ""]
        if shift.applied == 1 and shift.median > fail_above:
            lines += [f"**The median case is {shift.median:.3g}× slower**: the code every case shares, or a busier "
                      "machine (on a shared machine, --relative takes a common shift for the machine's).", ""]
        elif shift.applied != shift.median:
            lines += [f"**The median case is {shift.median:.3g}× {'slower' if shift.median > 1 else 'faster'}**, "
                      f"more than a machine's drift (--max-shift): the code every case shares, or a machine far "
                      "busier in one run.", ""]
    lines += [f"Bands: a 95% bootstrap band of the medians' ratio where both rows have per-block times (and then "
              f"a Mann–Whitney p < {alpha:g}), else interval arithmetic on the interquartile ranges; widened by "
              f"×{1 + noise_floor:g} (--noise-floor {noise_floor:g}) for what differs between two runs besides a "
              "common shift. A case fails when its band lies wholly above the factor, or when it was ok in A and is "
              "not in B.", ""]
    lines += [table(res, shift).to_markdown(index=False), ""]
    if plotted:
        lines += ["![compare](compare.png)", ""]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``compare`` command's arguments to ``parser`` (the CLI's subcommand and this module's ``main``);
    return it."""
    parser.add_argument("run_a", metavar="RUN_A", help="the baseline run directory (or its results.jsonl), or "
                                                        "pytest-benchmark's saved JSON")
    parser.add_argument("run_b", metavar="RUN_B", help="the run to check against it")
    parser.add_argument("--fail-above", type=float, default=1.10, metavar="FACTOR",
                        help="exit 1 when a case is slower by more than FACTOR beyond its noise band (default 1.10)")
    parser.add_argument("--noise-floor", type=float, default=DEFAULT_NOISE_FLOOR, metavar="F",
                        help="widen every band by 1+F for the run-to-run noise one run cannot measure "
                             f"(default {DEFAULT_NOISE_FLOOR:g}; 0 on a quiet machine)")
    parser.add_argument("--relative", action="store_true",
                        help="on a shared machine: divide the ratios by their median over all cases (the machine's "
                             "speed between the runs), up to --max-shift; by default they are judged as measured")
    parser.add_argument("--max-shift", type=float, default=DEFAULT_MAX_SHIFT, metavar="FACTOR",
                        help="with --relative, the largest common shift taken for the machine's (default "
                             f"{DEFAULT_MAX_SHIFT:g}); beyond it, the rest counts against the cases")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"significance level of the rank test on per-block times (default {DEFAULT_ALPHA:g})")
    parser.add_argument("--out", metavar="DIR", help="also write compare.md, compare.csv and compare.png there")
    parser.add_argument("--quiet", action="store_true", help="print only the verdict line and the failing cases")
    parser.add_argument("--strict", action="store_true",
                        help="also exit 1 when a case timed in both runs could not be judged (too few blocks for "
                             "the rank test, or no noise measured)")
    return parser


def _check_args(args) -> str | None:
    for name in ("fail_above", "max_shift"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v >= 1):
            return f"--{name.replace('_', '-')} must be a finite factor >= 1, got {v}"
    if not (math.isfinite(args.noise_floor) and args.noise_floor >= 0):
        return f"--noise-floor must be a finite number >= 0, got {args.noise_floor}"
    if not (0 < args.alpha < 1):
        return f"--alpha must lie in (0, 1), got {args.alpha}"
    return None


def run(args) -> int:
    """The ``compare`` command: 0 pass, 1 a case fails the gate, 2 unusable input."""
    problem = _check_args(args)
    if not problem and args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        problem = f"--out {args.out}: is a file, not a directory"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    runs = []
    for p in (args.run_a, args.run_b):
        try:
            runs.append(load(p))
        except OSError as exc:
            print(f"error: cannot read {p}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        except (ValueError, RuntimeError) as exc:  # not a results file, or one of a later format: one line
            print(f"error: {exc}", file=sys.stderr)
            return 2
    ra, rb = runs
    for name, r in ((args.run_a, ra), (args.run_b, rb)):
        if r.df.empty:
            print(f"error: {name} has no result rows", file=sys.stderr)
            return 2
    both, either = shared_cases(ra.df, rb.df)
    if both == 0 or both < MIN_SHARED * either:
        print(f"error: only {both} of the {either} cases are in both {args.run_a} and {args.run_b}: compare two runs "
              "of the same sweep (the cases match by case_id)", file=sys.stderr)
        return 2
    res, shift = compare_frames(ra.df, rb.df, args.fail_above, args.noise_floor, args.alpha, args.relative,
                                args.max_shift)
    notes = _threads_note(ra.df, rb.df)
    strict_fail = bool(args.strict and unjudged(res).any())
    failed = bool(res["fail"].any()) or strict_fail
    flags = f"--fail-above {args.fail_above:g}" + (", --strict" if args.strict else "")
    verdict = ("FAIL" if failed else "PASS") + f" ({flags}): {counts_line(res)}"
    out = Path(args.out) if args.out else None
    plotted = False
    try:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            for name in ("compare.png", "compare.csv", "compare.md"):  # never written through a link
                safefs.check_regular(out / name)
            plotted = plot(res, out / "compare.png", args.fail_above, f"{args.run_b} against {args.run_a}", shift)
            safefs.write_file(out / "compare.csv", res.to_csv(index=False))
        text = markdown(res, shift, Path(args.run_a), Path(args.run_b), ra.header, rb.header, args.fail_above,
                        args.noise_floor, args.alpha, plotted, notes, strict=args.strict)
        if out is not None:
            safefs.write_file(out / "compare.md", text)
    except OSError as exc:  # the verdict's exit code (1) must not be mistaken for it: a usage error
        print(f"error: {unwritable(out, exc)}", file=sys.stderr)
        return 2
    except safefs.UnsafeFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.quiet:
        print(verdict)
        failing = res[res["fail"] | (unjudged(res) if args.strict else False)]
        if len(failing):
            print(table(failing, shift).to_markdown(index=False))
    else:
        print(text)
    return 1 if failed else 0


def main(argv=None) -> int:
    """``python -m ntk_bench.bench.output.compare``: the ``compare`` command on its own (its exit status)."""
    parser = add_arguments(argparse.ArgumentParser(prog="ntk-bench compare", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
