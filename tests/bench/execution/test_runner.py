"""The sweep runner: sweeps as data, isolated cases, rows that survive interruption, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from ntk_bench import implementations
from ntk_bench.bench import sweeps
from ntk_bench.bench.execution import runner
from ntk_bench.bench.execution.executors import InlineExecutor, Job
from ntk_bench.bench.execution.executors.process import WorkerProcess
from ntk_bench.bench.output import report

ROOT = Path(__file__).parents[3]


def _smoke(impls):
    return sweeps.expand(sweeps.SWEEPS["smoke"], impls)


def test_full_sweep_covers_every_plugin_and_architecture_with_four_n_and_two_o():
    cases = sweeps.expand(sweeps.SWEEPS["full"])
    # every plugin "all" selects: the compiled variants only where a sweep names them (their first calls compile)
    assert {c.impl for c in cases} == set(sweeps.select_plugins(["all"])[0])
    assert set(sweeps.all_impls()) - set(sweeps.select_plugins(["all"])[0]) == {
        n for n in implementations.names("ours", compiled=True) if n.endswith("_compiled")}
    assert {c.problem.arch for c in cases} == {"mlp", "tutorial_cnn", "cnn", "resnet_tiny"}
    for arch in ("mlp", "cnn", "resnet_tiny"):
        probs = {c.problem for c in cases if c.problem.arch == arch}
        assert len({p.n for p in probs if p.m is None}) >= 4
        assert len({dict(p.arch_params)["out"] for p in probs}) >= 2
    assert any(c.problem.m is not None for c in cases)
    assert len({c.id for c in cases}) == len(cases)


def test_gpu_sweep_reaches_n512_and_o100():
    cases = sweeps.expand(sweeps.SWEEPS["gpu"])
    assert max(c.problem.n for c in cases) >= 512
    assert max(dict(c.problem.arch_params).get("out", 10) for c in cases) >= 100
    widths = {dict(c.problem.arch_params).get("width") for c in cases if c.problem.arch == "mlp"}
    assert {512, 2048} <= widths and any(c.problem.arch == "tutorial_cnn" for c in cases)


def test_real_sweep_times_ours_against_neural_tangents_on_the_real_networks():
    cases = sweeps.expand(sweeps.SWEEPS["real"])
    by_arch = {}
    for c in cases:
        by_arch.setdefault(c.problem.arch, set()).add(c.impl)
    assert set(by_arch) == {"mlp", "tutorial_cnn", "resnet18", "vit_tiny", "text_transformer", "lstm"}
    for arch, impls in by_arch.items():
        assert {"structured", "auto", "nt_structured_derivatives"} <= impls, arch
    images = {dict(c.problem.arch_params)["image"] for c in cases if c.problem.arch == "resnet18"}
    assert images == {32, 224}
    gpu = [c for c in sweeps.expand(sweeps.SWEEPS["gpu"]) if c.problem.arch == "resnet18"]
    assert {dict(c.problem.arch_params)["out"] for c in gpu} == {8, 128, 1000}


@pytest.mark.parametrize("spec, message", [
    ({"arch": [{"name": "transformer", "N": [2]}]}, "unknown architecture 'transformer'; valid: mlp, tutorial_cnn"),
    ({"impls": ["magic"], "arch": [{"name": "mlp", "N": [2]}]}, "unknown plugin 'magic'; valid: jacobian_contraction"),
    ({"arch": [{"name": "mlp", "N": [2], "params": {"widht": 3}}]}, "unexpected keyword argument 'widht'"),
    ({"arch": [{"name": "mlp", "N": [0]}]}, "arch entry 1: N[1] = 0: expected a positive integer"),
    ({"modes": ["diag"], "arch": [{"name": "mlp", "N": [2]}]}, "modes[1] = 'diag': Input should be 'full'"),
    ({"arch": []}, "no [[arch]] entries"),
    ({"arhc": [], "arch": [{"name": "mlp", "N": [2]}]}, "unknown key 'arhc'; valid: arch, description"),
    ({"arch": [{"name": "mlp", "N": [2], "impls": ["magic"]}]}, "arch entry 1: unknown plugin 'magic'"),
    ({"arch": [{"name": "mlp", "N": [2], "memory_budget_gib": -1}]},
     "memory_budget_gib = -1: expected a positive finite number of GiB"),
    ({"memory_budget_gib": "8G", "arch": [{"name": "mlp", "N": [2]}]},
     "memory_budget_gib = '8G': expected a positive finite number of GiB"),
    # bad values, each one line
    ({"arch": [{"name": "mlp", "N": 2}]}, "arch entry 1: N = 2: expected a list, e.g. N = [2]"),
    ({"arch": [{"name": "mlp", "N": [2], "NM": [[4]]}]}, "arch entry 1: NM[1] = [4]: expected a pair [N, M]"),
    ({"impls": "structured", "arch": [{"name": "mlp", "N": [2]}]}, "impls = 'structured': expected a list"),
    ({"timeout_s": "30", "arch": [{"name": "mlp", "N": [2]}]}, "timeout_s = '30': expected a positive finite number"),
    ({"time_budget_s": "0.1", "arch": [{"name": "mlp", "N": [2]}]}, "time_budget_s = '0.1': expected a positive"),
    ({"memory_budget_gib": float("inf"), "arch": [{"name": "mlp", "N": [2]}]}, "memory_budget_gib = inf: expected"),
    ({"timeout_s": 0, "arch": [{"name": "mlp", "N": [2]}]}, "timeout_s = 0: expected a positive finite number"),
    ({"timeout_s": -5, "arch": [{"name": "mlp", "N": [2]}]}, "timeout_s = -5: expected a positive finite number"),
    ({"impls": [], "arch": [{"name": "mlp", "N": [2]}]}, "impls = []: expected at least one value"),
    ({"arch": [{"name": "mlp", "N": [2], "params": {"depth": -3}}]}, "params.depth = -3: expected a positive integer"),
    ({"arch": [{"name": "mlp", "N": [2], "O": [-1]}]}, "O[1] = -1: expected a positive integer"),
    ({"arch": [{"name": "mlp", "N": [2], "O": [0]}]}, "O[1] = 0: expected a positive integer"),
    ({"arch": [{"name": "mlp", "N": [2], "params": {"width": "wide"}}]}, "params.width = 'wide': expected an integer"),
    ({"arch": [{"name": "mlp", "N": [True]}]}, "N[1] = True: expected an integer"),
    ({"devices": ["gpu"], "arch": [{"name": "mlp", "N": [2]}]}, "devices[1] = 'gpu'"),
    ({"arch": [{"name": "tutorial_cnn", "N": [2], "O": [3]}]}, "tutorial_cnn has a fixed O = 10; leave O out"),
    ({"arch": [{"factory": "no_such_module_x:make", "N": [2]}]},
     "factory 'no_such_module_x:make': importing 'no_such_module_x' failed: ModuleNotFoundError"),
    ({"arch": [{"name": "mlp", "N": [2], "inputs": {"shape": [3]}}]}, "inputs and inputs_factory go with a factory"),
])
def test_invalid_sweeps_get_one_clear_line(spec, message):
    with pytest.raises(sweeps.SweepError) as info:
        sweeps.expand({"name": "bad", **spec})
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_every_problem_of_a_sweep_is_one_line_of_the_same_error():
    spec = {"name": "bad", "impls": "structured", "timeout_s": "30", "memory_budget_gib": float("inf"),
            "arch": [{"name": "mlp", "N": 2, "NM": [[4]], "O": [0]}, {"name": "mlp", "N": [2], "impls": []}]}
    with pytest.raises(sweeps.SweepError) as info:
        sweeps.expand(spec)
    lines = str(info.value).splitlines()
    assert len(lines) == len(info.value.problems) == 7, lines
    assert all(line.startswith("sweep 'bad'") for line in lines)


@pytest.mark.parametrize("params, message", [
    ({"activation": "swish"}, "mlp(activation='swish'): cannot build the model: ValueError: unknown activation 'swish'"),
])
def test_a_value_the_schema_passes_but_the_model_cannot_take_is_caught_before_any_work(params, message):
    cases = sweeps.expand({"name": "s", "impls": ["structured"], "arch": [
        {"name": "mlp", "N": [2], "params": params}, {"name": "mlp", "N": [2], "params": {"width": 3}}]})
    with pytest.raises(sweeps.SweepError) as info:
        sweeps.check_models(cases)
    assert info.value.problems == [info.value.problems[0]] and message in info.value.problems[0]


def test_devices_are_checked_up_front():
    cases = sweeps.expand({"name": "s", "impls": ["structured"], "devices": ["cuda", "cuda:3"],
                           "arch": [{"name": "mlp", "N": [2]}]})
    with pytest.raises(sweeps.SweepError) as info:
        sweeps.check_devices(cases, cuda_count=0)
    assert len(info.value.problems) == 2 and "CUDA is not available here" in info.value.problems[0]
    with pytest.raises(sweeps.SweepError, match=r"'cuda:3': this machine has 2 CUDA device\(s\)"):
        sweeps.check_devices(cases, cuda_count=2)
    sweeps.check_devices(cases, cuda_count=4)


def test_an_entry_can_narrow_the_plugins_and_set_a_memory_budget():
    spec = {"name": "s", "impls": ["structured", "jacobian_contraction"], "memory_budget_gib": 2, "arch": [
        {"name": "mlp", "N": [2]},
        {"name": "mlp", "N": [2], "impls": ["structured"], "memory_budget_gib": 0.5},
    ]}
    cases = sweeps.expand(spec)
    assert [(c.impl, c.memory_budget_bytes) for c in cases] == [
        ("structured", 2 << 30), ("jacobian_contraction", 2 << 30), ("structured", 1 << 29)]
    assert len({c.id for c in cases}) == 3  # the budget is part of the case's key
    assert [c.impl for c in sweeps.expand(spec, ["explicit_mlp"])] == ["explicit_mlp"] * 2  # --impls wins


def test_sweep_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n[[arch]\n")
    proc = subprocess.run([sys.executable, "-m", "ntk_bench", "run", "--sweep", str(bad), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "not valid TOML" in proc.stderr


def test_user_sweep_file_expands(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('impls = ["explicit_mlp", "jacobian_contraction"]\nmodes = ["trace"]\n'
                 '[[arch]]\nname = "mlp"\nparams = { in_features = 4, width = 8 }\nN = [2, 4]\nNM = [[4, 2]]\nO = [1, 3]\n')
    cases = sweeps.expand(sweeps.load(str(f)))
    assert len(cases) == 2 * 3 * 2 and {c.mode for c in cases} == {"trace"}


def test_a_run_records_every_case_with_checked_numbers(smoke_run):
    header, rows = runner.read_results(smoke_run / "results.jsonl")
    assert header["sweep"] == "smoke" and header["torch"] and "git_commit" in header
    assert len(header["code_sha1"]) == 12
    assert len(rows) == len(sweeps.select_plugins(["all"])[0])
    for r in rows:
        assert r["status"] == "ok", r
        assert r["time_median_s"] > 0 and r["peak_mem_bytes"] is not None
        assert len(r["time_blocks_s"]) >= 3 and min(r["time_blocks_s"]) <= r["time_median_s"] <= max(r["time_blocks_s"])
        assert r["origin"] == sweeps.origin_of(r["impl"]) and r["origin"] in ("ours", "peer")
        assert r["concurrent"] == [] and r["executor"] == "local" and r["case_wall_s"] > 0
        assert r["rel_err"] <= 1e-4 and r["reference"].startswith(("neural_tangents", "harness"))
        assert r["predicted_jc_flops"] == 3 * r["O"] * r["fp_flops"] + 9 * r["O"] ** 2 * r["P"]
        assert r["predicted_vp_flops"] == 9 * r["O"] * r["fp_flops"]
        assert r["clock"] == "wall" and r["cpu_threads"] >= 1 and r["cpu_over_wall"] > 0  # the machine beside it
        assert "load_avg_1m" in r and "involuntary_switches" in r and "disturbed" in r
    auto = next(r for r in rows if r["impl"] == "auto")
    assert auto["auto_pick"] in sweeps.all_impls()
    # then every plugin and peer of the case side by side in one worker, auto and its pick among them
    from ntk_bench.bench.measurement import paired

    (rec,) = paired.read_records(smoke_run).values()
    assert set(rec["impls"]) == set(sweeps.select_plugins(["all"])[0]) and rec["worker"] == "worker"
    assert rec["rounds"] >= paired.MIN_ROUNDS and paired.ratio(rec, "auto", auto["auto_pick"]) is not None


def test_auto_runs_after_our_other_plugins_and_before_the_peers():
    cases = sweeps.expand({"name": "s", "impls": ["nt_jacobian_contraction", "auto", "structured", "explicit_mlp"],
                           "arch": [{"name": "mlp", "N": [2]}]})
    assert [c.impl for c in cases] == ["structured", "explicit_mlp", "auto", "nt_jacobian_contraction"]


def test_auto_is_compared_with_the_plugins_near_the_fastest():
    times = {"a": 1.0, "b": 1.2, "c": 1.3, "d": 1.1, "e": 1.05}
    assert runner._near_fastest(times) == ("a", "e", "d")  # within 25%, fastest first, at most 3
    assert runner._near_fastest({"a": 2.0, "b": 9.0}) == ("a",) and runner._near_fastest({}) == ()
    case = sweeps.expand({"name": "s", "impls": ["auto"], "arch": [{"name": "mlp", "N": [2]}]})[0]
    import dataclasses

    compared = dataclasses.replace(case, compare_with=("a", "b"))
    assert compared.id == case.id  # not part of the case's identity
    assert sweeps.Case.from_dict(json.loads(json.dumps(compared.to_dict()))) == compared


def test_paired_timing_sees_a_two_fold_difference():
    import time as time_module

    from ntk_bench.bench.measurement.timers import time_paired

    a, b, ratio = time_paired(lambda: time_module.sleep(0.004), lambda: time_module.sleep(0.002), 0.1)
    assert a > b and 1.5 < ratio < 2.5


def test_report_writes_csv_summary_and_plots(smoke_run, tmp_path):
    summary = report.write_report(smoke_run, tmp_path)
    df = pd.read_csv(tmp_path / "results.csv")
    assert list(df.columns[: len(report.COLUMNS)]) == report.COLUMNS
    text = summary.read_text()
    assert "Median time, each case alone:" in text and "explicit_mlp" in text and "Agreement with the reference:" in text
    assert "## auto against the fastest (paired)" in text and "| auto / fastest " in text and "| auto / pick " in text
    assert "## Ours against the peers (paired)" in text and "**use `" in text
    assert (tmp_path / "cost_model.md").exists()
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) >= 2 and all(p.stat().st_size > 1000 for p in pngs)  # a figure per architecture + cost model


def test_existing_run_needs_resume(smoke_run):
    with pytest.raises(FileExistsError, match="--resume"):
        runner.run_sweep(_smoke(None), smoke_run, "smoke", progress=False)


class _InterruptAfter(InlineExecutor):
    """Runs k cases in this process, then acts as if the runner were killed."""

    def __init__(self, run_dir, k):
        super().__init__(run_dir)
        self.k, self.cases = k, 0

    def submit(self, job):
        if job.task == "case":
            if self.cases == self.k:
                raise KeyboardInterrupt
            self.cases += 1
        return super().submit(job)


def test_interrupted_run_keeps_finished_rows_and_resumes(tmp_path):
    cases = _smoke(["explicit_mlp", "jacobian_contraction", "autograd_loop"])
    with pytest.raises(KeyboardInterrupt):
        runner.run_sweep(cases, tmp_path, "smoke", executor=_InterruptAfter(tmp_path, 2), progress=False)
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"case_id": "torn')  # killed in the middle of a write
    _, rows = runner.read_results(tmp_path / "results.jsonl")
    assert [r["impl"] for r in rows] == ["explicit_mlp", "jacobian_contraction"]
    runner.run_sweep(cases, tmp_path, "smoke", executor=_InterruptAfter(tmp_path, 10), resume=True, progress=False)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) == 4
    _, rows = runner.read_results(tmp_path / "results.jsonl")
    assert sorted(r["impl"] for r in rows) == sorted(["explicit_mlp", "jacobian_contraction", "autograd_loop"])


def test_a_deadline_stops_starting_cases_and_resume_finishes_them(tmp_path, caplog):
    cases = _smoke(["explicit_mlp", "jacobian_contraction"])
    runner.run_sweep(cases, tmp_path, "smoke", executor=_InterruptAfter(tmp_path, 10), progress=False, deadline_s=0)
    assert len(runner.read_results(tmp_path / "results.jsonl")[1]) <= 1  # the inline executor runs as it submits
    runner.run_sweep(cases, tmp_path, "smoke", executor=_InterruptAfter(tmp_path, 10), resume=True, progress=False,
                     deadline_s=60)
    assert sorted(r["impl"] for r in runner.read_results(tmp_path / "results.jsonl")[1]) == ["explicit_mlp",
                                                                                            "jacobian_contraction"]


def test_a_worker_answers_only_after_its_ready_signal_and_is_replaced_after_a_timeout(tmp_path):
    """(The faults themselves are injected in test_runner_faults.py.)"""
    case = _smoke(["explicit_mlp"])[0]
    worker = WorkerProcess(tmp_path / "worker.log")
    try:
        ready = worker.start()
        assert ready["pid"] == worker.proc.pid and ready["threads"] >= 1 and len(ready["code_sha1"]) == 12
        assert worker.run(Job("case", case, 0.001), tmp_path)["status"] == "timeout"  # counted from ready: no result
        assert worker.proc is None  # killed; the next job starts a fresh one, its start-up not counted
        row = worker.run(Job("case", case, 120), tmp_path)
        assert row["status"] == "unchecked" and row["worker_startup_s"] > 0, row  # no reference in this directory
    finally:
        worker.close()


def test_without_neural_tangents_the_reference_is_the_harness_in_float64(tmp_path, monkeypatch):
    from ntk_bench import reference
    from ntk_bench.bench.measurement import one_case, references

    monkeypatch.setattr(reference, "available", lambda: "neural-tangents unavailable: test")
    case = _smoke(["jacobian_contraction"])[0]
    record = references.ensure_reference(case.problem, tmp_path)
    assert record["status"] == "ok" and record["source"] == "harness:jacobian_contraction:float64:cpu"
    row = one_case.run_case(case, tmp_path)
    assert row["status"] == "ok" and row["reference"] == "harness:jacobian_contraction:float64:cpu"
    assert row["rel_err"] <= 1e-4 and "test" in row["reference_note"]


def test_when_neural_tangents_runs_out_of_memory_the_reference_is_its_next_implementation(tmp_path, monkeypatch):
    """XLA's RESOURCE_EXHAUSTED from structured derivatives (the text transformer's Embedding at N=16 asked for 34 GB)
    is not a failed reference: neural-tangents' Jacobian contraction computes it, the note says why."""
    from ntk_bench import reference
    from ntk_bench.bench.measurement import one_case, references

    if reference.available() is not None:
        pytest.skip(reference.available())
    original = reference.ntk

    def ntk(model, x1, x2=None, *args, implementation="structured_derivatives", **kwargs):
        if implementation == "structured_derivatives":
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 33720443936 bytes.")
        return original(model, x1, x2, *args, implementation=implementation, **kwargs)

    monkeypatch.setattr(reference, "ntk", ntk)
    case = _smoke(["jacobian_contraction"])[0]
    record = references.ensure_reference(case.problem, tmp_path)
    assert record["status"] == "ok" and record["source"] == "neural_tangents:jacobian_contraction"
    assert "structured_derivatives ran out of memory" in record["note"]
    assert one_case.run_case(case, tmp_path)["rel_err"] <= 1e-4


def test_a_plugin_declining_while_it_computes_is_unsupported_not_an_error(tmp_path, monkeypatch):
    """NTK-VP on a float32 LSTM learns only when it runs that mkldnn's RNN has no forward-mode derivative."""
    from ntk_bench import implementations
    from ntk_bench.bench.measurement import one_case, references

    plugin = implementations.get("ntk_vector_products")

    def declines(model, x1, x2, mode):
        raise implementations.UnsupportedModelError("ntk_vector_products: no forward-mode derivative (injected)")

    monkeypatch.setattr(plugin, "_kernel", declines)
    case = _smoke(["ntk_vector_products"])[0]
    references.ensure_reference(case.problem, tmp_path)
    row = one_case.run_case(case, tmp_path)
    assert row["status"] == "unsupported" and "injected" in row["error"], row


def test_a_case_out_of_memory_finishes_blocked(tmp_path, monkeypatch):
    from ntk_bench import implementations
    from ntk_bench.bench.measurement import one_case, references

    plugin = implementations.get("explicit_mlp")
    original = type(plugin).compute

    def compute(self, model, x1, x2=None, mode="full", memory_budget_bytes=None):
        if memory_budget_bytes is None:
            raise torch.OutOfMemoryError("pretend the device is full")
        return original(self, model, x1, x2, mode, memory_budget_bytes=memory_budget_bytes)

    monkeypatch.setattr(type(plugin), "compute", compute)
    case = _smoke(["explicit_mlp"])[0]
    references.ensure_reference(case.problem, tmp_path)
    row = one_case.run_case(case, tmp_path)
    assert row["status"] == "ok" and row["blocked_after_oom"] and row["memory_budget_bytes"] > 0
    assert row["rel_err"] <= 1e-4


def test_resumed_run_still_times_auto_against_the_rows_already_there(tmp_path):
    from ntk_bench.bench.measurement import paired

    runner.run_sweep(_smoke(["jacobian_contraction"]), tmp_path, "smoke", executor=InlineExecutor(tmp_path))
    assert paired.read_records(tmp_path) == {}  # one plugin: nothing to pair
    runner.run_sweep(_smoke(["jacobian_contraction", "auto"]), tmp_path, "smoke", resume=True, force=True,
                     executor=InlineExecutor(tmp_path))
    _, rows = runner.read_results(tmp_path / "results.jsonl")
    auto = next(r for r in rows if r["impl"] == "auto")
    assert [r["impl"] for r in rows] == ["jacobian_contraction", "auto"]
    assert auto["auto_pick"] != "jacobian_contraction"
    (rec,) = paired.read_records(tmp_path).values()
    assert set(rec["impls"]) == {"jacobian_contraction", "auto"}  # the first run's case, timed beside auto


def test_a_replayed_graphs_pool_counts_in_the_peak_memory(tmp_path, monkeypatch):
    """Rows of calls replayed from a CUDA graph say so, and their peak memory includes the graph's pool."""
    from ntk_bench.bench.measurement import one_case, references
    from ntk_bench.implementations.core import cuda_graphs
    from tests.implementations.core.test_cuda_graphs import rerun_capture

    case = _smoke(["structured"])[0]
    references.ensure_reference(case.problem, tmp_path)
    eager = one_case.run_case(case, tmp_path)
    monkeypatch.setattr(cuda_graphs, "CACHE", cuda_graphs.GraphCache(capture=rerun_capture, devices=("cpu",)))
    replayed = one_case.run_case(case, tmp_path)
    assert "cuda_graph_bytes" not in eager and replayed["status"] == "ok" and replayed["rel_err"] <= 1e-4
    assert replayed["cuda_graph_bytes"] >= 1000 and replayed["peak_mem_bytes"] >= replayed["cuda_graph_bytes"]
