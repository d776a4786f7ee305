"""The generic rule: any other module with parameters, by its own per-sample vjp."""

from __future__ import annotations

import warnings

import torch
from torch.utils import _pytree as pytree

from ...core.base import UnsupportedModelError
from ...core.costs import Layer
from ...core.tolerances import tolerance
from .. import rewrites
from .base import LayerCost, Rule, covered, order_of
from .taps import JacobianSide, check_jacobian_side


class GenericRule(Rule):
    """Any other module with parameters: its per-sample parameter Jacobian from its recorded inputs and output
    gradients, J[n, o] = vjp of the module alone on sample n along G[o, n], for the parameters the plan gives it
    (its own, those of submodules it uses without calling them, a parametrization's originals).

    ``mode`` "vmap": torch.func.vmap over samples of the vjp of ``functional_call`` (the batch dimension kept as
    a dimension of size 1), vmapped over the O gradients: one call. "loop": one sample at a time through the
    module's own forward, the O gradients in one batched backward (modules vmap cannot run). While the plan is
    checked, "vmap" is tried first and must reproduce the module's outputs, else "loop", which must too.
    Cost: about one forward and one O-wide backward of the module per sample, and (N, O, P) numbers.
    """

    name = "generic"
    level = "call"

    def __init__(self, module, slots):
        super().__init__(module, slots)
        self.names = list(slots)  # the parameters' names relative to the module
        self.mode = "vmap"

    def params(self):
        found = dict(self.module.named_parameters(remove_duplicate=False))
        return {k: found[k] for k in self.names}

    def targets(self, use):
        return [j for j, d in enumerate(use.entry.out_dims[use.index]) if d is not None]

    def side(self, use, grads, checking=False):
        """``grads``: per output leaf of ``targets(use)``, (O, *leaf.shape) or None (zeros: no gradient reached
        it)."""
        e, idx = use.entry, self.targets(use)
        outs = [use.outs[j] for j in idx]
        o = next(g.shape[0] for g in grads if g is not None)
        grads = [torch.zeros((o,) + z.shape, dtype=z.dtype, device=z.device) if g is None else g
                 for g, z in zip(grads, outs)]
        call = (use.leaves, use.spec, e.in_dims[use.index], [e.out_dims[use.index][j] for j in idx], idx)
        if not checking:
            return self._side(call, grads)
        for mode in ("vmap", "loop"):
            self.mode = mode
            try:
                if not self.reproduces(call, outs):
                    continue
                return self._side(call, grads)
            except (RuntimeError, ValueError, TypeError, NotImplementedError):
                if mode == "loop":
                    raise
        raise UnsupportedModelError(f"structured: {e.name} ({type(e.module).__name__}): its output for one sample "
                                    "depends on the other samples of the batch (or on randomness)")

    def _side(self, call, grads):
        leaves, spec, in_dims, out_dims, out_index = call
        n = next(leaf.shape[d] for leaf, d in zip(leaves, in_dims) if d is not None)
        if self.mode == "vmap":
            jac = self._vmap(leaves, spec, in_dims, out_dims, out_index, grads, n)
        else:
            jac = self._loop(leaves, spec, in_dims, out_dims, out_index, grads, n)
        return JacobianSide(jac, n)

    def check_side(self, side, n, o):
        check_jacobian_side(self, side, n, o)

    def reproduces(self, call, outs) -> bool:
        """Whether the module run per sample (in this rule's mode) gives the recorded outputs: it does not mix the
        samples of a batch, and its batch dimensions are the ones the plan found."""
        from torch.func import vmap

        leaves, spec, in_dims, out_dims, out_index = call
        n = next(leaf.shape[d] for leaf, d in zip(leaves, in_dims) if d is not None)
        with torch.no_grad(), rewrites.batchable(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")
            if self.mode == "vmap":
                params = {k: p.detach() for k, p in self.params().items()}
                split = [leaf if d is None else leaf.unflatten(d, (n, 1)) for leaf, d in zip(leaves, in_dims)]
                got = vmap(lambda ls: self._call(params, ls, spec, out_index), in_dims=(list(in_dims),),
                           out_dims=tuple(out_dims))(split)
                got = [g.flatten(d, d + 1) for g, d in zip(got, out_dims)]
            else:
                per = []
                for i in range(n):
                    sample = [leaf if d is None else leaf.narrow(d, i, 1) for leaf, d in zip(leaves, in_dims)]
                    args, kwargs = pytree.tree_unflatten(list(sample), spec)
                    res = pytree.tree_leaves(self.module(*args, **kwargs))
                    per.append([res[j] for j in out_index])
                got = [torch.cat([p[k] for p in per], d) for k, d in enumerate(out_dims)]
        tol = tolerance(outs[0].dtype, "repeat")
        for a, b in zip(got, outs):
            b = b.detach()
            if a.shape != b.shape or not torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max())):
                return False
        return True

    def _call(self, params, leaves, spec, out_index):
        from torch.func import functional_call

        args, kwargs = pytree.tree_unflatten(list(leaves), spec)
        if rewrites.rnn_supported(self.module) and not self.module._forward_hooks and \
                not self.module._forward_pre_hooks:
            out = rewrites.functional_rnn(self.module, params, tuple(args), kwargs)
        else:
            out = functional_call(self.module, params, tuple(args), kwargs)
        out = pytree.tree_leaves(out)
        return tuple(out[i] for i in out_index)

    def _vmap(self, leaves, spec, in_dims, out_dims, out_index, grads, n):
        from torch.func import vjp, vmap

        params = {k: p.detach() for k, p in self.params().items()}
        split = [leaf if d is None else leaf.unflatten(d, (n, 1)) for leaf, d in zip(leaves, in_dims)]
        gsplit = [g.unflatten(1 + d, (n, 1)) for g, d in zip(grads, out_dims)]

        def one(leaves_n, grads_n):
            _, pull = vjp(lambda p: self._call(p, leaves_n, spec, out_index), params)
            return vmap(lambda gs: pull(tuple(gs))[0])(grads_n)

        with torch.no_grad(), rewrites.batchable(), warnings.catch_warnings():  # (torch.func ignores no_grad)
            warnings.filterwarnings("ignore", message="There is a performance drop")
            jac = vmap(one, in_dims=([d for d in in_dims], [1 + d for d in out_dims]))(split, gsplit)
        return {k: v.reshape(n, v.shape[1], -1) for k, v in jac.items()}

    def _loop(self, leaves, spec, in_dims, out_dims, out_index, grads, n):
        params = self.params()
        names = list(params)
        blocks = {k: [] for k in names}
        o = grads[0].shape[0]
        for i in range(n):
            sample = [leaf if d is None else leaf.narrow(d, i, 1) for leaf, d in zip(leaves, in_dims)]
            gs = [g.narrow(1 + d, i, 1) for g, d in zip(grads, out_dims)]
            with torch.enable_grad(), rewrites.batchable():
                args, kwargs = pytree.tree_unflatten(list(sample), spec)
                outs = pytree.tree_leaves(self.module(*args, **kwargs))
                outs = [outs[j] for j in out_index]
                got = torch.autograd.grad(outs, list(params.values()), gs, is_grads_batched=True, allow_unused=True)
            for k, gr in zip(names, got):
                blocks[k].append(gr.reshape(o, -1) if gr is not None else params[k].new_zeros(o, params[k].numel()))
        return {k: torch.stack(v) for k, v in blocks.items()}

    def jacobians(self, side, slots):
        return {k: side.jac[k] for k in slots}

    def summed(self, side, slots):
        return {k: side.jac[k].sum(0) for k in slots}

    @classmethod
    def layers(cls, entry, flops_of):
        p = covered(entry.slots)
        return [Layer(cls.name, 1, p, 1, False, p=p, flops=max(flops_of(entry.module), 2 * p))]

    @classmethod
    def estimate(cls, layer, n, m, o, mode, symmetric):
        side = n if symmetric else n + m
        return LayerCost(side * (1 + 2 * o) * layer.flops + 2 * n * m * order_of(o, mode) * layer.p,
                         jac_held=side * o * layer.p)
