"""Turn a run's results.jsonl into results.csv, summary.md and PNG plots (pandas + matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .runner import read_results

COLUMNS = ["impl", "arch", "N", "M", "O", "P", "mode", "dtype", "device", "status", "time_median_s", "time_iqr_s",
           "peak_mem_bytes", "fp_flops", "predicted_jc_flops", "predicted_vp_flops", "rel_err", "reference", "error"]
JC, VP = "jacobian_contraction", "ntk_vector_products"


def load(run_dir: Path) -> tuple[dict, pd.DataFrame]:
    header, rows = read_results(Path(run_dir) / "results.jsonl")
    df = pd.DataFrame(rows)
    for c in COLUMNS + ["auto_pick", "auto_over_pick_paired", "auto_over_fastest_paired", "paired_fastest"]:
        if c not in df.columns:
            df[c] = np.nan
    # A row the worker never answered (timeout, crash) lacks the model's O and P: take them from its problem's other rows.
    problem = ["arch", "arch_params", "N", "M", "x2"]
    for c in ("O", "P", "fp_flops", "predicted_jc_flops", "predicted_vp_flops"):
        df[c] = df.groupby(problem, dropna=False)[c].transform("first")
    df["config"] = df["arch"] + df["arch_params"].map(_short_params)
    df["size"] = np.where(df["x2"] == "x1", "N=" + df["N"].astype(str), "N=" + df["N"].astype(str) + ", M=" + df["M"].astype(str))
    rest = [c for c in df.columns if c not in COLUMNS]
    return header, df[COLUMNS + rest]


def _short_params(params_json) -> str:
    params = {k: v for k, v in json.loads(params_json).items() if k != "out"}
    return "(" + ",".join(f"{k}={v}" for k, v in params.items()) + ")" if params else ""


def _impl_order(df: pd.DataFrame) -> list[str]:
    from ntk_bench import implementations
    from .sweeps import NT_PEERS

    order = implementations.names() + list(NT_PEERS)
    return [i for i in order if i in set(df["impl"])] + sorted(set(df["impl"]) - set(order))


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _fmt_bytes(b: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def _pivot(group: pd.DataFrame, impls: list[str], cell) -> pd.DataFrame:
    """Sizes down, plugins across; ``cell(row, fastest)`` renders an ok row; other rows show their status."""
    ok = group[group["status"].isin(["ok", "mismatch"])]
    fastest = ok.groupby("size")["time_median_s"].min()
    table = {}
    for impl in impls:
        col = {}
        for _, r in group[group["impl"] == impl].iterrows():
            col[r["size"]] = cell(r, fastest.get(r["size"], np.nan)) if r["status"] in ("ok", "mismatch") else r["status"]
        table[impl] = col
    sizes = sorted(group["size"].unique(), key=lambda s: (group[group["size"] == s]["N"].iloc[0], s))
    return pd.DataFrame(table, index=sizes).reindex(sizes).fillna("")


def _time_cell(r, fastest):
    mark = " ✗" if r["status"] == "mismatch" else ""
    return f"{_fmt_time(r['time_median_s'])} ({r['time_median_s'] / fastest:.3g}×){mark}"


def fit_cost_model(df: pd.DataFrame) -> pd.DataFrame:
    """Non-negative least-squares constants of the cost model per group: JC t = a·N·O·[FP] + b·N·M·O²·P, NTK-VP t = c·N·M·O·[FP]."""
    from scipy.optimize import nnls

    out = []
    for key, g in df[df["status"] == "ok"].groupby(["config", "O", "mode", "dtype", "device"]):
        jc, vp = g[g["impl"] == JC], g[g["impl"] == VP]
        if len(jc) < 2 or len(vp) < 2:
            continue
        n_side = jc["predicted_jc_flops"] - jc["N"] * jc["M"] * jc["O"] ** 2 * jc["P"]
        a_mat = np.stack([n_side.to_numpy(float), (jc["N"] * jc["M"] * jc["O"] ** 2 * jc["P"]).to_numpy(float)], 1)
        coef, _ = nnls(a_mat, jc["time_median_s"].to_numpy(float))
        c = float(np.dot(vp["predicted_vp_flops"], vp["time_median_s"]) / np.dot(vp["predicted_vp_flops"], vp["predicted_vp_flops"]))
        both = pd.merge(jc[["size", "N", "time_median_s"]], vp[["size", "time_median_s"]], on="size", suffixes=("_jc", "_vp")).sort_values("N")
        faster = np.where(both["time_median_s_jc"] <= both["time_median_s_vp"], "JC", "NTK-VP")
        flips = [f"{both['size'].iloc[i]}: {faster[i]}" for i in range(len(faster)) if i == 0 or faster[i] != faster[i - 1]]
        out.append({
            "config": key[0], "O": key[1], "mode": key[2], "dtype": key[3], "device": key[4],
            "jc_s_per_jacobian_flop": coef[0], "jc_s_per_contraction_flop": coef[1], "vp_s_per_flop": c,
            "faster (from the size shown on)": "; ".join(flips),
        })
    return pd.DataFrame(out)


CASE_KEYS = ["config", "O", "size", "mode", "dtype", "device"]


def _fastest(rows: pd.DataFrame) -> pd.DataFrame:
    """The fastest row per case: its impl and time."""
    return rows.sort_values("time_median_s").groupby(CASE_KEYS, sort=False).first()[["impl", "time_median_s"]]


def auto_vs_fastest(df: pd.DataFrame) -> pd.DataFrame:
    """Per case: auto's pick and time against the fastest of the other plugins (peers excluded)."""
    ok = df[df["status"] == "ok"]
    ours = ok[(ok["impl"] != "auto") & ~ok["impl"].str.startswith("nt_")]
    auto = ok[ok["impl"] == "auto"].set_index(CASE_KEYS)[["auto_pick", "time_median_s", "auto_over_pick_paired",
                                                         "auto_over_fastest_paired", "paired_fastest"]]
    j = auto.join(_fastest(ours), rsuffix="_fastest", how="inner").reset_index()
    pick_time = ours.set_index(CASE_KEYS + ["impl"])["time_median_s"]
    pick = [pick_time.get((*key, p), np.nan) for key, p in zip(j[CASE_KEYS].itertuples(index=False), j["auto_pick"])]
    return pd.DataFrame({
        **{k: j[k] for k in CASE_KEYS}, "auto pick": j["auto_pick"], "auto": j["time_median_s"].map(_fmt_time),
        "fastest": j["impl"], "fastest time": j["time_median_s_fastest"].map(_fmt_time),
        "auto / fastest": j["time_median_s"] / j["time_median_s_fastest"],
        "pick / fastest": np.asarray(pick, dtype=float) / j["time_median_s_fastest"],
        "auto / pick, paired": j["auto_over_pick_paired"],
        "auto / fastest, paired": j["auto_over_fastest_paired"], "paired fastest": j["paired_fastest"],
    })


def ours_vs_neural_tangents(df: pd.DataFrame) -> pd.DataFrame:
    """Per case: the fastest of our plugins against the fastest neural-tangents implementation."""
    ok = df[df["status"] == "ok"]
    peer = ok["impl"].str.startswith("nt_")
    j = _fastest(ok[~peer]).join(_fastest(ok[peer]), lsuffix="_ours", rsuffix="_nt", how="inner").reset_index()
    return pd.DataFrame({
        **{k: j[k] for k in CASE_KEYS},
        "ours": [f"{i} {_fmt_time(t)}" for i, t in zip(j["impl_ours"], j["time_median_s_ours"])],
        "neural-tangents": [f"{i} {_fmt_time(t)}" for i, t in zip(j["impl_nt"], j["time_median_s_nt"])],
        "ours / nt": j["time_median_s_ours"] / j["time_median_s_nt"],
    })


def _slope(n, t) -> float:
    return float(np.polyfit(np.log(n), np.log(t), 1)[0]) if len(n) >= 2 else float("nan")


def plots(df: pd.DataFrame, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    impls = _impl_order(df)
    colors = {impl: plt.cm.tab20(i % 20) for i, impl in enumerate(impls)}
    style = {impl: ("s--" if impl.startswith("nt_") else "o-") for impl in impls}  # peers dashed
    sq = df[(df["x2"] == "x1") & (df["status"] == "ok")]
    for config, g in sq.groupby("config"):
        panels = list(g.groupby(["O", "mode", "dtype", "device"]))
        for what, col, label in (("time", "time_median_s", "median time [s]"), ("memory", "peak_mem_bytes", "peak memory [bytes]")):
            fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
            for ax, ((o, mode, dtype, device), p) in zip(axes[0], panels):
                for impl in impls:
                    s = p[(p["impl"] == impl) & (p[col] > 0)].sort_values("N")
                    if len(s):
                        ax.plot(s["N"], s[col], style[impl], color=colors[impl],
                                label=f"{impl} (slope {_slope(s['N'], s[col]):.2f})" if what == "time" else impl)
                ax.set(xscale="log", yscale="log", xlabel="N (= M)", ylabel=label, title=f"O={o}, {mode}, {dtype}, {device}")
                ax.legend(fontsize=7)
            fig.suptitle(config)
            fig.tight_layout()
            name = f"{what}_vs_N_{_slug(config)}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            made.append(name)
    ok = df[df["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 5))
    for impl in impls:
        s = ok[ok["impl"] == impl]
        x = s["predicted_vp_flops"] if impl in (VP, "nt_ntk_vector_products") else s["predicted_jc_flops"]
        if len(s):
            ax.scatter(x, s["time_median_s"], s=14, color=colors[impl], label=impl)
    ax.set(xscale="log", yscale="log", xlabel="predicted FLOPs (JC model; NTK-VP model for NTK-VP)",
           ylabel="median time [s]", title="measured time against the cost model")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "time_vs_predicted_flops.png", dpi=110)
    plt.close(fig)
    return made + ["time_vs_predicted_flops.png"]


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in s).strip("_")


def summary(header: dict, df: pd.DataFrame, plot_names: list[str]) -> str:
    impls = _impl_order(df)
    lines = [f"# ntk-bench results: {header.get('sweep', '?')}", ""]
    env = ", ".join(f"{k} {v}" for k, v in header.items() if k not in ("sweep", "cases") and v is not None)
    lines += [f"Environment: {env}.", ""]
    counts = df["status"].value_counts().to_dict()
    lines += ["Cases: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".", ""]
    lines += ["Times are medians (torch.utils.benchmark, after a warm-up call); `(k×)` is the time over the "
              "fastest in the row. Peak memory is above what the model and inputs already held. "
              "Agreement is ‖K − K_ref‖/‖K_ref‖ on the leading block of the kernel against the float64 reference "
              f"({', '.join(sorted(df['reference'].dropna().unique())) or 'none'}). ✗ marks a mismatch.", ""]
    if "cuda_graph_bytes" in df and df["cuda_graph_bytes"].notna().any():
        graphed = df[df["cuda_graph_bytes"].notna()]
        lines += [f"{len(graphed)} rows replayed a captured CUDA graph ({', '.join(sorted(graphed['impl'].unique()))}): "
                  "their time is the replay's, their first call includes the capture (`first_call_s`), and their "
                  "peak memory includes the graph's memory pool.", ""]
    for key, g in df.groupby(["config", "O", "mode", "dtype", "device"], sort=False):
        config, o, mode, dtype, device = key
        p = int(g["P"].dropna().iloc[0]) if g["P"].notna().any() else "?"
        lines += [f"## {config}, O={o:g}, {mode}, {dtype}, {device} (P={p})", ""]
        lines += ["Median time:", "", _pivot(g, impls, _time_cell).to_markdown(), ""]
        mem = _pivot(g, impls, lambda r, f: _fmt_bytes(r["peak_mem_bytes"]) if pd.notna(r["peak_mem_bytes"]) else "")
        lines += ["Peak memory:", "", mem.to_markdown(), ""]
        agree = _pivot(g, impls, lambda r, f: f"{r['rel_err']:.1e}" if pd.notna(r["rel_err"]) else "no ref")
        lines += ["Agreement with the reference:", "", agree.to_markdown(), ""]
        notes = g[g["status"].isin(["unsupported", "error", "oom", "timeout"])].drop_duplicates("impl")
        if len(notes):
            lines += ["Not ok:", ""] + [f"- `{r['impl']}` {r['status']}: {r['error']}" for _, r in notes.iterrows()] + [""]
    fits = fit_cost_model(df)
    if len(fits):
        lines += ["## Cost model: fitted constants and JC / NTK-VP crossover", "",
                  "JC: t ≈ a·(N+M')·O·[FP] + b·N·M·O²·P; NTK-VP: t ≈ c·N·M·O·[FP] (least squares over the sizes measured). "
                  "1/b and 1/c read as effective FLOP/s.", "",
                  fits.to_markdown(index=False, floatfmt=".3g"), ""]
    autos = auto_vs_fastest(df)
    if len(autos):
        k = len(autos)
        within = int((autos["auto / fastest"] <= 1.10).sum())
        best = int((autos["auto pick"] == autos["fastest"]).sum())
        pick_close = int((autos["pick / fastest"] <= 1.10).sum())
        paired = autos["auto / pick, paired"].dropna()
        combined = int((autos["auto / pick, paired"] * autos["pick / fastest"] <= 1.10).sum())
        direct = autos["auto / fastest, paired"].dropna()
        lines += ["## auto's pick against the measured fastest", "",
                  f"- auto's own time within 10% of the fastest plugin's, each timed separately: {within} of {k} "
                  f"cases ({within / k:.0%}).",
                  f"- auto picked the measured fastest plugin in {best} of {k}; a plugin within 10% of it in "
                  f"{pick_close} of {k}.",
                  *([f"- auto against its own pick, timed in alternating blocks (`auto / pick, paired`, free of the "
                     f"machine's drift between cases): median {paired.median():.3f}, at most {paired.max():.3f}; "
                     f"(auto / pick, paired) × (pick / fastest) ≤ 1.10 in {combined} of {k} ({combined / k:.0%})."]
                    if len(paired) else []),
                  *([f"- auto against the fastest, timed in alternating blocks against its pick and every plugin "
                     f"whose separate time was within 25% of the fastest's (`auto / fastest, paired`: the largest "
                     f"of those ratios): within 10% in {int((direct <= 1.10).sum())} of {len(direct)} cases "
                     f"({(direct <= 1.10).mean():.0%}); median {direct.median():.3f}, at most {direct.max():.3f}."]
                    if len(direct) else []),
                  "", autos.to_markdown(index=False, floatfmt=".3g"), ""]
    peers = ours_vs_neural_tangents(df)
    if len(peers):
        lines += ["## The fastest of ours against the fastest of neural-tangents", "",
                  f"Ours no slower in {int((peers['ours / nt'] <= 1.0).sum())} of {len(peers)} cases.", "",
                  peers.to_markdown(index=False, floatfmt=".3g"), ""]
    if plot_names:
        lines += ["## Plots", ""] + [f"![{n}]({n})" for n in plot_names] + [""]
    return "\n".join(lines)


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write results.csv, summary.md and the plots for a run; return the summary's path."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    header, df = load(run_dir)
    if df.empty:
        raise ValueError(f"{run_dir / 'results.jsonl'} has no result rows yet")
    df.drop(columns=["config", "size"]).to_csv(out / "results.csv", index=False)
    names = plots(df, out)
    path = out / "summary.md"
    path.write_text(summary(header, df, names))
    return path
