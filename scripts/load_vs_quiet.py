"""Two runs of the same sweep side by side (one at load, one on a quiet machine): their paired ratios should agree
within their bands, their separate medians need not.

    PYTHONPATH=. python scripts/load_vs_quiet.py RUN_A RUN_B [--baseline NAME]

For every paired group the two runs have in common (matched by the group's key: problem, mode, dtype, device,
budget; the runs may hold different case sets), each plugin both runs timed in the group's paired rounds is
divided by a baseline of the group (``--baseline``, or the fastest of neural-tangents' programs both runs timed
there, by run A's paired medians; the fastest plugin both timed when there is none): both runs' paired ratios
with their 95% bands (``agree`` when the bands overlap); each run's medians' ratio (the plugin's median over the
baseline's, the cases' own timings ``time_median_s`` from separate processes minutes apart); and, for the plugin
and the baseline, run A's median over run B's (how much the machine's state moved each one). The last lines
count the agreeing paired ratios and give the ranges of the medians' ratios. Exit 0, or 2 when the runs have no
paired group in common.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _medians(run: Path) -> dict[str, float]:
    """case id -> its last row's ``time_median_s`` (ok rows)."""
    out = {}
    try:
        text = (run / "results.jsonl").read_text()
    except OSError:
        return out
    for raw in text.splitlines():
        try:
            row = json.loads(raw)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("case_id") and row.get("status") == "ok" and row.get("time_median_s"):
            out[row["case_id"]] = float(row["time_median_s"])
    return out


def _header(run: Path) -> dict:
    try:
        first = json.loads((run / "results.jsonl").read_text().split("\n", 1)[0])
        return first.get("header", {}) if isinstance(first, dict) else {}
    except (OSError, ValueError):
        return {}


def _num(v) -> str:
    return "" if v is None else f"{v:.3g}"


def overlap(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Whether two (median, low, high) bands overlap."""
    return a[1] <= b[2] and b[1] <= a[2]


def baseline_of(rec_a: dict, rec_b: dict, common: list[str], given: str | None) -> str | None:
    """The plugin every ratio of the group is over (see the module docstring)."""
    if given:
        return given if given in common else None
    med = rec_a.get("median_s") or {}
    timed = [n for n in common if med.get(n)]
    peers = [n for n in timed if n.startswith("nt_")]
    pool = peers or timed
    return min(pool, key=lambda n: med[n]) if pool else None


def compare(run_a: Path, run_b: Path, baseline: str | None = None) -> tuple[list[dict], list[str]]:
    """(one dict per (group, plugin) compared, the lines to print)."""
    from ntk_bench.bench.measurement import paired

    recs_a, recs_b = paired.read_records(run_a), paired.read_records(run_b)
    med_a, med_b = _medians(run_a), _medians(run_b)
    ha, hb = _header(run_a), _header(run_b)
    lines = [f"A: {run_a} (clock {ha.get('clock', '?')}, sweep {ha.get('sweep', '?')}, {len(recs_a)} paired groups)",
             f"B: {run_b} (clock {hb.get('clock', '?')}, sweep {hb.get('sweep', '?')}, {len(recs_b)} paired groups)"]
    if ha.get("clock") != hb.get("clock"):
        lines.append("note: the runs time on different clocks: their paired ratios measure different things")
    rows = []
    for gid in sorted(set(recs_a) & set(recs_b)):
        ra, rb = recs_a[gid], recs_b[gid]
        common = [n for n in ra.get("impls", []) if n in (rb.get("impls") or [])
                  and (ra.get("times_s") or {}).get(n) and (rb.get("times_s") or {}).get(n)]
        base = baseline_of(ra, rb, common, baseline)
        if base is None or len(common) < 2:
            lines.append(f"\n{gid.removeprefix('paired/')}: fewer than two plugins timed in both runs")
            continue
        lines.append(f"\n{gid.removeprefix('paired/')}  (time over {base}'s; A/B: run A's median over run B's)")
        lines.append(f"  {'plugin':26s} {'A paired':22s} {'B paired':22s} {'agree':5s} {'A medians':>9s} "
                     f"{'B medians':>9s} {'A/B median':>10s} {'A/B median ' + base}")
        ids_a, ids_b = ra.get("case_ids") or {}, rb.get("case_ids") or {}

        def run_ratio(meds, ids, name, base=base):
            """One plugin's median over another's in one run (separate processes, minutes apart)."""
            x, y = meds.get(ids.get(name, "")), meds.get(ids.get(base, ""))
            return x / y if x and y else None

        def med_ratio(name, ids_a=ids_a, ids_b=ids_b):
            a, b = med_a.get(ids_a.get(name, "")), med_b.get(ids_b.get(name, ""))
            return a / b if a and b else None

        base_ratio = med_ratio(base)
        for name in common:
            if name == base:
                continue
            band_a, band_b = paired.ratio(ra, name, base), paired.ratio(rb, name, base)
            if band_a is None or band_b is None:
                continue
            agree = overlap(band_a, band_b)
            m = med_ratio(name)
            ua, ub = run_ratio(med_a, ids_a, name), run_ratio(med_b, ids_b, name)
            rows.append({"group": gid, "plugin": name, "baseline": base, "a": band_a, "b": band_b, "agree": agree,
                         "medians_ratio_a": ua, "medians_ratio_b": ub,
                         "median_a_over_b": m, "baseline_median_a_over_b": base_ratio})
            lines.append(f"  {name:26s} {paired.fmt_ratio(band_a):22s} {paired.fmt_ratio(band_b):22s} "
                         f"{'yes' if agree else 'NO':5s} {_num(ua):>9s} {_num(ub):>9s} {_num(m):>10s} "
                         f"{_num(base_ratio):>10s}")
    if rows:
        agree = sum(r["agree"] for r in rows)
        meds = [v for r in rows for v in (r["median_a_over_b"], r["baseline_median_a_over_b"]) if v]
        unpaired = [r["medians_ratio_a"] / r["medians_ratio_b"] for r in rows
                    if r["medians_ratio_a"] and r["medians_ratio_b"]]
        inside = sum(1 for r in rows if r["medians_ratio_a"] and r["medians_ratio_b"]
                     and r["a"][1] <= r["medians_ratio_a"] <= r["a"][2]
                     and r["b"][1] <= r["medians_ratio_b"] <= r["b"][2])
        lines.append(f"\npaired ratios: {agree} of {len(rows)} agree within their bands "
                     f"({len({r['group'] for r in rows})} groups)")
        if unpaired:
            lines.append(f"medians' ratios (one plugin's median over the baseline's, each run on its own): run A's "
                         f"over run B's {min(unpaired):.3g} to {max(unpaired):.3g}; both inside their run's paired "
                         f"band in {inside} of {len(unpaired)}")
        if meds:
            lines.append(f"medians, run A's over run B's: {min(meds):.3g} to {max(meds):.3g} "
                         f"(the same plugin's separate timings in the two runs)")
    return rows, lines


def main(argv=None) -> int:
    """The command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--baseline", help="the plugin every ratio is over (default: see above)")
    args = p.parse_args(argv)
    rows, lines = compare(Path(args.run_a), Path(args.run_b), args.baseline)
    print("\n".join(lines))
    if not rows:
        print("no paired group with two plugins timed in both runs", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
