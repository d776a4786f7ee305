"""scripts/small_vs_nt.py: a case's ratio is the finalists' own rounds where the rows have them (the committed
run's), else the all-plugin rounds' (older runs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "results" / "2026-12-07-small-vs-nt-finalists" / "small" / "results.jsonl"


def _script():
    spec = importlib.util.spec_from_file_location("small_vs_nt", ROOT / "scripts" / "small_vs_nt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(final: bool) -> list[dict]:
    base = {"case": "c", "N": 8}
    ours = {**base, "impl": "ours_a", "origin": "ours", "time_median_s": 0.002, "over_nt_best": 0.8,
            "over_nt_best_p25": 0.7, "over_nt_best_p75": 0.9}
    if final:
        ours.update(final_nt="nt_b", final_time_s=0.001, final_nt_time_s=0.0025, final_over_nt=0.4,
                    final_over_nt_p25=0.38, final_over_nt_p75=0.42)
    slower = {**base, "impl": "ours_c", "origin": "ours", "time_median_s": 0.003, "over_nt_best": 1.2,
              "over_nt_best_p25": 1.1, "over_nt_best_p75": 1.3}
    nt = {**base, "impl": "nt_b", "origin": "peer", "time_median_s": 0.0025, "over_nt_best": 1.0,
          "over_nt_best_p25": 1.0, "over_nt_best_p75": 1.0}
    return [ours, slower, nt]


def test_the_finalists_rounds_give_the_cases_ratio_where_the_rows_have_them():
    script = _script()
    assert "| c N=8 | ours_a 1 | nt_b 2.5 | 0.40 (0.38–0.42) | yes |" in script.summary(_rows(final=True))
    assert "| c N=8 | ours_a 2 | nt_b 2.5 | 0.80 (0.70–0.90) | no |" in script.summary(_rows(final=False))


def test_the_committed_runs_table_is_the_finalists():
    text = _script().from_files([RUN])
    assert "| mlp512_N8 N=8 | explicit_mlp_compiled 0.933 | nt_structured_derivatives 1.74 | 0.54 (0.53–0.55) | no |" \
        in text
