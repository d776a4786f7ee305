"""The kernel of a dataset: an N x M empirical NTK cut into tiles, computed as tasks, kept on disk, resumable.

    K = kernel_matrix(model, X1, mode="trace", out="K.zarr")     # X1: tensor, array or Dataset
    K[:10, :10]                                                    # numpy reads; open_kernel("K.zarr") later

The kernel is cut into square tiles sized from the memory budget and the plugin's cost model (``tiling``'s
tile rule); x2 = None stores the upper triangle only (``kernel_store`` mirrors it on read). A task is one row
band: the tiles (I, J) of row block I that are missing. Tasks run in this process (``executor=None``) or on the
runner's executors (local workers pinned to cores, one per GPU, Ray, SLURM via submitit), which need the model
and the inputs as factories (``"file.py:function"``) a worker can import. Each finished tile is written to its
own chunk and recorded (``kernel_store``), so a killed run resumes with the missing tiles only, and the result
equals an uninterrupted run's bit for bit on the CPU: every tile runs the same plugin with the same oneDNN choice
(made once, recorded), on the same tile shapes. A tile that runs out of memory is computed again in halves.

Before the kernel is returned, a sample of tiles (the first diagonal tile and ``verify`` others) is recomputed
in float64 on up to ``verify_samples`` x ``verify_samples`` of their entries, against neural-tangents where it
is installed and takes the model, else the harness's float64 Jacobian contraction; the agreement is stored in the
kernel's attributes and a mismatch is an error (:class:`KernelVerificationError`).

An ``out`` that exists is resumed only if it was made from the same model (structure and weights), inputs,
mode, dtype, plugin and code version; otherwise :class:`KernelFileError` lists what differs.
"""

from __future__ import annotations

import copy
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ntk_bench.implementations.core.tolerances import tolerance

from ..store.kernel_store import KernelArray, KernelFileError, create, kernel_shape, open_kernel
from .factor_store import FactorStore, default_disk_budget
from .tiles import (
    _CACHE,
    DTYPES,
    Inputs,
    _block,
    _cast,
    _converted,
    _resolve,
    _rss,
    code_version,
    compute_band,
    model_fingerprint,
    run_band,
)

MAX_TILE = 1024  # a tile is a checkpoint: a kill loses at most the tiles in flight
_ATTRS_CHECKED = ("n", "m", "o", "mode", "dtype", "symmetric", "plugin", "model_fingerprint", "inputs_fingerprint",
                  "inputs2_fingerprint", "code_version", "tile")


class KernelVerificationError(RuntimeError):
    """A verified tile disagrees with the float64 reference."""


# -- the driver -------------------------------------------------------------------------------------------------


def _pick(impl, model, x1: Inputs, x2: Inputs | None, mode, device, dtype, budget):
    """The plugins to try, in order: ``impl``, or auto's ranking on a block of the kernel's first tile."""
    from ntk_bench import implementations

    if impl != "auto":
        return [implementations.get(impl)]
    auto = implementations.get("auto")
    k = min(x1.n, 256)
    xa = x1.rows(slice(0, k)).to(device)
    xa = xa.to(dtype) if xa.is_floating_point() else xa
    xb = None
    if x2 is not None:
        xb = x2.rows(slice(0, min(x2.n, 256))).to(device)
        xb = xb.to(dtype) if xb.is_floating_point() else xb
    return [p for p, *_ in auto.rank(model, xa, xb, mode, budget)]


def _tile_peak(plugin, model, x1: Inputs, x2: Inputs | None, mode, device, dtype, b: int, budget) -> int:
    """The plugin's estimated peak bytes of one off-diagonal b x b tile (both blocks' factors and their
    contraction); 0 where it has no estimate."""
    from ntk_bench.implementations.core.base import UnsupportedModelError
    from ntk_bench.implementations.core.costs import cost_stats

    if not hasattr(plugin, "factors"):  # (no factors kept across tiles: nothing to leave room for)
        return 0
    x = x1.rows(slice(0, 1)).to(device)
    x = x.to(dtype) if x.is_floating_point() else x
    try:
        return int(plugin.with_budget(budget).estimate(cost_stats(model, x), b, b, mode, False).bytes)
    except (NotImplementedError, AttributeError, UnsupportedModelError):
        return 0


def _tile_edge(plugin, model, x1: Inputs, x2: Inputs | None, mode, device, dtype, budget) -> int:
    from ntk_bench.implementations.core.costs import cost_stats
    from ntk_bench.implementations.core.tiling import tile_size

    x = x1.rows(slice(0, 1)).to(device)
    x = x.to(dtype) if x.is_floating_point() else x
    stats = cost_stats(model, x)
    n, m = x1.n, (x2 or x1).n
    b = tile_size(plugin.with_budget(budget), stats, n, m, mode, budget, False)
    return max(1, min(b, MAX_TILE, max(n, m)))


def _choose_onednn(plugin, model, x1: Inputs, x2, mode, device, dtype, b):
    """oneDNN on or off for every tile (made once so that every tile, in any process, runs the same kernels):
    the faster on the first tile, as ``onednn.is_faster`` decides; None where oneDNN does not apply."""
    from ntk_bench.implementations.core import onednn

    xa = x1.rows(slice(0, min(b, x1.n, 32))).to(device)  # (a trial on a whole large tile would cost minutes)
    if not xa.is_floating_point():
        probe = next((p for p in model.parameters()), None)
        if probe is None or probe.dtype != torch.float32 or probe.device.type != "cpu":
            return None
    elif dtype != torch.float32 or not onednn.usable(xa.to(dtype)):
        return None
    if not torch.backends.mkldnn.is_available() or not torch._C._get_mkldnn_enabled():
        return None

    def run():
        # (is_faster switches oneDNN on and off; the plugin's own per-model choice follows that switch)
        with onednn.fixed_choice(torch._C._get_mkldnn_enabled()):
            _block(plugin, model, xa, None, mode, device, dtype)

    return onednn.is_faster(run)


def _predicted_s(plugin, model, x1: Inputs, x2, mode, device, dtype, budget) -> float | None:
    """The cost model's seconds for the whole kernel (auto's constants for this plugin), kept beside the measured
    time; None where it cannot say."""
    from ntk_bench import implementations
    from ntk_bench.implementations.core.costs import cost_stats

    try:
        x = _cast(x1.rows(slice(0, 1)), device, dtype)
        stats = cost_stats(model, x)
        auto = implementations.get("auto")
        seconds, _ = auto.predict(plugin, stats, x1.n, (x2 or x1).n, mode, x2 is None,
                                  "cuda" if torch.device(device).type == "cuda" else "cpu", budget)
        return float(seconds)
    except Exception:  # a prediction is a note beside the kernel, never a reason to fail it
        return None


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} in the file, {new.get(k)!r} now" for k in _ATTRS_CHECKED
            if k in new and old.get(k) != new.get(k)]


def _print_progress(done: int, total: int, started: float, first_done: int, stream=None):
    stream = stream or sys.stderr
    elapsed = time.perf_counter() - started
    rate = (done - first_done) / elapsed if elapsed > 0 and done > first_done else None
    eta = (total - done) / rate if rate else None
    from ntk_bench.durations import fmt_duration

    stream.write(f"[{done:>{len(str(total))}}/{total} tiles] {fmt_duration(elapsed)} elapsed"
                 f"{'' if eta is None else f', ETA {fmt_duration(eta)}'}\n")
    stream.flush()


def kernel_matrix(model, X1, X2=None, mode: str = "trace", out=None, impl: str = "auto", tile: int | None = None,
                  executor=None, memory_budget_bytes: int | None = None, dtype: str | torch.dtype = "float32",
                  device: str = "cpu", verify: int = 3, verify_samples: int = 8, workers: int = 1,
                  devices: list[str] | None = None,
                  timeout_s: float | None = None, retries: int = 2, progress: bool = True,
                  reuse: bool = True, factors_disk_bytes: int | None = None,
                  keep_factors: bool = False) -> KernelArray:
    """Θ(X1, X2) of ``model`` over whole datasets, on disk at ``out``; see the module docstring.

    ``model``: a module, or a factory ``"file.py:function"`` (needed with an executor). ``X1``/``X2``: tensors,
    numpy arrays, Datasets (inputs, or (input, target) pairs), or factories ``"file.py:function"`` returning one.
    ``executor``: None (this process), or ``"local"`` (``workers`` pinned worker processes), ``"ray"``, ``"slurm"``,
    ``"submitit-local"``, ``"inline"``, or an :class:`~ntk_bench.bench.execution.executors.Executor`; ``devices``
    (``["cuda:0", "cuda:1"]``) gives the local executor one worker per GPU (then give ``device="cuda"``). ``reuse=False``
    computes every tile whole (no factors kept across tiles). ``factors_disk_bytes``: the disk a plugin's per-block
    factors may take beside the kernel (``OUT/factors/``, read back by a resumed run, by other workers and by later
    bands instead of recording them again; default a quarter of the free space, 0: none kept on disk); they are
    deleted once the kernel is complete unless ``keep_factors``. Returns the kernel (:class:`KernelArray`, numpy
    indexing).
    """
    from ntk_bench import implementations
    from ntk_bench.implementations.core.base import MODES, UnsupportedModelError
    from ntk_bench.implementations.plugins.auto import default_memory_budget

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if out is None:
        raise ValueError("out: the path of the kernel on disk (a directory, e.g. 'K.zarr') is required")
    dtype_name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tdtype = DTYPES[dtype_name]
    if executor is not None and not (isinstance(model, str) and isinstance(X1, str) and
                                     (X2 is None or isinstance(X2, str))):
        raise ValueError("executor: workers build the model and the inputs themselves; give them as factories "
                         "('file.py:function'), not objects")
    if tile is not None and (int(tile) != tile or tile < 1):
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    if factors_disk_bytes is not None and (int(factors_disk_bytes) != factors_disk_bytes or factors_disk_bytes < 0):
        raise ValueError(f"factors_disk_bytes must be a number of bytes >= 0, got {factors_disk_bytes!r}")
    rss_baseline = _rss()  # (in this process, the budget counts from here: the plan and the trials included)
    given = _resolve(model, "model")
    if not isinstance(given, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (or a factory returning one), got {type(given).__name__}")
    fingerprint = model_fingerprint(given)
    model_obj = _converted(given, device, tdtype)
    x1 = Inputs(_resolve(X1, "X1"), "X1")
    x2 = None if X2 is None else Inputs(_resolve(X2, "X2"), "X2")
    budget = memory_budget_bytes or default_memory_budget(torch.device(device)) // max(1, workers)
    out = Path(out)

    probe = x1.rows(slice(0, 1)).to(device)
    with torch.no_grad():
        o = model_obj(probe.to(tdtype) if probe.is_floating_point() else probe).reshape(1, -1).shape[1]
    attrs = {"n": x1.n, "m": (x2 or x1).n, "o": o, "mode": mode, "dtype": dtype_name, "symmetric": x2 is None,
             "model_fingerprint": fingerprint, "inputs_fingerprint": x1.fingerprint(),
             "inputs2_fingerprint": None if x2 is None else x2.fingerprint(), "code_version": code_version(),
             "model": model if isinstance(model, str) else type(model).__name__,
             "data": X1 if isinstance(X1, str) else type(X1).__name__,
             "data2": X2 if isinstance(X2, str) or X2 is None else type(X2).__name__, "device": device}

    existing = None
    if out.exists() or out.is_symlink():
        try:
            existing = open_kernel(out, writable=True)
        except KernelFileError:
            if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
                existing = None
            else:
                raise
    if existing is not None:
        wanted = dict(attrs, **({"tile": int(tile)} if tile else {}))
        if impl != "auto":
            wanted["plugin"] = impl
        diff = _differences(existing.attrs, wanted)
        if diff:
            raise KernelFileError(f"{out} holds another kernel; not resumed:\n  " + "\n  ".join(diff))
        kernel = existing
        plugin = implementations.get(kernel.attrs["plugin"])
        onednn_flag = kernel.attrs.get("onednn")
    else:
        kernel = plugin = onednn_flag = None
        reasons = {}
        for candidate in _pick(impl, model_obj, x1, x2, mode, device, tdtype, budget):
            why = candidate.supports(model_obj)
            if why is not None:
                reasons[candidate.name] = why
                continue
            b = int(tile) if tile else _tile_edge(candidate, model_obj, x1, x2, mode, device, tdtype, budget)
            try:
                onednn_flag = _choose_onednn(candidate, model_obj, x1, x2, mode, device, tdtype, b)
            except UnsupportedModelError as exc:
                reasons[candidate.name] = str(exc)
                continue
            plugin = candidate
            break
        if plugin is None:
            raise UnsupportedModelError("kernel_matrix: no plugin computes this model: " +
                                        "; ".join(f"{k}: {v}" for k, v in reasons.items()))
        shape = kernel_shape(attrs["n"], attrs["m"], o, mode)
        kernel = create(out, shape, b, dtype_name, {**attrs, "plugin": plugin.name, "onednn": onednn_flag,
                                                    "impl_asked": impl, "memory_budget_bytes": budget,
                                                    "predicted_s": _predicted_s(plugin, model_obj, x1, x2, mode,
                                                                                device, tdtype, budget)})

    spec = {"out": str(out.resolve()), "model": model, "data": X1, "data2": X2, "dtype": dtype_name,
            "device": device, "mode": mode, "plugin": plugin.name, "onednn": onednn_flag,
            "model_fingerprint": attrs["model_fingerprint"], "memory_budget_bytes": budget, "reuse": reuse,
            "factors_disk_bytes": default_disk_budget(out) if factors_disk_bytes is None else int(factors_disk_bytes),
            "rss_baseline": rss_baseline if executor is None else None, "keep_factors": keep_factors,
            "tile_peak_bytes": _tile_peak(plugin, model_obj, x1, x2, mode, device, tdtype, kernel.tile, budget)}
    rows, cols = kernel.grid
    total = len(kernel.tiles())
    started, first_done = time.perf_counter(), total - len(kernel.missing())
    t_tiles = time.perf_counter()
    phases: dict = {}
    if executor is None:
        def on_tile():
            if progress:
                _print_progress(total - len(kernel.missing()), total, started, first_done)

        try:
            for i in range(rows):
                band = [j for j in range(i if kernel.symmetric else 0, cols) if not kernel.done(i, j)]
                if band:
                    _add_phases(phases, compute_band(kernel, plugin, model_obj, x1, x2, i, band, spec, on_tile))
        finally:
            _CACHE.clear()  # the caller's process: the kept factors go with the call, not after it
    else:
        phases = _run_on_executor(executor, spec, kernel, workers, devices, timeout_s, retries, progress, started,
                                  first_done, total)
    tiles_s = time.perf_counter() - t_tiles
    kernel = open_kernel(out, writable=True)
    if not kernel.complete:
        raise RuntimeError(f"{out}: {len(kernel.missing())} tiles could not be computed; resume to try them again")
    timings = dict(kernel.attrs.get("timings") or {})
    if first_done < total:
        timings.setdefault("runs", []).append({"tiles": total - first_done, "seconds": round(tiles_s, 3),
                                               "workers": workers if executor is not None else 1,
                                               **{k: round(v, 4) for k, v in phases.items()}})
    kernel.update_attrs(timings=timings)
    if phases.get("blocks_not_kept"):
        warnings.warn(f"{out}: {int(phases['blocks_not_kept'])} blocks' factors did not fit the factors' disk budget "
                      f"({spec['factors_disk_bytes'] / 1e9:.3g} GB) and were recorded again where a later band "
                      "needed them; factors_disk_bytes (ntk-bench kernel --factors-disk GIB) raises it",
                      stacklevel=2)
    if not keep_factors:
        FactorStore(out, "", 0).remove_all()
    if verify is not None and verify >= 0 and not kernel.attrs.get("verification"):
        _verify(kernel, model_obj, x1, x2, mode, device, verify, verify_samples)
    return open_kernel(out)


def _add_phases(total: dict, phases: dict) -> None:
    for k, v in phases.items():
        total[k] = total.get(k, 0) + v


def _run_on_executor(executor, spec, kernel, workers, devices, timeout_s, retries, progress, started, first_done,
                     total):
    import concurrent.futures

    from .executors import Executor, Job, make_executor

    owned = not isinstance(executor, Executor)
    logs = Path(spec["out"]) / "logs"
    logs.mkdir(exist_ok=True)
    options = {"workers": workers, "devices": devices} if executor == "local" else {}
    ex = make_executor(executor, logs, **options) if owned else executor
    rows, cols = kernel.grid
    failures: dict[int, list[str]] = {}
    phases: dict = {}
    try:
        for attempt in range(1 + retries):
            futures = {}
            for i in range(rows):
                band = [j for j in range(i if kernel.symmetric else 0, cols) if not kernel.done(i, j)]
                if band:
                    payload = {**spec, "row": i, "cols": band, "id": f"tile-band/{i}"}
                    futures[ex.submit(Job("tile", payload, timeout_s or 7 * 24 * 3600.0))] = i
            if not futures:
                break
            for fut in concurrent.futures.as_completed(futures):
                row = fut.result()
                _add_phases(phases, row.get("phases") or {})
                if row.get("status") != "ok":
                    failures.setdefault(futures[fut], []).append(f"{row.get('status')}: {row.get('error')}")
                if progress:
                    _print_progress(total - len(kernel.missing()), total, started, first_done)
    finally:
        if owned:
            ex.close()
    if kernel.missing() and failures:
        raise RuntimeError("kernel_matrix: tiles failed after retries: " +
                           "; ".join(f"row block {i}: {errs[-1]}" for i, errs in sorted(failures.items())))
    return phases


def _reference(model64, xa, xb, mode) -> tuple[torch.Tensor, str]:
    """The float64 kernel by neural-tangents where it takes the model, else the harness's Jacobian contraction."""
    from ntk_bench import implementations, reference

    if reference.available() is None:
        try:
            return reference.ntk(model64, xa, xb, mode=mode), "neural-tangents"
        except Exception as exc:  # a model the translator cannot take: the harness's reference, and why
            note = f"harness (neural-tangents: {type(exc).__name__}: {str(exc)[:200]})"
            return implementations.get("jacobian_contraction").compute(model64, xa, xb, mode=mode), note
    return implementations.get("jacobian_contraction").compute(model64, xa, xb, mode=mode), "harness"


def _verify(kernel: KernelArray, model, x1: Inputs, x2, mode, device, verify: int, samples: int) -> None:
    """Recompute a sample of tiles in float64 and store the agreement; a mismatch is an error."""
    tiles = kernel.tiles()
    rng = random.Random(kernel.attrs["inputs_fingerprint"])
    chosen = [(0, 0)] + rng.sample([t for t in tiles if t != (0, 0)], min(verify, len(tiles) - 1))
    model64 = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    tol = tolerance(kernel.attrs["dtype"])
    results, worst = [], 0.0
    for i, j in chosen:
        si, sj = kernel.tile_slices(i, j)
        r = sorted(rng.sample(range(si.start, si.stop), min(samples, si.stop - si.start)))
        same = kernel.symmetric and i == j
        c = r if same else sorted(rng.sample(range(sj.start, sj.stop), min(samples, sj.stop - sj.start)))

        def gather(inputs, idx):
            x = torch.stack([inputs.rows(slice(k, k + 1))[0] for k in idx])
            return x.double() if x.is_floating_point() else x

        xa = gather(x1, r)
        xb = None if same else gather(x2 or x1, c)
        ref, source = _reference(model64, xa, xb, mode)
        got = torch.from_numpy(np.ascontiguousarray(kernel[np.array(r)][:, np.array(c)])).double()
        err = float((got - ref).norm() / ref.norm().clamp_min(1e-300))
        worst = max(worst, err)
        results.append({"tile": [i, j], "rows": r, "cols": c, "rel_error": err, "reference": source})
    kernel.update_attrs(verification={"tolerance": tol, "worst_rel_error": worst, "ok": worst <= tol,
                                      "tiles": results})
    if worst > tol:
        bad = [t for t in results if t["rel_error"] > tol]
        raise KernelVerificationError(f"{kernel.path}: {len(bad)} verified tiles disagree with the float64 reference "
                                      f"(worst relative error {worst:.3g} > {tol:g}): " +
                                      ", ".join(f"tile {t['tile']} {t['rel_error']:.3g}" for t in bad))


__all__ = ["Inputs", "KernelArray", "KernelFileError", "KernelVerificationError", "kernel_matrix",
           "model_fingerprint", "open_kernel", "run_band"]
