"""Timings on a shared machine: paired rounds in one worker, the machine recorded in every row (a disturbed row
flagged), the run's predicted duration before it starts, a line per case where no bar can be drawn, what --model
runs by default."""

from __future__ import annotations

import io
import json
import statistics
import textwrap
import time
from pathlib import Path

import pytest

from ntk_bench import implementations
from ntk_bench.bench import cli as cli_module
from ntk_bench.bench import sweeps
from ntk_bench.bench.execution import forecast, runner
from ntk_bench.bench.execution.executors import InlineExecutor
from ntk_bench.bench.measurement import machine, paired
from ntk_bench.bench.output import report

SMALL = {"name": "s", "impls": ["explicit_mlp", "jacobian_contraction"], "time_budget_s": 0.01, "timeout_s": 120,
         "arch": [{"name": "mlp", "params": {"in_features": 4, "width": 8, "depth": 1}, "N": [3], "O": [2]}]}


def _spin(seconds: float) -> None:
    """Busy for ``seconds`` of wall time (CPU-bound, so that both clocks see it)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


# -- the paired rounds ---------------------------------------------------------------------------------

def test_each_round_rotates_the_order_and_reverses_every_other():
    orders = [paired._order(["a", "b", "c"], r) for r in range(4)]
    assert orders == [["a", "b", "c"], ["c", "b", "a"], ["b", "c", "a"], ["a", "c", "b"]]
    for names in (["a", "b"], ["a", "b", "c"], ["a", "b", "c", "d"]):  # each first and each last in some round
        orders = [paired._order(names, r) for r in range(2 * len(names))]
        assert {o[0] for o in orders} == {o[-1] for o in orders} == set(names)


def test_a_two_fold_difference_is_measured_in_rounds_under_a_drifting_machine():
    # A clock that the calls advance: slow costs twice fast, times the machine's speed, which changes from round
    # to round (both calls of a round see the same): what a busy machine does to two plugins timed together.
    drift = [1.0, 3.0, 0.5, 2.0, 1.5, 0.7, 2.5, 1.0, 4.0]
    clock, calls_made = [0.0], [0]

    def call(cost):
        def fn():
            _spin(0.0025)  # real time above a block's minimum: one call a block
            clock[0] += cost * drift[calls_made[0] // 2]
            calls_made[0] += 1
        return fn

    times, number = paired.time_rounds({"fast": call(1.0), "slow": call(2.0)}, 0.0, timer=lambda: clock[0],
                                       min_rounds=8, max_rounds=8, warmup_s=0)
    assert number == {"fast": 1, "slow": 1} and len(times["fast"]) == len(times["slow"]) == 8
    rec = {"times_s": times, "median_s": {k: sorted(v)[4] for k, v in times.items()}}
    assert paired.ratio(rec, "slow", "fast") == pytest.approx((2.0, 2.0, 2.0))  # the drift cancels in a round
    assert max(times["fast"]) / min(times["fast"]) == pytest.approx(8.0)  # while each side alone moved 8-fold
    assert paired.fastest(rec) == "fast"


def test_a_block_is_not_charged_for_the_neighbour_that_ran_before_it():
    # A large neighbour leaves caches and the allocator cold: the next plugin's first calls after it are slower.
    # Injected: each call of "big" makes the following few calls of "small" cost 4 ms more.
    cold = [0]

    def big():
        _spin(0.004)
        cold[0] = 3

    def small():
        _spin(0.0005 + (0.004 if cold[0] else 0.0))
        cold[0] = max(0, cold[0] - 1)

    kw = dict(min_rounds=6, max_rounds=6)
    warm, _ = paired.time_rounds({"big": big, "small": small}, 0.0, **kw)
    charged, _ = paired.time_rounds({"big": big, "small": small}, 0.0, warmup_s=0, **kw)
    assert statistics.median(warm["small"]) < 0.0009  # its own cost, 0.5 ms
    assert statistics.median(charged["small"]) > 0.0011  # without the warm-up, the neighbour's cost in its block


def test_the_band_of_a_median_is_distribution_free_and_widens_with_few_rounds():
    assert paired.median_band(range(20)) == (9.5, 5.0, 14.0)  # order statistics 6 and 15 of 20
    assert paired.median_band([1, 2, 3, 4, 5, 6, 7]) == (4.0, 1.0, 7.0)
    assert paired.median_band([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError):
        paired.median_band([])


def test_a_run_times_the_ok_plugins_of_each_case_side_by_side_in_one_worker(tmp_path):
    cases = sweeps.expand(SMALL)
    out = tmp_path / "run"
    summary = runner.run(cases, out, "s", executor=InlineExecutor(out))
    assert summary.counts == {"ok": 2}
    recs = paired.read_records(out)
    assert len(recs) == 1
    rec = next(iter(recs.values()))
    assert rec["status"] == "ok" and set(rec["impls"]) == {"explicit_mlp", "jacobian_contraction"}
    assert rec["rounds"] >= paired.MIN_ROUNDS
    assert all(len(t) == rec["rounds"] for t in rec["times_s"].values())
    assert set(rec["case_ids"].values()) == {c.id for c in cases}
    for key in machine.FIELDS:  # the machine beside the rounds too
        assert key in rec
    text = report.write_report(out, tmp_path / "report").read_text()
    assert "**use `" in text and "Paired: time over the fastest in the same rounds" in text
    # resumed with nothing to do: the group's rounds are not timed again
    runner.run(cases, out, "s", executor=InlineExecutor(out), resume=True)
    assert (out / paired.PAIRED).read_text().count("\n") == 1


def test_our_fastest_and_the_fastest_peer_are_timed_again_by_themselves(tmp_path):
    """With a third plugin in the group, the record carries the finalists' own rounds, and "ours against the peers"
    (``ratio`` of those two) reads them; other pairs read the all-plugin rounds."""

    class PeerJC(implementations.NTKPlugin):
        name, origin = "a_peer_jc", "peer"

        def _kernel(self, model, x1, x2, mode):
            return implementations.get("jacobian_contraction")._kernel(model, x1, x2, mode)

    implementations.register(PeerJC())
    try:
        cases = sweeps.expand({**SMALL, "impls": [*SMALL["impls"], "a_peer_jc"]})
        out = tmp_path / "run"
        runner.run(cases, out, "s", executor=InlineExecutor(out))
    finally:
        implementations.unregister("a_peer_jc")
    rec = next(iter(paired.read_records(out).values()))
    ours = min(("explicit_mlp", "jacobian_contraction"), key=rec["median_s"].get)
    assert rec["status"] == "ok" and set(rec["final_times_s"]) == {ours, "a_peer_jc"}
    assert len(rec["final_times_s"][ours]) >= paired.MIN_ROUNDS
    final = [a / b for a, b in zip(rec["final_times_s"]["a_peer_jc"], rec["final_times_s"][ours])]
    assert paired.ratio(rec, "a_peer_jc", ours, final=True) == paired.median_band(final)
    together = [a / b for a, b in zip(rec["times_s"]["a_peer_jc"], rec["times_s"][ours])]
    assert paired.ratio(rec, "a_peer_jc", ours) == paired.median_band(together)  # a table of all: the rounds of all
    other = "jacobian_contraction" if ours == "explicit_mlp" else "explicit_mlp"
    together = [a / b for a, b in zip(rec["times_s"][other], rec["times_s"][ours])]
    assert paired.ratio(rec, other, ours, final=True) == paired.median_band(together)


def test_a_failure_in_the_finalists_rounds_keeps_the_rounds_of_all(monkeypatch):
    calls = {"ours": lambda: None, "theirs": lambda: None, "slow": lambda: None}
    real = paired.time_rounds
    monkeypatch.setattr(paired, "time_rounds", lambda c, *a, **k: (_ for _ in ()).throw(MemoryError("no room"))
                        if len(c) == 2 else real(c, *a, **k))
    times, _ = paired.time_rounds(calls, 0.0, min_rounds=7, max_rounds=7)
    monkeypatch.setattr(paired, "finalists", lambda med: ("ours", "theirs"))
    final, why = paired._final_rounds(times, calls, 0.0, time.perf_counter, None)
    assert final is None and "no room" in why


def test_the_finalists_are_our_fastest_and_the_fastest_peer_of_three_or_more():
    med = {"a": 2.0, "b": 1.0, "p": 3.0, "q": 0.5}
    origins = {"a": "ours", "b": "ours", "p": "peer", "q": "peer"}
    assert paired.finalists(med, origins) == ("b", "q")
    assert paired.finalists({"b": 1.0, "q": 0.5}, origins) is None  # two: their rounds are the finalists' already
    assert paired.finalists({"a": 2.0, "b": 1.0, "c": 3.0}, {"a": "ours", "b": "ours", "c": "ours"}) is None


def test_a_group_with_one_ok_plugin_gets_no_paired_rounds(tmp_path):
    cases = sweeps.expand({**SMALL, "impls": ["explicit_mlp"]})
    out = tmp_path / "run"
    runner.run(cases, out, "s", executor=InlineExecutor(out))
    assert paired.read_records(out) == {}


# -- the machine in every row -------------------------------------------------------------------------

class _Usage:
    def __init__(self, cpu_s, wall_s, load):
        self.cpu_s, self.wall_s, self.load, self.involuntary_switches = cpu_s, wall_s, load, 3


def test_a_row_that_waited_for_a_core_is_flagged_disturbed():
    cores = len(machine.cores() or [0])
    assert machine.fields(_Usage(0.95, 1.0, 0.0), 1)["disturbed"] is None
    waited = machine.fields(_Usage(0.3, 1.0, 0.0), 1)
    assert "CPU time 30% of wall time" in waited["disturbed"]
    loaded = machine.fields(_Usage(1.0, 1.0, cores + 5.0), 1)
    assert f"on {cores} core(s)" in loaded["disturbed"]
    assert machine.fields(_Usage(0.1, 1.0, 0.0), 1, "cuda:0")["disturbed"] is None  # a GPU call waits for the GPU
    # measured: a timed stretch that sleeps spends its wall time off the CPU
    with machine.Usage() as usage:
        time.sleep(0.05)
    row = machine.fields(usage, 1)
    assert row["cpu_over_wall"] < machine.MIN_CPU_OVER_WALL and "CPU time" in row["disturbed"]
    assert row["cpu_affinity"] == machine.cores() and row["involuntary_switches"] >= 0


def test_the_summary_first_line_counts_the_disturbed_rows_and_says_what_to_do(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    base = {"impl": "structured", "arch": "mlp", "N": 4, "M": 4, "status": "ok", "time_median_s": 1e-3,
            "time_iqr_s": 1e-4, "mode": "full", "dtype": "float32", "device": "cpu", "O": 2, "P": 10,
            "cpu_over_wall": 0.95, "load_avg_1m": 1.0, "disturbed": None}
    rows = [{**base, "case_id": "a"}, {**base, "case_id": "b", "impl": "explicit_mlp", "cpu_over_wall": 0.2,
                                       "load_avg_1m": 9.0, "disturbed": "CPU time 20% of wall time"}]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"header": {"sweep": "t"}}, *rows]))
    first = report.write_report(run).read_text().splitlines()[0]
    assert "1 of 2 timed rows were disturbed" in first and "load average 1.0 to 9.0" in first
    assert "--clock cpu" in first and "quieter machine" in first
    rows = [{**r, "clock": "cpu"} for r in rows]  # already on the CPU clock: the advice says what is left
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"header": {"sweep": "t"}}, *rows]))
    first = report.write_report(run).read_text().splitlines()[0]
    assert "1 of 2 timed rows ran on a busy machine" in first and "--clock cpu" not in first


def test_a_later_hold_to_fewer_cores_leaves_the_cores_a_process_was_given():
    """reference._start_cpu_backend holds a process to the cores neural-tangents may use; the rows' ``cores`` (what
    the load average is weighed against) stay the ones the worker was given."""
    import os

    given = machine.cores()
    if not hasattr(os, "sched_setaffinity") or not given or len(given) < 2:
        pytest.skip("needs two cores to hold one")
    try:
        os.sched_setaffinity(0, given[:1])
        assert machine.cores() == given
        assert machine.fields(_Usage(1.0, 1.0, len(given) - 0.5), 1)["disturbed"] is None
    finally:
        os.sched_setaffinity(0, given)


def test_worker_threads_default_to_the_cores_it_owns():
    assert machine.default_threads() == len(machine.cores() or range(1))


def test_clock_cpu_times_process_cpu_time_with_one_thread():
    from ntk_bench.bench.measurement import timing

    assert timing.clock_for("cpu") is time.process_time and timing.clock_for("cpu", "cuda:0") is time.perf_counter
    with timing.threads_for("cpu") as threads:
        assert threads == 1
    with pytest.raises(ValueError, match="--clock must be one of cpu, wall, got 'gpu'"):
        timing.clock_for("gpu")
    # sleeping costs wall time, not CPU time: the CPU clock does not count a wait
    med, _, calls, _ = timing.time_blocks(lambda: time.sleep(0.01), 1e-4, timing.clock_for("cpu"))
    assert calls == 5
    assert med < 0.005


def test_run_clock_cpu_is_recorded_in_the_header_and_rows(tmp_path, capsys):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({**SMALL, "impls": ["explicit_mlp"]}))
    code = cli_module.main(["run", "--sweep", str(f), "--out", str(tmp_path / "run"), "--executor", "inline",
                            "--clock", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    header, rows = runner.read_results(tmp_path / "run" / "results.jsonl")
    assert header["clock"] == "cpu" and rows[0]["clock"] == "cpu" and rows[0]["cpu_threads"] == 1


# -- before and during a run ---------------------------------------------------------------------------

def test_the_predicted_duration_is_printed_before_a_run_and_slow_cases_named(tmp_path, capsys, monkeypatch):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({**SMALL, "impls": ["explicit_mlp"]}))
    code = cli_module.main(["run", "--sweep", str(f), "--out", str(tmp_path / "run"), "--executor", "inline"])
    err = capsys.readouterr().err
    assert code == 0 and "predicted duration: about" in err and "1 case(s)" in err
    assert err.index("predicted duration") < err.index("[1/1] ok")  # before, and a line per case: no tty here
    assert "warning: this sweep is predicted" not in err
    # a sweep predicted to take long: a warning naming its slow cases
    cases = sweeps.expand(sweeps.SWEEPS["smoke"])
    models = sweeps.check_models(cases)
    slow = {c.id: (600.0 if c.impl == "asdl" else 1.0) for c in cases}
    monkeypatch.setattr(runner, "predict_seconds", lambda cs, m: {c.id: slow[c.id] for c in cs})
    monkeypatch.setattr(machine, "load_factor", lambda threads=None: (1.0, 0.0, 2))
    total, line, warning = forecast.describe(cases, models, 1)
    assert total > forecast.WARN_ABOVE_S and "predicted duration: about 1" in line
    assert "1 slow case(s)" in warning[0] and any(c.id in w for w in warning for c in cases if c.impl == "asdl")
    assert "--impls" in warning[-1] and "asdl" in warning[-1]


def test_a_line_per_case_where_the_terminal_cannot_draw_a_bar(monkeypatch):
    assert not cli_module.can_show_bar(io.StringIO())

    class ZeroColumns(io.StringIO):
        def isatty(self):
            return True

        def fileno(self):
            return 2

    import os

    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((0, 24)))
    assert not cli_module.can_show_bar(ZeroColumns())
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((80, 24)))
    assert cli_module.can_show_bar(ZeroColumns())


def test_the_eta_is_refitted_per_plugin_as_cases_finish():
    now = [0.0]
    eta = runner._Eta({"a1": 1.0, "a2": 1.0, "b1": 1.0, "b2": 1.0}, 1,
                      {"a1": "slow_peer", "a2": "slow_peer", "b1": "ours", "b2": "ours"}, clock=lambda: now[0])
    eta.done("a1", 10.0)  # the cost model was 10x off on this plugin ...
    eta.done("b1", 1.0)  # ... and right on this one
    now[0] = 11.0  # the jobs' own time is all the run took
    assert eta.scale("slow_peer") > 3 * eta.scale("ours")
    assert 1.0 * eta.scale("ours") + 1.0 * eta.scale("slow_peer") == pytest.approx(eta.left_s(["a2", "b2"]))
    now[0] = 22.0  # half the run went to what no job counts (references, start-ups): what is left takes as long
    assert eta.left_s(["a2", "b2"]) == pytest.approx(2 * (eta.scale("ours") + eta.scale("slow_peer")))
    eta.one_off(11.0)  # ... unless it was a reference computed once: it does not recur
    assert eta.left_s(["a2", "b2"]) == pytest.approx(eta.scale("ours") + eta.scale("slow_peer"))
    # a job predicted from this run's own measured times is not scaled by the cost model's error
    eta.add("p1", 3.0, "paired", measured=True)
    assert eta.scale("paired") == 1.0 and eta.scale("never_seen") == eta.scale(None) > 1


# -- --model -----------------------------------------------------------------------------------------

def test_model_runs_the_fast_plugins_by_default_and_everything_with_impls_all(tmp_path, monkeypatch):
    (tmp_path / "net.py").write_text(textwrap.dedent('''
        from torch import nn

        def make(width=4):
            return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 2))
    '''))
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--model", "net.py:make", "--input-shape", "5"]
    args = cli_module.build_parser(argv).parse_args(argv)
    spec = cli_module._model_spec(args)
    impls = {c.impl for c in sweeps.expand(spec)}
    assert {"structured", "auto", "jacobian_contraction", *implementations.names(None, tag="neural_tangents")} <= impls
    assert not impls & {"asdl", "nngeometry", "curvlinops", "autograd_loop"}  # seconds a call on small CNNs
    assert {c.impl for c in sweeps.expand(spec, ["all"])} == set(sweeps.select_plugins(["all"])[0])


def test_the_default_cpu_sweep_leaves_the_slow_calls_to_full():
    quick = sweeps.expand(sweeps.SWEEPS["quick"])
    full = sweeps.expand(sweeps.SWEEPS["full"])
    assert not {c.impl for c in quick} & {"autograd_loop", "asdl", "nngeometry", "curvlinops"}
    assert {c.impl for c in full} == set(sweeps.select_plugins(["all"])[0])
    for arch in ("mlp", "tutorial_cnn", "cnn", "resnet_tiny"):  # three sizes each: a slope with its band
        assert len({c.problem.n for c in quick if c.problem.arch == arch and c.mode == "full"}) >= 3
    assert len(quick) < len(full) / 3



def test_the_first_line_says_when_neural_tangents_had_more_cores_than_torch_had_threads():
    base = {"cpu_over_wall": 1.0, "load_avg_1m": 0.5, "disturbed": None, "clock": "cpu", "cpu_threads": 1}
    fair = [{**base, "impl": "structured"}, {**base, "impl": "nt_structured_derivatives", "xla_threads": 1}]
    line = machine.disturbed_line(fair, [{"cpu_over_wall": 1.0, "disturbed": None}])
    assert "none of 2 timed rows was disturbed**, nor any of 1 paired groups" in line and "more cores" not in line
    unfair = [*fair, {**base, "impl": "nt_jacobian_contraction", "xla_threads": 2}]
    assert "1 neural-tangents row(s) computed on more cores than torch had threads" in machine.disturbed_line(unfair)


def test_workers_pinned_to_a_core_each_do_not_count_each_other_as_disturbance(monkeypatch):
    """Two workers of one run on a core each put a load of 2 on the machine by themselves: each weighs the load
    against the cores the run's workers own together (NTK_BENCH_RUN_CORES, set by the local executor)."""
    from ntk_bench.bench.execution.executors.local import LocalExecutor

    own = len(machine.cores() or [0])
    monkeypatch.delenv("NTK_BENCH_RUN_CORES", raising=False)
    assert "core(s)" in machine.fields(_Usage(1.0, 1.0, own + 0.5), 1)["disturbed"]
    monkeypatch.setenv("NTK_BENCH_RUN_CORES", str(own + 1))
    assert machine.fields(_Usage(1.0, 1.0, own + 0.5), 1)["disturbed"] is None
    assert f"on {own + 1} core(s)" in machine.fields(_Usage(1.0, 1.0, own + 1.5), 1)["disturbed"]
    executor = LocalExecutor(Path("unused"), workers=2)
    try:
        envs = [w.env for w in executor.workers.values()]
        assert all(e["NTK_BENCH_RUN_CORES"] == str(len({c for s in executor.slot_list for c in s.cpus})) for e in envs)
    finally:
        executor.close()


def test_a_change_of_the_machines_own_speed_while_timed_is_flagged(monkeypatch):
    """A virtual machine whose host is shared changes speed with no load average to show it: the reference GEMM
    timed before and after a case says so in the row, and the report's first line gives the run's spread."""
    usage = _Usage(1.0, 1.0, 0.0)
    usage.probe_before_s, usage.probe_after_s = 1.0e-3, 1.1e-3
    steady = machine.fields(usage, 1)
    assert steady["disturbed"] is None and steady["probe_before_s"] == 1.0e-3 and steady["probe_after_s"] == 1.1e-3
    usage.probe_after_s = 2.0e-3
    assert "the machine's speed changed while timed" in machine.fields(usage, 1)["disturbed"]
    assert machine.fields(usage, 1, "cuda:0")["disturbed"] is None  # (a GPU's time is not the host's GEMM)
    # measured: Usage(probe=True) times the probe at both ends, and the probe is a positive time
    probes = iter([1.0e-3, 3.0e-3])
    monkeypatch.setattr(machine, "speed_probe", lambda: next(probes))
    with machine.Usage(probe=True) as measured:
        pass
    assert (measured.probe_before_s, measured.probe_after_s) == (1.0e-3, 3.0e-3)
    monkeypatch.undo()
    assert machine.speed_probe() > 0
    base = {"cpu_over_wall": 1.0, "load_avg_1m": 0.5, "disturbed": None, "clock": "cpu", "cpu_threads": 1}
    rows = [{**base, "probe_before_s": 1.0e-3, "probe_after_s": 1.1e-3},
            {**base, "probe_before_s": 2.2e-3, "probe_after_s": 2.4e-3}]
    line = machine.disturbed_line(rows)
    assert "the machine's own speed varied by 2.4× over the run" in line and "paired ratios are" in line
    assert "own speed" not in machine.disturbed_line(rows[:1])


def test_a_case_records_the_reference_gemm_around_its_timed_calls(tmp_path):
    import dataclasses

    from ntk_bench.bench import sweeps
    from ntk_bench.bench.measurement import one_case

    sweep = {"name": "s", "impls": ["explicit_mlp"], "time_budget_s": 0.01,
             "arch": [{"name": "mlp", "params": {"in_features": 4, "width": 8, "depth": 1}, "N": [3], "O": [2]}]}
    case = dataclasses.replace(sweeps.expand(sweep)[0], clock="cpu")
    row = one_case.run_case(case, tmp_path)
    assert row["status"] in ("ok", "unchecked") and row["probe_before_s"] > 0 and row["probe_after_s"] > 0
