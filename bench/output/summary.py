"""The summary's answers, from the paired rounds: which plugin to use, ours against the peers, auto's verdicts.

Every ratio here is the median, over the rounds of a group's paired timing (``paired.jsonl``, see
``bench/measurement/paired.py``), of one plugin's time over another's in the same round, with its 95% band; a median from
one process is never divided by a median from another. A group without paired rounds (an old run, a group with
fewer than two ok plugins) gets no ratio, and says so.

Also here: the log-log slope of time against N, only from three sizes or more, with a bootstrap band over the
timing blocks; and the cost model's fit, written to its own file (``cost_model.md``).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd

from ..measurement import paired
from . import plots as figs
from .plots import fmt_bytes, fmt_time


@functools.lru_cache(maxsize=1)
def _nt_peers() -> frozenset[str]:
    """neural-tangents' own implementations: the registry's plugins tagged ``neural_tangents``."""
    from ntk_bench import implementations

    return frozenset(implementations.names(None, tag="neural_tangents"))


CASE_KEYS = ["config", "O", "mode", "dtype", "device", "budget", "size"]
GROUP_KEYS = CASE_KEYS[:-1]
CLOSE = 1.10  # "within 10%"


def _is_peer(impl: str) -> bool:
    return bool(figs.is_peer(impl))


# -- paired records keyed like the report's rows -----------------------------------------------------------

def keyed(df: pd.DataFrame, records: dict[str, dict]) -> dict[tuple, dict]:
    """(config, O, mode, dtype, device, budget, size) -> the ok paired record of that case group (matched through
    its rows' case ids: the record's plugins that have a row in ``df``)."""
    if df.empty or not records:
        return {}
    by_case = df.set_index("case_id")
    out = {}
    for rec in records.values():
        if rec.get("status") != "ok" or not rec.get("times_s"):
            continue
        for cid in (rec.get("case_ids") or {}).values():
            if cid in by_case.index:
                row = by_case.loc[cid]
                row = row.iloc[-1] if isinstance(row, pd.DataFrame) else row
                out[tuple(row[k] for k in CASE_KEYS)] = rec
                break
    return out


def ratio_cells(rec: dict, impls: list[str]) -> dict[str, str]:
    """Per plugin of the record: its time over the fastest's in the same rounds, ``1.8× [1.6–2.1]``."""
    best = paired.fastest(rec)
    out = {}
    for impl in impls:
        band = paired.ratio(rec, impl, best) if best else None
        out[impl] = "1× (fastest)" if impl == best else paired.fmt_ratio(band)
    return out


def paired_table(group: pd.DataFrame, recs: dict[tuple, dict], impls: list[str], sizes: list[str]) -> pd.DataFrame:
    """Sizes down, plugins across: each plugin's paired time over the fastest of its round (blank: not timed in
    the rounds)."""
    table = {impl: {} for impl in impls}
    key0 = tuple(group.iloc[0][k] for k in GROUP_KEYS)
    for size in sizes:
        rec = recs.get((*key0, size))
        if rec is None:
            continue
        for impl, cell in ratio_cells(rec, [i for i in impls if i in rec["times_s"]]).items():
            table[impl][size] = cell
    return pd.DataFrame(table, index=sizes, columns=impls).reindex(sizes).fillna("")


# -- "use X" -----------------------------------------------------------------------------------------------

def _mem(df_case: pd.DataFrame, impl: str) -> float | None:
    r = df_case[df_case["impl"] == impl]
    if r.empty or pd.isna(r.iloc[-1]["peak_mem_bytes"]):
        return None
    return float(r.iloc[-1]["peak_mem_bytes"])


def verdict(rec: dict, df_case: pd.DataFrame | None = None) -> dict | None:
    """Which of our plugins to use on this case (the fastest in the paired rounds; auto aside, it runs a pick),
    how much faster than the next plugin and than neural-tangents' fastest, with bands; None without one of
    ours."""
    med = rec.get("median_s") or {}
    ours = [i for i in med if not _is_peer(i) and i != "auto"]
    if not ours:
        return None
    use = min(ours, key=med.get)
    others = [i for i in med if i not in (use, "auto")]
    nxt = min(others, key=med.get) if others else None
    nts = [i for i in med if i in _nt_peers()]
    nt = min(nts, key=med.get) if nts else None
    out = {"use": use, "next": nxt, "next_band": paired.ratio(rec, nxt, use) if nxt else None,
           "nt": nt, "nt_band": paired.ratio(rec, nt, use) if nt else None,
           "peer_faster": [p for p in med if _is_peer(p) and med[p] < med[use]], "rounds": rec.get("rounds")}
    if df_case is not None:
        out["mem"] = _mem(df_case, use)
        out["nt_mem"] = _mem(df_case, nt) if nt else None
    return out


def _faster_text(band, other: str, what: str) -> str:
    med, lo, hi = band
    if lo > 1:
        return f"{med:.3g}× [{lo:.3g}–{hi:.3g}] faster than {what}{other}"
    if hi < 1:
        return f"{1 / med:.3g}× [{1 / hi:.3g}–{1 / lo:.3g}] slower than {what}{other}"
    return f"as fast as {what}{other} ({med:.3g}× [{lo:.3g}–{hi:.3g}]: the band holds 1)"


def verdict_text(v: dict) -> str:
    """A case's recommendation as one Markdown sentence: the plugin to use, and its paired ratio bands against the
    next plugin and neural-tangents' fastest (and its memory where measured)."""
    parts = []
    if v["next"] and v["next"] == v["nt"]:  # one plugin both: said once
        parts.append(_faster_text(v["next_band"], f"`{v['next']}`", "the next, neural-tangents' fastest, "))
    elif v["next"]:
        parts.append(_faster_text(v["next_band"], f"`{v['next']}`", "the next, "))
    if v["nt"] and v["nt"] != v["next"]:
        parts.append(_faster_text(v["nt_band"], f"`{v['nt']}`", "neural-tangents' fastest, "))
    text = f"**use `{v['use']}`** (paired over {v['rounds']} rounds: " + "; ".join(parts)
    if v.get("mem") is not None:
        text += f"; memory {fmt_bytes(v['mem'])}"
        if v.get("nt_mem") is not None:
            text += f" against {fmt_bytes(v['nt_mem'])} for `{v['nt']}`"
    text += ")"
    if v["peer_faster"]:
        text += f"; faster still: the peer(s) {', '.join(f'`{p}`' for p in v['peer_faster'])}"
    return text


def _size_order(df: pd.DataFrame) -> dict[str, tuple]:
    """Each size label's sort key (N, x2 given, M), read once from the group's first row of each size."""
    first = df.drop_duplicates("size")
    return {s: (int(n), x2 != "x1", int(m)) for s, n, x2, m in zip(first["size"], first["N"], first["x2"], first["M"])}


def recommendations(g: pd.DataFrame, recs: dict[tuple, dict]) -> list[str]:
    """An architecture's "use X" lines: per group (O, mode, dtype, device, budget), the verdict at its largest
    paired size, and the sizes where another plugin wins."""
    lines = []
    for key, grp in g.groupby(GROUP_KEYS, sort=False, dropna=False):
        order = _size_order(grp)
        sizes = sorted(order, key=order.get)
        found = [(s, recs[(*key, s)]) for s in sizes if (*key, s) in recs]
        config, o, mode, dtype, device, budget = key
        where = ", ".join(str(x) for x in (f"O={figs._num(o)}", mode, dtype, device, budget) if x)
        if not found:
            lines.append(f"- {where}: no paired timing (fewer than two plugins ok, or a run before paired rounds): "
                         "no verdict")
            continue
        verdicts = [(s, verdict(rec, grp[grp["size"] == s])) for s, rec in found]
        verdicts = [(s, v) for s, v in verdicts if v is not None]
        if not verdicts:
            lines.append(f"- {where}: none of our plugins was timed in the paired rounds")
            continue
        size, v = verdicts[-1]
        text = f"- {where}, {size}: {verdict_text(v)}"
        elsewhere = [f"{s}: `{w['use']}`" for s, w in verdicts[:-1] if w["use"] != v["use"]]
        if elsewhere:
            text += f". Elsewhere: {'; '.join(elsewhere)}"
        lines.append(text + ".")
    return lines


# -- slopes ------------------------------------------------------------------------------------------------

def slope_band(ns, blocks, draws: int = 1000, seed: int = 0) -> tuple[float, float, float] | None:
    """(slope, low, high) of log(time) against log(N) over three sizes or more: the slope of the blocks'
    medians, and the 95% band of slopes fitted to one block drawn at random per size (``draws`` times); None
    from fewer than three distinct sizes."""
    pts = [(float(n), [float(b) for b in bl if b and b > 0]) for n, bl in zip(ns, blocks)]
    pts = [(n, bl) for n, bl in pts if bl and n > 0]
    if len({n for n, _ in pts}) < 3:
        return None
    x = np.log([n for n, _ in pts])
    k = float(np.polyfit(x, np.log([np.median(bl) for _, bl in pts]), 1)[0])
    rng = np.random.default_rng(seed)
    ys = np.log(np.stack([rng.choice(bl, size=draws) for _, bl in pts]))  # sizes x draws
    ks = np.polyfit(x, ys, 1)[0]
    lo, hi = np.quantile(ks, [0.025, 0.975])
    return k, float(lo), float(hi)


def _blocks(value) -> list[float]:
    """A row's timing blocks (a list, or the JSON text the report's frame keeps lists as); [] without them."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    return [float(v) for v in value if isinstance(v, (int, float))] if isinstance(value, list) else []


def slopes(group: pd.DataFrame, impls: list[str]) -> dict[str, str]:
    """Per plugin: ``1.02 [0.95–1.10]`` from its ok N = M rows when it has three sizes or more, else blank."""
    ok = group[(group["status"] == "ok") & (group["x2"] == "x1")]
    blocks_col = ok["time_blocks_s"] if "time_blocks_s" in ok else pd.Series([None] * len(ok), index=ok.index)
    per_impl: dict[str, tuple[list, list]] = {}
    for impl, n, b in zip(ok["impl"], ok["N"], blocks_col):  # (one pass: a large run has thousands of groups)
        ns, bs = per_impl.setdefault(impl, ([], []))
        ns.append(n)
        bs.append(b)
    out = {}
    for impl in impls:
        ns, bs = per_impl.get(impl, ([], []))
        band = slope_band(ns, [_blocks(b) for b in bs]) if len(set(ns)) >= 3 else None
        out[impl] = "" if band is None else f"{band[0]:.2f} [{band[1]:.2f}–{band[2]:.2f}]"
    return out


# -- ours against the peers, auto ----------------------------------------------------------------------

def ours_vs_peers(df: pd.DataFrame, recs: dict[tuple, dict]) -> tuple[pd.DataFrame, list[str]]:
    """Per paired case with a peer: our fastest and the fastest peer of the rounds, the peer's time over ours
    (above 1: ours faster) with its band, and each peer's ratio."""
    rows, peers_seen = [], []
    for key, rec in recs.items():
        med = rec["median_s"]
        ours = [i for i in med if not _is_peer(i)]
        peers = [i for i in med if _is_peer(i)]
        if not ours or not peers:
            continue
        best, peer = min(ours, key=med.get), min(peers, key=med.get)
        band = paired.ratio(rec, peer, best, final=True)
        finals = rec.get("final_times_s") or {}
        rounds = len(finals[best]) if best in finals and peer in finals else rec.get("rounds")
        row = {**dict(zip(CASE_KEYS, key)), "ours (fastest)": f"{best} {fmt_time(med[best])}",
               "fastest peer": f"{peer} {fmt_time(med[peer])}", "peer / ours": paired.fmt_ratio(band),
               "_band": band, "rounds": rounds}
        for p in peers:
            row[p] = paired.fmt_ratio(paired.ratio(rec, p, best, final=True))
            if p not in peers_seen:
                peers_seen.append(p)
        rows.append(row)
    return pd.DataFrame(rows), peers_seen


def peers_section(df: pd.DataFrame, recs: dict[tuple, dict], md_table) -> list[str]:
    """The report's section comparing, per case, our fastest plugin with the fastest peer timed in the same rounds
    (paired ratio bands); no lines when no case has both."""
    table, peers = ours_vs_peers(df, recs)
    if table.empty:
        return []
    bands = list(table["_band"])
    faster = sum(1 for b in bands if b[1] > 1)
    slower = sum(1 for b in bands if b[2] < 1)
    lines = ["## Ours against the peers (paired)", "",
             "Per case, the fastest of our plugins (auto included) and the fastest peer of the rounds, timed "
             "side by side, then (where the case has other plugins) the two again by themselves, so that no slow "
             "third party runs between them: `peer / ours` is the median over those rounds of the peer's time over "
             "ours (above 1: ours faster), with its 95% band; a column per peer likewise (the other peers from the "
             "rounds of all).", "",
             f"- Ours faster in {faster} of {len(bands)} cases (the band above 1), the peer faster in {slower} "
             f"(the band below 1), undecided in {len(bands) - faster - slower}."]
    for p in peers:
        rs = [paired.ratio(rec, p, min([i for i in rec['median_s'] if not _is_peer(i)], key=rec['median_s'].get),
                           final=True)
              for rec in recs.values() if p in rec["median_s"] and any(not _is_peer(i) for i in rec["median_s"])]
        rs = [r for r in rs if r]
        if rs:
            meds = [r[0] for r in rs]
            lines.append(f"- `{p}` over our fastest: median {np.median(meds):.3g}, from {min(meds):.3g} to "
                         f"{max(meds):.3g}, ours faster (band above 1) in {sum(r[1] > 1 for r in rs)} of {len(rs)}.")
    shown = table.drop(columns=["_band"])
    shown = shown[[c for c in CASE_KEYS if c in shown] + ["ours (fastest)", "fastest peer", "peer / ours"]
                  + peers + ["rounds"]]
    return lines + ["", md_table(shown), ""]


def auto_section(df: pd.DataFrame, recs: dict[tuple, dict], md_table) -> list[str]:
    """auto against the fastest of our other plugins and against its own pick, both from the paired rounds."""
    rows = []
    picks = df[df["impl"] == "auto"].set_index(CASE_KEYS)["auto_pick"] if "auto_pick" in df else pd.Series()
    for key, rec in recs.items():
        med = rec["median_s"]
        if "auto" not in med:
            continue
        ours = [i for i in med if not _is_peer(i) and i != "auto"]
        if not ours:
            continue
        best = min(ours, key=med.get)
        pick = picks.get(key) if key in picks.index else None
        pick = pick if isinstance(pick, str) else None
        over_best = paired.ratio(rec, "auto", best)
        over_pick = paired.ratio(rec, "auto", pick) if pick in med else None
        rows.append({**dict(zip(CASE_KEYS, key)), "auto pick": pick or "?", "fastest of ours": best,
                     "auto / fastest": paired.fmt_ratio(over_best),
                     "auto / pick": paired.fmt_ratio(over_pick) if pick in med else
                     ("(pick not in the rounds)" if pick else ""),
                     "_best": over_best, "_pick": over_pick, "_picked": pick == best})
    if not rows:
        return []
    t = pd.DataFrame(rows)
    k = len(t)
    within = sum(1 for b in t["_best"] if b and b[0] <= CLOSE)
    surely = sum(1 for b in t["_best"] if b and b[2] <= CLOSE)
    slower = sum(1 for b in t["_best"] if b and b[1] > CLOSE)
    lines = ["## auto against the fastest (paired)", "",
             "auto, its pick and every other plugin of the case timed side by side in the same rounds.", "",
             f"- auto's time within 10% of the fastest of our other plugins in {within} of {k} cases by the "
             f"median ratio ({surely} with the whole band within 10%; {slower} surely more than 10% slower).",
             f"- auto picked the plugin that was fastest in the rounds in {int(t['_picked'].sum())} of {k}."]
    pick_bands = [b for b in t["_pick"] if b]
    if pick_bands:
        lines.append(f"- auto over its own pick (its overhead): median {np.median([b[0] for b in pick_bands]):.3f}, "
                     f"at most {max(b[0] for b in pick_bands):.3f}.")
    shown = t.drop(columns=["_best", "_pick", "_picked"])
    return lines + ["", md_table(shown), ""]


# -- the cost model's file ---------------------------------------------------------------------------------

def cost_model_text(fits: pd.DataFrame, md_table, figure: str | None) -> str:
    """cost_model.md: the fitted constants of the JC and NTK-VP cost models and the time-against-FLOPs figure."""
    lines = ["# Cost model: fitted constants and JC / NTK-VP crossover", ""]
    if len(fits):
        lines += ["JC: t ≈ a·(N+M')·O·[FP] + b·N·M·O²·P; NTK-VP: t ≈ c·N·M·O·[FP] (non-negative least squares over "
                  "the sizes measured, each from its own process: a constant of 0 means that term was lost in the "
                  "noise). 1/b and 1/c read as effective FLOP/s.", "", md_table(fits), ""]
    else:
        lines += ["No group has two sizes or more of both jacobian_contraction and ntk_vector_products: nothing "
                  "to fit.", ""]
    if figure:
        lines += ["## Time against the cost model's FLOPs", "", f"![time_vs_predicted_flops]({figure})", ""]
    return "\n".join(lines)
