"""Run one case in this process: build its problem, call its plugin (the first call checked against the reference),
its peak memory, its timing, the machine while timed; the row as the row schema says (``run_case``)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ntk_bench import implementations
from ntk_bench.implementations.core import contractions, cuda_graphs, tolerances
from ntk_bench.implementations.core.costs import cost_stats

from ..store.row import check_row
from ..sweeps import Case, origin_of
from . import machine, timing
from .failures import CaseUnsupported, error_text, status_of
from .memory import measure_peak_memory, safe_memory_budget
from .problem_build import DTYPES, build_problem
from .references import load_reference
from .timers import time_blocks, time_paired


def agreement(k: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(‖K − K_ref‖_F / ‖K_ref‖_F, max|ΔK| / mean|K_ref|), in float64."""
    k, ref = k.detach().cpu().double(), ref.double()
    diff = k - ref
    return (float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(ref)),
            float(diff.abs().max() / ref.abs().mean()))


def kernel_fn(case: Case, model, x1, x2, budget):
    """(a zero-argument function computing the case's kernel, a converter of its output to torch).

    Every registered plugin, ours or a peer, through its ``prepare`` (a peer sets itself up there, outside the
    timed call); a plugin that declines the model, or raises ``UnsupportedModelError`` while preparing, makes the
    case ``unsupported`` with its reason.
    """
    plugin = implementations.get(case.impl)
    reason = plugin.supports(model)
    if reason is not None:
        raise CaseUnsupported(reason)
    try:
        return plugin.prepare(model, x1, x2, mode=case.mode, memory_budget_bytes=budget)
    except implementations.UnsupportedModelError as exc:
        raise CaseUnsupported(str(exc)) from None


def case_fields(case: Case) -> dict:
    """The columns of a result row that the case alone determines."""
    problem = case.problem
    fields = {
        "case_id": case.id, "impl": case.impl, "origin": origin_of(case.impl), "arch": problem.arch,
        "arch_params": json.dumps(dict(problem.arch_params), sort_keys=True),
        "N": problem.n, "M": problem.M, "x2": "x1" if problem.m is None else "separate",
        "mode": case.mode, "dtype": case.dtype, "device": case.device,
    }
    if problem.source is not None:
        fields["factory"] = problem.source.factory
    return fields


def _first_call(fn, to_torch, case, row):
    """The warm-up call (compilation, for JAX peers); its result is the one checked for agreement."""
    t0 = time.perf_counter()
    kernel = to_torch(fn())
    if case.device.startswith("cuda"):
        torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - t0
    _compile_fields(case, row)
    xla_threads = getattr(implementations.get(case.impl), "xla_threads", None)
    if xla_threads is not None:  # (a neural-tangents peer: the cores its XLA runtime computes on)
        row["xla_threads"] = xla_threads()
    if case.impl == "auto":
        row["auto_pick"], row["auto_reason"] = implementations.get("auto").last_choice
    return kernel


def _compile_fields(case, row) -> None:
    """``compiled`` (whether the kernel ran compiled: a ``*_compiled`` variant that did not fall back to eager) and
    ``compile_s`` (its compilation, part of ``first_call_s``); ``compile_fallback`` says why a variant ran eagerly.
    Peers (neural-tangents jits; the rest do not compile) get None."""
    plugin = implementations.get(case.impl)
    info = plugin.info() if hasattr(plugin, "info") else None
    if info is not None:
        row.update(compiled=info.compiled, compile_s=info.compile_s)
        if info.fallback is not None:
            row["compile_fallback"] = info.fallback[:300]
    elif origin_of(case.impl) == "ours":
        row.update(compiled=False, compile_s=None)


def _settle_auto(case, model, x1, x2, fn, row) -> None:
    auto = implementations.get("auto")
    for _ in range(auto.turns_left(model, x1, x2, case.mode, row.get("memory_budget_bytes", case.memory_budget_bytes))):
        fn()
    row["auto_pick"], row["auto_reason"] = auto.last_choice


# Paired timings compare two plugins a few percent apart: they get at least this budget, whatever the sweep's.
PAIRED_MIN_BUDGET_S = 1.0


def _auto_paired(case: Case, model, x1, x2, auto_fn) -> dict:
    """auto timed in alternating blocks against its pick and against ``case.compare_with``, free of drift.

    ``auto_over_pick_paired`` is auto's own overhead; ``auto_over_fastest_paired`` is auto against the fastest
    of all those (the largest ratio), the plugin named in ``paired_fastest``.
    """
    auto = implementations.get("auto")
    seconds = max(case.time_budget_s, PAIRED_MIN_BUDGET_S)
    pick, _, budget, _ = auto.choose(model, x1, x2, case.mode, case.memory_budget_bytes)
    pick_fn = lambda: pick.compute(model, x1, x2, mode=case.mode, memory_budget_bytes=budget)  # noqa: E731
    auto_s, pick_s, ratio = time_paired(auto_fn, pick_fn, seconds)
    row = {"paired_auto_s": auto_s, "paired_pick_s": pick_s, "auto_over_pick_paired": ratio}
    ratios = {pick.name: ratio}
    for name in case.compare_with:
        if name in ratios:
            continue
        other = implementations.get(name)
        other_fn = lambda: other.compute(model, x1, x2, mode=case.mode,  # noqa: E731
                                         memory_budget_bytes=case.memory_budget_bytes)
        try:
            ratios[name] = time_paired(auto_fn, other_fn, seconds)[2]
        except Exception as exc:  # it ran in its own case; here it is only a comparison: say why, go on
            row.setdefault("paired_errors", {})[name] = f"{type(exc).__name__}: {exc}"[:200]
    fastest = max(ratios, key=ratios.get)
    row.update(paired_ratios=ratios, paired_fastest=fastest, auto_over_fastest_paired=ratios[fastest])
    return row


def run_case(case: Case, run_dir: Path) -> dict:
    """Measure one case; never raises for a failure of the case itself (it becomes the status).

    The whole case (set-up, first call, memory, timing) runs with the thread count of its clock: one thread for
    ``clock="cpu"`` (a plugin that picks a backend by timing its first call picks it for the threads it is timed
    with), the worker's for ``"wall"``.
    """
    with timing.threads_for(case.clock):
        return check_row(_run_case(case, run_dir))  # the row as the schema says, where it is made


def _run_case(case: Case, run_dir: Path) -> dict:
    """``run_case`` at the thread count already set.

    Statuses: ``ok`` / ``mismatch`` (checked against the reference), ``unchecked`` (no reference: the reason in
    ``error``), ``unsupported``, ``oom``, ``error``. An out-of-memory first call without a budget, or a case the
    runner retries after the kernel's OOM killer ended it (``case.retry_blocked``), computes blocked under a
    budget that respects this process's memory limits (``blocked_after_oom``).
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    problem = case.problem
    row = {**case_fields(case), "cpu_threads": torch.get_num_threads()}
    dtype = DTYPES[case.dtype]
    try:
        arch, model, x1, x2 = build_problem(problem, dtype, case.device)

        stats = cost_stats(model, x1[:1])
    except Exception as exc:  # the model or its inputs could not be set up here (memory, the device, the factory)
        row.update(status=status_of(exc), error=f"setting up the problem failed: {error_text(exc)}"[:500])
        return row
    o, p, fp = stats.o, stats.p, stats.fp_flops
    n, m = problem.n, problem.M
    row.update(
        O=o, P=p, fp_flops=fp,
        predicted_jc_flops=(n + (0 if problem.m is None else m)) * o * fp + n * m * o * o * p,
        predicted_vp_flops=n * m * o * fp,
        kernel_bytes=math.prod(contractions.kernel_shape(n, m, o, case.mode)) * x1.element_size(),
    )
    peer = origin_of(case.impl) == "peer"
    budget = case.memory_budget_bytes
    if case.retry_blocked and budget is None and not peer:
        row["blocked_after_oom"] = True
        budget = safe_memory_budget(case.device)
    try:
        fn, to_torch = kernel_fn(case, model, x1, x2, budget)
    except CaseUnsupported as exc:
        row.update(status="unsupported", error=str(exc))
        return row
    except Exception as exc:  # preparing failed (a peer's set-up, a plugin's bug)
        row.update(status=status_of(exc), error=error_text(exc))
        return row
    record, ref = load_reference(problem, run_dir)
    if not peer and case.impl != "auto":
        try:
            est = implementations.get(case.impl).estimate(stats, n, m, case.mode, problem.m is None)
            row.update(est_flops=est.flops, est_peak_bytes=est.bytes)
        except Exception:  # a plugin's cost model need not know every model; the row goes without its estimate
            pass
    row["memory_budget_bytes"] = budget
    try:
        try:
            kernel = _first_call(fn, to_torch, case, row)
        except Exception as exc:  # out of memory without a budget: finish blocked under a budget that fits
            if status_of(exc) != "oom" or budget is not None or peer:
                raise
            row["blocked_after_oom"] = True
            row["first_try_error"] = error_text(exc)[:200]
            row["memory_budget_bytes"] = budget = safe_memory_budget(case.device)
            if case.device.startswith("cuda"):
                torch.cuda.empty_cache()
            fn, to_torch = kernel_fn(dataclasses.replace(case, memory_budget_bytes=budget), model, x1, x2, budget)
            kernel = _first_call(fn, to_torch, case, row)

        if case.impl == "auto":  # it tries two plugins in turn over its first calls: timed once it has settled
            _settle_auto(case, model, x1, x2, fn, row)
        _, row["peak_mem_bytes"] = measure_peak_memory(fn, case.device)
        if cuda_graphs.last_replay_bytes is not None:  # a replayed CUDA graph: its pool holds the intermediates
            row["cuda_graph_bytes"] = cuda_graphs.last_replay_bytes
            row["peak_mem_bytes"] += cuda_graphs.last_replay_bytes

        with timing.threads_for(case.clock) as threads, \
                machine.Usage(probe=not case.device.startswith("cuda")) as usage:
            if case.clock == "wall":
                med, iqr, reps, blocks = time_blocks(fn, case.time_budget_s)
            else:
                sync = torch.cuda.synchronize if case.device.startswith("cuda") else None
                med, iqr, reps, blocks = timing.time_blocks(fn, case.time_budget_s,
                                                            timing.clock_for(case.clock, case.device), sync)
        row.update(time_median_s=med, time_iqr_s=iqr, time_repeats=reps, time_blocks_s=blocks, clock=case.clock)
        row.update(machine.fields(usage, threads, case.device))
        if case.impl == "auto" and case.compare_with:  # auto's verdicts come from the group's paired rounds
            row.update(_auto_paired(case, model, x1, x2, fn))
    except Exception as exc:  # the case failed: record why and move on (status oom or error)
        row.update(status=status_of(exc), error=error_text(exc))
        return row
    if ref is None:
        why = (record or {}).get("error") or "the reference was not computed"
        row.update(status="unchecked", reference="none", error=f"not checked: {why}"[:500])
        return row
    a, b = record["block"]
    rel, maxrel = agreement(kernel[:a, :b], contractions.reduce_full(ref, case.mode))
    tolerance = max(tolerances.tolerance(case.dtype), record.get("tolerance") or 0.0)
    row.update(reference=record["source"], ref_block=f"{a}x{b}", rel_err=rel, max_abs_err_rel_mean=maxrel,
               status="ok" if rel <= tolerance else "mismatch")
    if record.get("tolerance"):  # a reference only as precise as the model's own casts (float32 inside float64)
        row["reference_tolerance"] = tolerance
    if record.get("note"):
        row["reference_note"] = record["note"]
    if not math.isfinite(rel):
        row["error"] = "the kernel has NaN or infinite entries"
    return row
