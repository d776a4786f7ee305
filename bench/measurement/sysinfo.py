"""What the operating system says about this process: memory limits and the kernel's OOM kills (no torch here).

A SIGKILL is called out-of-memory only when the kernel says so: the ``oom_kill``
counter of this process's memory cgroup (v2 ``memory.events``, v1
``memory.oom_control``), or else the system-wide ``/proc/vmstat`` counter, went
up while the worker ran. The memory a retry may use respects the cgroup limit
(``memory.max`` / ``memory.limit_in_bytes``) and ``RLIMIT_AS`` as well as what
the machine has free.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60  # cgroup v1 writes ~2^63 for "no limit"


def _cgroup_dirs() -> list[Path]:
    """This process's memory cgroup directories (v2 unified, v1 memory controller), innermost first."""
    dirs = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return dirs
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # v2
            base = CGROUP_ROOT / rel
        elif "memory" in controllers.split(","):  # v1
            base = CGROUP_ROOT / "memory" / rel
        else:
            continue
        # a container often sees its own cgroup as the root of the hierarchy: try the path, then the root
        for d in (base, base.parent, CGROUP_ROOT / "memory", CGROUP_ROOT):
            if d.is_dir() and d not in dirs and ((d / "memory.events").exists() or (d / "memory.oom_control").exists()):
                dirs.append(d)
                break
    return dirs


def _read_kv(path: Path) -> dict[str, int]:
    out = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                out[key] = int(value)
    except OSError:
        pass
    return out


def oom_kill_count() -> tuple[int, str] | None:
    """(the kernel's count of OOM kills that concern this process, where it was read), or None if unreadable."""
    for d in _cgroup_dirs():
        for name in ("memory.events", "memory.oom_control"):
            kv = _read_kv(d / name)
            if "oom_kill" in kv:
                return kv["oom_kill"], f"{d / name}"
    kv = _read_kv(Path("/proc/vmstat"))
    if "oom_kill" in kv:
        return kv["oom_kill"], "/proc/vmstat (system-wide)"
    return None


def cgroup_memory_headroom() -> int | None:
    """Bytes this process's memory cgroup may still allocate (limit − usage), None without a limit."""
    best = None
    for d in _cgroup_dirs():
        for limit_name, usage_name in (("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            try:
                limit_text = (d / limit_name).read_text().strip()
                usage = int((d / usage_name).read_text().strip())
            except (OSError, ValueError):
                continue
            if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= _UNLIMITED:
                continue
            headroom = max(0, int(limit_text) - usage)
            best = headroom if best is None else min(best, headroom)
    return best


def address_space_headroom() -> int | None:
    """Bytes of address space left under RLIMIT_AS, None when unlimited."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        vm = 0
    return max(0, soft - vm)


def available_memory() -> int | None:
    """The memory the machine has free for a new allocation (``MemAvailable`` of /proc/meminfo), in bytes; None where
    that is not readable."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return None


def cpu_memory_budget(fraction: float = 0.5) -> int:
    """A CPU memory budget for blocked computation: ``fraction`` of the least of the machine's free memory, the
    cgroup's headroom and the address space left (8 GiB when none is known)."""
    limits = [v for v in (available_memory(), cgroup_memory_headroom(), address_space_headroom()) if v is not None]
    return int(fraction * min(limits)) if limits else 8 << 30


def cpu_affinity() -> list[int] | None:
    """The cores this process may run on, sorted; None where the platform does not say."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
