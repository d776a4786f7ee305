"""oneDNN (mkldnn) or PyTorch's own CPU kernels, whichever runs a plugin's kernel faster, per model and shapes.

oneDNN sets each convolution up at a fixed cost that dominates tiny ones, while on larger ones it is several
times faster than the native kernels; its linear (GEMM) kernel beats MKL's on some shapes and CPUs and not on
others. Which wins depends on the CPU, so it is measured on the first call for a model and shapes, like
cudnn.benchmark, and kept (``is_faster``). Under ``enabled(True)`` convolutions go to oneDNN (PyTorch's own
switch) and ``linear`` calls oneDNN's linear for float32 CPU tensors; under ``enabled(False)`` neither does.
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch
import torch.nn.functional as F

from .module_walks import shape_keyed_cache


@contextlib.contextmanager
def enabled(flag: bool):
    """oneDNN's CPU kernels on or off inside the block (torch.backends.mkldnn's global switch), restored after."""
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(flag)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)


def usable(x: torch.Tensor) -> bool:
    """Whether oneDNN could run ``x``'s kernels here (a float32 CPU tensor, a build with oneDNN, switched on)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available() and \
        torch._C._get_mkldnn_enabled()


_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), by oneDNN's linear when it is switched on for float32 CPU tensors (``weight``
    may be a transposed view: ``linear(g, w.t())`` is ``g @ w``); no autograd through the oneDNN path. Under
    ``torch.compile`` it is ``F.linear``: Inductor picks its own GEMM."""
    if torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    if _LINEAR is not None and usable(x) and weight.dtype == x.dtype and not torch.is_grad_enabled():
        return _LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def is_faster(run, repeats: int = 5, margin: float = 0.9, only_below_s: float = 0.05) -> bool:
    """Whether to keep oneDNN for ``run``: unless PyTorch's own kernels run it more than 10% faster.

    Best of ``repeats`` calls each, alternating, after a warm-up call each. A call that takes over ``only_below_s``
    with oneDNN keeps it untried (its set-up cost is small there, and the trial would cost seconds).
    """
    def timed(flag):
        with enabled(flag):
            t0 = time.perf_counter()
            run()
            return time.perf_counter() - t0

    on = [timed(True)]
    if on[0] > only_below_s:
        return True
    on = [timed(True)]
    timed(False)
    off = []
    for _ in range(repeats):
        off.append(timed(False))
        on.append(timed(True))
    return min(off) >= margin * min(on)


_FIXED = threading.local()


@contextlib.contextmanager
def fixed_choice(flag: bool | None):
    """Inside the block ``on_faster_backend`` runs with oneDNN on (True) or off (False) without timing a trial
    (None: measured as usual). A computation split over processes (the tiles of a dataset's kernel) fixes the
    choice once, so that every part runs the same kernels and the result does not depend on which process ran it."""
    before = getattr(_FIXED, "flag", None)
    _FIXED.flag = flag
    try:
        yield
    finally:
        _FIXED.flag = before


def on_faster_backend(store, model, key: tuple, run, prepare=None):
    """``run()`` with oneDNN on or off, whichever ran it faster on the first call for ``model`` and ``key``
    (``is_faster``, its answer cached in ``store`` per model, key and parameter shapes); ``prepare()`` first, once,
    outside the timed calls (a plan)."""
    flag = getattr(_FIXED, "flag", None)
    if flag is not None:
        with enabled(flag):
            return run()
    outs = []

    def trial():
        if prepare is not None:
            prepare()
        return is_faster(lambda: outs.append(run()))

    use = shape_keyed_cache(store, model, key, trial)
    if outs and use:  # a slow call keeps oneDNN untried: its kernel is this call's
        return outs[-1]
    with enabled(use):
        return run()
