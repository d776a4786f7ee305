"""Kernel arithmetic the plugins share: shapes per mode, Jacobian contraction, and :class:`KernelSum`,
which accumulates per-layer Gram and Jacobian terms in place (structured, explicit_mlp)."""

from __future__ import annotations

import torch

from . import onednn


def kernel_shape(n: int, m: int, o: int, mode: str) -> tuple[int, ...]:
    """The kernel's shape for N×M samples and O outputs in ``mode``: (N, M, O, O) full, (N, M) trace, (N, M, O)
    diagonal."""
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
    out: torch.Tensor | None = None
    for j1, j2 in zip(jac1, jac2):
        term = torch.einsum(expr, j1, j2)
        out = term if out is None else out.add_(term)
    if out is None:
        raise ValueError("contract_jacobians: no Jacobian blocks (a model without trainable parameters)")
    return out


def gradient_gram(g1: torch.Tensor, g2: torch.Tensor, mode: str) -> torch.Tensor:
    """Σ_c G1[o, n, c] G2[o, m, c] for G of shape (O, N, C): trace → (N, M), diagonal → (N, M, O).

    (Full mode accumulates its Gram terms in :class:`KernelSum`.)
    """
    o, n, c = g1.shape
    m = g2.shape[1]
    if mode == "trace":
        return onednn.gram(g1.transpose(0, 1).reshape(n, o * c), g2.transpose(0, 1).reshape(m, o * c))
    return torch.bmm(g1, g2.transpose(1, 2)).permute(1, 2, 0)


# From this many rows (N·O), a symmetric full-mode Gram (x2 = None) is built from the blocks on and above its
# diagonal only (the lower ones mirrored in the final copy): less GEMM and multiply-add work for more operator
# calls. On a GPU it pays only where the GEMMs bound the call, not the host issuing them, and from fewer rows inside
# a CUDA graph capture, where the extra launches cost nothing at replay (results/2026-11-23-gpu/graph_check.txt);
# there the split is in halves (3 of 4 blocks). On the CPU the GEMMs bound the call from a few hundred rows, and k
# row blocks of at least SYMMETRIC_BLOCK_MIN_ROWS (up to SYMMETRIC_MAX_BLOCKS) cost (k + 1) / 2k of the work
# (results/2026-12-07-small-vs-nt-finalists).
SYMMETRIC_SPLIT_MIN_ROWS = 8192
SYMMETRIC_SPLIT_MIN_ROWS_CAPTURED = 2048
SYMMETRIC_SPLIT_MIN_ROWS_CPU = 512
SYMMETRIC_BLOCK_MIN_ROWS = 128
SYMMETRIC_MAX_BLOCKS = 8


def symmetric_split_min_rows(device: torch.device) -> int:
    """N·O from which a symmetric Gram term is built from its upper blocks (lower while a CUDA graph is captured)."""
    if device.type == "cpu":
        return SYMMETRIC_SPLIT_MIN_ROWS_CPU
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return SYMMETRIC_SPLIT_MIN_ROWS_CAPTURED
    return SYMMETRIC_SPLIT_MIN_ROWS


def symmetric_blocks(rows: int, device: torch.device) -> int:
    """Into how many row blocks a symmetric Gram of ``rows`` rows is split once it is split (halves off the CPU)."""
    if device.type != "cpu":
        return 2
    return max(2, min(SYMMETRIC_MAX_BLOCKS, rows // SYMMETRIC_BLOCK_MIN_ROWS))


def block_starts(n: int, k: int) -> list[int]:
    """The first index of each of ``k`` near-equal blocks of ``range(n)`` (n blocks of one where n < k), and n."""
    k = max(1, min(k, n))
    return [round(i * n / k) for i in range(k)] + [n]


SYMMETRIC_JACOBIAN_MIN_ROWS = 64


def _gram_rows(a: torch.Tensor, b: torch.Tensor, same: bool) -> torch.Tensor:
    """a bᵀ; where b is a (a symmetric kernel's Jacobian) and has SYMMETRIC_JACOBIAN_MIN_ROWS rows or more, from
    the products of the row blocks on and above the diagonal only, the lower ones mirrored."""
    r = a.shape[0]
    if not same or r < SYMMETRIC_JACOBIAN_MIN_ROWS:
        return onednn.gram(a, b)
    starts = block_starts(r, symmetric_blocks(r, a.device))
    out = torch.empty(r, r, dtype=a.dtype, device=a.device)
    for i0, i1 in zip(starts, starts[1:]):
        out[i0:i1, i0:] = onednn.gram(a[i0:i1], a[i0:])  # (not mm(out=): torch.compile takes no strided out= tensor)
        if i0:
            out[i0:i1, :i0] = out[:i0, i0:i1].T
    return out


def _outputs_first(j: torch.Tensor) -> bool:
    """Whether an (N, O, P) Jacobian is a view of a contiguous (O, N, P) tensor."""
    return j.shape[0] > 1 and j.shape[1] > 1 and j.transpose(0, 1).is_contiguous()


class KernelSum:
    """A sum of per-layer kernel terms in a mode's shape, accumulated in place.

    Full-mode Gram terms xx[n, m]·Σ_c G1[o, n, c] G2[p, m, c] are kept in the
    (N, O, M, O) order the GEMM writes, so a layer costs one GEMM and one fused
    multiply-add pass (no permuted reads); ``result()`` copies once to (N, M, O, O).
    A large symmetric kernel (x2 = None) computes only the row blocks of samples
    on and above the diagonal (``symmetric_blocks``) and mirrors the lower ones in
    that copy: (k + 1) / 2k of the GEMM and multiply-add work for k blocks.
    """

    def __init__(self, mode: str):
        self.mode = mode
        self.acc: torch.Tensor | None = None
        self.starts: list[int] | None = None  # set when only the upper blocks are summed: the blocks' first samples
        # (Σ xx, O) of the identity-Gram terms, added to the diagonal by result()
        self.identity: tuple[torch.Tensor, int] | None = None

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
            self._add_upper_blocks(xx, a1, n, o, block_starts(n, symmetric_blocks(n * o, a1.device)))
            return
        a2 = a1 if symmetric else g2.transpose(0, 1).reshape(m * o, c)
        self._add_block(slice(None), slice(None), onednn.gram(a1, a2), xx)

    def add_scaled_gram(self, xx: torch.Tensor, w: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor,
                        symmetric: bool = False) -> None:
        """Add xx ⊙ (G1 G2ᵀ) where G[o, n, c] = w[o, c]·d[n, c]: the layer just below a Linear output layer, whose
        G is the output weights scaled per sample by the activation derivatives (w: (O, C), d: (N, C)).

        In trace mode Σ_o Σ_c G1[o, n, c] G2[o, m, c] = Σ_c (Σ_o w[o, c]²) d1[n, c] d2[m, c]: one N·M·C GEMM
        instead of the Gram's N·M·O·C. The other modes build G and take the ordinary Gram: grouping their
        N·M·O²·C by output pairs o ≤ p saves (O-1)/2O of the GEMM but costs a scatter of N·M·O² entries and a
        narrower GEMM, which measured slower on the CPU.
        """
        if self.mode == "trace":
            self.add(onednn.gram(d1 * (w * w).sum(0), d2).mul_(xx))
            return
        g1 = w.unsqueeze(1) * d1
        self.add_gram(xx, g1, g1 if d2 is d1 else w.unsqueeze(1) * d2, symmetric=symmetric)

    def _add_block(self, rows: slice, cols: slice, prod: torch.Tensor, xx: torch.Tensor,
                   overwrite: bool = False) -> None:
        """acc[rows, :, cols, :] += prod ⊙ xx[rows, cols] (= with ``overwrite``, or for the first term)."""
        weight = xx[rows, cols][:, None, :, None]
        o = prod.shape[0] // weight.shape[0]
        prod = prod.view(weight.shape[0], o, weight.shape[2], o)
        if self.acc is None:  # the first term, covering the whole kernel: its buffer becomes the sum
            self.acc = prod.mul_(weight)
        elif overwrite:  # (not mul(out=): torch.compile takes no strided out= tensor)
            self.acc[rows, :, cols, :].copy_(prod.mul_(weight))
        else:
            self.acc[rows, :, cols, :].addcmul_(prod, weight)

    def _add_upper_blocks(self, xx: torch.Tensor, a: torch.Tensor, n: int, o: int, starts: list[int]) -> None:
        """Each block of samples [s, e) against the samples from s on: one GEMM per block (the lower blocks are
        mirrored by ``result``)."""
        if self.starts is not None and self.starts != starts:
            raise ValueError(f"KernelSum: symmetric terms split at {starts}, earlier ones at {self.starts}")
        first = self.acc is None
        if first:
            self.acc = torch.empty(n, o, n, o, dtype=a.dtype, device=a.device)
        for s, e in zip(starts, starts[1:]):
            self._add_block(slice(s, e), slice(s, n), onednn.gram(a[s * o: e * o], a[s * o:]), xx, overwrite=first)
        self.starts = starts

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
        m = j2.shape[0]
        if _outputs_first(j1) and _outputs_first(j2):  # (N, O, P) views of (O, N, P) tensors: rows (o, n)
            prod = _gram_rows(j1.transpose(0, 1).reshape(o * n, p), j2.transpose(0, 1).reshape(o * m, p), j1 is j2)
            prod = prod.view(o, n, o, m).permute(1, 0, 3, 2)
        else:
            prod = _gram_rows(j1.reshape(n * o, p), j2.reshape(-1, p), j1 is j2).view(n, o, m, o)
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
        """The sum in the mode's shape ((N, M, O, O) for full, contiguous), the identity-Gram terms added to the
        diagonal entries; ValueError when nothing was added."""
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
            if self.identity is None:
                raise ValueError("KernelSum.result(): no term was added")
            xx, o = self.identity
            return xx.new_zeros(kernel_shape(xx.shape[0], xx.shape[1], o, self.mode))
        if self.mode != "full":
            return self.acc
        full = self.acc.permute(0, 2, 1, 3)
        if self.starts is None:
            return full.contiguous()
        # Θ[n, m, o, p] = Θ[m, n, p, o]: the blocks left of the diagonal from those above it.
        out = torch.empty(full.shape, dtype=full.dtype, device=full.device)
        for s, e in zip(self.starts, self.starts[1:]):
            out[s:e, s:].copy_(full[s:e, s:])
            if s:
                out[s:e, :s].copy_(self.acc[:s, :, s:e, :].permute(2, 0, 3, 1))
        return out


def input_gram(x1: torch.Tensor, x2: torch.Tensor, bias: bool) -> torch.Tensor:
    """X1 X2ᵀ of a Linear layer's inputs, plus 1 for its bias (whose Jacobian is the layer's G itself)."""
    xx = x1 @ x2.T
    return xx + 1 if bias else xx


def chunks(n: int, size: int) -> list[slice]:
    """Ragged slices of ``range(n)`` of at most ``size`` each."""
    size = max(1, int(size))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]

