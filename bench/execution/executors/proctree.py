"""Process trees: kill a worker with everything it started, and die with a process that is not our parent.

A worker is started in its own session, so killing its process group takes the
children a plugin starts; a child that calls ``setsid`` (or starts a session of
its own: ``start_new_session=True``) leaves that group, and only its place in
the tree still ties it to the worker. :func:`kill_tree` therefore freezes the
whole tree (SIGSTOP, so that nothing forks or re-parents meanwhile), collects it
again until it stops growing, and then SIGKILLs every process and the root's
group. :func:`watch_process` is the other direction: a thread that acts when a
given process (the runner, when it is not our parent) is gone, recognised by
its pid *and* start time so that a reused pid does not keep us alive.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import psutil


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def kill_tree(pid: int, wait_s: float = 10.0) -> list[int]:
    """SIGKILL ``pid``, its process group and all its descendants (also those in sessions of their own).

    Returns the pids signalled. Waits up to ``wait_s`` for them to go (a process in uninterruptible sleep
    can take a while; the caller still reaps its own child)."""
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        root = None
    procs: dict[int, psutil.Process] = {}
    if root is not None:
        procs[pid] = root
        # Stop first, collect again: a process that forks between the listing and the kill is caught the next round.
        for _ in range(5):
            new = [p for p in [root, *_descendants(root)] if p.pid not in procs or p.pid == pid]
            for p in new:
                try:
                    p.send_signal(signal.SIGSTOP)
                except psutil.Error:
                    pass
                procs[p.pid] = p
            if all(p.pid == pid for p in new):
                break
    try:
        os.killpg(pid, signal.SIGKILL)  # the worker is its group's leader: same-group children too
    except (ProcessLookupError, PermissionError):
        pass
    for p in procs.values():
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    others = [p for p in procs.values() if p.pid != pid]
    if others:
        psutil.wait_procs(others, timeout=wait_s)
    return sorted(procs)


def process_identity(pid: int | None = None) -> tuple[int, float]:
    """(pid, start time): what :func:`watch_process` needs to recognise the process (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return pid, psutil.Process(pid).create_time()


def alive(identity: tuple[int, float]) -> bool:
    """Whether the process (pid, start time) still runs (a zombie counts as gone; a reused pid is another one)."""
    pid, created = identity
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - created) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch_process(identity: tuple[int, float], on_death: Callable[[], None], interval_s: float = 0.5,
                  name: str = "watch") -> threading.Thread:
    """Call ``on_death`` (in a daemon thread) once the process ``identity`` is gone; returns the thread."""

    def run():
        while alive(identity):
            time.sleep(interval_s)
        on_death()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
