"""What a rank test over timing blocks can tell: the significance level the compare gate uses, and the blocks a side
needs before a Mann–Whitney test can reach it at all (the gate and the runner size their timings by it)."""

from __future__ import annotations

import math

DEFAULT_ALPHA = 0.01


def rank_test_floor(na: int, nb: int) -> float:
    """The smallest two-sided p a Mann–Whitney test of ``na`` against ``nb`` blocks can give (every block of one
    side above every block of the other): 2 / C(na + nb, na)."""
    return min(1.0, 2 / math.comb(na + nb, na))


def min_blocks(alpha: float = DEFAULT_ALPHA) -> int:
    """Blocks a side the rank test needs to be able to reach ``alpha`` (5 at 0.01; 3 blocks never reach 0.1)."""
    n = 1
    while rank_test_floor(n, n) >= alpha:
        n += 1
    return n
