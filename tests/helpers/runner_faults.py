"""Plugins that inject faults into a worker, for the runner's tests (loaded with ``--plugin runner_faults``).

Each computes the right kernel (Jacobian contraction's) unless its fault fires:

- ``fault_sleep``: sleeps ``NTKB_TEST_SLEEP_S`` seconds per call (a hang, for timeouts and kills);
- ``fault_selfkill``: the worker sends itself SIGKILL (a kill from outside, not the OOM killer);
- ``fault_abort``: ``os.abort()`` (a crash: SIGABRT);
- ``fault_wrong``: 1% off (a mismatch); ``fault_nan``: NaN entries in the kernel the runner checks (strict JSON, a
  mismatch);
- ``fault_error``: raises RuntimeError;
- ``fault_flaky``: raises until the file ``NTKB_TEST_MARKER`` exists, creating it (an error that a retry fixes);
- ``fault_oom_kill``: without a memory budget, plays the kernel's OOM killer: adds one to the counter in the file
  ``NTKB_TEST_OOM_COUNTER`` (the test makes the runner read the kernel's count from there) and SIGKILLs its
  worker; under a budget (the runner's blocked retry) it computes correctly;
- ``fault_started``: writes its pid to ``NTKB_TEST_PIDFILE`` then sleeps ``NTKB_TEST_SLEEP_S`` (a running worker to
  signal the runner under);
- ``fault_closed_pipe``: closes the worker's answer pipe and sleeps ``NTKB_TEST_SLEEP_S`` (a worker that will never
  answer, yet does not exit);
- ``fault_setsid_child``: starts a child in a session of its own (``setsid``: out of the worker's process group),
  writes the child's pid to ``NTKB_TEST_PIDFILE``, then sleeps ``NTKB_TEST_SLEEP_S``;
- with ``NTKB_TEST_FREEZE_REFERENCE`` set where this module is imported, every reference computation there hangs.

They are never registered in the pytest process itself (the suite iterates every registered plugin): the
tests load them in the runner or worker processes they start, or register them for one test and unregister.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ntk_bench.implementations.core.base import NTKPlugin


def _right(model, x1, x2, mode):
    from ntk_bench import implementations

    return implementations.get("jacobian_contraction")._kernel(model, x1, x2, mode)


class _Fault(NTKPlugin):
    capturable = False

    def fault(self, model, x1, x2, mode):
        return None

    def _kernel(self, model, x1, x2, mode):
        out = self.fault(model, x1, x2, mode)
        return _right(model, x1, x2, mode) if out is None else out


class Sleep(_Fault):
    name = "fault_sleep"

    def fault(self, model, x1, x2, mode):
        time.sleep(float(os.environ.get("NTKB_TEST_SLEEP_S", "3600")))


class SelfKill(_Fault):
    name = "fault_selfkill"

    def fault(self, model, x1, x2, mode):
        os.kill(os.getpid(), signal.SIGKILL)


class Abort(_Fault):
    name = "fault_abort"

    def fault(self, model, x1, x2, mode):
        print("fault_abort: about to abort", flush=True)
        os.abort()


class Wrong(_Fault):
    name = "fault_wrong"

    def fault(self, model, x1, x2, mode):
        return _right(model, x1, x2, mode) * 1.01


class NaN(_Fault):
    """NaN entries in what the runner checks (through ``prepare``, past any check of the plugin's own result)."""

    name = "fault_nan"

    def prepare(self, model, x1, x2=None, mode="full", memory_budget_bytes=None):
        run, _ = super().prepare(model, x1, x2, mode, memory_budget_bytes=memory_budget_bytes)
        return run, lambda out: torch.full_like(out, float("nan"))


class Error(_Fault):
    name = "fault_error"

    def fault(self, model, x1, x2, mode):
        raise RuntimeError("fault_error: injected failure")


class Flaky(_Fault):
    name = "fault_flaky"

    def fault(self, model, x1, x2, mode):
        marker = Path(os.environ["NTKB_TEST_MARKER"])
        if not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError("fault_flaky: fails the first time")


class OomKill(_Fault):
    name = "fault_oom_kill"

    def compute(self, model, x1, x2=None, mode="full", memory_budget_bytes=None):
        if memory_budget_bytes is None:
            counter = Path(os.environ["NTKB_TEST_OOM_COUNTER"])
            counter.write_text(str(int(counter.read_text() or 0) + 1 if counter.exists() else 1))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().compute(model, x1, x2, mode, memory_budget_bytes=memory_budget_bytes)


class Started(_Fault):
    name = "fault_started"

    def fault(self, model, x1, x2, mode):
        Path(os.environ["NTKB_TEST_PIDFILE"]).write_text(str(os.getpid()))
        time.sleep(float(os.environ.get("NTKB_TEST_SLEEP_S", "3600")))


class ClosedPipe(_Fault):
    name = "fault_closed_pipe"

    def fault(self, model, x1, x2, mode):
        for fd in map(int, os.listdir("/proc/self/fd")):  # the answer pipe: the pipe this process writes to
            try:
                with open(f"/proc/self/fdinfo/{fd}") as info:
                    flags = int(next(line for line in info if line.startswith("flags:")).split()[1], 8)
                if fd > 2 and flags & 3 == os.O_WRONLY and os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:"):
                    os.close(fd)
            except (OSError, StopIteration):
                pass
        time.sleep(float(os.environ.get("NTKB_TEST_SLEEP_S", "3600")))


class SetsidChild(_Fault):
    name = "fault_setsid_child"

    def fault(self, model, x1, x2, mode):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True)
        Path(os.environ["NTKB_TEST_PIDFILE"]).write_text(str(child.pid))
        time.sleep(float(os.environ.get("NTKB_TEST_SLEEP_S", "3600")))


if os.environ.get("NTKB_TEST_FREEZE_REFERENCE"):
    from ntk_bench.bench.measurement import references

    references.reference_block = lambda problem, o: time.sleep(3600)


plugins = [Sleep(), SelfKill(), Abort(), Wrong(), NaN(), Error(), Flaky(), OomKill(), Started(), ClosedPipe(),
           SetsidChild()]
