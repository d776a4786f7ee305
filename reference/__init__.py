"""The neural-tangents reference: the same model and weights in JAX, float64, on the CPU.

``ntk(model, x1, x2, mode, implementation)`` returns neural-tangents'
empirical NTK as a torch tensor in the plugin shapes; ``kernel_fn`` gives a
compiled JAX function for timing neural-tangents' implementations as peers.
JAX and neural-tangents are imported on first use, so the rest of the harness
runs where they are missing (``available()`` says why not).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .translate import UnsupportedOpError, to_jax

IMPLEMENTATIONS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives", "auto")


def available() -> str | None:
    """None when neural-tangents can be imported, otherwise why not."""
    try:
        _nt()
    except Exception as exc:  # ImportError, or a broken JAX/TF install failing at import
        return f"neural-tangents unavailable: {type(exc).__name__}: {exc}"
    return None


def _nt():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # neural-tangents imports TensorFlow
    import jax

    jax.config.update("jax_enable_x64", True)
    import neural_tangents as nt

    return nt


def kernel_fn(model: torch.nn.Module, implementation: str = "jacobian_contraction", mode: str = "full",
              dtype: str = "float64"):
    """A jitted ``f(x1, x2_or_None) -> jax.Array`` computing neural-tangents' NTK of ``model``.

    ``mode`` uses neural-tangents' own ``trace_axes``/``diagonal_axes``, so
    peers are timed doing only the work the mode needs (its trace is a mean over
    outputs; it is rescaled to the sum, the plugins' trace).
    """
    import jax

    nt = _nt()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown neural-tangents implementation {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    apply_fn, params = to_jax(model)
    params = {k: v.astype(dtype) for k, v in params.items()}
    axes = {"full": ((), ()), "trace": ((-1,), ()), "diagonal": ((), (-1,))}
    if mode not in axes:
        raise ValueError(f"unknown mode {mode!r}; valid modes: full, trace, diagonal")
    trace_axes, diagonal_axes = axes[mode]
    fn = nt.empirical_ntk_fn(
        apply_fn, trace_axes=trace_axes, diagonal_axes=diagonal_axes, vmap_axes=0,
        implementation=getattr(nt.NtkImplementation, implementation.upper()),
    )

    def kernel(a, b, p):
        k = fn(a, b, p)
        if mode == "trace":  # neural-tangents averages over traced axes; the trace is their sum
            k = k * jax.eval_shape(apply_fn, p, a).shape[-1]
        return k

    jitted = jax.jit(kernel)
    return lambda x1, x2=None: jitted(x1.astype(dtype), None if x2 is None else x2.astype(dtype), params)


def to_numpy64(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def ntk(model: torch.nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None,
        mode: str = "full", implementation: str = "jacobian_contraction") -> torch.Tensor:
    """neural-tangents' empirical NTK of ``model`` in float64 on the CPU, in the plugin shapes.

    Computed with ``trace_axes=(), diagonal_axes=()`` (the full kernel), then
    reduced to ``mode`` in torch.
    """
    from ntk_bench.implementations.kernels import reduce_full

    if mode not in ("full", "trace", "diagonal"):
        raise ValueError(f"unknown mode {mode!r}; valid modes: full, trace, diagonal")
    fn = kernel_fn(model, implementation, "full")
    out = fn(to_numpy64(x1), None if x2 is None else to_numpy64(x2))
    return reduce_full(torch.from_numpy(np.asarray(out).copy()), mode)


__all__ = ["IMPLEMENTATIONS", "UnsupportedOpError", "available", "kernel_fn", "ntk", "to_jax"]
