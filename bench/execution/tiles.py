"""The worker side of a dataset kernel: one task computes a row band of tiles (:func:`run_band`) and writes each
tile to the on-disk kernel as it finishes. Its inputs, model and plugin are built once per process from the
task's spec (factories a worker can import); a column block's factors are kept between the tiles of a band
within the memory budget. The driver (``kernel_matrix``) cuts the kernel into these tasks and hands them to an
executor, whose workers call :func:`run_band`, so this module imports neither of them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..store.kernel_store import KernelArray, KernelFileError, open_kernel

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# -- inputs ----------------------------------------------------------------------------------------------------


class Inputs:
    """A tensor, a numpy array or a ``torch.utils.data.Dataset`` (of inputs, or of (input, target) pairs), read
    by rows."""

    def __init__(self, data, what: str):
        self.what = what
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(data)
        if isinstance(data, torch.Tensor):
            if data.dim() < 1 or data.shape[0] == 0:
                raise ValueError(f"{what}: needs at least one sample, got a tensor of shape {tuple(data.shape)}")
            self._tensor, self._dataset = data, None
            self.n = data.shape[0]
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self._tensor, self._dataset = None, data
            self.n = len(data)
            if self.n == 0:
                raise ValueError(f"{what}: the dataset is empty")
        else:
            raise TypeError(f"{what}: expected a tensor, a numpy array or a Dataset, got {type(data).__name__}")

    def _item(self, k: int) -> torch.Tensor:
        item = self._dataset[k]
        if isinstance(item, (tuple, list)):  # (input, target): the input
            item = item[0]
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(item)
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"{self.what}: item {k} is a {type(item).__name__}, not a tensor or (tensor, target)")
        return item

    def rows(self, s: slice) -> torch.Tensor:
        if self._tensor is not None:
            return self._tensor[s]
        return torch.stack([self._item(k) for k in range(*s.indices(self.n))])

    def fingerprint(self, chunk: int = 4096) -> str:
        h = hashlib.sha1()
        for start in range(0, self.n, chunk):
            block = self.rows(slice(start, min(start + chunk, self.n))).contiguous()
            h.update(f"{block.dtype}{tuple(block.shape[1:])}".encode())
            h.update(block.reshape(-1).view(torch.uint8).numpy().tobytes())
        return f"{self.n}:{h.hexdigest()[:16]}"


def model_fingerprint(model: torch.nn.Module) -> str:
    """The model's structure (its repr) and every parameter's and buffer's name, dtype, shape and values."""
    h = hashlib.sha1(repr(model).encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def code_version() -> str:
    """ntk-bench's version and a digest of the plugins' code (what computes a tile)."""
    import importlib.util

    from ntk_bench.version import __version__

    digest = hashlib.sha1()
    root = Path(importlib.util.find_spec("ntk_bench.implementations").origin).resolve().parent
    for f in sorted(root.rglob("*.py")):
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


# -- the objects a task needs, built once per process -------------------------------------------------------------

_BUILT: dict = {}


def _resolve(ref_or_obj, what: str):
    if isinstance(ref_or_obj, str):
        from ..zoo.architectures import load_callable

        return load_callable(ref_or_obj)()
    return ref_or_obj


def _build(spec: dict):
    """(model, inputs1, inputs2 or None) for a task, from its factories, checked against the kernel's
    fingerprints (a factory that gives other weights in another process would make a kernel of two models)."""
    key = (spec["model"], spec["data"], spec.get("data2"), spec["dtype"], spec["device"])
    if key not in _BUILT:
        model = _resolve(spec["model"], "model")
        x1 = Inputs(_resolve(spec["data"], "data"), "data")
        x2 = Inputs(_resolve(spec["data2"], "data2"), "data2") if spec.get("data2") else None
        if model_fingerprint(model) != spec["model_fingerprint"]:
            raise KernelFileError(f"the model factory {spec['model']!r} gives other weights in this process than in "
                                  "the driver's: seed it (torch.manual_seed) so that every process builds the same")
        _BUILT.clear()
        _BUILT[key] = (_converted(model, spec["device"], DTYPES[spec["dtype"]]), x1, x2)
    return _BUILT[key]


def _converted(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """The model on ``device`` in ``dtype``: the caller's own object when it is so already, else a copy (a
    module's ``.to`` would change the caller's)."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    if all(t.device == torch.device(device) and (not t.is_floating_point() or t.dtype == dtype) for t in tensors):
        return model
    return copy.deepcopy(model).to(device=device, dtype=dtype)


@contextlib.contextmanager
def _onednn_choice(flag):
    from ntk_bench.implementations.core import onednn

    with onednn.fixed_choice(flag):
        yield


def _block(plugin, model, xa, xb, mode, device, dtype):
    def cast(x):
        x = x.to(device)
        return x.to(dtype) if x.is_floating_point() else x

    return plugin.compute(model, cast(xa), None if xb is None else cast(xb), mode=mode)


def _tile_kernel(plugin, model, xa, xb, mode, device, dtype, depth: int = 0) -> torch.Tensor:
    """One tile; out of memory, the tile again in halves (each half of its rows, recursively)."""
    try:
        return _block(plugin, model, xa, xb, mode, device, dtype)
    except (torch.OutOfMemoryError, MemoryError):
        if xa.shape[0] < 2 or depth > 8:
            raise
    h = xa.shape[0] // 2
    if xb is None:  # a diagonal tile: its four quarters, the lower one mirrored
        a, b = xa[:h], xa[h:]
        top = torch.cat([_tile_kernel(plugin, model, a, None, mode, device, dtype, depth + 1),
                         _tile_kernel(plugin, model, a, b, mode, device, dtype, depth + 1)], dim=1)
        br = _tile_kernel(plugin, model, b, None, mode, device, dtype, depth + 1)
        from ntk_bench.implementations.core.tiling import _mirror

        bottom = torch.cat([_mirror(top[:, h:], mode), br], dim=1)
        return torch.cat([top, bottom], dim=0)
    return torch.cat([_tile_kernel(plugin, model, xa[:h], xb, mode, device, dtype, depth + 1),
                      _tile_kernel(plugin, model, xa[h:], xb, mode, device, dtype, depth + 1)], dim=0)


class _FactorCache:
    """Column blocks' factors kept for the next row bands of this process, within a byte cap (oldest out).

    The cap is what the budget leaves beside a tile's own peak (``_cache_cap``); the column block in use stays
    counted among the kept ones, and room for the next block is made before it is recorded (``reserve``), so
    the kept blocks plus the tile's peak never exceed the budget, not even while a block is being recorded."""

    def __init__(self):
        self.key, self.blocks, self.bytes = None, {}, 0

    def get(self, key, j):
        if key != self.key:
            self.key, self.blocks, self.bytes = key, {}, 0
        return self.blocks.get(j)

    def clear(self) -> None:
        self.key, self.blocks, self.bytes = None, {}, 0

    def reserve(self, size: int, cap: int) -> None:
        """Drop the oldest blocks until ``size`` more bytes fit ``cap`` (all of them when they cannot)."""
        while self.blocks and self.bytes + size > cap:
            old = self.blocks.pop(next(iter(self.blocks)))
            self.bytes -= old.nbytes()

    def put(self, j, factors, cap: int) -> None:
        size = factors.nbytes()
        self.reserve(size, cap)
        if self.bytes + size <= cap:
            self.blocks[j] = factors
            self.bytes += size


def _cache_cap(spec: dict, fa) -> int:
    """The bytes column blocks may keep: the budget less the tile's peak, the plugin's estimate or, where that
    counts less, the two blocks' factors as recorded (``fa``: the row block's; a column block is as large), and
    less what this process holds beyond them since the kernel began (``_overhead``)."""
    tile = max(int(spec.get("tile_peak_bytes") or 0), 2 * fa.nbytes())
    return max(0, int(spec.get("memory_budget_bytes") or 0) - tile - _overhead(spec, fa))


_BASELINE: dict = {}


def _rss() -> int | None:
    """This process's resident bytes (Linux), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _overhead(spec: dict, fa) -> int:
    """Resident bytes of this process above its baseline that are neither the kept column blocks nor the row
    block ``fa``: the plan, the oneDNN choice's trial, the allocator's pools. The baseline is the caller's before
    the kernel began (``rss_baseline``, in the caller's process) or the worker's before its first band."""
    now = _rss()
    if now is None:
        return 0
    base = spec.get("rss_baseline") or _BASELINE.setdefault(spec["out"], now)
    return max(0, now - base - _CACHE.bytes - fa.nbytes())


_TRIM: list = []


def _release_freed_memory(device) -> None:
    """Hand the memory the allocator has freed back to the system. glibc keeps freed heap memory for reuse: after
    a block's factors are recorded, its forward's and backward's freed buffers (about half the block's bytes)
    stay resident, unseen by the kept blocks' cap; and a freed block's place is not always reused by the next."""
    if torch.device(device).type != "cpu":
        return
    if not _TRIM:
        try:
            import ctypes

            _TRIM.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):  # not glibc: nothing to trim
            _TRIM.append(None)
    if _TRIM[0] is not None:
        _TRIM[0](0)


_CACHE = _FactorCache()


def _cast(x, device, dtype):
    x = x.to(device)
    return x.to(dtype) if x.is_floating_point() else x


def compute_band(kernel: KernelArray, plugin, model, x1: Inputs, x2, i: int, cols, spec: dict, on_tile=None) -> dict:
    """The tiles (I, J) for J in ``cols`` not done yet, written as each finishes.

    A plugin with ``factors``/``contract`` (``structured``) records row block I once and each column block once per
    process (kept within what the memory budget leaves beside a tile's peak, ``_cache_cap``), so the per-sample
    work grows linearly in N and only the contraction quadratically; other plugins compute each tile whole.
    Returns seconds per phase."""
    from ntk_bench.implementations.core import engine, onednn
    from ntk_bench.implementations.core.base import UnsupportedModelError

    dtype, device, mode = DTYPES[spec["dtype"]], spec["device"], spec["mode"]
    if not spec.get("rss_baseline") and _rss() is not None:  # a worker: its budget counts from its first band
        _BASELINE.setdefault(spec["out"], _rss())
    # Each tile's record carries the seconds (and this process's CPU seconds) since the band's previous tile was
    # written, the row's factors counted with the band's first tile: the work a kill loses is then readable.
    since, since_cpu = time.perf_counter(), time.process_time()
    si = kernel.tile_slices(i, 0)[0]
    xa = _cast(x1.rows(si), device, dtype)
    phases = {"factors_s": 0.0, "contract_s": 0.0, "whole_tiles_s": 0.0, "tiles": 0}
    todo = [j for j in cols if not kernel.done(i, j)]
    if not todo:
        return phases
    flag = spec.get("onednn")
    use_factors = hasattr(plugin, "factors") and spec.get("reuse", True)
    store = _store(kernel, plugin, spec) if use_factors else None
    phases.update(blocks_recorded=0, blocks_read=0)
    fa = call = None
    with _onednn_choice(flag):
        if use_factors:
            try:
                call = engine.validated(plugin, model, xa, None, mode)
                # a block kept by this process as a column (x2 = None: X1's blocks are the columns too), or on disk
                fa = _CACHE.get(_cache_key(spec), i) if kernel.symmetric else None
                fa = fa or _read_back(plugin, store, "x1", i, call, phases)
                if fa is None:
                    t0, c0 = time.perf_counter(), time.process_time()
                    with engine.running(model), \
                            (onednn.enabled(flag) if flag is not None else contextlib.nullcontext()):
                        fa = plugin.factors(call.net, call.x1)
                    _release_freed_memory(device)
                    _add(phases, "factors_s", t0, c0)
                    phases["blocks_recorded"] += 1
                    _write(plugin, store, "x1", i, fa, phases)
            except (UnsupportedModelError, torch.OutOfMemoryError, MemoryError, _stale()):
                fa = None
        cap = 0 if fa is None else _cache_cap(spec, fa)
        for j in todo:
            sj = kernel.tile_slices(i, j)[1]
            same = kernel.symmetric and i == j
            xb = None if same else _cast((x2 or x1).rows(sj), device, dtype)
            block = None
            if fa is not None:
                try:
                    block = _contracted(plugin, model, call, fa, xb, j, mode, flag, spec, phases, cap, store)
                except (UnsupportedModelError, torch.OutOfMemoryError, MemoryError, _stale()):
                    block = None
            if block is None:
                t0, c0 = time.perf_counter(), time.process_time()
                block = _tile_kernel(plugin, model, xa, xb, mode, device, dtype)
                _add(phases, "whole_tiles_s", t0, c0)
            now, cpu = time.perf_counter(), time.process_time()
            kernel.write_tile(i, j, block.detach().cpu().numpy(),
                              info={"seconds": round(now - since, 4), "cpu_s": round(cpu - since_cpu, 4),
                                    "process_cpu_s": round(cpu, 4), "pid": os.getpid(), "at": time.time()})
            since, since_cpu = now, cpu
            phases["tiles"] += 1
            if on_tile is not None:
                on_tile()
    if store is not None and not spec.get("keep_factors"):
        t0, c0 = time.perf_counter(), time.process_time()
        store.prune(kernel)
        _add(phases, "disk_s", t0, c0)
    return phases


def _store(kernel: KernelArray, plugin, spec: dict):
    """The kernel's on-disk factors (``factor_store``), or None where they are off or the plugin cannot keep
    its factors."""
    from .factor_store import FactorStore, factors_key

    budget = spec.get("factors_disk_bytes")
    if not budget or not hasattr(plugin, "factors_state"):
        return None
    store = FactorStore(kernel.path, factors_key(kernel.attrs), budget, spec["device"])
    if kernel.symmetric:
        store.col_side = "x1"
    return store


def _cache_key(spec: dict):
    return (spec["out"], spec.get("model_fingerprint"))


def _read_back(plugin, store, side: str, j: int, call, phases: dict):
    """Block ``j``'s factors read back from the disk, or None (none kept, or kept under another plan)."""
    if store is None:
        return None
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        state = store.load(side, j)
        f = None if state is None else plugin.factors_from_state(call.net, call.x1, state)
    except _stale():
        f = None
    _add(phases, "disk_s", t0, c0)
    if f is not None:
        phases["blocks_read"] += 1
    return f


def _write(plugin, store, side: str, j: int, f, phases: dict) -> None:
    if store is None:
        return
    t0, c0 = time.perf_counter(), time.process_time()
    nbytes = f.nbytes()  # (structured's walks the rules' objects: once)
    if store.save(side, j, plugin.factors_state(f), nbytes):
        phases["blocks_written"] = phases.get("blocks_written", 0) + 1
    elif store.no_room_for(nbytes):  # (a later band that needs it records it again)
        phases["blocks_not_kept"] = phases.get("blocks_not_kept", 0) + 1
    _add(phases, "disk_s", t0, c0)


def _add(phases: dict, name: str, t0: float, c0: float) -> None:
    """Seconds since ``t0`` to phase ``name`` and this process's CPU seconds since ``c0`` to its ``_cpu_s`` twin
    (on a shared machine the CPU seconds are the comparable ones)."""
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
    cpu = name[:-2] + "_cpu_s"
    phases[cpu] = phases.get(cpu, 0.0) + time.process_time() - c0


def _stale():
    from ntk_bench.implementations.core.base import StaleFactors

    return StaleFactors


def _contracted(plugin, model, call, fa, xb, j, mode, flag, spec, phases, cap: int, store=None):
    import dataclasses as dc

    from ntk_bench.implementations.core import engine, onednn

    toggle = onednn.enabled(flag) if flag is not None else contextlib.nullcontext()
    fb, xb_call = None, None
    if xb is not None:
        fb = _CACHE.get(_cache_key(spec), j)
        if fb is None:
            # room for the block about to be recorded (as large per sample as the row block), before it exists
            _CACHE.reserve(-(-fa.nbytes() * xb.shape[0] // max(1, fa.n)), cap)
            xb_call = engine.validated(plugin, model, xb, None, mode)
            side = None if store is None else store.col_side
            fb = _read_back(plugin, store, side, j, xb_call, phases)
            if fb is None:
                t0, c0 = time.perf_counter(), time.process_time()
                with engine.running(model), toggle:
                    fb = plugin.factors(xb_call.net, xb_call.x1)
                _release_freed_memory(spec["device"])
                _add(phases, "factors_s", t0, c0)
                phases["blocks_recorded"] += 1
                _write(plugin, store, side, j, fb, phases)
            _CACHE.put(j, fb, cap)
    t0, c0 = time.perf_counter(), time.process_time()
    with engine.running(model), (onednn.enabled(flag) if flag is not None else contextlib.nullcontext()):
        k = plugin.contract(fa, fb, mode)
    k = engine.checked(plugin, k, dc.replace(call, x2=None if xb is None else xb.detach()), mode)
    _add(phases, "contract_s", t0, c0)
    return k


def run_band(spec: dict) -> dict:
    """A task: the missing tiles of row block ``spec["row"]`` among ``spec["cols"]``, written to the kernel at
    ``spec["out"]``. Returns a row: status, tiles written, seconds per phase."""
    from ntk_bench import implementations

    t0 = time.perf_counter()
    model, x1, x2 = _build(spec)
    kernel = open_kernel(spec["out"], writable=True)
    plugin = implementations.get(spec["plugin"])
    phases = compute_band(kernel, plugin, model, x1, x2, spec["row"], spec["cols"], spec)
    return {"status": "ok", "phases": phases, "wall_s": time.perf_counter() - t0}
