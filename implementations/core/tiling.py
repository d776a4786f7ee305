"""Tiling: any plugin computes a kernel larger than memory allows, tile by tile.

x1 × x2 is cut into square tiles, as large as the plugin's memory estimate
allows under the budget, with a ragged last tile (no divisibility rules). For
x2 = None each pair of tiles is computed once and mirrored (Θ(x_j, x_i) is
Θ(x_i, x_j) with samples and outputs swapped), and diagonal tiles use the
plugin's own symmetric path. When the whole kernel does not fit in the budget
next to a tile, tiles are moved to CPU memory as they finish and the result
is returned there.
"""

from __future__ import annotations

import torch

from .contractions import kernel_shape
from .costs import cost_stats, kernel_numel

_SWAP = {"full": (1, 0, 3, 2), "trace": (1, 0), "diagonal": (1, 0, 2)}


def _mirror(block: torch.Tensor, mode: str) -> torch.Tensor:
    """Θ(x_j, x_i) from Θ(x_i, x_j): samples and outputs swapped."""
    return block.permute(*_SWAP[mode])


def tile_size(plugin, stats, n: int, m: int, mode: str, budget: int, symmetric: bool) -> int:
    """The largest tile edge whose estimated peak fits ``budget`` (the whole problem if it fits)."""
    if plugin.estimate(stats, n, m, mode, symmetric).bytes <= budget:
        return max(n, m)
    b = max(n, m)
    while b > 1:
        b = (b + 1) // 2
        if plugin.estimate(stats, min(b, n), min(b, m), mode, False).bytes <= budget:
            return b
    need = plugin.estimate(stats, 1, 1, mode, False).bytes
    raise MemoryError(f"{plugin.name}: a memory budget of {budget:.3g} bytes is too small; "
                      f"even a 1 x 1 tile needs about {need:.3g}")


def tiled_kernel(plugin, model, x1, x2, mode: str, budget: int) -> torch.Tensor:
    stats = cost_stats(model, x1[:1])
    symmetric = x2 is None
    xb = x1 if symmetric else x2
    n, m = x1.shape[0], xb.shape[0]
    b = tile_size(plugin, stats, n, m, mode, budget, symmetric)
    if b >= max(n, m):
        return plugin._kernel(model, x1, x2, mode)
    tile = plugin.estimate(stats, min(b, n), min(b, m), mode, False).bytes
    dtype = next(p for p in model.parameters() if p.requires_grad).dtype  # (x1 may hold integer ids)
    total = kernel_numel(n, m, stats.o, mode) * dtype.itemsize
    out_device = x1.device if total + tile <= budget else torch.device("cpu")
    out = torch.empty(kernel_shape(n, m, stats.o, mode), dtype=dtype, device=out_device)
    rows = [slice(i, min(i + b, n)) for i in range(0, n, b)]
    cols = [slice(j, min(j + b, m)) for j in range(0, m, b)]
    for i, si in enumerate(rows):
        for j, sj in enumerate(cols):
            if symmetric and j < i:
                continue
            same = symmetric and i == j
            block = plugin._kernel(model, x1[si], None if same else xb[sj], mode)
            out[si, sj].copy_(block)  # one copy, across devices when the kernel lives in CPU memory
            if symmetric and j > i:
                out[sj, si].copy_(_mirror(block, mode))
            del block
    return out
