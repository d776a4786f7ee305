"""The machine a run's header names: the CPU's model, not only its architecture, and the vector instructions
torch uses there (one plugin's ratio to another moves with the CPU: MKL's GEMM against oneDNN's, for one)."""

from __future__ import annotations

import platform

import pytest

from ntk_bench.bench.measurement import environment


def test_the_cpu_is_named_by_its_model_where_the_system_says(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path,
                                                                         *a, **k))
    assert environment.cpu_name() == "AMD EPYC 9R14 96-Core Processor"
    cpuinfo.write_text("processor\t: 0\n")  # (no model line: what platform says)
    assert environment.cpu_name() == (platform.processor() or platform.machine())


@pytest.mark.skipif(not __import__("os").path.exists("/proc/cpuinfo"), reason="Linux's /proc names the CPU")
def test_the_header_names_the_cpu_model_and_torchs_vector_instructions():
    import torch

    env = environment.environment()
    if not torch.cuda.is_available():
        assert env["device_name"] == environment.cpu_name()
        with open("/proc/cpuinfo") as f:
            if "model name" in f.read():
                assert env["device_name"] != platform.machine()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
