"""ntk-bench: the empirical neural tangent kernel of a PyTorch model, by several checked algorithms.

    import ntk_bench
    kernel = ntk_bench.ntk(model, x1)                      # (N, N, O, O), the algorithm picked by ``auto``
    kernel = ntk_bench.ntk(model, x1, x2, mode="trace", impl="structured")

Subpackages: ``ntk_bench.implementations`` (the plugins and their registry),
``ntk_bench.reference`` (neural-tangents in float64, the reference every plugin
is checked against), ``ntk_bench.bench`` (the zoo, sweeps, runner, report and
the ``ntk-bench`` command line).
"""

from __future__ import annotations

from pathlib import Path as _Path

from .version import __version__

# In a source checkout the subpackages are the repository's top-level folders (implementations/, reference/,
# bench/); an installed wheel has them inside this package. Without an install (the GPU machines run the checkout
# with their own Python), the checkout's root is searched for them too.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "implementations" / "__init__.py").is_file() \
        and not (_Path(__file__).parent / "implementations").exists():
    __path__.append(str(_root))  # noqa: F821 - the package's own __path__


def ntk(model, x1, x2=None, mode: str = "full", impl: str = "auto", compile: bool = False, **kwargs):
    """Θ(x1, x2) of ``model``: (N, M, O, O) for ``mode="full"``, (N, M) for ``"trace"``, (N, M, O) for ``"diagonal"``.

    ``x2=None`` means x2 = x1. ``impl`` names a plugin (``ntk_bench.implementations.names()``); ``auto`` picks
    one from the cost model. ``compile=True`` runs the plugin's compiled variant (``explicit_mlp``,
    ``jacobian_contraction``, ``structured``: ``implementations.core.compiled``): its first call per model and shapes
    compiles (seconds), later calls of a small model are several times faster. Other keyword arguments
    (``memory_budget_bytes``) go to the plugin's ``compute``.
    """
    from . import implementations

    if compile:
        variants = [n.removesuffix("_compiled") for n in implementations.names("ours", compiled=True)
                    if n.endswith("_compiled")]
        if impl not in variants:
            raise ValueError(f"compile=True needs impl= one of {', '.join(variants)} (a plugin with a compiled "
                             f"variant), got {impl!r}")
        impl = f"{impl}_compiled"
    return implementations.get(impl).compute(model, x1, x2, mode=mode, **kwargs)


def kernel_matrix(model, X1, X2=None, mode: str = "trace", out=None, **kwargs):
    """Θ(X1, X2) of ``model`` over whole datasets, in tiles, on disk at ``out`` (a zarr directory), resumable.

    ``X1``/``X2``: tensors, numpy arrays or ``torch.utils.data.Dataset`` s (or ``"file.py:function"`` factories).
    Returns the kernel, read with numpy indexing; ``open_kernel(out)`` opens it later. Keyword arguments:
    ``impl``, ``tile``, ``executor``, ``workers``, ``memory_budget_bytes``, ``dtype``, ``device``, ``verify``
    (``ntk_bench.bench.execution.kernel_matrix``).
    """
    from .bench.execution.kernel_matrix import kernel_matrix as _kernel_matrix

    return _kernel_matrix(model, X1, X2, mode=mode, out=out, **kwargs)


def open_kernel(path):
    """A kernel written by :func:`kernel_matrix`, read with numpy indexing (``K[:10, :10]``, ``np.asarray(K)``)."""
    from .bench.store.kernel_store import open_kernel as _open

    return _open(path)


__all__ = ["__version__", "kernel_matrix", "ntk", "open_kernel"]
