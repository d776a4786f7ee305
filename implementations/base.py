"""The interface every NTK plugin offers, and the checks and helpers they share.

A plugin subclasses :class:`NTKPlugin`, sets ``name``, and implements ``_kernel``.
``compute`` validates the inputs, runs ``_kernel`` and leaves the model as it
found it (parameters, ``.grad``, train/eval flag), so plugins stay small.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Callable, Iterator

import torch
from torch import nn

MODES = ("full", "trace", "diagonal")


class UnsupportedModelError(ValueError):
    """The plugin cannot handle this model; the message says why."""


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the NTK differentiates: every parameter that requires grad."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def kernel_shape(n: int, m: int, o: int, mode: str) -> tuple[int, ...]:
    return {"full": (n, m, o, o), "trace": (n, m), "diagonal": (n, m, o)}[mode]


def reduce_full(kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a full (N, M, O, O) kernel to the requested mode."""
    if mode == "full":
        return kernel
    if mode == "trace":
        return torch.einsum("nmaa->nm", kernel)
    return torch.einsum("nmaa->nma", kernel).contiguous()


_CONTRACTIONS = {"full": "naf,mbf->nmab", "trace": "naf,maf->nm", "diagonal": "naf,maf->nma"}


def contract_jacobians(jac1: list[torch.Tensor], jac2: list[torch.Tensor], mode: str) -> torch.Tensor:
    """Sum over parameter blocks of J1 J2ᵀ in the requested mode.

    Each block is (N, O, P_i); trace and diagonal contract directly (N·M·O·P_i
    instead of N·M·O²·P_i).
    """
    expr = _CONTRACTIONS[mode]
    out = None
    for j1, j2 in zip(jac1, jac2):
        term = torch.einsum(expr, j1, j2)
        out = term if out is None else out.add_(term)
    return out


def gradient_gram(g1: torch.Tensor, g2: torch.Tensor, mode: str) -> torch.Tensor:
    """Σ_c G1[o, n, c] G2[o, m, c] for G of shape (O, N, C): trace → (N, M), diagonal → (N, M, O).

    (Full mode accumulates its Gram terms in :class:`KernelSum`.)
    """
    o, n, c = g1.shape
    m = g2.shape[1]
    if mode == "trace":
        return g1.transpose(0, 1).reshape(n, o * c) @ g2.transpose(0, 1).reshape(m, o * c).T
    return torch.bmm(g1, g2.transpose(1, 2)).permute(1, 2, 0)


# From this many rows (N·O), a symmetric full-mode Gram (x2 = None) is built from 3 of its 4 blocks. On an H100
# at N·O = 5120 (MLP 784-512-512-10, N=512) the split cut GPU time from 2.0 to 1.8 ms a call but raised the
# wall time (2.6 to 2.8 ms: more launches, and the call is bound by the CPU's launch overhead); it pays only
# where the GEMMs dominate.
SYMMETRIC_SPLIT_MIN_ROWS = 8192
# Inside a CUDA graph capture (cuda_graphs) the extra launches cost nothing at replay: on an H100 the split took
# the replayed MLP call at N·O = 5120 from 2.24 to 2.02 ms (structured) and 2.18 to 1.99 ms (explicit_mlp).
SYMMETRIC_SPLIT_MIN_ROWS_CAPTURED = 2048


def symmetric_split_min_rows(device: torch.device) -> int:
    """N·O from which a symmetric Gram term is built from 3 of its 4 blocks (lower while a CUDA graph is captured)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return SYMMETRIC_SPLIT_MIN_ROWS_CAPTURED
    return SYMMETRIC_SPLIT_MIN_ROWS


class KernelSum:
    """A sum of per-layer kernel terms in a mode's shape, accumulated in place.

    Full-mode Gram terms xx[n, m]·Σ_c G1[o, n, c] G2[p, m, c] are kept in the
    (N, O, M, O) order the GEMM writes, so a layer costs one GEMM and one fused
    multiply-add pass (no permuted reads); ``result()`` copies once to (N, M, O, O).
    A large symmetric kernel (x2 = None) computes only the upper blocks of the
    split [first half, second half] and mirrors the lower-left one in that copy:
    3/4 of the GEMM and multiply-add work.
    """

    def __init__(self, mode: str):
        self.mode, self.acc = mode, None
        self.half = None  # set when only the upper blocks are summed: the first half's size
        self.identity = None  # (Σ xx, O) of the identity-Gram terms, added to the diagonal by result()

    def add_gram(self, xx: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, symmetric: bool = False) -> None:
        """Add xx ⊙ (G1 G2ᵀ) for G of shape (O, N, C); ``symmetric``: g2 is g1 and xx is symmetric (x2 = None)."""
        if self.mode != "full":
            term = gradient_gram(g1, g2, self.mode)
            self.add(term * xx.view(xx.shape + (1,) * (term.dim() - 2)))
            return
        o, n, c = g1.shape
        m = g2.shape[1]
        a1 = g1.transpose(0, 1).reshape(n * o, c)
        if symmetric and n >= 2 and n * o >= symmetric_split_min_rows(a1.device):
            self._add_upper_blocks(xx, a1, n, o)
            return
        a2 = a1 if symmetric else g2.transpose(0, 1).reshape(m * o, c)
        self._add_block(slice(None), slice(None), a1 @ a2.T, xx)

    def _add_block(self, rows: slice, cols: slice, prod: torch.Tensor, xx: torch.Tensor,
                   overwrite: bool = False) -> None:
        """acc[rows, :, cols, :] += prod ⊙ xx[rows, cols] (= with ``overwrite``, or for the first term)."""
        weight = xx[rows, cols][:, None, :, None]
        o = prod.shape[0] // weight.shape[0]
        prod = prod.view(weight.shape[0], o, weight.shape[2], o)
        if self.acc is None:  # the first term, covering the whole kernel: its buffer becomes the sum
            self.acc = prod.mul_(weight)
        elif overwrite:
            torch.mul(prod, weight, out=self.acc[rows, :, cols, :])
        else:
            self.acc[rows, :, cols, :].addcmul_(prod, weight)

    def _add_upper_blocks(self, xx: torch.Tensor, a: torch.Tensor, n: int, o: int) -> None:
        h = n // 2
        top, bottom = a[: h * o], a[h * o:]
        first = self.acc is None
        if first:
            self.acc = torch.empty(n, o, n, o, dtype=a.dtype, device=a.device)
        for rows, cols, lhs, rhs in ((slice(0, h), slice(0, h), top, top), (slice(0, h), slice(h, n), top, bottom),
                                     (slice(h, n), slice(h, n), bottom, bottom)):
            self._add_block(rows, cols, lhs @ rhs.T, xx, overwrite=first)
        self.half = h

    def add_identity_gram(self, xx: torch.Tensor, o: int) -> None:
        """Add xx[n, m]·δ_op: the Gram term of the output layer itself, whose G[o, n, c] = δ_oc.

        No GEMM: the terms are summed as (N, M) and ``result()`` adds them to the N·M·O diagonal entries only,
        instead of all N·M·O².
        """
        self.identity = (xx if self.identity is None else self.identity[0] + xx, o)

    def add_jacobians(self, j1: torch.Tensor, j2: torch.Tensor) -> None:
        """Add J1 J2ᵀ for Jacobians of shape (N, O, P) and (M, O, P); full mode as one GEMM written in place."""
        if self.mode != "full":
            self.add(contract_jacobians([j1], [j2], self.mode))
            return
        n, o, p = j1.shape
        prod = (j1.reshape(n * o, p) @ j2.reshape(-1, p).T).view(n, o, j2.shape[0], o)
        if self.acc is None:
            self.acc = prod
        else:
            self.acc.add_(prod)

    def add(self, term: torch.Tensor) -> None:
        """Add a fresh term in the mode's shape ((N, M, O, O) for full); the term may be overwritten."""
        if self.mode == "full":
            term = term.permute(0, 2, 1, 3)
        if self.acc is None:
            self.acc = term
        else:
            self.acc.add_(term)

    def result(self) -> torch.Tensor:
        out = self._gram_sum()
        if self.identity is not None:
            xx, o = self.identity
            if self.mode == "trace":
                out.add_(xx * o)
            else:
                (out if self.mode == "diagonal" else torch.diagonal(out, dim1=2, dim2=3)).add_(xx.unsqueeze(-1))
        return out

    def _gram_sum(self) -> torch.Tensor:
        if self.acc is None:  # only identity terms
            xx, o = self.identity
            return xx.new_zeros(kernel_shape(*xx.shape, o, self.mode))
        if self.mode != "full":
            return self.acc
        full = self.acc.permute(0, 2, 1, 3)
        if self.half is None:
            return full.contiguous()
        # Θ[n, m, o, p] = Θ[m, n, p, o]: the lower-left block from the upper-right one.
        h = self.half
        out = torch.empty(full.shape, dtype=full.dtype, device=full.device)
        out[:h].copy_(full[:h])
        out[h:, h:].copy_(full[h:, h:])
        out[h:, :h].copy_(self.acc[:h, :, h:, :].permute(2, 0, 3, 1))
        return out


def input_gram(x1: torch.Tensor, x2: torch.Tensor, bias: bool) -> torch.Tensor:
    """X1 X2ᵀ of a Linear layer's inputs, plus 1 for its bias (whose Jacobian is the layer's G itself)."""
    xx = x1 @ x2.T
    return xx + 1 if bias else xx


def submodules(module: nn.Module) -> list[nn.Module]:
    """The module and all its submodules (a shared one as often as it is reached), walking ``_modules`` directly:
    per call, where ``model.modules()`` / ``parameters()`` (generators and a de-duplicating set) cost tens of µs."""
    out = [module]
    for child in module._modules.values():
        if child is not None:
            out.extend(submodules(child))
    return out


def _parameter_signature(module: nn.Module) -> tuple:
    """(shape, requires_grad) of every parameter."""
    return tuple((p.shape, p.requires_grad) for m in submodules(module) for p in m._parameters.values() if p is not None)


def shape_keyed_cache(store: "weakref.WeakKeyDictionary", model: nn.Module, key: tuple, make: Callable):
    """``make()`` cached per model (weakly) and per ``key`` plus the model's parameter shapes.

    For facts that depend on the architecture and input shapes, not on the weights.
    """
    per_model = store.setdefault(model, {})
    full_key = (_parameter_signature(model), *key)
    if full_key not in per_model:
        per_model[full_key] = make()
    return per_model[full_key]


_OUTPUT_WIDTHS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def output_width(model: nn.Module, x: torch.Tensor) -> int:
    """O, from a forward pass on one sample (cached per model, parameter shapes and input shape).

    The model must map (N, ...) to (N, O).
    """
    def width():
        with torch.no_grad():
            y = model(x[:1])
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != 1:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"model output must have shape (N, O); got {shape} for a batch of 1")
        return y.shape[1]

    return shape_keyed_cache(_OUTPUT_WIDTHS, model, (tuple(x.shape[1:]), x.dtype, x.device), width)


def validate_inputs(model: nn.Module, x1, x2, mode: str) -> None:
    """Raise a clear ValueError/TypeError for inputs no plugin can take."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    p0 = next((p for p in model.parameters() if p.requires_grad), None)
    if p0 is None:
        raise ValueError("model has no trainable parameters: its NTK is empty")
    for label, x in (("x1", x1), ("x2", x2)):
        if x is None and label == "x2":
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{label} has dtype {x.dtype}; the NTK needs floating-point inputs")
        if x.dim() < 2:
            raise ValueError(f"{label} must be batched, shape (N, ...); got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{label} is an empty batch (shape {tuple(x.shape)})")
        if x.device != p0.device:
            raise ValueError(f"{label} is on {x.device} but the model's parameters are on {p0.device}")
        if x.dtype != p0.dtype:
            raise TypeError(
                f"{label} has dtype {x.dtype} but the model's parameters are {p0.dtype}; "
                f"convert one of them (e.g. model.to({x.dtype}))"
            )
        if not math.isfinite(x.sum().item()) and not bool(torch.isfinite(x).all()):  # (a sum is 2 ops, not 4;
            raise ValueError(f"{label} contains NaN or inf")                          # an overflowing one is rechecked)
    if x2 is not None and x1.shape[1:] != x2.shape[1:]:
        raise ValueError(
            f"x1 and x2 have different per-sample shapes: {tuple(x1.shape[1:])} vs {tuple(x2.shape[1:])}"
        )


@contextlib.contextmanager
def model_state_preserved(model: nn.Module) -> Iterator[None]:
    """Restore the train/eval flags and the ``.grad`` of every parameter on exit.

    Plugins never write parameter values (the tests check that); autograd-based
    ones may touch ``.grad``, which is put back as it was.
    """
    modules = submodules(model)
    flags = {m: m.training for m in modules}
    params = list({id(p): p for m in modules for p in m._parameters.values() if p is not None}.values())
    grads = [p.grad for p in params]
    try:
        yield
    finally:
        for m, flag in flags.items():
            if m.training != flag:  # (nn.Module's attribute setter is slow; most calls change nothing)
                m.training = flag
        for p, g in zip(params, grads):
            if p.grad is not g:
                p.grad = g


class NTKPlugin:
    """One algorithm for the empirical NTK Θ(x1, x2) = J(x1) J(x2)ᵀ."""

    name: str = ""
    # "ours" (an algorithm of this project, one auto may pick) or "peer" (another library's routine, run as its
    # authors run it, for comparison)
    kind: str = "ours"
    # True where ``_kernel`` can be captured in a CUDA graph: no host syncs, no data-dependent shapes (cuda_graphs).
    capturable: bool = False

    def supports(self, model: nn.Module) -> str | None:
        """None when this plugin can handle ``model``, otherwise the reason it cannot."""
        return None

    def compute(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, mode: str = "full",
                memory_budget_bytes: int | None = None) -> torch.Tensor:
        """Θ(x1, x2) with shape (N, M, O, O) / (N, M) / (N, M, O) for full / trace / diagonal.

        ``x2=None`` means x2 = x1. The result is on the inputs' device, in their dtype.
        With ``memory_budget_bytes`` the kernel is computed in tiles whose estimated
        peak fits the budget (``blocking``); a kernel too large to sit next to a
        tile within the budget is returned in CPU memory.
        """
        validate_inputs(model, x1, x2, mode)
        o = output_width(model, x1)
        reason = self.supports(model)
        if reason is not None:
            raise UnsupportedModelError(reason)
        with model_state_preserved(model):
            if memory_budget_bytes is None:
                from . import cuda_graphs

                out = cuda_graphs.CACHE.kernel(self, model, x1, x2, mode)
                if out is None:
                    out = self._kernel(model, x1, x2, mode)
            else:
                from .blocking import blocked_kernel

                out = blocked_kernel(self.with_budget(memory_budget_bytes), model, x1, x2, mode, memory_budget_bytes)
        expected = kernel_shape(x1.shape[0], (x1 if x2 is None else x2).shape[0], o, mode)
        if tuple(out.shape) != expected:
            raise RuntimeError(f"{self.name} returned shape {tuple(out.shape)}, expected {expected}")
        return out.to(dtype=x1.dtype) if memory_budget_bytes is not None else out.to(device=x1.device, dtype=x1.dtype)

    def prepare(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, mode: str = "full",
                memory_budget_bytes: int | None = None) -> tuple[Callable[[], object], Callable[[object], torch.Tensor]]:
        """``(run, to_torch)``: ``run()`` computes the kernel in the plugin's native form and ``to_torch(out)`` turns
        that into the plugin shapes as a torch tensor. A runner times ``run`` alone, so a peer does its set-up
        here (translating the model, converting inputs) and returns its own routine, called as its authors call it.
        For our plugins ``run`` is ``compute`` itself."""
        return (lambda: self.compute(model, x1, x2, mode, memory_budget_bytes=memory_budget_bytes)), (lambda out: out)

    def with_budget(self, memory_budget_bytes: int) -> "NTKPlugin":
        """This plugin, for a call under a memory budget (plugins that tile internally override it)."""
        return self

    def estimate(self, stats, n: int, m: int, mode: str, symmetric: bool):
        """Cost-model FLOPs and peak bytes for an N x M block (``costs.Estimate``).

        The default is Jacobian contraction's: (N+M)·O Jacobian rows of P numbers
        each, built with one backward per output, then contracted.
        """
        from .costs import Estimate, contraction_flops, jacobian_bytes, kernel_numel

        side = n if symmetric else n + m
        flops = side * stats.o * 3 * stats.fp_flops + contraction_flops(stats, n, m, mode)
        peak = 2 * jacobian_bytes(stats, n, 0 if symmetric else m) + side * stats.o * stats.activations * stats.itemsize
        return Estimate(flops, peak + kernel_numel(n, m, stats.o, mode) * stats.itemsize)

    def _kernel(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None, mode: str) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<NTK plugin {self.name}>"


def functional_single(model: nn.Module) -> tuple[dict[str, torch.Tensor], Callable]:
    """Detached trainable parameters and f(params, x_single) -> (O,) for torch.func."""
    params = {k: v.detach() for k, v in trainable_parameters(model).items()}

    def f(p, x):
        return torch.func.functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    return params, f


def chunks(n: int, size: int) -> list[slice]:
    """Ragged slices of ``range(n)`` of at most ``size`` each."""
    size = max(1, int(size))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]

