"""Turn a run's results.jsonl into results.csv, summary.md and PNG figures (pandas + matplotlib).

A results file may hold several segments, each starting with a ``{"header": ...}``
line (a run resumed with ``--force`` appends one); rows are read from all of
them, and when a case appears more than once the last row wins (the summary
says how many). Rows with a status this code does not know, without optional
columns, or without any rows at all give a report, not a traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ntk_bench.modes import MODES

from ..measurement import paired as paired_rounds
from ..measurement.machine import disturbed_line
from ..store import safefs
from ..store.row import row_problems
from ..store.rundir import entries, unwritable
from . import plots as figs
from . import summary as answers
from .plots import fmt_bytes as _fmt_bytes
from .plots import fmt_time as _fmt_time

COLUMNS = ["impl", "arch", "N", "M", "O", "P", "mode", "dtype", "device", "status", "time_median_s", "time_iqr_s",
           "peak_mem_bytes", "fp_flops", "predicted_jc_flops", "predicted_vp_flops", "rel_err", "reference", "error"]
NUMERIC = ["N", "M", "O", "P", "time_median_s", "time_iqr_s", "peak_mem_bytes", "fp_flops", "predicted_jc_flops",
           "predicted_vp_flops", "rel_err", "memory_budget_bytes", "auto_over_pick_paired",
           "auto_over_fastest_paired"]
OPTIONAL = ["auto_pick", "auto_over_pick_paired", "auto_over_fastest_paired", "paired_fastest", "x2", "arch_params",
            "memory_budget_bytes", "blocked_after_oom", "case_id"]
JC, VP = "jacobian_contraction", "ntk_vector_products"
OK = "ok"
# What a group of rows (one table, one panel) shares; a case is a group and a size.
GROUP_KEYS = ["config", "O", "mode", "dtype", "device", "budget"]
CASE_KEYS = GROUP_KEYS + ["size"]


@dataclasses.dataclass
class Run:
    """A run's rows as a DataFrame (one row per case, the last one written), with what reading it found."""

    headers: list[dict]
    df: pd.DataFrame
    duplicates: int = 0  # rows replaced by a later row of the same case
    unreadable: int = 0  # lines that are not a JSON object (a torn last line, a stray line)
    incomplete: int = 0  # rows without impl, arch or N: left out
    paired: dict = dataclasses.field(default_factory=dict)  # paired id -> its record (paired.jsonl)
    off_schema: list[str] = dataclasses.field(default_factory=list)  # rows that do not match the row schema: why

    @property
    def header(self) -> dict:
        return self.headers[0] if self.headers else {}


def _read(path: Path, add, problems: list[str] | None = None) -> tuple[list[dict], int]:
    """(headers, unreadable lines) of a results.jsonl; ``add(row)`` for each row, with ``segment`` (the index of
    its header). Rows come migrated to the current format; with ``problems``, each row that does not match the row
    schema adds a line there (it is still added: a report shows every row it can)."""
    headers: list[dict] = []
    unreadable = 0
    for what, obj in entries(path):
        if what == "unreadable":
            unreadable += 1
        elif what == "header":
            headers.append(obj)
        else:
            if problems is not None:
                problem = row_problems(obj)
                if problem is not None:
                    problems.append(problem)
            add({**obj, "segment": max(len(headers) - 1, 0)})
    return headers, unreadable


def read_run(path: Path) -> tuple[list[dict], list[dict], int]:
    """(headers, rows, unreadable lines) of a results.jsonl (or a run directory holding one).

    Every line with a ``"header"`` key starts a segment; each row gets ``segment``, the index of its header.
    """
    rows: list[dict] = []
    headers, unreadable = _read(_results_path(path), rows.append)
    return headers, rows, unreadable


class _Columns:
    """Rows gathered column by column as they are read: repeated strings kept once, lists and dicts as their
    JSON text (as results.csv holds them), so that a large run's rows take little more memory than its table."""

    def __init__(self):
        self.cols: dict[str, list] = {}
        self.n = 0
        self._strings: dict[str, str] = {}

    def add(self, row: dict) -> None:
        for k, v in row.items():
            col = self.cols.get(k)
            if col is None:
                col = self.cols[k] = []
            if len(col) < self.n:
                col.extend([None] * (self.n - len(col)))
            if isinstance(v, str):
                v = self._strings.setdefault(v, v)
            elif isinstance(v, (list, dict)) and k != "arch_params":
                v = self._strings.setdefault(json.dumps(v), json.dumps(v))
            col.append(v)
        self.n += 1

    def frame(self) -> pd.DataFrame:
        for col in self.cols.values():
            if len(col) < self.n:
                col.extend([None] * (self.n - len(col)))
        df = pd.DataFrame(self.cols, index=range(self.n))
        self.cols = {}
        return df


def read_columns(path: Path, problems: list[str] | None = None) -> tuple[list[dict], pd.DataFrame, int]:
    """(headers, rows as a DataFrame of Python objects, unreadable lines) of a results.jsonl, read line by line
    (``read_run`` as one frame: a large run never holds its rows as dicts)."""
    cols = _Columns()
    headers, unreadable = _read(_results_path(path), cols.add, problems)
    return headers, cols.frame(), unreadable


def _results_path(path: Path) -> Path:
    """The results.jsonl of ``path`` (a run directory or the file); ValueError in one line when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no results file at {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file (a results.jsonl was expected)")
    return path


def _params_dict(value) -> dict:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def _short_params(value) -> str:
    params = {k: v for k, v in _params_dict(value).items() if k != "out"}
    return "(" + ",".join(f"{k}={v}" for k, v in params.items()) + ")" if params else ""


def _budget_label(b) -> str:
    return "" if b is None or not np.isfinite(b) else f"budget {_fmt_bytes(b)}"


def _case_budget(r) -> float:
    """The memory budget the case asked for: not the one a row fell back to after running out of memory."""
    return _case_budget_of(r.get("blocked_after_oom"), r.get("memory_budget_bytes"), r.get("case_id"))


def _case_budget_of(blocked, b, cid) -> float:
    if blocked is True:
        return np.nan
    if isinstance(b, (int, float)) and not isinstance(b, bool) and np.isfinite(b):
        return float(b)
    cid = str(cid or "")  # a row the worker never answered carries the budget only in its key
    last = cid.rsplit("/", 1)[-1]
    if last.startswith("budget=") and last.endswith("B") and last[7:-1].isdigit():
        return float(last[7:-1])
    return np.nan


def _jsonable(v):
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def _count(v) -> bool:
    """A usable N or M: a finite number, not a bool, at least 1 (a row with ``N: NaN`` is left out, not fatal)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 1 and v == int(v)


def frame(rows: list[dict] | pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """(the rows as a DataFrame, one per case with the last row winning; duplicates; incomplete rows).

    ``rows``: dicts, or a frame of them as ``read_columns`` gives."""
    if not isinstance(rows, pd.DataFrame):
        cols = _Columns()
        for r in rows:
            if isinstance(r, dict):
                cols.add(r)
        rows = cols.frame()
    df = rows
    for c in ("impl", "arch", "N", "M", "blocked_after_oom", "memory_budget_bytes", "case_id"):
        if c not in df.columns:
            df[c] = None
    keep = [i not in (None, "") and not (isinstance(i, float) and math.isnan(i)) and a not in (None, "")
            and not (isinstance(a, float) and math.isnan(a)) and _count(n)
            for i, a, n in zip(df["impl"], df["arch"], df["N"])]
    incomplete = len(df) - sum(keep)
    if incomplete:
        df = df[keep].reset_index(drop=True)
    df["M"] = [m if _count(m) else None for m in df["M"]]
    df["memory_budget_bytes_case"] = [_case_budget_of(b, m, c) for b, m, c in
                                      zip(df["blocked_after_oom"], df["memory_budget_bytes"], df["case_id"])]
    for c in dict.fromkeys(COLUMNS + OPTIONAL):
        if c not in df.columns:
            df[c] = np.nan
    if "memory_budget_bytes_case" not in df.columns:
        df["memory_budget_bytes_case"] = np.nan
    df = df.astype({c: object for c in ("arch_params", "x2", "case_id", "auto_pick", "paired_fastest", "status",
                                         "mode", "dtype", "device", "reference", "error")})
    for c in NUMERIC:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["M"] = df["M"].fillna(df["N"])
    df["x2"] = [x if isinstance(x, str) else ("x1" if m == n else "separate")
                for x, n, m in zip(df["x2"], df["N"], df["M"])]
    for c, default in (("status", "?"), ("mode", "?"), ("dtype", "?"), ("device", "?"), ("arch_params", "{}")):
        df[c] = [v if isinstance(v, str) else (json.dumps(v) if isinstance(v, dict) else default) for v in df[c]]
    df["case_id"] = [cid if isinstance(cid, str) and cid else
                     f"{r.impl}/{r.arch}{r.arch_params}/N={r.N:g}/M={r.x2 if r.x2 == 'x1' else r.M}/{r.mode}/"
                     f"{r.dtype}/{r.device}/{r.memory_budget_bytes_case}"
                     for cid, r in zip(df["case_id"], df.itertuples(index=False))]
    before = len(df)
    df = df.drop_duplicates("case_id", keep="last").reset_index(drop=True)
    duplicates = before - len(df)
    df["N"] = df["N"].astype(int)
    df["M"] = df["M"].astype(int)
    # A row the worker never answered (timeout, crash) lacks the model's O and P: take them from its problem's other rows.
    problem = ["arch", "arch_params", "N", "M", "x2"]
    if len(df):
        for c in ("O", "P", "fp_flops", "predicted_jc_flops", "predicted_vp_flops"):
            df[c] = df.groupby(problem, dropna=False)[c].transform("first")
    df["config"] = df["arch"].astype(str) + df["arch_params"].map(_short_params)
    df["size"] = ["N=" + str(n) if x == "x1" else f"N={n}, M={m}" for n, m, x in zip(df["N"], df["M"], df["x2"])]
    df["budget"] = df["memory_budget_bytes_case"].map(_budget_label)
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].map(_jsonable)
    rest = [c for c in df.columns if c not in COLUMNS]
    return df[COLUMNS + rest], duplicates, incomplete


def load_run(run_dir: Path) -> Run:
    off_schema: list[str] = []
    headers, rows, unreadable = read_columns(run_dir, off_schema)
    df, duplicates, incomplete = frame(rows)
    run_dir = Path(run_dir)
    records = paired_rounds.read_records(run_dir if run_dir.is_dir() else run_dir.parent)
    return Run(headers, df, duplicates, unreadable, incomplete, records, off_schema)


def load(run_dir: Path) -> tuple[dict, pd.DataFrame]:
    """(the first header, the rows as a DataFrame)."""
    run = load_run(run_dir)
    return run.header, run.df


def _impl_order(df: pd.DataFrame) -> list[str]:
    """Ours in the registry's order, then peers, then anything else by name."""
    present = set(df["impl"])
    if "origin" in df:  # the rows say which are peers
        figs.IS_PEER.update({i: k == "peer" for i, k in zip(df["impl"], df["origin"]) if k in ("peer", "ours")})
    order = list(figs._OURS)
    if "ntk_bench.implementations" in sys.modules:  # the registry's order, where it is loaded (never imported for
        try:                                        # a report: torch and the plugins take hundreds of MB)
            from ntk_bench import implementations

            order = implementations.names() + implementations.names("peer")
        except Exception:  # a broken third-party entry point must not stop a report
            order = list(figs._OURS)
    ours = [i for i in order if i in present and not figs.is_peer(i)]
    others = sorted(present - set(order))
    return ours + [i for i in others if not figs.is_peer(i)] + \
        [i for i in order if i in present and figs.is_peer(i)] + [i for i in others if figs.is_peer(i)]


def _fmt_iqr(iqr: float, median: float) -> str:
    """The IQR in the unit of the median's rendering (``12.3 ms ± 0.4``)."""
    scale = 1 if median >= 1 else 1e3 if median >= 1e-3 else 1e6
    v = iqr * scale
    return f"{v:.0f}" if v >= 100 else f"{v:.2g}"


def noisy(r) -> bool:
    """A row whose interquartile range is larger than its median: its time says little."""
    return pd.notna(r["time_iqr_s"]) and pd.notna(r["time_median_s"]) and r["time_iqr_s"] > r["time_median_s"]


def _time_text(r) -> str:
    t = _fmt_time(r["time_median_s"])
    if t and pd.notna(r["time_iqr_s"]):
        t += f" ± {_fmt_iqr(r['time_iqr_s'], r['time_median_s'])}"
    return t


def _sizes(group: pd.DataFrame) -> list[str]:
    return _sizes_of(group[["size", "N", "M", "x2"]].to_dict("records"))


def _sizes_of(records: list[dict]) -> list[str]:
    first: dict[str, dict] = {}
    for r in records:
        first.setdefault(r["size"], r)
    return sorted(first, key=lambda s: (first[s]["N"], first[s]["x2"] != "x1", first[s]["M"], s))


_PIVOT_COLUMNS = ("impl", "size", "N", "M", "x2", "status", "time_median_s", "time_iqr_s", "peak_mem_bytes", "rel_err")


def _records(group: pd.DataFrame) -> list[dict]:
    return group[[c for c in _PIVOT_COLUMNS if c in group]].to_dict("records")


def _pivot(group: pd.DataFrame, impls: list[str], cell, records: list[dict] | None = None) -> pd.DataFrame:
    """Sizes down, plugins across; ``cell(row, fastest)`` renders an ok or mismatch row; others show their status.

    The rows are read once as dicts (``records``: ``_records(group)``, when the caller has them; a large run has
    thousands of groups, and pandas' selections per plugin and size took most of a report's time)."""
    records = _records(group) if records is None else records
    # the fastest ok time per size, of the rows that are not noisy (a noisy row is no yardstick, unless all are)
    steady: dict[str, float] = {}
    any_ok: dict[str, float] = {}
    for r in records:
        t = r["time_median_s"]
        if r["status"] != OK or pd.isna(t):
            continue
        any_ok[r["size"]] = min(any_ok.get(r["size"], np.inf), t)
        if not (r["time_iqr_s"] > t):
            steady[r["size"]] = min(steady.get(r["size"], np.inf), t)
    fastest = {**any_ok, **steady}
    wanted = set(impls)
    table: dict[str, dict] = {impl: {} for impl in impls}
    for r in records:
        if r["impl"] not in wanted:
            continue
        if r["status"] not in (OK, "mismatch"):
            table[r["impl"]][r["size"]] = str(r["status"])
        else:
            table[r["impl"]][r["size"]] = cell(r, fastest.get(r["size"], np.nan))
    sizes = _sizes_of(records)
    return pd.DataFrame(table, index=sizes, columns=impls).reindex(sizes).fillna("")


def _time_cell(r, fastest):
    mark = " ✗" if r["status"] == "mismatch" else ""
    if pd.isna(r["time_median_s"]):
        return f"{r['status']}, no time{mark}"
    if isinstance(r.get("disturbed"), str) and r.get("disturbed"):
        mark = " ⚠" + mark
    if noisy(r):
        return f"{_time_text(r)} (noisy){mark}"
    return f"{_time_text(r)}{mark}"


def fit_cost_model(df: pd.DataFrame) -> pd.DataFrame:
    """Non-negative least-squares constants of the cost model per group: JC t = a·N·O·[FP] + b·N·M·O²·P, NTK-VP t = c·N·M·O·[FP]."""
    from scipy.optimize import nnls

    out = []
    need = ["time_median_s", "predicted_jc_flops", "predicted_vp_flops", "O", "P"]
    good = df[(df["status"] == OK) & np.isfinite(df[need].astype(float)).all(axis=1)]
    for key, g in good.groupby(GROUP_KEYS, sort=False, dropna=False):
        jc, vp = g[g["impl"] == JC], g[g["impl"] == VP]
        if len(jc) < 2 or len(vp) < 2:
            continue
        contraction = (jc["N"] * jc["M"] * jc["O"] ** 2 * jc["P"]).to_numpy(float)
        n_side = jc["predicted_jc_flops"].to_numpy(float) - contraction
        coef, _ = nnls(np.stack([n_side, contraction], 1), jc["time_median_s"].to_numpy(float))
        vpf = vp["predicted_vp_flops"].to_numpy(float)
        c = float(np.dot(vpf, vp["time_median_s"]) / np.dot(vpf, vpf)) if np.dot(vpf, vpf) > 0 else np.nan
        both = pd.merge(jc[["size", "N", "time_median_s"]], vp[["size", "time_median_s"]], on="size",
                        suffixes=("_jc", "_vp")).sort_values("N")
        faster = np.where(both["time_median_s_jc"] <= both["time_median_s_vp"], "JC", "NTK-VP")
        flips = [f"{both['size'].iloc[i]}: {faster[i]}" for i in range(len(faster)) if i == 0 or faster[i] != faster[i - 1]]
        out.append({
            **dict(zip(GROUP_KEYS, key)),
            "jc_s_per_jacobian_flop": coef[0], "jc_s_per_contraction_flop": coef[1], "vp_s_per_flop": c,
            "faster (from the size shown on)": "; ".join(flips),
        })
    return _drop_empty_budget(pd.DataFrame(out))


def _drop_empty_budget(t: pd.DataFrame) -> pd.DataFrame:
    if "budget" in t.columns and not (t["budget"].astype(str) != "").any():
        t = t.drop(columns="budget")
    return t


def _fastest(rows: pd.DataFrame) -> pd.DataFrame:
    """The fastest row per case: its impl and time."""
    return rows.sort_values("time_median_s").groupby(CASE_KEYS, sort=False, dropna=False).first()[
        ["impl", "time_median_s"]]


def _ours(df: pd.DataFrame) -> pd.Series:
    return ~df["impl"].map(figs.is_peer).astype(bool)


def ours_vs_peers(df: pd.DataFrame, impls: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Per case with a peer row: the fastest of ours, and every peer's time with its factor over ours.

    Returns (the table, the peers in order); a peer row that is not ok shows its status.
    """
    peers = [i for i in impls if figs.is_peer(i)]
    if not peers:
        return pd.DataFrame(), []
    ok = df[(df["status"] == OK) & df["time_median_s"].notna()]
    best_frame = _fastest(ok[_ours(ok)])
    # plain dicts keyed by the case (NaN as None, so that equal keys meet): a large run has many thousand cases
    best = {_key(k): (i, t) for k, i, t in zip(best_frame.index, best_frame["impl"], best_frame["time_median_s"])}
    cases: dict[tuple, dict[str, dict]] = {}
    cols = CASE_KEYS + ["impl", "status", "time_median_s"]
    for r in df.loc[df["impl"].isin(peers), cols].to_dict("records"):
        cases.setdefault(_key(tuple(r[k] for k in CASE_KEYS)), {})[r["impl"]] = r  # the last row of a peer wins
    rows = []
    for key, g in cases.items():
        if key in best:
            ours_impl, ours_t = best[key]
            row = {**dict(zip(CASE_KEYS, key)), "ours (fastest)": f"{ours_impl} {_fmt_time(ours_t)}"}
        else:
            ours_t = np.nan
            row = {**dict(zip(CASE_KEYS, key)), "ours (fastest)": "none ok"}
        fastest_peer, fastest_t = None, np.inf
        for peer in peers:
            r = g.get(peer)
            if r is None:
                row[peer] = ""
                continue
            if r["status"] == OK and pd.notna(r["time_median_s"]):
                if np.isfinite(ours_t):
                    row[peer] = f"{_fmt_time(r['time_median_s'])} ({r['time_median_s'] / ours_t:.3g}×)"
                    row[f"_{peer}"] = r["time_median_s"] / ours_t
                else:
                    row[peer] = _fmt_time(r["time_median_s"])
                if r["time_median_s"] < fastest_t:
                    fastest_peer, fastest_t = peer, r["time_median_s"]
            else:
                row[peer] = str(r["status"])
        row["ours / fastest peer"] = ours_t / fastest_t if fastest_peer and np.isfinite(ours_t) else np.nan
        row["fastest peer"] = fastest_peer or ""
        rows.append(row)
    return _drop_empty_budget(pd.DataFrame(rows)), peers


def _key(key: tuple) -> tuple:
    return tuple(None if isinstance(v, float) and math.isnan(v) else v for v in key)


def figure_groups(g: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """The panels of an architecture's figure: its groups (O, mode, dtype, device, budget) with an ok row."""
    groups = [(key, p) for key, p in g.groupby(["O", "mode", "dtype", "device", "budget"], sort=False, dropna=False)
              if (p["status"] == OK).any()]
    return sorted(groups, key=lambda kp: _group_order(kp[0]))


def plots_for(df: pd.DataFrame, out: Path) -> list[tuple[str, str]]:
    """Write one figure per architecture and the cost-model figure; return [(config, file name)]."""
    impls = _impl_order(df)
    made = []
    for config, g in df.groupby("config", sort=False):
        groups = figure_groups(g)
        if not groups:
            continue
        name = figure_name(config)
        title = _config_title(config, g)
        if len(groups) > MAX_PANELS:  # a figure stays readable, and a large run's report fast; the tables have all
            title += f" (the first {MAX_PANELS} of {len(groups)} groups; the tables show every one)"
        figs.arch_figure(title, groups[:MAX_PANELS], impls, out / name)
        made.append((config, name))
    ok = df[(df["status"] == OK) & df["time_median_s"].notna()]
    if len(ok):
        figs.cost_model_figure(ok, impls, out / "time_vs_predicted_flops.png")
        made.append(("", "time_vs_predicted_flops.png"))
    return made


_MODE_ORDER = {mode: i for i, mode in enumerate(MODES)}


def _group_order(key: tuple) -> tuple:
    o, mode, dtype, device, budget = key
    return (o if pd.notna(o) else np.inf, _MODE_ORDER.get(mode, 3), str(mode), str(dtype), str(device), str(budget))


def _config_title(config: str, g: pd.DataFrame) -> str:
    params = {k: v for k, v in _params_dict(g["arch_params"].iloc[0]).items() if k != "out"}
    arch = g["arch"].iloc[0]
    return f"{arch}" + (": " + ", ".join(f"{k}={v}" for k, v in params.items()) if params else "")


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in s).strip("_") or "run"


MAX_PANELS = 12  # groups (O, mode, dtype, device, budget) drawn in one architecture's figure


def figure_name(config: str) -> str:
    """The PNG's name for a configuration: readable (its first 60 characters, letters and digits) and its own (a
    digest of the whole name: ``a.b`` and ``a,b`` differ, and a long one stays under the file system's limit)."""
    digest = hashlib.sha1(config.encode()).hexdigest()[:10]
    return f"{_slug(config)[:60].strip('_') or 'run'}-{digest}.png"


# Text from a results file (sweep and plugin names, parameters, errors) is the user's, or whoever made the file:
# in summary.md it must stay text. HTML's specials become entities (no <script>, <iframe> or remote <img>);
# Markdown's link, image, emphasis, code and table characters are backslash-escaped; a line break becomes a space
# (no injected heading or list).
_MD_ESCAPES = str.maketrans({"\\": "\\\\", "`": "\\`", "*": "\\*", "[": "\\[", "]": "\\]", "|": "\\|", "#": "\\#",
                             "<": "&lt;", ">": "&gt;", "&": "&amp;", "\n": " ", "\r": " "})


def md_text(value) -> str:
    """``value`` as literal text in Markdown (and the HTML a renderer makes of it)."""
    return str(value).translate(_MD_ESCAPES)


def _code(name) -> str:
    """A plugin's name as `code`, or as escaped text when it is not a plain name."""
    name = str(name)
    return f"`{name}`" if name and all(ch.isalnum() or ch in "_.:+-" for ch in name) else md_text(name)


def _escaped(t: pd.DataFrame) -> pd.DataFrame:
    cell = lambda v: md_text(v) if isinstance(v, str) else v
    out = t.map(cell) if hasattr(t, "map") else t.applymap(cell)  # DataFrame.map: pandas >= 2.1
    out.index = [md_text(i) if isinstance(i, str) else i for i in out.index]
    out.columns = [md_text(c) if isinstance(c, str) else c for c in out.columns]
    return out


def _md(t: pd.DataFrame) -> str:
    """A table of strings (its index the first column) in Markdown, every cell escaped; written directly, since
    a large run has thousands of these tables."""
    if not len(t):
        return "(none)"
    rows = [["", *(md_text(c) for c in t.columns)]]
    rows += [[md_text(i), *("" if v is None else md_text(v) for v in values)]
             for i, values in zip(t.index, t.itertuples(index=False, name=None))]
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join(":" + "-" * (w + 1) for w in widths) + "|")
    return "\n".join(lines)


def _md_table(t: pd.DataFrame) -> str:
    """A markdown table of strings: numbers to 3 significant digits, blanks where there is no number."""
    def cell(v):
        if isinstance(v, (bool, np.bool_)):
            return "yes" if v else "no"
        if isinstance(v, (float, np.floating)):
            return "" if not np.isfinite(v) else f"{v:.3g}"
        return "" if v is None else str(v)
    mapped = t.map(cell) if hasattr(t, "map") else t.applymap(cell)  # DataFrame.map: pandas >= 2.1
    return _escaped(mapped).to_markdown(index=False, disable_numparse=True) if len(t) else "(none)"


def _header_line(h: dict) -> str:
    keep = [k for k in ("sweep", "git_commit", "code_sha1", "started", "device_name") if h.get(k)]
    return ", ".join(f"{k} {md_text(str(h[k])[:12] if k == 'git_commit' else h[k])}" for k in keep) or "no header"


_NOT_IN_SUMMARY = ("time_blocks_s", "concurrent", "cpu_affinity", "paired_ratios", "paired_errors", "auto_reason",
                   "worker_malloc", "worker_host", "executor_host", "worker", "executor", "kernel_bytes", "est_flops",
                   "est_peak_bytes", "first_call_s", "max_abs_err_rel_mean", "ref_block", "case_wall_s",
                   "time_repeats", "first_try_error", "paired_auto_s", "paired_pick_s", "worker_startup_s")


def summary(header: dict | Run, df: pd.DataFrame | None = None, plot_names=None) -> str:
    """The summary.md of a run (a :class:`Run`, or the old (header, df, plot names) form)."""
    run = header if isinstance(header, Run) else Run([header] if header else [], df)
    # the columns no section reads: every group's rows are taken from the frame many times, and a large run's
    # lists and texts made each take slow
    df = run.df.drop(columns=[c for c in _NOT_IN_SUMMARY if c in run.df.columns])
    made = [(("", n) if isinstance(n, str) else n) for n in (plot_names or [])]
    fig_of = {c: n for c, n in made if c}
    impls = _impl_order(df)
    h = run.header
    recs = answers.keyed(df, run.paired)
    lines = [disturbed_line(df.to_dict("records"), run.paired.values()), "",
             f"# ntk-bench results: {md_text(h.get('sweep', '?'))}", ""]
    env = ", ".join(f"{md_text(k)} {md_text(v)}" for k, v in h.items() if k not in ("sweep", "cases") and v is not None)
    lines += [f"Environment: {env or 'unknown (no header line)'}.", ""]
    if len(run.headers) > 1:
        per = df.groupby("segment").size().to_dict() if "segment" in df else {}
        lines += [f"This results file holds {len(run.headers)} segments (a header line each; rows of later segments "
                  "replace earlier rows of the same case):", ""]
        lines += [f"{i + 1}. {_header_line(s)}: {per.get(i, 0)} rows kept" for i, s in enumerate(run.headers)] + [""]
    notes = []
    if run.duplicates:
        notes.append(f"{run.duplicates} rows repeat a case already in the file (a re-run or resumed case): the last "
                     "row of each case is the one shown.")
    if run.unreadable:
        notes.append(f"{run.unreadable} lines are not JSON objects (e.g. a line torn by a killed runner) and were "
                     "skipped.")
    if run.incomplete:
        notes.append(f"{run.incomplete} rows lack impl, arch or N and were left out.")
    if run.off_schema:
        notes.append(f"{len(run.off_schema)} rows do not match the row schema and are shown as they are (first: "
                     f"{md_text(run.off_schema[0][:200])}).")
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    if df.empty:
        lines += ["No result rows yet.", ""]
        return "\n".join(lines)
    counts = df["status"].value_counts().to_dict()
    lines += ["Cases: " + ", ".join(f"{v} {md_text(k)}" for k, v in counts.items()) + ".", ""]
    n_noisy = int(((df["status"] == OK) & (df["time_iqr_s"] > df["time_median_s"])).sum())
    refs = ", ".join(sorted(md_text(r) for r in df["reference"].dropna().unique())) or "none"
    n_disturbed = int(sum(isinstance(d, str) and bool(d) for d in df.get("disturbed", pd.Series(dtype=object))))
    lines += ["How to read: each case ran alone in a worker first (its status, first call, peak memory and "
              "agreement); its time is the median over timing blocks there (after a warm-up call), `± x` the "
              "interquartile range of those blocks in the same unit. A row whose interquartile range is larger than "
              f"its median is marked `noisy` ({n_noisy} here); ⚠ marks a row whose timing was disturbed (its CPU "
              f"time well under its wall time, or the load above its cores: {n_disturbed} here). Times of different "
              "rows were taken at different moments and are not divided by each other: every ratio (`k× [lo–hi]`, "
              "the paired tables, the verdicts) comes from the case's plugins timed side by side afterwards, in "
              "alternating rounds in one worker (each block after untimed calls of its own plugin, so that none pays "
              "for the caches its neighbour left cold), as the median over rounds of one's time over the other's "
              "in the same round with its 95% band. Peak memory is above what the model and inputs already held. "
              "Agreement is ‖K − K_ref‖/‖K_ref‖ on the leading block of the kernel against the "
              f"float64 reference ({refs}); ✗ marks a mismatch. `slope` is the log-log slope of time against N over "
              "three N = M sizes or more (2: quadratic in N), with the 95% band of slopes fitted to timing blocks "
              "drawn at random. The cost model's fit is in [cost_model.md](cost_model.md).", ""]
    if not recs:
        lines += ["**No paired rounds in this run** (a run from before them, or no case with two plugins ok): no "
                  "plugin's time is divided by another's, and there is no verdict.", ""]
    if "cuda_graph_bytes" in df and df["cuda_graph_bytes"].notna().any():
        graphed = df[df["cuda_graph_bytes"].notna()]
        lines += [f"{len(graphed)} rows replayed a captured CUDA graph ({', '.join(sorted(md_text(i) for i in graphed['impl'].unique()))}): "
                  "their time is the replay's, their first call includes the capture (`first_call_s`), and their "
                  "peak memory includes the graph's memory pool.", ""]
    shown_config = None
    rank = {c: i for i, c in enumerate(df["config"].drop_duplicates())}  # architectures in the run's order
    groups = sorted(df.groupby(GROUP_KEYS, sort=False, dropna=False),
                    key=lambda kg: (rank[kg[0][0]], _group_order(kg[0][1:])))
    for key, g in groups:
        config, o, mode, dtype, device, budget = key
        if config != shown_config:
            shown_config = config
            lines += [f"## {md_text(_config_title(config, g))}", ""]
            lines += answers.recommendations(df[df["config"] == config], recs) + [""]
            if config in fig_of:
                lines += [f"![{md_text(config)}]({fig_of[config]})", ""]
        ps = sorted({int(p) for p in g["P"].dropna()})
        p = f"{ps[0]:,}" if len(ps) == 1 else "?" if not ps else "/".join(f"{x:,}" for x in ps)
        gi = [i for i in impls if i in set(g["impl"])]
        where = ", ".join(x for x in (f"O={figs._num(o)}", mode, dtype, device, budget) if x)
        lines += [f"### {md_text(config)}: {md_text(where)} (P={p})", ""]
        records = _records(g)
        times = _pivot(g, gi, _time_cell, records)
        slopes = answers.slopes(g, gi)
        if any(slopes.values()):
            times.loc["slope"] = [slopes[i] for i in gi]
        lines += ["Median time, each case alone: median ± IQR", "", _md(times), ""]
        ratios = answers.paired_table(g, recs, gi, list(times.index.drop("slope", errors="ignore")))
        if (ratios != "").any().any():
            lines += ["Paired: time over the fastest in the same rounds [95% band]", "", _md(ratios), ""]
        mem = _pivot(g, gi, lambda r, f: _fmt_bytes(r["peak_mem_bytes"]) if pd.notna(r["peak_mem_bytes"]) else "",
                     records)
        lines += ["Peak memory:", "", _md(mem), ""]
        agree = _pivot(g, gi, lambda r, f: f"{r['rel_err']:.1e}" if pd.notna(r["rel_err"]) else "no ref", records)
        lines += ["Agreement with the reference:", "", _md(agree), ""]
        bad = g[~g["status"].isin([OK, "mismatch"])].drop_duplicates("impl")
        if len(bad):
            lines += ["Not ok:", ""] + [f"- {_code(r['impl'])} {md_text(r['status'])}"
                                        + (f": {md_text(r['error'])}" if isinstance(r["error"], str) and r["error"]
                                           else "")
                                        for _, r in bad.iterrows()] + [""]
    lines += answers.auto_section(df, recs, _md_table)
    lines += answers.peers_section(df, recs, _md_table)
    return "\n".join(lines)


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write results.csv, summary.md and the figures for a run; return the summary's path.

    Every file is written whole under a temporary name and renamed over its own (never through a link there; a
    link, a directory or a FIFO in its place is refused). ValueError in one line for an output directory that is
    a file or cannot be written."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a directory")
    if out.is_symlink() and not out.exists():
        raise ValueError(f"--out {out}: is a symbolic link to {os.readlink(out)}, which does not exist")
    run = load_run(run_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with safefs.replacing(out / "results.csv", "w") as f:
            run.df.drop(columns=["config", "size", "memory_budget_bytes_case"], errors="ignore").to_csv(
                f, index=False, chunksize=10_000)
        made = plots_for(run.df, out) if len(run.df) else []
        path = out / "summary.md"
        safefs.write_file(path, summary(run, plot_names=made))
        scatter = "time_vs_predicted_flops.png"
        safefs.write_file(out / "cost_model.md", answers.cost_model_text(
            fit_cost_model(run.df) if len(run.df) else pd.DataFrame(), _md_table,
            scatter if scatter in [n for _, n in made] else None))
    except OSError as exc:
        raise ValueError(unwritable(out, exc)) from None
    return path
