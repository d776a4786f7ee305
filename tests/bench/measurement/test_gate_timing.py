"""The regression gate on this machine, with a load generator beside it (a busy loop per core, as on a shared CI
runner): the same code timed twice passes; a plugin made 1.5x and 3x slower (a registered copy that repeats its
work) fails on every one of its cases and on no other; a uniform slowdown of every case passes with --relative.

It times code: marked ``serial`` (make test runs it alone after the parallel tests). Each timing is a fresh
``python -m ntk_bench.bench.measurement.gate`` run (process CPU time, one thread), all five side by side so that whatever else
runs on the machine runs beside all of them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ntk_bench.bench.output import compare, report

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.serial

# The plugin under test: structured, its work repeated SUBJECT times per call (the same kernel, that many times
# slower); the sweep's built-in plugins do theirs OTHERS times. Raising both by one factor stands for a machine that
# much slower (a slower machine cannot be made on demand on a shared one: busy loops pinned beside a wall-clock run
# moved its times by nothing or by 50x as the other processes on the machine came and went).
SUBJECT = '''
from ntk_bench import implementations
from ntk_bench.implementations.structured import plugin as _structured

SUBJECT, OTHERS = {subject}, {others}


class Subject(type(_structured)):
    name = "subject"

    def compute(self, *args, **kwargs):
        for _ in range(SUBJECT - 1):
            super().compute(*args, **kwargs)
        return super().compute(*args, **kwargs)


def _slowed(plugin):
    compute = plugin.compute

    def slow(*args, **kwargs):
        for _ in range(OTHERS - 1):
            compute(*args, **kwargs)
        return compute(*args, **kwargs)
    plugin.compute = slow


for _name in ("structured", "jacobian_contraction"):
    if OTHERS > 1:
        _slowed(implementations.get(_name))
implementations.register(Subject())
'''

SWEEP = '''name = "gate-test"
impls = ["subject", "structured", "jacobian_contraction"]
time_budget_s = {budget}
[[arch]]
name = "mlp"
params = {{ in_features = 16, width = 64, depth = 2 }}
N = [4]
O = [4]
[[arch]]
name = "cnn"
params = {{ channels = 4, image = 8 }}
N = [4]
O = [4]
'''


@contextlib.contextmanager
def busy_loops(cpus):
    """One busy-looping process pinned to each CPU of ``cpus`` (a CPU named twice gets two)."""
    procs = []
    try:
        for cpu in cpus:
            procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                          preexec_fn=lambda cpu=cpu: os.sched_setaffinity(0, {cpu})))
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _cpus() -> list[int]:
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs os.sched_setaffinity (Linux)")
    return sorted(os.sched_getaffinity(0))


def gate_runs(tmp_path, runs: dict, budget: float) -> None:
    """Time the sweep once per entry of ``runs`` (name -> the subject's repeats, the others'), side by side."""
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(SWEEP.format(budget=budget))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = {}
    for name, (subject, others) in runs.items():
        (tmp_path / f"subject_{name}.py").write_text(SUBJECT.format(subject=subject, others=others))
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "ntk_bench.bench.measurement.gate", "--out", str(tmp_path / name), "--sweep", str(sweep),
             "--plugin", f"subject_{name}", "--processes", "1", "--rounds", "3", "--blocks", "7"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    for name, p in procs.items():
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, f"{name}: {err[-3000:]}"


def verdicts(a, b, **kw):
    res, shift = compare.compare_frames(report.load_run(a).df, report.load_run(b).df, **kw)
    return res.set_index("case_id"), shift


def run_compare(a, b, *extra) -> int:
    import argparse

    args = compare.add_arguments(argparse.ArgumentParser()).parse_args([str(a), str(b), "--quiet", *extra])
    return compare.run(args)


# Where the same code timed twice differs by more than this in some case, the machine's noise is as large as the
# tightest window checked below (a uniform 4/3 slowdown read between 1.1 and 1.5): a wrong verdict is then the
# machine's.
SAME_CODE_NOISE = 1.1


@contextlib.contextmanager
def speed_samples(every_s: float = 0.25):
    """The machine's own speed while the block runs: the reference GEMM (``machine.speed_probe``) on this thread's
    CPU time, every ``every_s`` seconds, from a thread of this process (which only waits for the gate runs)."""
    import threading
    import time

    from ntk_bench.bench.measurement import machine

    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            t = machine.speed_probe(timer=time.thread_time)
            if t:
                samples.append(t)
            stop.wait(every_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def test_the_gate_passes_the_same_code_and_fails_a_plugin_made_slower(tmp_path):
    """On a machine whose own speed moves while the five runs are timed (a virtual machine on a shared host: the
    reference GEMM's CPU time varying by over ``machine.MAX_SPEED_CHANGE``, or the same code timed twice differing
    by over ``SAME_CODE_NOISE`` in a case), a wrong verdict is the machine's, not the gate's: the test then says it
    cannot judge the gate there (a skip naming both and the failed check), rather than pass or fail it. Where
    neither shows, every verdict must hold."""
    from ntk_bench.bench.measurement import machine

    with busy_loops(_cpus()), speed_samples() as samples:
        gate_runs(tmp_path, {"A": (6, 3), "A2": (6, 3), "B15": (9, 3), "B3": (18, 3), "SLOW": (8, 4)}, budget=0.02)
    try:
        _check_verdicts(tmp_path)
    except AssertionError as exc:
        spread = max(samples) / min(samples) if len(samples) >= 2 else 1.0
        same, _ = verdicts(tmp_path / "A", tmp_path / "A2")  # the same code twice: this machine's own noise
        ratios = same["B/A"].to_numpy(float)
        noise = float(np.exp(np.nanmax(np.abs(np.log(ratios))))) if np.isfinite(ratios).any() else float("inf")
        if spread > machine.MAX_SPEED_CHANGE or noise > SAME_CODE_NOISE:
            pytest.skip(f"this machine cannot judge the gate now: the same code timed twice differed by up to "
                        f"{noise:.2f}x in one case, and a reference GEMM's CPU time varied {spread:.1f}x over "
                        f"{len(samples)} samples while the runs were timed; the failed check: "
                        f"{' '.join(str(exc).split())[:200]}")
        raise


def _check_verdicts(tmp_path):
    # A: the subject doing its work 6 times, the others 3 times; A2: the same code again; B15: the subject 1.5x
    # slower; B3: 3x; SLOW: every case 4/3 slower (the code of A on a slower machine)
    a = tmp_path / "A"
    res, _ = verdicts(a, tmp_path / "A2")
    assert len(res) == 6 and (res["status A"] == "ok").all() and res["judged"].all(), res.to_string()
    assert not res["fail"].any(), res[["case", "B/A", "low", "high", "p", "verdict"]].to_string()
    assert run_compare(a, tmp_path / "A2", "--fail-above", "1.10", "--strict") == 0
    for name, factor in (("B15", 1.5), ("B3", 3.0)):
        res, _ = verdicts(a, tmp_path / name)
        shown = res[["case", "B/A", "low", "high", "p", "verdict"]].to_string()
        subject = res["impl"] == "subject"
        assert subject.sum() == 2
        assert res.loc[subject, "fail"].all() and (res.loc[subject, "verdict"] == "slower").all(), shown
        assert not res.loc[~subject, "fail"].any(), shown
        # (CPU time on a loaded machine still moves one case's ratio by a quarter or more between two runs)
        ratios = res.loc[subject, "B/A"].to_numpy(float)
        assert np.all((ratios > factor / 1.5) & (ratios < factor * 1.5)), shown
        assert run_compare(a, tmp_path / name, "--fail-above", "1.10") == 1
    res, shift = verdicts(a, tmp_path / "SLOW", relative=True)
    shown = res[["case", "B/A", "relative", "low", "high", "p", "verdict"]].to_string()
    assert 1.1 < shift.median < 1.5 and shift.applied == shift.median and not res["fail"].any(), shown
    assert run_compare(a, tmp_path / "SLOW", "--relative") == 0
