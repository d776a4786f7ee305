"""One name per concept: the environment-variable helper (with its fallback to the old prefix)."""

from __future__ import annotations

import warnings

import pytest

from ntk_bench.envvars import env, env_name


def test_env_reads_the_new_name_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert env("CUDA_GRAPHS", environ={"NTK_BENCH_CUDA_GRAPHS": "0"}) == "0"
        assert env("NTK_BENCH_CUDA_GRAPHS", environ={"NTK_BENCH_CUDA_GRAPHS": "0"}) == "0"
        assert env("CUDA_GRAPHS", "1", environ={}) == "1"
        assert env("CUDA_GRAPHS", environ={}) is None


def test_env_falls_back_to_the_old_prefix_with_a_warning_naming_both():
    with pytest.warns(DeprecationWarning, match="NTKBENCH_REQUIRE_REFERENCE.*NTK_BENCH_REQUIRE_REFERENCE"):
        assert env("REQUIRE_REFERENCE", environ={"NTKBENCH_REQUIRE_REFERENCE": "1"}) == "1"


def test_env_new_name_wins_over_the_old():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert env("REFERENCE", environ={"NTK_BENCH_REFERENCE": "harness", "NTKBENCH_REFERENCE": "nt"}) == "harness"


def test_env_reads_os_environ(monkeypatch):
    monkeypatch.delenv("NTK_BENCH_CUDA_GRAPHS", raising=False)
    monkeypatch.setenv("NTKBENCH_CUDA_GRAPHS", "0")
    with pytest.warns(DeprecationWarning):
        assert env("CUDA_GRAPHS", "1") == "0"
    assert env_name("CUDA_GRAPHS") == "NTK_BENCH_CUDA_GRAPHS"


def test_old_cuda_graphs_switch_still_turns_replay_off(monkeypatch):
    """The old spelling still reaches the code that reads it (the CUDA-graph cache), with the warning."""
    import torch

    from ntk_bench import implementations
    from ntk_bench.implementations.core import cuda_graphs

    cache = cuda_graphs.GraphCache(devices=("cpu",))
    plugin, x = implementations.get("structured"), torch.zeros(2, 3)
    monkeypatch.delenv("NTK_BENCH_CUDA_GRAPHS", raising=False)
    if not getattr(plugin, "capturable", False):
        pytest.skip("structured is not capturable")
    assert cache.applies(plugin, x)
    monkeypatch.setenv("NTKBENCH_CUDA_GRAPHS", "0")
    with pytest.warns(DeprecationWarning, match="NTK_BENCH_CUDA_GRAPHS"):
        assert not cache.applies(plugin, x)

