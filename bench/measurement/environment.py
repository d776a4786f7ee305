"""The environment a run records in its header: versions, the machine, the code that ran."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch


def environment() -> dict:
    """Versions and machine facts for the header line of results.jsonl."""
    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {
        "torch": torch.__version__, "jax": version("jax"), "jaxlib": version("jaxlib"),
        "neural_tangents": version("neural-tangents"), "backpack": version("backpack-for-pytorch"),
        "numpy": version("numpy"), "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_name(),
        "cpu_capability": cpu_capability(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "git_commit": commit,
        "code_sha1": code_sha1(), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def cpu_name() -> str:
    """The CPU's model as the system names it (Linux's /proc/cpuinfo ``model name``), else what ``platform`` says
    (often only the architecture, "x86_64"). Timings of one plugin against another differ by CPU, not only by
    speed: which of MKL's GEMM and oneDNN's is the faster, and by how much, is the CPU's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model Name", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str | None:
    """The vector instructions torch's CPU kernels use here ("AVX512", "AVX2", ...; None where torch does not say)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return None


def code_sha1() -> str:
    """A digest of the harness's code that ran (the plugins, the reference, the runner), whatever .git says
    (a copied working tree can carry a stale or no repository)."""
    digest = hashlib.sha1()
    for pkg in ("ntk_bench.implementations", "ntk_bench.bench", "ntk_bench.reference"):
        spec = importlib.util.find_spec(pkg)  # the folder, without importing the package (JAX stays unloaded)
        root = Path(spec.origin).resolve().parent
        for f in sorted(root.rglob("*.py")):
            digest.update(f"{pkg}/{f.relative_to(root).as_posix()}".encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:12]
