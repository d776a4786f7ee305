"""The pre-run estimate's load scaling: several wall-clock threads by the load average's fair share, one CPU-clock
thread by the share of a core it is measured to get (the load average overstates what one thread loses where the
scheduler shares cores between sessions)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
import time
from pathlib import Path

import pytest

from ntk_bench.bench import sweeps
from ntk_bench.bench.execution import forecast, runner
from ntk_bench.bench.measurement import machine

RESULTS = Path(__file__).resolve().parents[3] / "results"
WALL_RUN = RESULTS / "2026-12-07-quick-cpu-load"  # 2 torch threads, wall clock, at load


def _minutes(text: str) -> float:
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    h, mi, s = (int(g or 0) for g in m.groups())
    return 60 * h + mi + s / 60


def test_two_wall_clock_threads_keep_the_fair_share_that_predicted_the_committed_load_run():
    log = (WALL_RUN / "run.log").read_text()
    m = re.search(r"about (\S+) for \d+ case\(s\).*load average, ([\d.]+) on (\d+) core\(s\): ([\d.]+)x", log)
    predicted_min, load, n, factor = _minutes(m[1]), float(m[2]), int(m[3]), float(m[4])
    ours, _, _ = machine.load_factor(2, load=load, n_cores=n)
    assert ours == pytest.approx(factor, abs=0.1)  # the factor that run printed (both rounded), from its load
    took_min = _minutes(re.search(r"this run: \d+ row\(s\) in (\S+)", log)[1])
    assert 1 / 1.5 < took_min / predicted_min < 1.5


def test_one_cpu_clock_thread_is_scaled_by_its_measured_share_not_by_the_load_average():
    # at load 18.9 on 2 cores the fair share says 10.4x for 2 threads and 9.5x for 1; a thread measured to get
    # 40% of a core runs 2.5x slower whatever the load average says
    assert machine.load_factor(2, load=18.9, n_cores=2)[0] == pytest.approx(10.45, abs=0.05)
    assert machine.load_factor(1, load=18.9, n_cores=2)[0] == pytest.approx(9.9, abs=0.05)
    assert machine.load_factor(1, load=18.9, n_cores=2, one_thread_share=0.4)[0] == pytest.approx(2.5)
    assert machine.load_factor(1, load=0.1, n_cores=2, one_thread_share=1.0)[0] == 1.0
    assert machine.load_factor(2, load=18.9, n_cores=2, one_thread_share=0.4)[0] > 10  # threads wait for each other


def test_the_forecast_uses_the_measured_share_for_a_cpu_clock_sweep(monkeypatch):
    cases = sweeps.expand(sweeps.SWEEPS["smoke"])[:4]
    monkeypatch.setattr(runner, "estimate", lambda cs, m, slots=1: (200.0, [(c.id, 50.0) for c in cs]))
    monkeypatch.setattr(machine, "load_average", lambda: 18.9)
    monkeypatch.setattr(machine, "cores", lambda: [0, 1])
    monkeypatch.setattr(machine, "one_thread_share", lambda probe_s=0.5: 0.4)
    cpu = [dataclasses.replace(c, clock="cpu") for c in cases]
    total, line, _ = forecast.describe(cpu, {}, 1)
    assert total == pytest.approx(500.0) and "40% of a core" in line
    wall = [dataclasses.replace(c, clock="wall") for c in cases]
    total, line, _ = forecast.describe(wall, {}, 1)
    assert total == pytest.approx(200.0 * 2 / (2 * 2 / 20.9)) and "load average, 18.9 on 2 core(s)" in line


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_the_measured_share_sees_a_busy_process_on_the_same_core():
    before = os.sched_getaffinity(0)
    core = min(before)
    os.sched_setaffinity(0, {core})
    try:
        spinner = multiprocessing.get_context("fork").Process(target=_busy, args=(3.0,))
        spinner.start()  # inherits the one core: the probe's thread shares it with a busy one
        try:
            time.sleep(0.2)
            share = machine.one_thread_share(0.5)
        finally:
            spinner.terminate()
            spinner.join()
    finally:
        os.sched_setaffinity(0, before)
    assert share is not None and 0 < share < 0.75  # (others on that core only lower it)


def test_a_paired_job_is_predicted_at_wall_time_with_its_first_calls_from_the_committed_cpu_clock_run():
    from ntk_bench.bench.measurement import paired
    from ntk_bench.bench.store import rundir

    # (one thread, CPU clock: at load 12-20 without the blocks' warm-up; on a quiet machine with it, the records
    # made before they said so)
    for name, warmup in (("2026-12-07-quick-cpu-load-clock-cpu", 0.0), ("2026-12-07-small-sweep", 0.02)):
        run = RESULTS / name
        rows = rundir.latest_rows(rundir.read_results(run / "results.jsonl", warn=False)[1])
        predicted = actual = cpu_only = 0.0
        for record in paired.read_records(run).values():
            ok = [rows[cid] for impl, cid in record["case_ids"].items() if impl in record["impls"]]
            predicted += runner.measured_paired_seconds(ok, record["budget_s"], warmup, "final_times_s" in record)
            cpu_only += paired.predict_seconds([r["time_median_s"] for r in ok], record["budget_s"], warmup)
            actual += record["job_wall_s"]
        assert 1 / 1.5 < predicted / actual < 1.5, name
        if warmup == 0.0:
            assert actual / cpu_only > 2.5  # the CPU-time medians alone: the ETA's paired share far too low
    one = {"time_median_s": 0.01, "clock": "cpu", "cpu_over_wall": 0.25, "first_call_s": 2.0}
    assert runner.measured_paired_seconds([one, one], 1.0) == pytest.approx(
        paired.predict_seconds([0.04, 0.04], 1.0) + 4.0)
    assert runner.measured_paired_seconds([{**one, "clock": "wall"}] * 2, 1.0) == pytest.approx(
        paired.predict_seconds([0.01, 0.01], 1.0) + 4.0)
