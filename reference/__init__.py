"""The neural-tangents reference: the torch model's own graph, translated to JAX, differentiated by neural-tangents.

The model is exported with ``torch.export`` (a dynamic batch dimension) and decomposed to core ATen; each op
becomes one JAX rule (``aten_rules``), with the same weights. Before a kernel is computed the translation must
reproduce the torch forward in float64, evaluated per sample as neural-tangents evaluates it (so a model that
mixes the samples of a batch is refused, not silently mis-kernelled). Weights a Linear transposes are stored
(in, out), so neural-tangents' structured derivatives see ``x @ W`` as in hand-written JAX
(``scripts/nt_fairness.py`` measures the translation against hand-written JAX).

- ``available()``: None, or why neural-tangents cannot be used here;
- ``supports(model, example)``: None, or why the model cannot be translated (every missing op named);
- ``to_jax(model, example)``: ``(apply_fn, params)``, float64; ``forward(model, x)``: its output, per sample;
- ``kernel_fn(model, example, implementation, mode, dtype)``: neural-tangents' jitted kernel, for timing it as
  a peer (``implementations/peers/neural_tangents.py``);
- ``ntk(model, x1, x2, mode, implementation)``: the float64 reference kernel, a torch tensor in the plugin shapes;
- ``tolerance(model, example)``: what the reference is good to (1e-10; 100 eps of float32 for a float64 model that
  casts to float32 inside, as T5's layer norm does: those casts are translated, not lifted to float64);
  ``forward_tolerance(model, example)``: the same read from torch's forward alone, for a kernel computed in torch.

``example`` is a batch like x1 (its per-sample shape and dtype; integer token ids work). JAX and
neural-tangents are imported on first use, with TensorFlow's and XLA's start-up logging silenced.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import warnings

import numpy as np
import torch

from ntk_bench.implementations.core.tolerances import tolerance
from ntk_bench.modes import MODES

from .translate import UnsupportedOpError

IMPLEMENTATIONS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives", "auto")
# The forward check (and ntk(quick_compile=True)) compiles with XLA's backend optimisation off, where compiling
# dominates: it compiles several times faster and runs several times slower on the zoo's conv nets.
# Timed peers compile with XLA's defaults.
QUICK_COMPILE = {"xla_backend_optimization_level": 0}
# neural-tangents' (trace_axes, diagonal_axes) for each of the interface's modes.
_MODES = dict(zip(MODES, (((), ()), ((-1,), ()), ((), (-1,)))))


# neural-tangents imports TensorFlow, whose C++ start-up logs errors about CUDA plugins at level 2; the level is
# read when the first XLA library loads, so it is set here, before anything imports JAX or TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _jax():
    import jax

    jax.config.update("jax_enable_x64", True)
    _start_cpu_backend()
    return jax


# The cores XLA's CPU runtime computes on in this process, once this module started JAX's backend (None before, or
# when something else started it first: then nobody here knows).
_XLA_THREADS: int | None = None


def xla_threads() -> int | None:
    """How many cores neural-tangents computes on in this process (see :func:`_start_cpu_backend`); None when
    JAX's CPU backend has not started, or was started before this module could size it."""
    return _XLA_THREADS


def _start_cpu_backend() -> None:
    """Start JAX's CPU backend; with ``NTK_BENCH_XLA_THREADS=T`` set, on T cores.

    XLA's CPU runtime sizes its thread pool by the cores the starting thread may run on, whatever ``XLA_FLAGS``
    say (``--xla_cpu_multi_thread_eigen=false`` still splits a dot over every core), and even a pool of one runs
    part of each call beside the calling thread. So a process that times neural-tangents against torch at T threads
    (the runner's jobs on the CPU clock, the comparison scripts) sets the variable, and the whole process (every
    thread, torch's included) is held to T of its cores from here on (:func:`_hold`): both sides then compute on
    the same T cores, and a CPU-clock time is the time of T cores. Unset, XLA uses every core the process may run
    on."""
    global _XLA_THREADS
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return
    except (ImportError, AttributeError):  # (a JAX that does not say: left as it is, its cores unknown)
        return
    import jax

    from ntk_bench.envvars import positive_int

    given = positive_int("XLA_THREADS")
    held = _hold(given) if given is not None else None
    jax.devices("cpu")
    try:
        _XLA_THREADS = held or len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (no affinity on this system: XLA takes what it takes)
        _XLA_THREADS = None


@contextlib.contextmanager
def xla_threads_held(count: int):
    """Inside: neural-tangents computes on ``count`` cores (``NTK_BENCH_XLA_THREADS``, unless the environment
    already sets it): JAX's CPU backend starts held there, or, where it started before (a reference computed in
    this process), every thread, XLA's pool included, is held at once (the pool then takes turns on those cores;
    the test of this function checks that a call's CPU time is no more than its wall time). After: the variable
    and every thread's cores as they were, so a process that runs jobs in turn (the runner's own, with the inline
    executor) is left as found, and :func:`xla_threads` says the cores XLA may use again."""
    global _XLA_THREADS
    from ntk_bench.envvars import positive_int

    set_here = "NTK_BENCH_XLA_THREADS" not in os.environ
    if set_here:
        os.environ["NTK_BENCH_XLA_THREADS"] = str(count)
    before = _affinities()
    try:
        given = positive_int("XLA_THREADS")
        if _backend_started() and given is not None:
            _XLA_THREADS = _hold(given) or _XLA_THREADS
        yield
    finally:
        if set_here:
            os.environ.pop("NTK_BENCH_XLA_THREADS", None)
        _restore_affinities(before)
        if _backend_started():
            try:
                _XLA_THREADS = len(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                pass


def _backend_started() -> bool:
    """Whether JAX's CPU backend has started in this process (False where JAX is absent or does not say)."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def _affinities() -> dict[int, set[int]]:
    """Every thread's cores, by thread id (empty where the system has no affinity)."""
    found = {}
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                found[int(tid)] = os.sched_getaffinity(int(tid))
            except OSError:  # (a thread that ended meanwhile)
                pass
    except (AttributeError, OSError):
        pass
    return found


def _restore_affinities(before: dict[int, set[int]]) -> None:
    """Each thread back to its cores in ``before``; a thread started since to those of the calling thread then."""
    if not before:
        return
    default = before.get(threading.get_native_id(), next(iter(before.values())))
    for tid, cores in _affinities().items():
        want = before.get(tid, default)
        if cores != want:
            try:
                os.sched_setaffinity(tid, want)
            except OSError:
                pass


def _hold(given: int) -> int | None:
    """Hold every thread of this process to ``given`` of its cores, starting from the one the calling thread runs
    on (processes started side by side hold different cores); the cores it may use after (None where the system
    has no affinity). Warns when torch computes with more threads than that."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if given < len(cores):
        now = _current_cpu()
        start = cores.index(now) if now in cores else 0
        cores = sorted((cores[start:] + cores[:start])[:given])
        for tid in os.listdir("/proc/self/task"):  # (Linux sets a thread's affinity, not the process's)
            try:
                os.sched_setaffinity(int(tid), cores)
            except OSError:  # (a thread that ended meanwhile)
                pass
        cores = sorted(os.sched_getaffinity(0))
        if torch.get_num_threads() > len(cores):
            warnings.warn(f"NTK_BENCH_XLA_THREADS={given} holds this process to {len(cores)} core(s) while torch "
                          f"computes with {torch.get_num_threads()} threads: they wait for each other",
                          RuntimeWarning, stacklevel=4)
    return len(cores)


def _current_cpu() -> int | None:
    """The core the calling thread runs on (Linux's /proc; None elsewhere)."""
    try:
        with open("/proc/thread-self/stat") as f:
            stat = f.read()
        return int(stat[stat.rfind(")") + 2:].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def _nt():
    _jax()
    import warnings

    import neural_tangents as nt

    # (structured derivatives falling back to a primitive's plain Jacobian, e.g. an embedding's gather: correct)
    warnings.filterwarnings("ignore", message="No Jacobian rule found for", module="neural_tangents")
    return nt


def available() -> str | None:
    """None when neural-tangents can be imported, otherwise why not."""
    try:
        _nt()
    except Exception as exc:  # ImportError, or a broken JAX/TF install failing at import
        return f"neural-tangents unavailable: {type(exc).__name__}: {exc}"
    return None


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """A batch as numpy: floats as float64, integer ids as they are."""
    x = x.detach().cpu()
    return x.double().numpy() if x.is_floating_point() else x.numpy()


to_numpy64 = to_numpy  # the name bench/measurement/measure.py uses


def _lowest_float_computed(fn, *args):
    """``(fn(*args), dtype)``: the float dtype of least precision among the tensors its ops produce (float64 when
    none is lower): a float64 model that casts to float32 inside computes part of its forward in float32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    lowest = [torch.float64]

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and \
                        torch.finfo(t.dtype).eps > torch.finfo(lowest[0]).eps:
                    lowest[0] = t.dtype
            return out

    try:
        with Watch():
            result = fn(*args)
    except Exception:  # a forward that does not run under a dispatch mode: its dtypes are not known
        return fn(*args), torch.float64
    return result, lowest[0]


def _torch_forward64(model: torch.nn.Module, example: torch.Tensor) -> tuple[np.ndarray, float]:
    """The torch forward in float64 (on a float64 copy of a float32 model), and the tolerance it is good to:
    1e-10, or ``REDUCED_PRECISION_ULPS`` eps of the lowest precision the float64 forward casts to inside."""
    floating = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    x = example.double() if example.is_floating_point() else example
    with torch.no_grad():
        if all(t.dtype == torch.float64 for t in floating):
            twin = model
        else:
            try:
                twin = copy.deepcopy(model).to(torch.float64)
            except Exception:  # a model that cannot be deep-copied: compare with its own precision
                return model(example).detach().cpu().double().numpy(), tolerance(torch.float32)
        out, lowest = _lowest_float_computed(twin, x)
        tol = max(FLOAT64_TOLERANCE, REDUCED_PRECISION_ULPS * torch.finfo(lowest).eps)
        return out.detach().cpu().numpy(), tol


def _per_sample_forward(model: torch.nn.Module, prog, x: torch.Tensor) -> np.ndarray:
    """The translation's float64 output (N, O) on x, one sample at a time (jitted once per program)."""
    jax = _jax()
    from . import translate

    params, constants = translate.weights(model, prog)
    if prog.forward is None:
        def per_sample(p, c, batch):
            apply_fn = translate.JaxFunction(prog, c, np.float64)
            return jax.vmap(lambda xi: apply_fn(p, xi[None])[0])(batch)

        prog.forward = jax.jit(per_sample)
    return np.asarray(_quick(prog, "forward", prog.forward, params, constants, to_numpy(x)))


def _quick(prog, key, jitted, *args):
    """``jitted(*args)``, compiled with QUICK_COMPILE once per argument shapes and dtypes (cached on ``prog``)."""
    jax = _jax()
    signature = (key,) + tuple(None if a is None else (a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(
        args, is_leaf=lambda v: v is None))
    compiled = prog.compiled.get(signature)
    if compiled is None:
        compiled = prog.compiled[signature] = jitted.lower(*args).compile(QUICK_COMPILE)
    return compiled(*args)


def forward(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The JAX translation's output on ``x`` as (N, O) in float64, each sample evaluated alone, as
    neural-tangents differentiates it (raises UnsupportedOpError where the model does not translate)."""
    from . import translate

    _jax()
    return _per_sample_forward(model, translate.program(model, x), x)


def _check(model: torch.nn.Module, example: torch.Tensor, prog) -> str:
    """"" when the translation, evaluated per sample (as neural-tangents vmaps it), reproduces the torch forward
    of the batch in float64 to 1e-10 of its largest output; else the reason."""
    jax = _jax()
    from . import translate

    name = prog.model_name
    try:
        y = _per_sample_forward(model, prog, example)
    except UnsupportedOpError as exc:
        return str(exc)
    except Exception as exc:  # a rule meeting arguments it cannot take: a translation failure, reported as such
        return f"{name}: evaluating the JAX translation failed: {type(exc).__name__}: {translate._first_lines(exc)}"
    ref, tol = _torch_forward64(model, example)
    tol = prog.tolerance = max(tol, _precision(prog))
    ref = ref.reshape(ref.shape[0], -1) if ref.ndim == 1 else ref
    if y.shape != ref.shape:
        return f"{name}: the translation returns shape {y.shape}, torch {ref.shape}"
    if not np.all(np.isfinite(ref)):
        return ""  # nothing to compare against (non-finite outputs on this example)
    err = float(np.max(np.abs(y - ref)) / max(float(np.max(np.abs(ref))), 1e-300))
    if not err <= tol:
        mixed = ""
        if example.shape[0] > 1:
            apply_fn, params = translate.to_jax(model, example)
            batched = np.asarray(jax.jit(apply_fn)(params, to_numpy(example)))
            if float(np.max(np.abs(batched - ref))) / max(float(np.max(np.abs(ref))), 1e-300) <= tol:
                mixed = " (the batched translation agrees: the model mixes the samples of a batch, and "\
                        "neural-tangents differentiates one sample at a time)"
        return (f"{name}: the JAX translation's forward, per sample, differs from torch's by {err:.1e} "
                f"(relative to max |f|; allowed: {tol:.1e}){mixed}; no reference is computed from it")
    return ""


FLOAT64_TOLERANCE = tolerance(torch.float64)  # a float64 kernel is checked to this; the reference must be as good
REDUCED_PRECISION_ULPS = 100  # a model casting to a lower precision: its forward and kernel are good to 100 eps


def _precision(prog) -> float:
    """The relative precision the translation is good to: 1e-10 when it computes in float64 throughout; where the
    model casts to a lower precision (seen while tracing it), ``REDUCED_PRECISION_ULPS`` of that dtype's eps."""
    if not prog.reduced:
        return FLOAT64_TOLERANCE
    import jax.numpy as jnp

    return max(FLOAT64_TOLERANCE, REDUCED_PRECISION_ULPS * max(float(jnp.finfo(d).eps) for d in prog.reduced))


def tolerance(model: torch.nn.Module, example: torch.Tensor) -> float:
    """The relative agreement with torch's float64 forward (and kernel, ``‖K − K_ref‖ / ‖K_ref‖``) this model's
    reference is good to: 1e-10 where the model computes in float64 throughout, 100 eps of the lowest precision
    it casts to otherwise (a float64 T5, whose layer norm computes in float32: 1.2e-5). Raises
    UnsupportedOpError like ``ntk``."""
    prog = _checked_program(model, example)
    return prog.tolerance if prog.tolerance is not None else _precision(prog)


def forward_tolerance(model: torch.nn.Module, example: torch.Tensor) -> float:
    """What a float64 kernel of ``model`` computed in torch (a brute force, say) is good to, read from the dtypes
    its float64 forward computes in (no JAX needed): 1e-10, or 100 eps of the lowest precision it casts to."""
    return _torch_forward64(model, example)[1]


def reduced_precision(model: torch.nn.Module, example: torch.Tensor) -> list[str]:
    """The float dtypes below float64 the model casts to (and its translation computes in); [] for none."""
    return sorted(_checked_program(model, example).reduced)


def _checked_program(model: torch.nn.Module, example: torch.Tensor):
    """The model's translation, checked once against the torch forward; UnsupportedOpError when unusable."""
    from . import translate

    prog = translate.program(model, example)
    if prog.check is None:
        prog.check = _check(model, example, prog)
    if prog.check:
        raise UnsupportedOpError(prog.check)
    return prog


def supports(model: torch.nn.Module, example: torch.Tensor) -> str | None:
    """None when ``model`` translates (on batches like ``example``) and reproduces its torch forward; else why
    not: the export failure, every op without a rule, or the failed check. Cached per model and input shape."""
    try:
        _jax()
    except Exception as exc:
        return f"JAX unavailable: {type(exc).__name__}: {exc}"
    try:
        _checked_program(model, example)
    except UnsupportedOpError as exc:
        return str(exc)
    return None


def to_jax(model: torch.nn.Module, example: torch.Tensor):
    """``(apply_fn, params)``: ``apply_fn(params, x)`` computes ``model(x)`` as (N, O) in JAX from float64
    parameters keyed by torch's names (``apply_fn.layouts``: those stored transposed)."""
    _jax()
    from . import translate

    return translate.to_jax(model, example)


def kernel_fn(model: torch.nn.Module, example: torch.Tensor, implementation: str = "jacobian_contraction",
              mode: str = "full", dtype: str = "float64", quick_compile: bool = False):
    """neural-tangents' jitted NTK of ``model``: ``f(x1, x2_or_None)`` on numpy batches -> a JAX array.

    ``mode`` uses neural-tangents' own ``trace_axes``/``diagonal_axes``, so a peer does only the work the mode
    needs (its trace is a mean over outputs; it is rescaled to the sum, the plugins' trace). The model is
    computed in ``dtype`` throughout (weights, constants, floating inputs). ``f.convert(x)`` turns a torch or
    numpy batch into the JAX array ``f.run(a, b)`` takes, the jitted call alone (for timing; its first call
    compiles, once per model, input shapes, implementation, mode and dtype). ``quick_compile`` compiles with
    XLA's backend optimisation off (``QUICK_COMPILE``): for one-off kernels, not for timing.
    """
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"kernel_fn(model, example, implementation, mode, dtype): example must be a batch like x1 "
                        f"(a torch.Tensor), got {type(example).__name__} {example!r:.40}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown neural-tangents implementation {implementation!r}; "
                         f"valid: {', '.join(IMPLEMENTATIONS)}")
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    nt = _nt()
    jax = _jax()
    from . import translate

    prog = _checked_program(model, example)
    params, constants = translate.weights(model, prog, dtype)
    key = (implementation, mode, dtype.name)
    jitted = prog.kernels.get(key)
    if jitted is None:
        trace_axes, diagonal_axes = _MODES[mode]
        impl = getattr(nt.NtkImplementation, implementation.upper())

        def kernel(a, b, p, c):
            apply_fn = translate.JaxFunction(prog, c, dtype)
            fn = nt.empirical_ntk_fn(apply_fn, trace_axes=trace_axes, diagonal_axes=diagonal_axes, vmap_axes=0,
                                     implementation=impl)
            k = fn(a, b, p)
            if mode == "trace":  # neural-tangents averages over traced axes; the trace is their sum
                k = k * jax.eval_shape(apply_fn, p, a).shape[-1]
            return k

        jitted = prog.kernels[key] = jax.jit(kernel)
    cpu = jax.devices("cpu")[0]
    params, constants = jax.device_put((params, constants), cpu)

    def convert(x):
        if x is None:
            return None
        x = to_numpy(x) if isinstance(x, torch.Tensor) else np.asarray(x)
        return jax.device_put(x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x, cpu)

    def run(a, b=None):
        if quick_compile:
            return _quick(prog, key, jitted, a, b, params, constants)
        return jitted(a, b, params, constants)

    def f(x1, x2=None):
        return run(convert(x1), convert(x2))

    f.convert, f.run, f.params = convert, run, params
    return f


def ntk(model: torch.nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, mode: str = "full",
        implementation: str = "structured_derivatives", quick_compile: bool = False) -> torch.Tensor:
    """neural-tangents' empirical NTK of ``model`` in float64 on the CPU, in the plugin shapes
    ((N, M, O, O) / (N, M) / (N, M, O); a model returning (N,) has O = 1).

    Computed with ``trace_axes=(), diagonal_axes=()`` (the full kernel), then reduced to ``mode`` in torch.
    ``quick_compile``: XLA's backend optimisation off, for small problems where compiling dominates (on big
    conv nets it compiles several times faster and runs several times slower). Raises UnsupportedOpError (with the reason) for a
    model the translation cannot reproduce.
    """
    from ntk_bench.implementations.core.contractions import reduce_full

    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if x2 is not None and tuple(x2.shape[1:]) != tuple(x1.shape[1:]):
        raise ValueError(f"x1 and x2 have different per-sample shapes: {tuple(x1.shape[1:])} vs "
                         f"{tuple(x2.shape[1:])}")
    fn = kernel_fn(model, x1, implementation, "full", "float64", quick_compile=quick_compile)
    out = fn(x1, x2)
    return reduce_full(torch.from_numpy(np.array(out)), mode)


__all__ = ["IMPLEMENTATIONS", "UnsupportedOpError", "available", "forward", "forward_tolerance", "kernel_fn", "ntk",
           "reduced_precision", "supports", "to_jax", "to_numpy", "tolerance"]
