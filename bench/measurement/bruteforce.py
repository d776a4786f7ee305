"""The brute-force oracle: a kernel computed the slowest, plainest way, independent of every plugin: for each
sample alone and each output, one ``torch.autograd.grad`` of that output with respect to every trainable
parameter, then J1 J2ᵀ. ``ntk-bench check`` uses it as the float64 reference where neural-tangents is missing or
cannot take the model; the tests compare plugins with it."""

from __future__ import annotations

import torch

from ntk_bench.implementations.core.contractions import reduce_full


def jacobian(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, O, P): row (n, o) is ∂f(x_n)_o/∂θ, a shared parameter once (its uses summed by autograd)."""
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    rows = []
    with torch.enable_grad():
        for i in range(x.shape[0]):
            y = model(x[i:i + 1]).reshape(-1)
            for o in range(y.shape[0]):
                grads = torch.autograd.grad(y[o], params, retain_graph=True, allow_unused=True)
                # an Embedding(sparse=True)'s gradient is a sparse tensor
                rows.append(torch.cat([(torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g)
                                       .reshape(-1) for p, g in zip(params, grads)]))
    return torch.stack(rows).reshape(x.shape[0], -1, rows[0].numel()).detach()


def ntk(model: torch.nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, mode: str = "full") -> torch.Tensor:
    """Θ(x1, x2) of ``model`` in the plugin shapes of ``mode``, in the model's dtype (x2 = None: x2 = x1)."""
    j1 = jacobian(model, x1)
    j2 = j1 if x2 is None else jacobian(model, x2)
    return reduce_full(torch.einsum("naf,mbf->nmab", j1, j2), mode)
