"""Kernels replayed from CUDA graphs: the caching is tested on the CPU with a stand-in capture that replays by
re-running the kernel on the static inputs; the real capture where a GPU is present."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ntk_bench import implementations
from ntk_bench.bench.measurement.problems import rel_err
from ntk_bench.implementations.core import cuda_graphs
from ntk_bench.implementations.core.cuda_graphs import CapturedKernel, CaptureFailed, GraphCache


class _Rerun:
    """A stand-in for torch.cuda.CUDAGraph: replay() runs the kernel again into the captured output."""

    def __init__(self, run, static, output):
        self.run, self.static, self.output = run, static, output

    def replay(self):
        self.output.copy_(self.run(*self.static))


def rerun_capture(run, inputs):
    static = [None if x is None else x.detach().clone() for x in inputs]
    for _ in range(cuda_graphs.WARMUP_CALLS):
        run(*static)
    output = run(*static)
    return CapturedKernel(_Rerun(run, static, output), static, output, pool_bytes=1000)


@pytest.fixture
def cpu_cache(monkeypatch):
    cache = GraphCache(capture=rerun_capture, devices=("cpu",))
    monkeypatch.setattr(cuda_graphs, "CACHE", cache)
    return cache


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2)).double()


def _inputs(model, n, seed):
    shape = (5,) if isinstance(model[0], nn.Linear) else (2, 4, 4)
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("mode", implementations.MODES)
@pytest.mark.parametrize("plugin_name, make", [("structured", _mlp), ("structured", _cnn), ("explicit_mlp", _mlp)])
def test_replays_equal_eager_kernels_for_new_inputs(cpu_cache, plugin_name, make, mode):
    model, plugin, jc = make(), implementations.get(plugin_name), implementations.get("jacobian_contraction")
    for seed, with_x2 in ((1, False), (2, False), (3, True), (4, True)):
        x1, x2 = _inputs(model, 4, seed), (_inputs(model, 3, seed + 10) if with_x2 else None)
        out = plugin.compute(model, x1, x2, mode=mode)
        assert cuda_graphs.last_replay_bytes is not None
        assert rel_err(out, jc.compute(model, x1, x2, mode=mode)) <= 1e-12
        out.fill_(float("nan"))  # the caller owns the result: the graph's output is not handed out
    assert cpu_cache.captures == 2  # one per (x1, x2) shape


def test_a_new_capture_for_new_shapes_modes_parameters_flags_and_train_mode(cpu_cache, monkeypatch):
    model, plugin = _mlp(), implementations.get("structured")
    x = _inputs(model, 4, 1)
    plugin.compute(model, x)
    plugin.compute(model, x)
    assert cpu_cache.captures == 1
    with torch.no_grad():  # in place: the graph reads the weights where they are, no new capture
        model[0].weight.mul_(2)
    assert rel_err(plugin.compute(model, x), plugin._kernel(model, x, None, "full")) <= 1e-12
    assert cpu_cache.captures == 1
    plugin.compute(model, x[:3])
    plugin.compute(model, x, mode="trace")
    assert cpu_cache.captures == 3
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())  # new storage: the old graph reads the old one
    assert rel_err(plugin.compute(model, x), plugin._kernel(model, x, None, "full")) <= 1e-12
    assert cpu_cache.captures == 4
    model.eval()
    plugin.compute(model, x)
    assert cpu_cache.captures == 5
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = not before
    try:
        plugin.compute(model, x)
    finally:
        torch.backends.cudnn.allow_tf32 = before
    assert cpu_cache.captures == 6


def test_inputs_that_require_grad_are_copied_in(cpu_cache):
    model, plugin = _mlp(), implementations.get("structured")
    x = _inputs(model, 4, 1)
    for _ in range(2):
        out = plugin.compute(model, x.clone().requires_grad_())
    assert cpu_cache.captures == 1 and not out.requires_grad
    assert rel_err(out, plugin._kernel(model, x, None, "full")) <= 1e-12


def test_cached_graphs_per_model_are_bounded(cpu_cache, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS_PER_MODEL", 2)
    model, plugin = _mlp(), implementations.get("structured")
    for n in (2, 3, 4, 2):
        plugin.compute(model, _inputs(model, n, 1))
    assert len(cpu_cache._graphs[model]) == 2 and cpu_cache.captures == 4
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS_PER_MODEL", 10)
    monkeypatch.setattr(cuda_graphs, "MAX_CACHED_BYTES_PER_MODEL", 2500)  # the stand-in's pools are 1000 bytes
    for n in (5, 6, 7):
        plugin.compute(model, _inputs(model, n, 1))
    assert len(cpu_cache._graphs[model]) == 2
    monkeypatch.setattr(cuda_graphs, "MAX_CACHED_BYTES_PER_MODEL", 0)  # the newest graph is kept all the same
    plugin.compute(model, _inputs(model, 8, 1))
    assert len(cpu_cache._graphs[model]) == 1 and cuda_graphs.last_replay_bytes is not None


def test_a_failed_capture_warns_once_and_runs_eagerly(monkeypatch):
    attempts = []

    def failing(run, inputs):
        attempts.append(1)
        run(*inputs)
        raise CaptureFailed("RuntimeError: operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "CACHE", GraphCache(capture=failing, devices=("cpu",)))
    model, plugin = _mlp(), implementations.get("structured")
    x = _inputs(model, 4, 1)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        out = plugin.compute(model, x)
    assert rel_err(out, plugin._kernel(model, x, None, "full")) <= 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plugin.compute(model, x)
    assert len(attempts) == 1 and cuda_graphs.last_replay_bytes is None


def test_errors_of_the_kernel_itself_propagate(cpu_cache, monkeypatch):
    """An error of the kernel itself (here structured declining at run time) raises from the capture's warm-up, as
    eagerly."""
    plugin = implementations.get("structured")

    def declines(model, x1, x2, mode):
        raise implementations.UnsupportedModelError("structured: declined at run time")

    monkeypatch.setattr(plugin, "_kernel", declines)
    model, x = _mlp(), _inputs(_mlp(), 4, 1)
    with pytest.raises(implementations.UnsupportedModelError, match="declined at run time"):
        plugin.compute(model, x)
    assert cpu_cache.captures == 1


def test_no_capture_when_off_large_or_not_capturable(cpu_cache, monkeypatch):
    model, x = _mlp(), _inputs(_mlp(), 4, 1)
    implementations.get("jacobian_contraction").compute(model, x)
    implementations.get("structured").compute(model, x, memory_budget_bytes=1 << 30)
    monkeypatch.setenv("NTK_BENCH_CUDA_GRAPHS", "0")
    implementations.get("structured").compute(model, x)
    monkeypatch.delenv("NTK_BENCH_CUDA_GRAPHS")
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPH_BYTES", 0)
    implementations.get("structured").compute(model, x)
    assert cpu_cache.captures == 0 and cuda_graphs.last_replay_bytes is None


def test_auto_replays_its_picks_graph(cpu_cache):
    model, x = _mlp(), _inputs(_mlp(), 4, 1)
    auto = implementations.get("auto")
    auto.compute(model, x)
    while auto.turns_left(model, x):  # (two close candidates are run in turn over auto's first calls)
        auto.compute(model, x)
    first = cpu_cache.captures  # one graph per capturable plugin it ran (two when it tried two)
    for _ in range(2):
        out = auto.compute(model, x)
    assert 1 <= first <= 2 and cpu_cache.captures == first and auto.last_choice[0] in ("structured", "explicit_mlp")
    assert rel_err(out, implementations.get("jacobian_contraction").compute(model, x)) <= 1e-12


# -- on a GPU: the real capture --------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@needs_cuda
@pytest.mark.parametrize("mode", implementations.MODES)
@pytest.mark.parametrize("plugin_name, make", [("structured", _mlp), ("structured", _cnn), ("explicit_mlp", _mlp)])
def test_cuda_graph_replays_equal_eager_kernels(plugin_name, make, mode, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "CACHE", GraphCache())
    model, plugin = make().cuda(), implementations.get(plugin_name)
    torch.empty(64 << 20, dtype=torch.uint8, device="cuda")  # freed at once: a block the allocator caches (capture frees it)
    for seed, with_x2 in ((1, False), (2, False), (3, True), (4, True)):
        x1 = _inputs(model, 4, seed).cuda()
        x2 = _inputs(model, 3, seed + 10).cuda() if with_x2 else None
        eager = plugin._kernel(model, x1, x2, mode)
        out = plugin.compute(model, x1, x2, mode=mode)
        assert rel_err(out, eager) <= 1e-12
        # the graph holds at least its input buffers and its output
        held = x1.numel() * x1.element_size() + out.numel() * out.element_size()
        assert cuda_graphs.last_replay_bytes is not None and cuda_graphs.last_replay_bytes >= held
    with torch.no_grad():
        model[0].weight.mul_(2)
    x1 = _inputs(model, 4, 1).cuda()
    assert rel_err(plugin.compute(model, x1, mode=mode), plugin._kernel(model, x1, None, mode)) <= 1e-12
    assert cuda_graphs.CACHE.captures == 2


@needs_cuda
def test_cuda_graph_capture_of_a_syncing_model_falls_back_to_eager(monkeypatch):
    class Syncs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) * (2.0 if float(x.sum()) > 0 else 1.0)  # a host sync: not capturable

    monkeypatch.setattr(cuda_graphs, "CACHE", GraphCache())
    model, x = Syncs().double().cuda(), torch.randn(4, 3, dtype=torch.float64, device="cuda")
    with pytest.warns(RuntimeWarning, match="capture failed"):
        out = implementations.get("structured").compute(model, x)
    # (the reference: the autograd loop, since vmap cannot run a forward that reads a tensor's value)
    assert rel_err(out, implementations.get("autograd_loop").compute(model, x)) <= 1e-12
    assert rel_err(implementations.get("structured").compute(model, x), out) <= 1e-12
