"""Fit auto's cost-model constants to a run: t ≈ overhead_s + est_flops · s_per_flop, per plugin and device.

The fit minimises the relative error over the plugin's ok cases (small and
large cases count alike), with both constants kept non-negative.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..store import safefs
from ..store.rundir import latest_rows, read_rows


def _fit(flops: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """Non-negative (overhead, seconds per FLOP) minimising Σ ((a + b·f) / t − 1)²."""
    from scipy.optimize import nnls

    (a, b), _ = nnls(np.stack([1 / t, flops / t], 1), np.ones_like(t))
    return float(a), float(b)


def calibrate(run_dirs: list[Path], out: Path) -> dict:
    """Fit constants from the runs' ok rows and merge them into ``out`` (the file the user names: ``auto`` reads
    it when ``NTK_BENCH_CALIBRATION`` names it); return what was fitted. Nothing fitted: ``out`` is left as it is
    and {} returned. An existing ``out`` that is not a calibration file: ``CalibrationError``, nothing written."""
    from ntk_bench.implementations.plugins.auto import read_calibration, validate_calibration

    out = Path(out)
    existing = read_calibration(out) if out.exists() else {}  # checked before the fit: one line, no traceback
    # each run's last row of a case (a case run again by --retry-failed counts once)
    rows = [r for d in run_dirs for r in latest_rows(read_rows(Path(d) / "results.jsonl")).values()]
    fitted: dict[str, dict] = {}
    groups: dict[tuple[str, str], list] = {}
    for r in rows:
        if r.status == "ok" and r.est_flops is not None and r.time_median_s:
            device = "cuda" if r.device.startswith("cuda") else "cpu"
            groups.setdefault((device, r.impl), []).append((r.est_flops, r.time_median_s))
    for (device, impl), pts in sorted(groups.items()):
        if len(pts) < 3:
            continue
        f, t = np.array(pts, dtype=float).T
        a, b = _fit(f, t)
        fitted.setdefault(device, {})[impl] = {"overhead_s": a, "s_per_flop": b, "cases": len(pts)}
    if not fitted:
        return {}
    for device, table in fitted.items():  # (constants this fit does not make, s_per_element, s_per_op, are kept)
        for impl, constants in table.items():
            existing.setdefault(device, {}).setdefault(impl, {}).update(constants)
    validate_calibration(existing, str(out))  # what auto will read back
    safefs.write_file(out, (json.dumps(existing, indent=1, sort_keys=True) + "\n").encode())
    return fitted
