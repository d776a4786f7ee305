"""A plugin's kernel replayed from a captured CUDA graph, where the call is bound by kernel launches.

On a GPU a small kernel is bound by the host: the device idles while the host issues the call's tens of
operators (and autograd's backward) one by one. A CUDA graph records them once and replays them with one launch
(eager against replayed calls: ``results/2026-11-23-gpu/graph_check.txt``).

``NTKPlugin.compute`` routes a call here when the plugin sets ``capturable = True`` (its ``_kernel`` has no
host syncs and no data-dependent shapes), the inputs are on a GPU, no memory budget is given and the plugin's
estimated peak is at most ``MAX_GRAPH_BYTES``. The first call for a model (its parameters' storage, train/eval
flags), input shapes, dtype, mode and math flags (TF32) runs the kernel eagerly twice on a side stream and
captures a third run; later calls copy the inputs into the graph's static buffers, replay it and return a copy
of its output (the next replay overwrites it). The graph's memory pool holds the kernel's intermediates for as
long as the graph is cached (at most ``MAX_GRAPHS_PER_MODEL`` per model and ``MAX_CACHED_BYTES_PER_MODEL`` of
pools, least recently used dropped); ``last_replay_bytes`` says how much, for the runner's peak memory. A
capture that fails (a model whose forward syncs with the host, say) is remembered, warned about once, and those
calls run eagerly. ``NTK_BENCH_CUDA_GRAPHS=0`` turns replay off.

Costs: the first call is about three eager calls plus the capture; each later call one input copy, one
launch and one output copy (N·M·O² numbers in full mode).
"""

from __future__ import annotations

import collections
import warnings
import weakref
from typing import Callable

import torch

from ntk_bench.envvars import env

from .module_walks import submodules

MAX_GRAPH_BYTES = 2 << 30  # a kernel whose estimated peak is larger runs eagerly
MAX_GRAPHS_PER_MODEL = 4
MAX_CACHED_BYTES_PER_MODEL = 4 << 30  # the pools of a model's cached graphs together (the newest is always kept)
WARMUP_CALLS = 2

# Bytes held by the graph the most recent call replayed (its pool and static buffers); None after an eager call.
last_replay_bytes: int | None = None


class CaptureFailed(RuntimeError):
    """The kernel ran eagerly but could not be captured."""


class CapturedKernel:
    """A captured graph, its static input buffers and its output; ``held_bytes``: the pool and the input buffers
    (the output is in the pool)."""

    def __init__(self, graph, inputs: list, output: torch.Tensor, pool_bytes: int):
        self.graph, self.inputs, self.output, self.pool_bytes = graph, inputs, output, pool_bytes
        self.held_bytes = pool_bytes + sum(t.numel() * t.element_size() for t in inputs if t is not None)

    @torch.no_grad()
    def __call__(self, *inputs) -> torch.Tensor:
        """Copy ``inputs`` into the static buffers, replay the graph and return a copy of its output (the next replay
        overwrites the graph's own)."""
        for static, x in zip(self.inputs, inputs):
            if static is not None:
                static.copy_(x)
        self.graph.replay()
        return self.output.clone()


def capture_cuda(run: Callable, inputs: list) -> CapturedKernel:
    """Warm ``run`` up on a side stream (lazy initialisation, cuDNN's algorithm search), then capture it.

    Errors of the warm-up calls propagate as they would eagerly; a failed capture raises :class:`CaptureFailed`.
    """
    device = next(x for x in inputs if x is not None).device
    with torch.cuda.device(device):
        static = [None if x is None else x.detach().clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                run(*static)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        # torch.cuda.graph empties the allocator's cache on entry: do it first, so that the growth of reserved
        # memory is the graph's pool and not less by the cached blocks of earlier work
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = run(*static)
            torch.cuda.synchronize()
        except Exception as exc:
            raise CaptureFailed(f"{type(exc).__name__}: {exc}") from exc
        pool_bytes = max(0, torch.cuda.memory_reserved() - reserved)
    return CapturedKernel(graph, static, output, pool_bytes)


def _math_flags() -> tuple:
    """Global flags that change which GPU kernels a capture records."""
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision(),
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction, torch.backends.cudnn.deterministic)


def graph_key(model: torch.nn.Module, x1: torch.Tensor, x2, mode: str) -> tuple:
    """What a capture depends on: the storage of the parameters and buffers it reads, the modules' train/eval
    flags, the inputs' shapes, dtype and device, the mode and the math flags (the weights' values do not matter:
    the graph reads them where they are)."""
    modules = submodules(model)
    tensors = tuple((t.data_ptr(), t.shape, t.dtype, t.requires_grad) for m in modules
                    for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)
    return (tensors, tuple(m.training for m in modules), tuple(x1.shape), x1.dtype, x1.device,
            None if x2 is None else tuple(x2.shape), mode, _math_flags())


class GraphCache:
    """Captured kernels per model (weakly held) and :func:`graph_key`.

    ``capture`` and ``devices`` are parameters so that the caching can be tested without a GPU.
    """

    def __init__(self, capture: Callable = capture_cuda, devices: tuple = ("cuda",)):
        self.capture, self.devices = capture, devices
        self._graphs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self.captures = 0

    def applies(self, plugin, x1) -> bool:
        """Whether a call may replay a graph at all: a capturable plugin, inputs on one of ``devices``, and
        ``NTKBENCH_CUDA_GRAPHS`` not 0."""
        return (getattr(plugin, "capturable", False) and x1.device.type in self.devices
                and env("CUDA_GRAPHS", "1") != "0")

    @staticmethod
    def small_enough(plugin, model, x1, x2, mode) -> bool:
        from .costs import cost_stats

        n, m = x1.shape[0], (x1 if x2 is None else x2).shape[0]
        return plugin.estimate(cost_stats(model, x1[:1]), n, m, mode, x2 is None).bytes <= MAX_GRAPH_BYTES

    def kernel(self, plugin, model, x1, x2, mode) -> torch.Tensor | None:
        """The kernel from a replayed graph, capturing it first if new; None where it is to run eagerly."""
        global last_replay_bytes
        last_replay_bytes = None
        if not self.applies(plugin, x1):
            return None
        graphs = self._graphs.setdefault(model, collections.OrderedDict())
        key = (plugin.name, graph_key(model, x1, x2, mode))
        if key not in graphs:
            small = self.small_enough(plugin, model, x1, x2, mode)
            graphs[key] = self._capture(plugin, model, x1, x2, mode) if small else None
            while len(graphs) > MAX_GRAPHS_PER_MODEL or (
                    len(graphs) > 1 and sum(g.pool_bytes for g in graphs.values() if g) > MAX_CACHED_BYTES_PER_MODEL):
                graphs.popitem(last=False)
        graphs.move_to_end(key)
        captured = graphs[key]
        if captured is None:
            return None
        last_replay_bytes = captured.held_bytes
        return captured(x1, x2)

    def _capture(self, plugin, model, x1, x2, mode) -> CapturedKernel | None:
        def run(a, b):
            return plugin._kernel(model, a, b, mode)

        self.captures += 1
        try:
            return self.capture(run, [x1, x2])
        except CaptureFailed as exc:
            warnings.warn(f"{plugin.name}: CUDA graph capture failed ({exc}); running this kernel eagerly",
                          RuntimeWarning, stacklevel=4)
            return None


CACHE = GraphCache()
