"""Shared pieces of the runner's tests: the smoke cases, one reference computed per session, fault plugins."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
HELPERS = Path(__file__).parent


def smoke(impls=None):
    from ntk_bench.bench import sweeps

    return sweeps.expand(sweeps.SWEEPS["smoke"], impls)


@pytest.fixture(scope="session")
def smoke_reference(tmp_path_factory):
    """A run directory holding the smoke problem's reference (copy it into a test's run with ``seed_reference``)."""
    from ntk_bench.bench.measurement import references

    d = tmp_path_factory.mktemp("smoke-reference")
    record = references.ensure_reference(smoke(["structured"])[0].problem, d)
    assert record["status"] == "ok", record
    return d


def seed_reference(ref_dir: Path, run_dir: Path) -> None:
    shutil.copytree(ref_dir / "references", Path(run_dir) / "references", dirs_exist_ok=True)


@pytest.fixture
def fault_plugins(monkeypatch):
    """The fault plugins registered in this process for one test (and their module importable by workers)."""
    from ntk_bench import implementations

    monkeypatch.syspath_prepend(str(HELPERS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")]))
    names = implementations.load_module("runner_faults")
    yield names
    for name in names:
        implementations.unregister(name)


def cli_env(**extra) -> dict:
    path = os.pathsep.join([str(ROOT), str(HELPERS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in extra.items()}}


def cli(*args, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    """``python -m ntk_bench ARGS`` in a subprocess; its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, "-m", "ntk_bench", *map(str, args)], capture_output=True, text=True,
                          env=env or cli_env(), timeout=timeout, cwd=cwd or ROOT)


def start_cli(*args, env=None, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ntk_bench", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or cli_env(), cwd=cwd or ROOT)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke sweep (every plugin and peer on a tiny MLP) run once by the local executor, one worker."""
    from ntk_bench.bench.execution import runner

    out = tmp_path_factory.mktemp("smoke-run")
    runner.run_sweep(smoke(), out, "smoke", progress=False)
    return out
