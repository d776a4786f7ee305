"""The report: robust to the runs people actually have, and readable (IQR, fixed styles, N ≠ M, peers, auto)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

from ntk_bench import implementations
from ntk_bench.bench.output import plots, report

matplotlib.use("Agg")

ROOT = Path(__file__).parents[3]
HEADER = {"header": {"sweep": "t", "torch": "x", "cpu_count": 2, "git_commit": "abc"}}
PARAMS = json.dumps({"depth": 1, "in_features": 4, "out": 2, "width": 8})


def row(impl, n=4, m=None, status="ok", t=1e-3, iqr=1e-4, budget=None, **extra):
    """A result row as the runner writes it (the columns the report uses)."""
    m_ = n if m is None else m
    case_id = f"{impl}/mlp/N={n}/M={'x1' if m is None else m}/full/float32/cpu" + \
        ("" if budget is None else f"/budget={budget}B")
    r = {"case_id": case_id, "impl": impl, "arch": "mlp", "arch_params": PARAMS, "N": n, "M": m_,
         "x2": "x1" if m is None else "separate", "mode": "full", "dtype": "float32", "device": "cpu", "O": 2,
         "P": 66, "status": status, "memory_budget_bytes": budget, "peak_mem_bytes": 1e6 * n, "rel_err": 1e-8,
         "reference": "neural_tangents:structured_derivatives", "fp_flops": 100, "predicted_jc_flops": 1e5 * n,
         "predicted_vp_flops": 2e5 * n}
    if status == "ok":
        r.update(time_median_s=t * n, time_iqr_s=iqr)
    else:
        r["error"] = f"{status}: something"
    return {**r, **extra}


def write_run(path: Path, lines: list[dict | str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def legend_texts(fig) -> list[str]:
    return [t.get_text() for lg in fig.legends for t in lg.get_texts()]


def test_a_run_without_rows_gives_a_summary_not_a_traceback(tmp_path):
    run = write_run(tmp_path / "run", [HEADER])
    summary = report.write_report(run, tmp_path / "out")
    assert "No result rows yet" in summary.read_text()
    assert (tmp_path / "out" / "results.csv").exists() and not list((tmp_path / "out").glob("*.png"))


def test_a_duplicated_case_keeps_its_last_row_and_says_so(tmp_path):
    run = write_run(tmp_path / "run", [HEADER, row("structured", t=1e-3), row("explicit_mlp"),
                                       row("structured", t=5e-3)])
    rep = report.load_run(run)
    assert rep.duplicates == 1 and len(rep.df) == 2
    assert rep.df.set_index("impl").loc["structured", "time_median_s"] == pytest.approx(5e-3 * 4)
    text = report.write_report(run, tmp_path / "out").read_text()
    assert "1 rows repeat a case already in the file" in text and "the last row of each case" in text
    cells = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| N=4")).split("|")]
    assert cells[2:4] == ["4 ms ± 0.1", "20 ms ± 0.1"]  # no factor from medians of separate processes


def test_one_problem_with_and_without_a_memory_budget_is_two_groups(tmp_path):
    gib = 2**30
    rows = [row(i, n) for i in ("structured", "jacobian_contraction") for n in (4, 8)]
    rows += [row(i, n, budget=gib, t=2e-3) for i in ("structured", "jacobian_contraction") for n in (4, 8)]
    # A timed-out row carries its budget only in its case id (the worker never answered).
    timeout = row("autograd_loop", 8, budget=gib, status="timeout")
    del timeout["memory_budget_bytes"]
    # A row that ran out of memory and was retried blocked is still a case without a budget.
    rows += [timeout, row("explicit_mlp", 8, memory_budget_bytes=gib // 2, blocked_after_oom=True)]
    run = write_run(tmp_path / "run", [HEADER, *rows])
    df = report.load_run(run).df
    assert set(df["budget"]) == {"", "budget 1 GiB"}
    assert df.set_index("impl").loc["autograd_loop", "budget"] == "budget 1 GiB"
    assert df.set_index("impl").loc["explicit_mlp", "budget"] == ""
    text = report.write_report(run, tmp_path / "out").read_text()
    headings = [line for line in text.splitlines() if line.startswith("### ")]
    assert len(headings) == 2 and sum("budget 1 GiB" in h for h in headings) == 1
    assert "`autograd_loop` timeout" in text
    fig = plots.arch_figure("mlp", report.figure_groups(df), report._impl_order(df), None)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 2 and any("budget 1 GiB" in t for t in titles)
    matplotlib.pyplot.close(fig)


def test_unknown_statuses_missing_columns_and_bad_lines_are_reported(tmp_path):
    bare = {"impl": "structured", "arch": "mlp", "N": 4}  # no case_id, status, times, M, x2, P, arch_params
    lines = [HEADER, row("structured", 8, status="exploded"), bare, {"impl": "x"}, "[1, 2]", "not json",
             row("explicit_mlp", 8), '{"case_id": "torn']
    run = write_run(tmp_path / "run", lines)
    rep = report.load_run(run)
    assert rep.unreadable == 3 and rep.incomplete == 1 and len(rep.df) == 3
    text = report.write_report(run, tmp_path / "out").read_text()
    assert "1 exploded" in text and "`structured` exploded" in text
    assert "3 lines are not JSON objects" in text and "1 rows lack impl, arch or N" in text
    # the bare row and the row without impl do not match the row schema: shown (or left out) as they are, and said
    assert len(rep.off_schema) == 2 and "2 rows do not match the row schema" in text


def test_a_segmented_results_file_reads_every_segment(tmp_path):
    second = {"header": {**HEADER["header"], "git_commit": "def", "started": "later"}}
    run = write_run(tmp_path / "run", [HEADER, row("structured", 4), row("explicit_mlp", 4),
                                       second, row("structured", 4, t=3e-3), row("structured", 8)])
    rep = report.load_run(run)
    assert len(rep.headers) == 2 and rep.duplicates == 1
    assert sorted(rep.df["segment"]) == [0, 1, 1]
    text = report.write_report(run, tmp_path / "out").read_text()
    assert "2 segments" in text and "git_commit def" in text and "N=8" in text


def test_iqr_beside_each_median_and_a_noisy_row_flagged():
    df, *_ = report.frame([row("structured", 4, t=1e-3, iqr=4e-4), row("explicit_mlp", 4, t=2e-4, iqr=9e-3)])
    table = report._pivot(df, ["structured", "explicit_mlp"], report._time_cell)
    assert table.loc["N=4", "structured"] == "4 ms ± 0.4"
    assert table.loc["N=4", "explicit_mlp"] == "800 µs ± 9000 (noisy)"


def test_slopes_only_from_three_sizes_with_their_band_and_no_nan_anywhere(tmp_path):
    from ntk_bench.bench.output import summary as answers

    def blocks(n):
        return [1e-3 * n * f for f in (0.8, 1.0, 1.25)]

    rows = [row("structured", n, time_blocks_s=blocks(n)) for n in (4, 8, 16)] + \
        [row("explicit_mlp", 4, time_blocks_s=blocks(4)), row("explicit_mlp", 8, time_blocks_s=blocks(8)),
         row("explicit_mlp", 16, m=4, time_blocks_s=blocks(16)), row("jacobian_contraction", 8, t=float("nan")),
         row("backpack_batchgrad", 4), row("backpack_batchgrad", 8), row("backpack_batchgrad", 16)]  # no blocks
    df, *_ = report.frame(rows)
    slopes = answers.slopes(df, ["structured", "explicit_mlp", "jacobian_contraction", "backpack_batchgrad"])
    k, lo, hi = (float(v) for v in slopes["structured"].replace("[", "").replace("]", "").replace("–", " ").split())
    assert k == 1.0 and lo < 1.0 < hi and hi - lo < 1  # a band from the blocks, around the slope of the medians
    assert slopes["explicit_mlp"] == "" and slopes["jacobian_contraction"] == "" and slopes["backpack_batchgrad"] == ""
    run = write_run(tmp_path / "run", [HEADER, *rows])
    text = report.write_report(run, tmp_path / "out").read_text()
    assert "nan" not in text.lower()
    fig = plots.arch_figure("mlp", report.figure_groups(df), report._impl_order(df), None)
    assert legend_texts(fig) and not any("nan" in t.lower() for t in legend_texts(fig))
    matplotlib.pyplot.close(fig)


def test_n_not_m_cases_are_plotted_as_hollow_markers_at_the_geometric_mean():
    df, *_ = report.frame([row("structured", n) for n in (4, 16)] + [row("structured", 32, m=8, t=5e-3)])
    fig = plots.arch_figure("mlp", report.figure_groups(df), ["structured"], None)
    time_ax = fig.axes[0]
    hollow = [ln for ln in time_ax.get_lines() if ln.get_markerfacecolor() == "white" and len(ln.get_xdata())]
    assert [list(ln.get_xdata()) for ln in hollow] == [[pytest.approx(16.0)]]
    assert list(hollow[0].get_ydata()) == [pytest.approx(5e-3 * 32)]
    assert any(t.get_text() == "32×8" for t in time_ax.texts)
    assert "hollow: N ≠ M" in legend_texts(fig)
    matplotlib.pyplot.close(fig)


def test_a_plugin_keeps_its_colour_and_marker_in_runs_with_different_plugin_sets():
    def legend_styles(impls):
        df, *_ = report.frame([row(i, n) for i in impls for n in (4, 8)])
        fig = plots.arch_figure("mlp", report.figure_groups(df), report._impl_order(df), None)
        handles = fig.legends[0].legend_handles
        out = {h.get_label(): (matplotlib.colors.to_hex(h.get_color()), h.get_marker()) for h in handles}
        matplotlib.pyplot.close(fig)
        return out

    a = legend_styles(["structured", "auto", "nt_jacobian_contraction"])
    b = legend_styles(["jacobian_contraction", "autograd_loop", "explicit_mlp", "structured",
                       "nt_structured_derivatives", "nt_jacobian_contraction", "someone_elses_plugin"])
    for impl in ("structured", "nt_jacobian_contraction"):
        assert a[impl] == b[impl]
    assert len({b[i] for i in b if i in plots._OURS or i in plots._PEERS}) == \
        len([i for i in b if i in plots._OURS or i in plots._PEERS])  # distinct within a run
    assert plots.style("someone_elses_plugin") == plots.style("someone_elses_plugin")
    assert plots.style("nt_jacobian_contraction").peer and not plots.style("structured").peer


class _FakePeer(implementations.NTKPlugin):
    name = "asdl_fake_peer"
    origin = "peer"

    def supports(self, model):
        return None

    def _kernel(self, model, x1, x2, mode):  # never called here
        raise NotImplementedError


def paired_record(n: int, times: dict[str, list[float]]) -> dict:
    """A paired.jsonl record of the rows ``row(impl, n)``: every round's time of each plugin."""
    import statistics

    return {"paired_id": f"paired/mlp/N={n}", "status": "ok", "case_ids": {i: row(i, n)["case_id"] for i in times},
            "times_s": times, "median_s": {i: statistics.median(t) for i, t in times.items()},
            "rounds": len(next(iter(times.values())))}


def test_ours_against_every_peer_and_auto_from_the_paired_rounds_only(tmp_path):
    implementations.register(_FakePeer())
    try:
        # The isolated medians say the opposite of the rounds (structured "faster" than explicit_mlp): only the
        # rounds may decide.
        rows = [row("structured", 4, t=1e-4), row("explicit_mlp", 4, t=5e-4), row("nt_jacobian_contraction", 4),
                row("asdl_fake_peer", 4), row("nt_structured_derivatives", 4, status="error"),
                row("auto", 4, auto_pick="explicit_mlp"), row("structured", 8), row("asdl_fake_peer", 8)]
        run = write_run(tmp_path / "run", [HEADER, *rows])
        drift = [1.0, 1.3, 0.8, 1.6, 1.1, 0.9, 2.0, 1.2]  # the machine's speed, round by round
        recs = [paired_record(4, {"structured": [2e-3 * d for d in drift], "explicit_mlp": [1e-3 * d for d in drift],
                                  "auto": [1.02e-3 * d for d in drift],
                                  "nt_jacobian_contraction": [4e-3 * d for d in drift],
                                  "asdl_fake_peer": [3e-3 * d for d in drift]}),
                paired_record(8, {"structured": [1e-3 * d for d in drift],
                                  "asdl_fake_peer": [0.5e-3 * d for d in drift]})]
        (run / "paired.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        text = report.write_report(run, tmp_path / "out").read_text()
    finally:
        implementations.unregister("asdl_fake_peer")
    verdicts = text.split("## mlp")[1].split("![")[0]
    assert "N=8: **use `structured`**" in verdicts  # the largest size's verdict first
    assert "faster still: the peer(s) `asdl_fake_peer`" in verdicts
    assert "Elsewhere: N=4: `explicit_mlp`" in verdicts
    # explicit_mlp over structured: 0.5 in every round, whatever the drift; the band is a point
    table = text.split("Paired: time over the fastest")[1].split("Peak memory")[0]
    n4 = [c.strip() for c in next(line for line in table.splitlines() if line.startswith("| N=4")).split("|")]
    # (every table cell is escaped Markdown: the brackets render as themselves)
    assert n4[2:5] == ["1× (fastest)", "2× \\[2–2\\]", "1.02× \\[1.02–1.02\\]"]
    peers = text.split("## Ours against the peers (paired)")[1]
    assert "Ours faster in 1 of 2 cases (the band above 1), the peer faster in 1" in peers
    assert "`nt_jacobian_contraction` over our fastest: median 4" in peers
    autos = text.split("## auto against the fastest (paired)")[1].split("## Ours")[0]
    assert "within 10% of the fastest of our other plugins in 1 of 1" in autos
    assert "auto picked the plugin that was fastest in the rounds in 1 of 1" in autos
    assert "1.02× \\[1.02–1.02\\]" in autos


@pytest.mark.parametrize("run", ["2026-11-23-quick-cpu", "2026-11-23-gpu"])
def test_a_committed_run_gives_a_figure_per_architecture(run, tmp_path):
    src = ROOT / "results" / run
    if not (src / "results.jsonl").exists():
        pytest.skip(f"{src} is not in this checkout")
    summary = report.write_report(src, tmp_path).read_text()
    configs = report.load_run(src).df["config"].unique()
    pngs = {p.name for p in tmp_path.glob("*.png")}
    assert len(pngs) == len(configs) + 1 and "time_vs_predicted_flops.png" in pngs
    cost_model = (tmp_path / "cost_model.md").read_text()
    assert "](time_vs_predicted_flops.png)" in cost_model and "time_vs_predicted_flops" not in summary
    assert all(f"]({name})" in summary for name in pngs - {"time_vs_predicted_flops.png"})
    # a run from before the paired rounds: no plugin's median divided by another's, and it says so
    assert " ± " in summary and "No paired rounds in this run" in summary and "nan" not in summary.lower()
    assert "×" not in summary.split("## ")[1]
    csv = pd.read_csv(tmp_path / "results.csv")
    assert list(csv.columns[: len(report.COLUMNS)]) == report.COLUMNS


def test_a_run_where_nothing_ran_ok_has_tables_and_no_figures(tmp_path):
    rows = [row(i, n, status=s) for i, s in (("structured", "error"), ("auto", "timeout"),
                                              ("nt_jacobian_contraction", "unsupported")) for n in (4, 8)]
    for r in rows:
        r.pop("O"), r.pop("P")  # the worker never answered
    text = report.write_report(write_run(tmp_path / "run", [HEADER, *rows]), tmp_path / "out").read_text()
    assert "Cases: 2 error, 2 timeout, 2 unsupported." in text and "O=?" in text
    assert "`nt_jacobian_contraction` unsupported: unsupported: something" in text
    assert not list((tmp_path / "out").glob("*.png"))
