"""The arithmetic of a cost estimate: what an algorithm costs, given a model's sizes (``costs.CostStats``).

It imports nothing of the package, so that the interface (``base``), whose default ``estimate`` uses it, stays
at the bottom of the layers; ``costs`` re-exports all of it.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol


class Sizes(Protocol):
    """The sizes of a model these formulas read (``costs.CostStats`` has them)."""

    p: int  # trainable parameters
    o: int  # outputs per sample
    itemsize: int


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What one call of an algorithm costs: ``flops`` (floating-point operations), ``bytes`` (its estimated peak
    memory, which the memory budget and the tiling compare against), and where a plugin counts them, ``traffic`` and
    ``ops`` (see their comments); auto turns them into seconds with constants fitted per plugin and device."""

    flops: float
    bytes: float
    traffic: float = 0.0  # numbers read or written by memory-bound operators (costed per number, not per FLOP)
    ops: float = 0.0  # operator calls (costed per call)


def jacobian_bytes(stats: Sizes, n: int, m: int) -> float:
    """Per-sample Jacobians of both sides, (N+M)·O·P numbers."""
    return (n + m) * stats.o * stats.p * stats.itemsize


def kernel_numel(n: int, m: int, o: int, mode: str) -> int:
    """The number of kernel entries for N×M samples and O outputs in ``mode``: N·M·O², N·M or N·M·O."""
    return n * m * {"full": o * o, "trace": 1, "diagonal": o}[mode]


def contraction_flops(stats: Sizes, n: int, m: int, mode: str) -> float:
    """J1 J2ᵀ: 2·N·M·O²·P (full) or 2·N·M·O·P (trace, diagonal)."""
    return 2 * kernel_numel(n, m, stats.o, "full" if mode == "full" else "diagonal") * stats.p
