"""What the two BackPACK plugins share: a hook-free copy of the caller's model, and the
stacked-batch Jacobian then contraction. BackPACK itself is imported only when used."""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch

from ..core.base import NTKPlugin, UnsupportedModelError
from ..core.contractions import contract_jacobians


@contextlib.contextmanager
def quiet_backward_hooks():
    """BackPACK's hooks fire on module outputs when inputs need no grad; torch warns each time."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def backpack_copy(model):
    """An extended deep copy of ``model`` (the caller's model keeps no hooks)."""
    from backpack import extend

    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.grad = None
    return extend(clone)


def backpack_problem(model, plugin: str) -> str | None:
    """What BackPACK's module extensions would get wrong or fail on, named: hooks, parametrisations and shared
    parameters (its per-module quantities assume one use of each parameter), convolutions padded other than with
    zeros (its rules unfold zero-padded inputs), and in-place activations (its backward hooks on module outputs
    cannot be modified in place)."""
    from torch import nn

    from ..core.module_walks import inplace_modules, structure_problem

    problem = structure_problem(model, plugin, "extends the model's modules with BackPACK")
    if problem:
        return problem
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and m.padding_mode != "zeros":
            return (f"{plugin}: BackPACK's convolution rules assume zero padding; {name} ({type(m).__name__}) has "
                    f"padding_mode={m.padding_mode!r}")
    inplace = inplace_modules(model)
    if inplace:
        return f"{plugin}: BackPACK's backward hooks fail on an in-place module output: {inplace[0]} is in place"
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            if m.padding_idx is not None or m.max_norm is not None:
                return f"{plugin}: BackPACK's Embedding rule takes no padding_idx or max_norm ({name})"
            if m.weight.dtype != torch.get_default_dtype():
                return (f"{plugin}: BackPACK's Embedding rule builds its one-hot in the default dtype "
                        f"({torch.get_default_dtype()}), not {m.weight.dtype} ({name})")
    return None


# What torch raises when BackPACK's hooks meet an output that the forward then modifies in place (ResNet's
# ``out += identity``): not visible from the module tree, so recognised here and turned into a decline.
_INPLACE_HOOK_ERROR = "is a view and is being modified inplace"
# What BackPACK raises when its module hooks fire in a backward pass that the forward itself runs (a PINN's
# torch.autograd.grad): the module's stored input/output are not there yet.
_HOOK_WITHOUT_FORWARD_ERROR = "object has no attribute 'output'"


class BackpackPlugin(NTKPlugin):
    """Per-sample Jacobians of the stacked batch [x1; x2] from a BackPACK extension, then J1 J2ᵀ."""

    tags = frozenset({"backpack"})

    def _jacobians(self, net, x, params) -> list[torch.Tensor]:
        """One (N+M, O, P_i) block per parameter of the extended copy ``net``."""
        raise NotImplementedError

    def estimate(self, stats, n, m, mode, symmetric):
        """One forward of [x1; x2], O backward passes (or one, O-wide), per-sample gradients, contraction."""
        from ..core.costs import Estimate, contraction_flops, jacobian_bytes, kernel_numel

        side = n if symmetric else n + m
        flops = side * (stats.fp_flops + stats.o * (2 * stats.fp_flops + 2 * stats.p)) + contraction_flops(stats, n, m, mode)
        peak = 2 * jacobian_bytes(stats, n, 0 if symmetric else m) + side * stats.o * stats.activations * stats.itemsize
        return Estimate(flops, peak + kernel_numel(n, m, stats.o, mode) * stats.itemsize)

    def _kernel(self, model, x1, x2, mode):
        from ..core.validation import called_more_than_once

        repeated = called_more_than_once(model)
        if repeated:
            raise UnsupportedModelError(f"{self.name}: {repeated[0]} is called more than once per forward pass; "
                                        "BackPACK's per-module quantities assume one call")
        n = x1.shape[0]
        x = x1 if x2 is None else torch.cat([x1, x2])
        net = backpack_copy(model)
        try:
            with quiet_backward_hooks():
                jac = self._jacobians(net, x, [p for p in net.parameters() if p.requires_grad])
        except RuntimeError as exc:
            if _INPLACE_HOOK_ERROR not in str(exc):
                raise
            raise UnsupportedModelError(
                f"{self.name}: the model modifies a module's output in place (e.g. `out += identity` in its "
                f"forward), which BackPACK's backward hooks cannot handle") from exc
        except AttributeError as exc:
            if _HOOK_WITHOUT_FORWARD_ERROR not in str(exc):
                raise
            raise UnsupportedModelError(
                f"{self.name}: BackPACK's backward hooks fired on a module whose forward quantities they had not "
                f"stored ({exc}): the forward runs a backward pass itself (torch.autograd.grad inside forward, "
                f"as a PINN does)") from exc
        j1 = [j[:n] for j in jac]
        j2 = j1 if x2 is None else [j[n:] for j in jac]
        return contract_jacobians(j1, j2, mode)
