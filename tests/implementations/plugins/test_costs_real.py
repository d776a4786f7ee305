"""auto's cost model on real networks: its prediction for ``structured`` within 3x of the time measured on every
network of the real zoo and on timm's efficientnet_b0, convnext_atto, regnetx_002 and a DeiT; and auto's first
call within 1.5x of its pick's own first call. The times are the ones committed in results/ (written by
scripts/measure_structured_costs.py: process CPU time, one torch thread); this test times nothing, it recomputes
the predictions from the current code."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
MEASURED = ROOT / "results" / "2026-12-07-structured-costs" / "times.json"
WITHIN = 3.0
FIRST_CALL_WITHIN = 1.5
# Below this, a first call is the size of the cost model's own look at the model (one forward of one sample
# under FlopCounterMode): a few milliseconds that no pick can hide.
FIRST_CALL_FLOOR_S = 0.05


def _rows():
    return json.loads(MEASURED.read_text())["rows"]


def test_every_network_of_the_zoo_and_the_timm_four_is_measured():
    names = {r["network"] for r in _rows()}
    assert {"resnet18", "mobilenet_v3_small", "vit_tiny", "text_transformer", "lstm", "gru", "mlp_layernorm",
            "cnn_groupnorm", "cnn_batchnorm", "conv1d_net", "conv_variants", "mlp_tied"} <= names
    assert {"efficientnet_b0", "convnext_atto", "regnetx_002", "deit_tiny_patch16_224"} <= names


@pytest.mark.parametrize("row", _rows(), ids=lambda r: r["network"])
def test_structured_prediction_within_3x_of_the_measured_time(row):
    if row["source"] == "timm":
        pytest.importorskip("timm")
    spec = importlib.util.spec_from_file_location("measure_structured_costs",
                                                  ROOT / "scripts" / "measure_structured_costs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    build = script.build
    from ntk_bench import implementations
    from ntk_bench.implementations.core.costs import cost_stats

    model, x = build(row["source"], row["network"], row["params"], row["N"])
    stats = cost_stats(model, x[:1])
    predicted, _ = implementations.get("auto").predict(implementations.get("structured"), stats, row["N"], row["N"],
                                                        row["mode"], True, "cpu", 1 << 40)
    ratio = predicted / row["structured_s"]
    assert 1 / WITHIN <= ratio <= WITHIN, (f"{row['network']}: predicted {predicted:.3g} s, measured "
                                           f"{row['structured_s']:.3g} s (x{ratio:.2f})")


@pytest.mark.parametrize("row", [r for r in _rows() if r["pick_first_call_s"] >= FIRST_CALL_FLOOR_S],
                         ids=lambda r: r["network"])
def test_auto_first_call_within_1_5x_of_its_picks(row):
    """(the median ratio of three pairs of first calls, each on a fresh copy of the model, in alternating order)"""
    assert row["auto_over_pick_first_call"] <= FIRST_CALL_WITHIN, row
