"""A worker's tie to the runner that started it: it dies with its parent. Imports nothing heavy (a worker calls it
before torch is imported)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from ntk_bench.envvars import env

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """End this process when its parent dies (Linux: the kernel's parent-death signal, and a watcher thread for
    the moment before it takes effect), so that a worker never outlives the runner that started it."""
    parent = int(env("PARENT_PID", os.getppid()))
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)

    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
