"""Memory: a call's peak (the CUDA allocator's, or the CPU's peak RSS with glibc's malloc told not to hide new
allocations in memory it kept), and the budget a case retries under after running out."""

from __future__ import annotations

import ctypes

import torch

from ntk_bench.implementations.plugins.auto import default_memory_budget

from . import sysinfo


def safe_memory_budget(device: str) -> int:
    """The budget to compute blocked under after running out of memory: CUDA as ``auto`` computes it (the free
    device memory); CPU half of what this process may still allocate (the machine's free memory, its cgroup's
    ``memory.max`` headroom and ``RLIMIT_AS``, whichever is least)."""
    if str(device).startswith("cuda"):
        return default_memory_budget(torch.device(device))
    return sysinfo.cpu_memory_budget()


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def measure_peak_memory(fn, device: str):
    """Run ``fn`` once; return (its result, peak memory in bytes above what was in use before).

    CUDA: max_memory_allocated over the call. CPU: the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs) over its RSS before the call. So that
    memory freed by earlier calls and kept by malloc does not hide new
    allocations, the heap is trimmed first and allocations of 64 KiB and more
    are served by fresh mappings during the call (glibc's mallopt); afterwards
    the mapping threshold is set to glibc's dynamic maximum, 32 MiB.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    libc = _glibc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
            libc.mallopt(_M_MMAP_THRESHOLD, 64 << 10)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _rss_bytes("VmRSS")
    except OSError:  # not Linux: no peak measurement
        return fn(), None
    try:
        out = fn()
        return out, max(0, _rss_bytes("VmHWM") - base)
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
