"""Executors as futures: local parallel workers pinned to their cores, a real local Ray cluster (a worker killed
mid-sweep), and submitit's local executor, each giving the same rows as the local executor on the smoke sweep."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from ntk_bench.bench import sweeps
from ntk_bench.bench.execution import runner
from ntk_bench.bench.execution.executors import Job, LocalExecutor, Slot, plan_slots
from ntk_bench.bench.execution.executors.local import split_cores
from tests.helpers.runner_helpers import children_of, cmdline, seed_reference, smoke


def _rows(path):
    _, rows = runner.read_results(path / "results.jsonl")
    return {r["case_id"]: r for r in rows}


def _same_rows(a, b) -> dict:
    """{case id: (status here, status there)} where they differ, or a case is on one side only."""
    return {k: (a.get(k, {}).get("status"), b.get(k, {}).get("status")) for k in set(a) | set(b)
            if a.get(k, {}).get("status") != b.get(k, {}).get("status")}


# -- slots -------------------------------------------------------------------------------------------------------

def test_one_worker_by_default_and_disjoint_cores_for_several():
    assert [(s.label, s.takes, s.cpus) for s in plan_slots()] == [("worker", "any", None)]
    assert split_cores([0, 1, 2, 3, 4], 2) == [(0, 1, 2), (3, 4)]
    assert split_cores([0, 1], 3) == [(0,), (1,), (0,)]  # more workers than cores: shared (and warned)
    slots = plan_slots(workers=2)
    cores = [set(s.cpus) for s in slots]
    assert len(slots) == 2 and not cores[0] & cores[1] and all(s.takes == "cpu" for s in slots)
    assert slots[0].env()["NTK_BENCH_CPUS"] == ",".join(map(str, slots[0].cpus))


def test_one_worker_per_gpu_each_seeing_its_own(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    slots = plan_slots(devices=["cuda:0", "cuda:1"])
    gpu0, gpu1, cpu = slots
    assert (gpu0.env()["CUDA_VISIBLE_DEVICES"], gpu1.env()["CUDA_VISIBLE_DEVICES"]) == ("0", "1")
    assert cpu.takes == "cpu" and "CUDA_VISIBLE_DEVICES" not in cpu.env()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # the runner itself sees GPUs 4 and 6 as cuda:0 and cuda:1
    assert gpu1.env()["CUDA_VISIBLE_DEVICES"] == "6" and gpu1.env()["NTK_BENCH_GPU"] == "1"
    case = sweeps.expand({"name": "s", "impls": ["structured"], "devices": ["cuda", "cuda:1", "cpu"],
                          "arch": [{"name": "mlp", "N": [2]}]})
    jobs = {c.device: Job("case", c, 1.0) for c in case}
    assert gpu0.accepts(jobs["cuda"]) and not gpu0.accepts(jobs["cuda:1"]) and gpu1.accepts(jobs["cuda:1"])
    assert not gpu0.accepts(jobs["cpu"]) and cpu.accepts(jobs["cpu"]) and not cpu.accepts(jobs["cuda"])
    assert Slot("w", "any").accepts(jobs["cuda:1"]) and gpu0.accepts(Job("reference", case[0].problem, 1.0))
    with pytest.raises(ValueError, match="names a GPU twice"):
        plan_slots(devices=["cuda:0", "cuda:0"])


def test_parallel_workers_pinned_to_disjoint_cores_record_what_ran_beside_them(tmp_path, smoke_reference):
    """Two CPU workers: each row says its cores and the cases that overlapped it; auto waits for its group."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    seed_reference(smoke_reference, tmp_path)
    impls = ["explicit_mlp", "structured", "jacobian_contraction", "autograd_loop", "auto"]
    ex = LocalExecutor(tmp_path, workers=2)
    summary = runner.run(smoke(impls), tmp_path, "smoke", executor=ex)
    rows = {r["impl"]: r for r in summary.rows.values()}
    assert {r["status"] for r in rows.values()} == {"ok"}, rows
    affinities = {tuple(r["cpu_affinity"]) for r in rows.values()}
    assert len(affinities) == 2 and not set(affinities.pop()) & set(affinities.pop())
    assert all(r["worker_threads"] == 1 for r in rows.values())
    if sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION"):  # glibc told to keep freed memory
        assert all("mmap_threshold=33554432" in r["worker_malloc"] for r in rows.values())
    assert any(r["concurrent"] for r in rows.values())  # something ran beside something
    ours = {i for i in impls if i != "auto"}
    assert not ours & {c.split("/")[0] for c in rows["auto"]["concurrent"]}  # auto ran after its group
    from ntk_bench.bench.measurement import paired

    (rec,) = paired.read_records(tmp_path).values()  # then the group side by side, in one worker
    assert set(rec["impls"]) == set(impls) and rec["cpu_affinity"] in [r["cpu_affinity"] for r in rows.values()]
    header, _ = runner.read_results(tmp_path / "results.jsonl")
    assert header["slots"] == 2 and [w["label"] for w in header["workers"]] == ["cpu0", "cpu1"]


# -- Ray ---------------------------------------------------------------------------------------------------------

def _kill_a_ray_worker_under_a_task(stop: threading.Event, killed: list) -> None:
    """Kill (SIGKILL) the first Ray worker seen running one of our worker subprocesses: a task in flight."""
    me = os.getpid()
    while not stop.is_set() and not killed:
        for pid in _descendants(me):
            if "ntk_bench.bench.execution.worker" in cmdline(pid):
                parent = _parent(pid)
                if parent and cmdline(parent).startswith("ray::"):
                    os.kill(parent, signal.SIGKILL)
                    killed.append(parent)
                    return
        time.sleep(0.2)


def _parent(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        out += kids
        todo += kids
    return out


@pytest.mark.ray
def test_ray_gives_the_local_rows_even_with_a_worker_killed_mid_sweep(tmp_path, smoke_run):
    """A real Ray cluster on this machine (two CPUs, 100 MB object store, no dashboard); a Ray worker is SIGKILLed
    while it runs a task: Ray retries the task, no row is lost, and the rows equal the local executor's."""
    pytest.importorskip("ray")
    from ntk_bench.bench.execution.executors.ray_executor import RayExecutor

    ex = RayExecutor(tmp_path, init_kwargs={"address": "local", "num_cpus": 2, "object_store_memory": 100 * 2**20,
                                            "include_dashboard": False, "_node_ip_address": "127.0.0.1"})
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_ray_worker_under_a_task, args=(stop, killed), daemon=True)
    killer.start()
    try:
        summary = runner.run(smoke(), tmp_path, "smoke", executor=ex)
    finally:
        stop.set()
        killer.join()
    assert killed, "no Ray worker was killed: the test did not inject its fault"
    assert summary.ran == summary.total and summary.left == 0
    assert _same_rows(_rows(tmp_path), _rows(smoke_run)) == {}
    rows = _rows(tmp_path)
    assert {r["executor"] for r in rows.values()} == {"ray"} and all(r["executor_host"] for r in rows.values())
    # resumable: the run is complete
    assert runner.run(smoke(), tmp_path, "smoke", executor=None, resume=True).nothing_to_do


# -- SLURM through submitit ----------------------------------------------------------------------------------------

@pytest.mark.slurm
def test_submitit_local_gives_the_local_rows(tmp_path, smoke_run, smoke_reference):
    """The SLURM executor's code path (job arrays through submitit, each job isolating its cases in a worker) with
    submitit's LocalExecutor: the same rows as the local executor on the smoke sweep. (The reference is there
    already: the Ray test computes one on its cluster.)"""
    pytest.importorskip("submitit")
    seed_reference(smoke_reference, tmp_path)
    from ntk_bench.bench.execution.executors.submitit_executor import SubmititExecutor

    ex = SubmititExecutor(tmp_path, cluster="local", max_parallel=2, jobs_per_task=6, partition="ignored-locally",
                          slurm_params={"account": "ignored-locally"})
    summary = runner.run(smoke(), tmp_path, "smoke", executor=ex)
    assert summary.ran == summary.total
    assert _same_rows(_rows(tmp_path), _rows(smoke_run)) == {}
    assert {r["executor"] for r in _rows(tmp_path).values()} == {"submitit-local"}
    assert all(r["slurm_job_id"] for r in _rows(tmp_path).values())
    assert list((tmp_path / "submitit").iterdir())  # submitit's job folders, in the run directory


@pytest.mark.slurm
def test_slurm_job_arrays_ask_for_the_partition_gpus_time_and_parallelism(tmp_path):
    """``--executor slurm`` against submitit's own mocked sbatch: the CUDA cases go as one job array whose script
    asks for the partition, a GPU per task, a time limit covering the chunk, the array's parallelism, the account."""
    pytest.importorskip("submitit")
    test_core = pytest.importorskip("submitit.core.test_core")
    from ntk_bench.bench.execution.executors.submitit_executor import SubmititExecutor

    cases = sweeps.expand({"name": "s", "impls": ["structured", "explicit_mlp", "jacobian_contraction"],
                           "devices": ["cuda"], "timeout_s": 600, "arch": [{"name": "mlp", "N": [2]}]})
    mock = test_core.MockedSubprocess(known_cmds=["srun", "sbatch"])
    with mock.context():
        ex = SubmititExecutor(tmp_path, cluster="slurm", partition="gpu", gpus_per_task=1, time_limit_min=5,
                              max_parallel=4, jobs_per_task=2, slurm_params={"account": "myproj"})
        futures = [ex.submit(Job("case", c, c.timeout_s)) for c in cases]
        deadline = time.monotonic() + 30
        while any(f.started_at is None for f in futures) and time.monotonic() < deadline:
            time.sleep(0.1)
        ex.close()
    scripts = list((tmp_path / "submitit").rglob("*_submission.sh"))
    assert len(scripts) == 1, scripts  # one job array
    text = scripts[0].read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --account=myproj",
                 "#SBATCH --array=0-2%3", "#SBATCH --cpus-per-task=1"):
        assert line in text, text
    minutes = int(next(ln for ln in text.splitlines() if ln.startswith("#SBATCH --time=")).split("=")[1])
    assert minutes >= (600 + 300) / 60  # a chunk's timeout and the worker's start-up
    assert all(f.started_at is not None and not f.done() for f in futures)
