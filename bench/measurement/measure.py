"""Run one job in this process: a case (time, peak memory, cost model, agreement) or a reference.

``run_case(case, run_dir)`` returns the result row; ``ensure_reference(problem,
run_dir)`` computes the float64 reference block of a problem once and stores it
under ``run_dir/references`` (written atomically, with its checksum: a damaged
file is recomputed, a failed reference is tried again by the next run). Both are
plain functions, so any executor (a local worker process, submitit, Ray) can call
them.

The reference is neural-tangents' structured derivatives in float64 when it is
installed and can take the model (``reference.supports``); otherwise the harness's
own float64 CPU result (Jacobian contraction, or the autograd loop where that
declines the model), recorded as such in the row's ``reference`` column with the
reason in ``reference_note``. A row is ``ok`` or ``mismatch`` only after that
check; without a reference it is ``unchecked``, with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

from ..zoo import architectures
from ..store import safefs
from . import sysinfo
from ..store.rundir import write_atomic
from ..sweeps import Case, Problem, build_architecture, kind_of

TOLERANCE = {"float64": 1e-10, "float32": 1e-4}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
REF_MAX_BLOCK = 64  # the reference covers the leading block of at most 64 x 64 samples ...
REF_MAX_ENTRIES = 4_000_000  # ... and at most this many kernel entries (O = 100: 20 x 20 samples)
HARNESS_REFERENCES = ("jacobian_contraction", "autograd_loop")


# -- problems ----------------------------------------------------------------

def build_problem(problem: Problem, dtype: torch.dtype, device: str):
    """The model and the inputs x1, x2 (x2 None when M is x1): the same numbers in every dtype."""
    arch = build_architecture(problem, dtype=dtype, device=device)
    model = arch.model
    x1 = architectures.inputs(arch, problem.n, seed=1, dtype=dtype, device=device)
    x2 = None
    if problem.m is not None:
        x2 = architectures.inputs(arch, problem.m, seed=2, dtype=dtype, device=device)
    return arch, model, x1, x2


def problem_size(problem: Problem) -> dict:
    """O and P of the problem's model (built on the CPU, no kernel computed)."""
    arch = build_architecture(problem)
    return {"O": arch.num_outputs, "P": arch.num_parameters}


def reference_block(problem: Problem, o: int) -> tuple[int, int]:
    a = min(problem.n, REF_MAX_BLOCK, max(1, int(math.sqrt(REF_MAX_ENTRIES / (o * o)))))
    b = a if problem.m is None else min(problem.m, a)
    return a, b


_DIGESTS: dict[tuple, str] = {}


def _source_files(problem: Problem, model) -> list[Path]:
    """The source files the model's behaviour comes from: its factories' and every module class's that is not
    torch's own (the zoo's, the user's, a model library's)."""
    import inspect

    files = set()
    if problem.source is not None:
        files.update(f for f in (architectures.ref_file(r) for r in problem.source.refs()) if f is not None)
    for module in model.modules():
        cls = type(module)
        if cls.__module__.split(".")[0] == "torch":
            continue
        try:
            files.add(Path(inspect.getsourcefile(cls)))
        except (TypeError, OSError):  # a class without a source file: its structure and weights still count
            pass
    return sorted(files, key=lambda f: (f.name, f.read_bytes() if f.is_file() else b""))


def _digest_of(problem: Problem, model, x1, x2) -> str:
    """sha1 of the model's structure (its modules as printed), its weights and buffers, its source files and the
    inputs, as built for the reference (float64, CPU)."""
    digest = hashlib.sha1(problem.id.encode() + b"\0" + str(model).encode())
    for name, t in list(model.state_dict(keep_vars=False).items()) + [("x1", x1), ("x2", x2)]:
        if t is None:
            continue
        t = t.detach().cpu().contiguous()
        digest.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for f in _source_files(problem, model):  # by name and contents: the same code installed elsewhere agrees
        try:
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
        except OSError:
            digest.update(f.name.encode() + b"\0missing")
    return digest.hexdigest()


def model_digest(problem: Problem) -> str:
    """What the problem's reference depends on besides its name (``_digest_of``), once per process and problem;
    a model that cannot be built gets a digest of the error (its reference job records the failure)."""
    key = (problem.model_key, problem.n, problem.m)
    if key not in _DIGESTS:
        try:
            _, model, x1, x2 = build_problem(problem, torch.float64, "cpu")
            _DIGESTS[key] = _digest_of(problem, model, x1, x2)
        except Exception as exc:  # the reference job meets the same failure and records it
            _DIGESTS[key] = hashlib.sha1(f"{problem.id}\0unbuildable: {exc}".encode()).hexdigest()
    return _DIGESTS[key]


def _reference_path(problem: Problem, run_dir: Path) -> Path:
    """references/<key>: the key covers the problem's name and sizes, and the model's structure, weights, source
    files and inputs (``model_digest``): a model whose code or weights changed never meets a stale reference."""
    key = hashlib.sha1(f"{problem.id}\0{model_digest(problem)}".encode()).hexdigest()[:16]
    return Path(run_dir) / "references" / key


def _references_dir(run_dir: Path) -> Path:
    """The run's references/ folder, created when missing; a link or a file there is refused (UnsafeFileError)."""
    folder = Path(run_dir) / "references"
    if not safefs.check_dir(folder):
        folder.mkdir(parents=True, exist_ok=True)
        safefs.check_dir(folder)
    return folder


def _sha1_file(path: Path) -> str | None:
    try:
        return hashlib.sha1(safefs.read_bytes(path)).hexdigest()
    except (OSError, ValueError):
        return None


def read_reference_record(problem: Problem, run_dir: Path) -> dict | None:
    try:
        record = json.loads(safefs.read_bytes(_reference_path(problem, run_dir).with_suffix(".json")))
        return record if isinstance(record, dict) and record.get("model_digest") == model_digest(problem) else None
    except (OSError, ValueError):
        return None


def reference_ok(problem: Problem, run_dir: Path) -> bool:
    """True when the problem's reference is stored, ``ok`` and its kernel file intact (its checksum matches)."""
    record = read_reference_record(problem, run_dir)
    if not record or record.get("status") != "ok" or not record.get("sha1"):
        return False
    return _sha1_file(_reference_path(problem, run_dir).with_suffix(".pt")) == record["sha1"]


def _harness_reference(model, example) -> str | None:
    from ntk_bench import implementations

    for name in HARNESS_REFERENCES:
        if implementations.get(name).supports(model) is None:
            return name
    return None


def _nt_reason(model, example) -> str | None:
    """None when neural-tangents can compute this model's reference, else why not."""
    from ntk_bench import reference

    reason = reference.available()
    if reason is None:
        reason = reference.supports(model, example)
    return reason


def ensure_reference(problem: Problem, run_dir: Path) -> dict:
    """Compute (once) the float64 reference kernel of the problem's leading block; return its record.

    A stored record is reused only when it is ``ok`` and its kernel file's checksum matches; a failed or damaged
    one is computed again.
    """
    if reference_ok(problem, run_dir):
        return read_reference_record(problem, run_dir)
    path = _reference_path(problem, run_dir)
    _references_dir(run_dir)
    record = {"problem": problem.id, "model_digest": model_digest(problem)}
    try:
        arch, model, x1, x2 = build_problem(problem, torch.float64, "cpu")
        a, b = reference_block(problem, arch.num_outputs)
        x1b, x2b = x1[:a], (None if x2 is None else x2[:b])
        record["block"] = [a, b]
        note = _nt_reason(model, x1b)
        kernel = None
        if note is None:
            from ntk_bench import reference

            for implementation in ("structured_derivatives", "jacobian_contraction"):
                try:
                    kernel = reference.ntk(model, x1b, x2b, implementation=implementation)
                    record["source"] = f"neural_tangents:{implementation}"
                    if reference.reduced_precision(model, x1b):  # the model casts to float32 inside: its precision
                        record["tolerance"] = reference.tolerance(model, x1b)
                        record["reduced_precision"] = reference.reduced_precision(model, x1b)
                    break
                except Exception as exc:
                    if "RESOURCE_EXHAUSTED" in str(exc):  # XLA out of memory: neural-tangents' next implementation
                        note = f"neural-tangents' {implementation} ran out of memory: {str(exc)[:200]}"
                        continue
                    if "unsupported" not in type(exc).__name__.lower():
                        raise
                    note = f"neural-tangents cannot take the model: {exc}"  # the translation: use the harness
                    break
        if kernel is None:
            name = _harness_reference(model, x1b)
            if name is None:
                raise RuntimeError("no harness reference supports the model (jacobian_contraction, autograd_loop)")
            from ntk_bench import implementations

            kernel = implementations.get(name).compute(model, x1b, x2b,
                                                       memory_budget_bytes=sysinfo.cpu_memory_budget())
            record["source"] = f"harness:{name}:float64:cpu"
        record["note"] = note
        import io

        buf = io.BytesIO()
        torch.save(kernel.detach().cpu(), buf)
        data = buf.getvalue()
        write_atomic(path.with_suffix(".pt"), data)
        record.update(status="ok", sha1=hashlib.sha1(data).hexdigest())
    except Exception as exc:  # the reference itself failed: recorded (and tried again by the next run)
        record.update(status=status_of(exc), error=f"{type(exc).__name__}: {exc}"[:500])
    write_reference_record(problem, run_dir, record)
    return record


def write_reference_record(problem: Problem, run_dir: Path, record: dict) -> None:
    """Store a reference's record (atomically: a reader on any host sees the old file or the new one)."""
    from ..store.rundir import dumps

    meta_path = _reference_path(problem, run_dir).with_suffix(".json")
    _references_dir(run_dir)
    write_atomic(meta_path, dumps({**record, "problem": problem.id, "model_digest": model_digest(problem)}).encode())


def load_reference(problem: Problem, run_dir: Path):
    """(record, kernel) of the problem's reference; kernel None (and the record saying why) when unusable."""
    record = read_reference_record(problem, run_dir)
    if record is None:
        return None, None
    if record.get("status") != "ok":
        return record, None
    path = _reference_path(problem, run_dir).with_suffix(".pt")
    try:
        data = safefs.read_bytes(path)  # read once: the bytes checked are the bytes loaded
    except (OSError, ValueError) as exc:
        return {**record, "status": "error", "error": f"reference file unreadable: {exc}"}, None
    if record.get("sha1") and hashlib.sha1(data).hexdigest() != record["sha1"]:
        return {**record, "status": "error", "error": f"reference file {path.name} is damaged (checksum)"}, None
    try:
        import io

        # tensors only (an explicit weights_only=True is not overridden by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD): a
        # checksum in a file beside it is no signature, and a pickle from a tampered run directory must never run
        return record, torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # a truncated or unreadable file
        return {**record, "status": "error", "error": f"reference file unreadable: {type(exc).__name__}: {exc}"}, None


def safe_memory_budget(device: str) -> int:
    """The budget to compute blocked under after running out of memory: CUDA as ``auto`` computes it (the free
    device memory); CPU half of what this process may still allocate (the machine's free memory, its cgroup's
    ``memory.max`` headroom and ``RLIMIT_AS``, whichever is least)."""
    if str(device).startswith("cuda"):
        from ntk_bench.implementations.plugins.auto import default_memory_budget

        return default_memory_budget(torch.device(device))
    return sysinfo.cpu_memory_budget()


# -- measurement -------------------------------------------------------------

def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _glibc():
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def measure_peak_memory(fn, device: str):
    """Run ``fn`` once; return (its result, peak memory in bytes above what was in use before).

    CUDA: max_memory_allocated over the call. CPU: the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs) over its RSS before the call. So that
    memory freed by earlier calls and kept by malloc does not hide new
    allocations, the heap is trimmed first and allocations of 64 KiB and more
    are served by fresh mappings during the call (glibc's mallopt); afterwards
    the mapping threshold is set to glibc's dynamic maximum, 32 MiB.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    libc = _glibc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
            libc.mallopt(_M_MMAP_THRESHOLD, 64 << 10)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _rss_bytes("VmRSS")
    except OSError:  # not Linux: no peak measurement
        return fn(), None
    try:
        out = fn()
        return out, max(0, _rss_bytes("VmHWM") - base)
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)


def _timer(fn):
    """torch.utils.benchmark's Timer for ``fn()`` with all CPU threads (its default is one)."""
    from torch.utils import benchmark

    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def time_blocks(fn, budget_s: float):
    """(median, IQR, calls, per-block times) of ``fn``'s run time over repeated blocks of calls, in seconds per call.

    torch.utils.benchmark's Timer times each block (CUDA synchronised, with all
    CPU threads); blocks are sized so that at least 5 fit the budget, and run
    until the budget is spent. A call longer than the budget is timed 5 times:
    the per-block times are what ``compare`` tests two runs with, and its rank
    test needs 5 blocks a side to reach p < 0.01 (3 never reach 0.1).
    """
    import statistics

    timer = _timer(fn)
    one = timer.timeit(1).median
    min_repeats = 5
    number = max(1, int(budget_s / min_repeats / max(one, 1e-9)))
    times = [one] if number == 1 else []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_repeats or (time.perf_counter() < deadline and one < budget_s):
        times.append(timer.timeit(number).median)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0], len(times) * number, times


def time_call(fn, budget_s: float):
    """(median, IQR, calls) of ``fn``'s run time (``time_blocks`` without the blocks)."""
    return time_blocks(fn, budget_s)[:3]


MIN_PAIRS = 20


def time_paired(fn_a, fn_b, budget_s: float):
    """(median of a, median of b, median of the ratios a/b) over alternating blocks of calls.

    Two functions timed minutes apart see different machines (a shared VM's
    speed drifts by tens of percent); timed in alternating blocks of the same
    number of calls (a b, then b a, ...), each pair sees the same one. At least
    ``MIN_PAIRS`` pairs (as many of each order), more while the budget lasts: on a
    busy VM single pairs of 30 ms calls ranged over ±15%, and the median of 10
    pairs of 145 ms calls of the same code was 1.07.
    """
    import statistics

    ta, tb = _timer(fn_a), _timer(fn_b)
    one = max(ta.timeit(1).median, tb.timeit(1).median)
    number = max(1, int(budget_s / 40 / max(one, 1e-9)))  # about 20 pairs of short blocks: a robust median
    a, b = [], []
    deadline = time.perf_counter() + budget_s
    while len(a) < MIN_PAIRS or (time.perf_counter() < deadline and 2 * one * number < budget_s):
        first, second = (ta, tb) if len(a) % 2 == 0 else (tb, ta)
        t1, t2 = first.timeit(number).median, second.timeit(number).median
        a.append(t1 if first is ta else t2)
        b.append(t2 if first is ta else t1)
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def agreement(k: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(‖K − K_ref‖_F / ‖K_ref‖_F, max|ΔK| / mean|K_ref|), in float64."""
    k, ref = k.detach().cpu().double(), ref.double()
    diff = k - ref
    return (float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(ref)),
            float(diff.abs().max() / ref.abs().mean()))


def status_of(exc: BaseException) -> str:
    """``oom`` for an out-of-memory error (torch's, Python's, an allocator's message), ``unsupported`` for a plugin
    declining the model while computing (what only running shows), else ``error``."""
    from ntk_bench.implementations import UnsupportedModelError

    if isinstance(exc, UnsupportedModelError):
        return "unsupported"
    text = str(exc)
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text \
            or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "oom"
    return "error"


_status_of = status_of


class CaseUnsupported(Exception):
    """The case's implementation cannot run this model here; the message says why."""


def _kernel_fn(case: Case, model, x1, x2, budget):
    """(a zero-argument function computing the case's kernel, a converter of its output to torch).

    Every registered plugin, ours or a peer, through its ``prepare`` (a peer sets itself up there, outside the
    timed call); a plugin that declines the model, or raises ``UnsupportedModelError`` while preparing, makes the
    case ``unsupported`` with its reason.
    """
    from ntk_bench import implementations

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
        "case_id": case.id, "impl": case.impl, "kind": kind_of(case.impl), "arch": problem.arch,
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
    if case.impl == "auto":
        from ntk_bench import implementations

        row["auto_pick"], row["auto_reason"] = implementations.get("auto").last_choice
    return kernel


def _compile_fields(case, row) -> None:
    """``compiled`` (whether the kernel ran compiled: a ``*_compiled`` variant that did not fall back to eager) and
    ``compile_s`` (its compilation, part of ``first_call_s``); ``fallback`` says why a variant ran eagerly. Peers
    (neural-tangents jits; the rest do not compile) get None."""
    from ntk_bench import implementations

    plugin = implementations.get(case.impl)
    info = plugin.info() if hasattr(plugin, "info") else None
    if info is not None:
        row.update(compiled=info.compiled, compile_s=info.compile_s)
        if info.fallback is not None:
            row["compile_fallback"] = info.fallback[:300]
    elif kind_of(case.impl) == "ours":
        row.update(compiled=False, compile_s=None)


def _settle_auto(case, model, x1, x2, fn, row) -> None:
    from ntk_bench import implementations

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
    from ntk_bench import implementations

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


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def run_case(case: Case, run_dir: Path) -> dict:
    """Measure one case; never raises for a failure of the case itself (it becomes the status).

    The whole case (set-up, first call, memory, timing) runs with the thread count of its clock: one thread for
    ``clock="cpu"`` (a plugin that picks a backend by timing its first call picks it for the threads it is timed
    with), the worker's for ``"wall"``.
    """
    from . import timing

    with timing.threads_for(case.clock):
        return _run_case(case, run_dir)


def _run_case(case: Case, run_dir: Path) -> dict:
    """``run_case`` at the thread count already set.

    Statuses: ``ok`` / ``mismatch`` (checked against the reference), ``unchecked`` (no reference: the reason in
    ``error``), ``unsupported``, ``oom``, ``error``. An out-of-memory first call without a budget, or a case the
    runner retries after the kernel's OOM killer ended it (``case.retry_blocked``), computes blocked under a
    budget that respects this process's memory limits (``blocked_after_oom``).
    """
    from ntk_bench.implementations.core import kernels

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    problem = case.problem
    row = {**case_fields(case), "cpu_threads": torch.get_num_threads()}
    dtype = DTYPES[case.dtype]
    try:
        arch, model, x1, x2 = build_problem(problem, dtype, case.device)
        from ntk_bench.implementations.core.costs import model_stats

        stats = model_stats(model, x1[:1])
    except Exception as exc:  # the model or its inputs could not be set up here (memory, the device, the factory)
        row.update(status=status_of(exc), error=f"setting up the problem failed: {_error_text(exc)}"[:500])
        return row
    o, p, fp = stats.o, stats.p, stats.fp_flops
    n, m = problem.n, problem.M
    row.update(
        O=o, P=p, fp_flops=fp,
        predicted_jc_flops=(n + (0 if problem.m is None else m)) * o * fp + n * m * o * o * p,
        predicted_vp_flops=n * m * o * fp,
        kernel_bytes=math.prod(kernels.kernel_shape(n, m, o, case.mode)) * x1.element_size(),
    )
    peer = kind_of(case.impl) == "peer"
    budget = case.memory_budget_bytes
    if case.retry_blocked and budget is None and not peer:
        row["blocked_after_oom"] = True
        budget = safe_memory_budget(case.device)
    try:
        fn, to_torch = _kernel_fn(case, model, x1, x2, budget)
    except CaseUnsupported as exc:
        row.update(status="unsupported", error=str(exc))
        return row
    except Exception as exc:  # preparing failed (a peer's set-up, a plugin's bug)
        row.update(status=status_of(exc), error=_error_text(exc))
        return row
    record, ref = load_reference(problem, run_dir)
    if not peer and case.impl != "auto":
        from ntk_bench import implementations

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
            row["first_try_error"] = _error_text(exc)[:200]
            row["memory_budget_bytes"] = budget = safe_memory_budget(case.device)
            if case.device.startswith("cuda"):
                torch.cuda.empty_cache()
            fn, to_torch = _kernel_fn(dataclasses.replace(case, memory_budget_bytes=budget), model, x1, x2, budget)
            kernel = _first_call(fn, to_torch, case, row)
        from ntk_bench.implementations.core import cuda_graphs

        if case.impl == "auto":  # it tries two plugins in turn over its first calls: timed once it has settled
            _settle_auto(case, model, x1, x2, fn, row)
        _, row["peak_mem_bytes"] = measure_peak_memory(fn, case.device)
        if cuda_graphs.last_replay_bytes is not None:  # a replayed CUDA graph: its pool holds the intermediates
            row["cuda_graph_bytes"] = cuda_graphs.last_replay_bytes
            row["peak_mem_bytes"] += cuda_graphs.last_replay_bytes
        from . import machine, timing

        with timing.threads_for(case.clock) as threads, machine.Usage() as usage:
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
        row.update(status=status_of(exc), error=_error_text(exc))
        return row
    if ref is None:
        why = (record or {}).get("error") or "the reference was not computed"
        row.update(status="unchecked", reference="none", error=f"not checked: {why}"[:500])
        return row
    a, b = record["block"]
    rel, maxrel = agreement(kernel[:a, :b], kernels.reduce_full(ref, case.mode))
    tolerance = max(TOLERANCE[case.dtype], record.get("tolerance") or 0.0)
    row.update(reference=record["source"], ref_block=f"{a}x{b}", rel_err=rel, max_abs_err_rel_mean=maxrel,
               status="ok" if rel <= tolerance else "mismatch")
    if record.get("tolerance"):  # a reference only as precise as the model's own casts (float32 inside float64)
        row["reference_tolerance"] = tolerance
    if record.get("note"):
        row["reference_note"] = record["note"]
    if not math.isfinite(rel):
        row["error"] = "the kernel has NaN or infinite entries"
    return row


def environment() -> dict:
    """Versions and machine facts for the header line of results.jsonl."""
    import platform
    import socket
    import subprocess
    from importlib import metadata

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {
        "torch": torch.__version__, "jax": version("jax"), "jaxlib": version("jaxlib"),
        "neural_tangents": version("neural-tangents"), "backpack": version("backpack-for-pytorch"),
        "numpy": version("numpy"), "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "git_commit": commit,
        "code_sha1": code_sha1(), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def code_sha1() -> str:
    """A digest of the harness's code that ran (the plugins, the reference, the runner), whatever .git says
    (a copied working tree can carry a stale or no repository)."""
    import importlib.util

    digest = hashlib.sha1()
    for pkg in ("ntk_bench.implementations", "ntk_bench.bench", "ntk_bench.reference"):
        spec = importlib.util.find_spec(pkg)  # the folder, without importing the package (JAX stays unloaded)
        root = Path(spec.origin).resolve().parent
        for f in sorted(root.rglob("*.py")):
            digest.update(f"{pkg}/{f.relative_to(root).as_posix()}".encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:12]
