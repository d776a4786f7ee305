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
    """oneDNN's CPU kernels on or off inside the block (torch.backends.mkldnn's global switch), restored after.
    Inside ``enabled(True)`` the Gram GEMMs (``gram``) go to oneDNN too: only where a plugin chose it."""
    before, chosen = torch._C._get_mkldnn_enabled(), getattr(_CHOSEN, "flag", None)
    torch._C._set_mkldnn_enabled(flag)
    _CHOSEN.flag = flag
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)
        _CHOSEN.flag = chosen


# This thread's innermost ``enabled`` (None outside any): the Gram GEMMs take oneDNN only inside ``enabled(True)``,
# since plugins without a backend trial share them and MKL's GEMM is the faster on some CPUs.
_CHOSEN = threading.local()


def usable(x: torch.Tensor) -> bool:
    """Whether oneDNN could run ``x``'s kernels here (a float32 CPU tensor, a build with oneDNN, switched on)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available() and \
        torch._C._get_mkldnn_enabled()


_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), by oneDNN's linear when it is switched on for float32 CPU tensors (``weight``
    may be a transposed view: ``linear(g, w.t())`` is ``g @ w``); no autograd through the oneDNN path. Under
    ``torch.compile`` a GEMM of ``COMPILED_MIN_MACS`` or more goes through ``ntk_bench::linear``, which takes
    oneDNN when it runs inside ``enabled(True)`` (a plugin's choice: ``compile_context``) and MKL's GEMM otherwise,
    as Inductor would (on some CPUs far slower than oneDNN's); smaller ones are Inductor's."""
    if torch.compiler.is_compiling():
        if _COMPILED is not None and x.device.type == "cpu" and x.dtype == torch.float32 \
                and not torch.is_grad_enabled() \
                and x.numel() // max(1, x.shape[-1]) * weight.shape[0] * weight.shape[-1] >= COMPILED_MIN_MACS:
            return _COMPILED(x, weight, bias)
        return F.linear(x, weight, bias)
    if _LINEAR is not None and usable(x) and weight.dtype == x.dtype and not torch.is_grad_enabled():
        return _LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a bᵀ for matrices (rows · rows): a Gram GEMM, by oneDNN's linear (x Wᵀ with W = b) inside ``enabled(True)``,
    the plugin's backend trial (``on_faster_backend``) having found it faster for the model and shapes; MKL's
    otherwise. Which is faster depends on the CPU and the shapes (docs/algorithms.md)."""
    if torch.compiler.is_compiling():
        return linear(a, b) if a.dim() == 2 and b.dim() == 2 else a @ b.T  # (``ntk_bench::linear`` chooses)
    if getattr(_CHOSEN, "flag", None) is True and a.dim() == 2 and b.dim() == 2 and a.stride(-1) == 1 \
            and b.stride(-1) == 1:  # (rows in place: no copy of either side into oneDNN's layout)
        return linear(a, b)
    return a @ b.T


# A compiled GEMM this large (multiply-adds) calls oneDNN or MKL as the switch says when it runs; below it the
# call's own overhead (a Python function) would cost more than a choice of library can gain.
COMPILED_MIN_MACS = 1 << 20


def _compiled_linear():
    """``ntk_bench::linear``: ``linear`` as an operator that compiled code calls as it is (None where this torch
    has no oneDNN linear or no ``torch.library.custom_op``)."""
    if _LINEAR is None or not hasattr(torch.library, "custom_op"):
        return None
    existing = getattr(getattr(torch.ops, "ntk_bench", None), "linear", None)
    if existing is not None:  # (this module loaded a second time, under another name: one operator)
        return existing

    @torch.library.custom_op("ntk_bench::linear", mutates_args=())
    def compiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if getattr(_CHOSEN, "flag", None) is True and usable(x) and weight.dtype == x.dtype:
            return _LINEAR(x, weight, bias, "none", [], "")
        return F.linear(x, weight, bias)

    @compiled_linear.register_fake
    def _(x, weight, bias):
        return x.new_empty(x.shape[:-1] + (weight.shape[0],))

    return compiled_linear


_COMPILED = _compiled_linear()


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


def choice(store, model, key: tuple, run, prepare=None) -> bool:
    """Whether ``on_faster_backend`` runs ``model`` at ``key`` with oneDNN on: its cached answer, or a trial of
    ``run`` (``prepare()`` first, once, outside the timed calls); a fixed choice where one is set."""
    flag = getattr(_FIXED, "flag", None)
    if flag is not None:
        return flag

    def trial():
        if prepare is not None:
            prepare()
        return is_faster(run)

    return shape_keyed_cache(store, model, key, trial)


def on_faster_backend(store, model, key: tuple, run, prepare=None):
    """``run()`` with oneDNN on or off, whichever ran it faster on the first call for ``model`` and ``key``
    (``is_faster``, its answer cached in ``store`` per model, key and parameter shapes); ``prepare()`` first, once,
    outside the timed calls (a plan)."""
    outs = []
    use = choice(store, model, key, lambda: outs.append(run()), prepare)
    if outs and use:  # a slow call keeps oneDNN untried: its kernel is this call's
        return outs[-1]
    with enabled(use):
        return run()
