"""Ours against neural-tangents on small models: paired, alternating rounds in one process, warm and first call.

    python scripts/small_vs_nt.py --out results/DIR                 # every case (minutes; compiles included)
    python scripts/small_vs_nt.py --cases mlp_tiny --rounds 5       # one case
    python scripts/small_vs_nt.py --list                            # the cases

For each case (a model, N, float32 on the CPU) every plugin runs on its own copy of the model (the same weights),
so that no plugin's first call profits from another's caches:

- first call: ``compute`` for ours (validation, plan, backend trial, and for ``*_compiled`` the compilation and
  the check against eager); for the neural-tangents peers ``prepare`` (the translation to JAX, timed apart as
  ``prepare_s``) then the first ``run()`` (jit compilation);
- warm: after two more calls each, ``--rounds`` rounds (``paired.time_rounds``, as the runner's paired timing);
  in each round every plugin runs a block of calls sized to about ``--block-s`` (its time per call is the block's
  time over its calls), after untimed calls of its own (``paired.WARMUP_S``: the neighbour before it in the round
  leaves caches and allocator cold), in an order rotated and reversed from round to round so that drift and the
  other processes on the machine hit all alike. A plugin's time is the median over rounds
  with the 25th-75th percentile band; ``/ nt fastest`` is the median over rounds of each round's ratio of our
  plugin to neural-tangents' fastest peer in that round, with its band;
- the case's ratio (``ours / nt`` of the first table): our fastest and neural-tangents' fastest of those rounds
  timed again by themselves, ``--rounds`` more rounds: the slow peers (a Jacobian contraction of gigabytes, a
  second long) leave the caches and the allocator cold for whatever runs after them, and a fast plugin's blocks
  still paid for that after their warm-up calls; neither finalist pays for a third party's here.

A plugin whose first call takes more than ``--max-first-s``, or whose Jacobian would take more than
``--max-jacobian-gb`` (Jacobian contraction, ours or neural-tangents'), is left out of the rounds and says why.
Appends to ``--out``/``results.jsonl`` (a header line, then one row per case and plugin as each case finishes) and
writes ``table.md``; prints the table. ``--tables FILE...`` prints the tables of rows from several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (id, zoo architecture, its parameters, N)
CASES = [
    ("mlp_tiny", "mlp", {"in_features": 10, "width": 64, "depth": 2, "out": 3, "activation": "tanh"}, 8),
    ("text_tiny", "text_transformer", {"vocab": 50, "seq": 12, "d_model": 32, "heads": 2, "ff": 64, "layers": 1,
                                       "out": 10}, 4),
    ("cnn_small", "cnn", {"channels": 8, "image": 16, "out": 10}, 8),
    *[(f"mlp512_N{n}", "mlp", {"in_features": 784, "width": 512, "depth": 2, "out": 10}, n) for n in (8, 32, 128)],
    *[(f"tutorial_cnn_N{n}", "tutorial_cnn", {}, n) for n in (2, 4, 8, 16)],
]
OURS = ["explicit_mlp", "explicit_mlp_compiled", "structured", "structured_compiled", "jacobian_contraction",
        "jacobian_contraction_compiled", "auto"]
NT = ["nt_jacobian_contraction", "nt_ntk_vector_products", "nt_structured_derivatives"]
JACOBIAN_PLUGINS = ("jacobian_contraction", "jacobian_contraction_compiled", "nt_jacobian_contraction")
# Compilations that take minutes on a loaded 2-core machine (over a minute idle): left out unless --all-compiles.
SLOW_COMPILES = {("text_tiny", "jacobian_contraction_compiled"): "its compilation takes over a minute"}


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, 25th, 75th percentile)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q[0], q[2]


def _prepare(name: str, model, x):
    """(run, first-call seconds, prepare seconds, compiled or None, fallback reason or None)."""
    from ntk_bench import implementations

    plugin = implementations.get(name)
    t0 = time.perf_counter()
    run, to_torch = plugin.prepare(model, x, None, "full")
    prepare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    to_torch(run())
    first_s = time.perf_counter() - t0
    info = plugin.info() if hasattr(plugin, "info") else None
    return run, first_s, prepare_s, (None if info is None else info.compiled), (None if info is None else info.fallback)


def run_case(case, ours, rounds: int, block_s: float, max_first_s: float, max_jacobian_gb: float,
             all_compiles: bool = False) -> list[dict]:
    from ntk_bench import implementations
    from ntk_bench.bench.measurement import paired
    from ntk_bench.bench.zoo import architectures

    cid, arch_name, params, n = case
    rows, runs = [], {}
    for name in [*ours, *NT]:
        arch = architectures.build(arch_name, seed=0, **params)
        x = architectures.inputs(arch, n, seed=1)
        row = {"case": cid, "arch": arch_name, "params": params, "N": n, "impl": name,
               "origin": implementations.origin_of(name), "P": arch.num_parameters, "O": arch.num_outputs}
        rows.append(row)
        jac_gb = n * arch.num_outputs * arch.num_parameters * 4 / 1e9
        reason = implementations.get(name).supports(arch.model)
        if reason is not None:
            row["skipped"] = reason
            continue
        if (cid, name) in SLOW_COMPILES and not all_compiles:
            row["skipped"] = f"{SLOW_COMPILES[cid, name]} (--all-compiles runs it)"
            continue
        if name in JACOBIAN_PLUGINS and jac_gb > max_jacobian_gb:
            row["skipped"] = f"its Jacobian would take {jac_gb:.1f} GB (> {max_jacobian_gb:g})"
            continue
        try:
            run, first_s, prepare_s, compiled, fallback = _prepare(name, arch.model, x)
        except implementations.UnsupportedModelError as exc:
            row["skipped"] = str(exc)[:300]
            continue
        row.update(first_call_s=first_s, prepare_s=prepare_s)
        if compiled is not None:
            row.update(compiled=compiled, fallback=fallback)
        if first_s > max_first_s:
            row["skipped"] = f"first call {first_s:.1f} s (> {max_first_s:g} s): left out of the rounds"
            continue
        for _ in range(2):
            run()
        runs[name] = (run, row)
    names = list(runs)
    times, number = paired.time_rounds({k: runs[k][0] for k in names}, 0.0, min_rounds=rounds, max_rounds=rounds,
                                       block_s=block_s) if names else ({}, {})
    nt_names = [k for k in names if k in NT]
    nt_best = [min(times[k][r] for k in nt_names) for r in range(rounds)] if nt_names else None
    for name in names:
        row = runs[name][1]
        med, lo, hi = _quantiles(times[name])
        row.update(calls_per_block=number[name], rounds=rounds, time_median_s=med, time_p25_s=lo, time_p75_s=hi)
        if nt_best is not None:
            ratio = _quantiles([a / b for a, b in zip(times[name], nt_best)])
            row.update(over_nt_best=ratio[0], over_nt_best_p25=ratio[1], over_nt_best_p75=ratio[2])
    ours_names = [k for k in names if k not in NT]
    if nt_names and ours_names:  # the two finalists again, by themselves: the case's ratio
        ours_best = min(ours_names, key=lambda k: statistics.median(times[k]))
        nt_fastest = min(nt_names, key=lambda k: statistics.median(times[k]))
        final, _ = paired.time_rounds({k: runs[k][0] for k in (ours_best, nt_fastest)}, 0.0, min_rounds=rounds,
                                      max_rounds=rounds, block_s=block_s)
        ratio = _quantiles([a / b for a, b in zip(final[ours_best], final[nt_fastest])])
        runs[ours_best][1].update(final_nt=nt_fastest, final_time_s=statistics.median(final[ours_best]),
                                  final_nt_time_s=statistics.median(final[nt_fastest]), final_over_nt=ratio[0],
                                  final_over_nt_p25=ratio[1], final_over_nt_p75=ratio[2])
    return rows


def _ms(s: float | None) -> str:
    return "" if s is None else f"{s * 1e3:.3g}"


def table(rows: list[dict]) -> str:
    """Markdown: per case and plugin the first call, the warm time with its band, and the ratio to nt's fastest."""
    out = ["| case | plugin | first call s | warm ms (p25–p75) | / nt fastest (p25–p75) | note |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        warm = f"{_ms(r['time_median_s'])} ({_ms(r['time_p25_s'])}–{_ms(r['time_p75_s'])})" \
            if "time_median_s" in r else ""
        ratio = f"{r['over_nt_best']:.2f} ({r['over_nt_best_p25']:.2f}–{r['over_nt_best_p75']:.2f})" \
            if "over_nt_best" in r else ""
        first = "" if "first_call_s" not in r else f"{r['first_call_s']:.3g}" + (
            f" (+{r['prepare_s']:.2g} prepare)" if r.get("origin", r.get("kind")) == "peer" else "")
        note = r.get("skipped") or ("" if r.get("compiled") in (None, True) else
                                    f"not compiled: {r.get('fallback') or ''}")
        out.append(f"| {r['case']} N={r['N']} | {r['impl']} | {first} | {warm} | {ratio} | {note[:140]} |")
    return "\n".join(out)


def summary(rows: list[dict]) -> str:
    """Per case: our fastest and nt's fastest (warm medians), their paired ratio, and whether ≤ 0.5 holds."""
    out = ["| case | our fastest (ms) | nt fastest (ms) | ours / nt (p25–p75) | ≤ 0.5× |", "|---|---|---|---|---|"]
    for cid in dict.fromkeys(r["case"] for r in rows):
        timed = [r for r in rows if r["case"] == cid and "time_median_s" in r]
        ours = [r for r in timed if r.get("origin", r.get("kind")) == "ours"]
        nt = [r for r in timed if r.get("origin", r.get("kind")) == "peer"]
        if not ours or not nt:
            continue
        final = [r for r in ours if "final_over_nt" in r]
        if final:  # the two finalists timed by themselves
            best = final[0]
            figures = (best["final_time_s"], best["final_nt"], best["final_nt_time_s"], best["final_over_nt"],
                       best["final_over_nt_p25"], best["final_over_nt_p75"])
        else:  # rows of a run before the finalists' rounds: every plugin's rounds
            best = min(ours, key=lambda r: r["over_nt_best"])
            fastest_nt = min(nt, key=lambda r: r["time_median_s"])
            figures = (best["time_median_s"], fastest_nt["impl"], fastest_nt["time_median_s"], best["over_nt_best"],
                       best["over_nt_best_p25"], best["over_nt_best_p75"])
        ms, nt_impl, nt_ms, ratio, lo, hi = figures
        out.append(f"| {cid} N={best['N']} | {best['impl']} {_ms(ms)} | {nt_impl} {_ms(nt_ms)} | {ratio:.2f} "
                   f"({lo:.2f}–{hi:.2f}) | {'yes' if ratio <= 0.5 else 'no'} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", help="case ids (default: all; --list shows them)")
    ap.add_argument("--impls", nargs="*", default=OURS, help="our plugins (the nt peers always run)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block-s", type=float, default=0.02, help="about this long a block of calls per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-first-s", type=float, default=120.0)
    ap.add_argument("--max-jacobian-gb", type=float, default=1.0)
    ap.add_argument("--out", type=Path, help="folder for results.jsonl and table.md")
    ap.add_argument("--all-compiles", action="store_true", help="also the compilations in SLOW_COMPILES")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for cid, arch, params, n in CASES:
            print(cid, arch, json.dumps(params), f"N={n}")
        return
    from ntk_bench.bench.execution.worker import _keep_freed_memory
    from ntk_bench.bench.measurement import environment

    _keep_freed_memory()
    torch.set_num_threads(args.threads)
    # neural-tangents on as many cores as torch has threads (the process is held to them when JAX starts)
    os.environ["NTK_BENCH_XLA_THREADS"] = str(args.threads)
    cases = [c for c in CASES if not args.cases or c[0] in args.cases]
    unknown = set(args.cases or ()) - {c[0] for c in CASES}
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; --list shows them")
    meta = {"torch": torch.__version__, "threads": args.threads, "cpu": environment.cpu_name(),
            "cpu_capability": environment.cpu_capability(),
            "load_before": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": " ".join(sys.argv)}
    rows = []
    if args.out:  # rows are appended as each case finishes: a run cut short keeps them
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps({"meta": meta}) + "\n")
    for case in cases:
        done = run_case(case, args.impls, args.rounds, args.block_s, args.max_first_s, args.max_jacobian_gb,
                        args.all_compiles)
        rows.extend(done)
        if args.out:
            with open(args.out / "results.jsonl", "a") as f:
                for r in done:
                    f.write(json.dumps(r) + "\n")
        print(f"{case[0]} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    meta["load_after"] = os.getloadavg()
    text = f"{json.dumps(meta)}\n\n## Per case: our fastest against neural-tangents' fastest\n\n{summary(rows)}\n\n" \
           f"## Every plugin\n\n{table(rows)}\n"
    print(text)
    if args.out:
        (args.out / "table.md").write_text(text)


def from_files(paths: list[Path]) -> str:
    """The tables of the rows in ``paths`` (results.jsonl files of runs of this script, e.g. cases run apart)."""
    rows, metas = [], []
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            (metas.append(r["meta"]) if "meta" in r else rows.append(r))
    return "\n".join(json.dumps(m) for m in metas) + \
        f"\n\n## Per case: our fastest against neural-tangents' fastest\n\n{summary(rows)}\n\n" \
        f"## Every plugin\n\n{table(rows)}\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--tables"]:  # python scripts/small_vs_nt.py --tables A/results.jsonl B/results.jsonl
        print(from_files([Path(p) for p in sys.argv[2:]]))
    else:
        main()
