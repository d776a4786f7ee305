"""nngeometry 0.4: ``GramMatrix(model=model, loader=loader)``, its finite-width NTK of one set of examples.

What it computes and how: Θ(x1, x1) only (the kernel of a data loader's examples with themselves), as an
``FMatDense`` of shape (O, N, O, N). Per layer it knows, forward hooks keep the layer's input and tensor
hooks its output gradient; for each output o it backpropagates the batch's summed output o to the
*inputs* (``torch.autograd.grad(..., [inputs])``, no parameter gradients), then, for each output o', once
more, and adds each layer's Gram term: Linear in closed form, (X1X2ᵀ) ⊙ (G1G2ᵀ) plus the bias term;
Conv1d/Conv2d, BatchNorm, LayerNorm and GroupNorm by materialising the layer's per-sample gradients
(unfolded patches for convolutions) and multiplying them. About O + O² backward passes of the batch and
no (N, O, P) Jacobian, so it is a per-layer method like ``structured``. It is called as nngeometry's
README and tests call it, with a ``DataLoader`` of one batch of all N examples (what its own
``_get_dataloader`` builds); trace and diagonal are reduced from its full kernel.

Where it wins: nets of Linear layers (exact, and only the Gram terms). What it cannot do, and what this
plugin declines: x2 ≠ x1; layers other than Linear, Conv1d, Conv2d, BatchNorm1d/2d (eval), LayerNorm and
GroupNorm (it raises on a leaf module it does not know and *silently leaves out* parameters held by
other modules, such as a ViT's class token); grouped convolutions and padding modes other than zeros
(its unfold ignores ``groups`` and ``padding_mode``: 0.10 to 0.15 relative error against the brute force); a module
called twice in one forward, or a parameter shared by two modules (it keeps one input per layer: 0.04 to
0.3 error); frozen parameters in those layers (it includes them); integer inputs (it sets
``requires_grad`` on the batch).

Precision: exact for Linear layers, but in float64 every other layer's per-sample gradients go through
float32 buffers: its generic ``JacobianFactory.kxy`` allocates them with ``torch.zeros(bs, numel,
device=...)`` and no dtype, i.e. in the default dtype. Measured relative errors against a float64
brute-force kernel: 1.2e-9 (mlp_layernorm), 1e-8 to 4e-8 (small conv nets, GroupNorm, BatchNorm,
Conv1d), 5.3e-7 (resnet18): float32 accuracy, a mismatch at the 1e-10 float64 tolerance, and reported as
one. Under ``torch.set_default_dtype(torch.float64)`` the same calls agree to ≤ 7e-15, which is why
nngeometry's own tests (whose conftest sets that default on the CPU) do not see it. This plugin does not
change the default dtype: it runs the library as a user does. In float32 it is exact to float32.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.base import UnsupportedModelError
from ..core.contractions import reduce_full
from ._peer import PeerPlugin, hooks_restored, reraise_as_unsupported, shared_submodule

# The layers whose nngeometry rules were checked against a float64 brute-force kernel; the per-sample input
# rank each rule expects (LayerNorm: the input's per-sample shape must be its normalized_shape).
_CHECKED = {nn.Linear: 2, nn.Conv1d: 3, nn.Conv2d: 4, nn.BatchNorm1d: 2, nn.BatchNorm2d: 4, nn.GroupNorm: 4,
            nn.LayerNorm: None}
_EXACT_IN_FLOAT64 = (nn.Linear,)
# Library errors that mean "this model is outside what GramMatrix can do" (message fragment -> why).
_UNSUPPORTED = {
    "not have been used in the graph": "it differentiates the outputs with respect to the inputs, and the model's "
                                       "output does not depend on them through autograd (the forward detaches its "
                                       "input, e.g. to take gradients itself as a PINN does)",
}


def _layer_problem(name: str, m: nn.Module) -> str | None:
    """Why nngeometry's rule for the checked layer ``m`` would be wrong or fail, or None."""
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        if m.groups != 1:
            return f"its per-sample gradient of a convolution ignores groups ({name!r} has groups={m.groups})"
        if m.padding_mode != "zeros":
            return f"its unfold pads with zeros, and {name!r} has padding_mode={m.padding_mode!r}"
        if isinstance(m.padding, str):
            return f"its unfold needs integer padding, and {name!r} has padding={m.padding!r}"
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and m.weight is None:
        return f"its normalisation rules need the affine weight, and {name!r} has none"
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if m.running_mean is None:
            return f"its BatchNorm rule uses the running statistics, and {name!r} tracks none"
        if m.training:
            return f"it handles BatchNorm in eval mode only, and {name!r} is in training mode"
    return None


class NNGeometryGram(PeerPlugin):
    """nngeometry's GramMatrix as a peer: Θ(x1, x1) from per-layer Gram terms (see the module docstring for what it
    declines)."""

    name = "nngeometry"
    package = "nngeometry"
    module = "nngeometry"

    def _supports(self, model):
        shared = shared_submodule(model)
        if shared is not None:
            return f"{self.name}: it keeps one input per layer, and module {shared} is registered twice"
        owner: dict[int, str] = {}
        for mname, m in model.named_modules():
            own = [(k, p) for k, p in m._parameters.items() if p is not None]
            if not own:
                continue
            label = f"{type(m).__name__} {mname!r}" if mname else type(m).__name__
            if type(m) not in _CHECKED:
                return (f"{self.name}: no checked rule for {label}, holding {', '.join(k for k, _ in own)} "
                        f"(nngeometry knows Linear, Conv1d/2d, BatchNorm, LayerNorm and GroupNorm; it raises on "
                        f"other leaf modules and silently leaves out parameters held elsewhere)")
            problem = _layer_problem(mname, m)
            if problem is not None:
                return f"{self.name}: {problem}"
            for k, p in own:
                if not p.requires_grad:
                    return f"{self.name}: it differentiates every parameter of {label}, and {k!r} is frozen"
                if id(p) in owner:
                    return (f"{self.name}: it keeps one input per layer, and {mname}.{k} is the same parameter as "
                            f"{owner[id(p)]}")
                owner[id(p)] = f"{mname}.{k}"
        return None

    def known_inexact(self, model, dtype):
        """In float64, the layers whose per-sample gradients nngeometry keeps in float32 buffers (its result then
        misses the float64 tolerance); None in float32 or when no such layer holds parameters."""
        if dtype != torch.float64:
            return None
        for mname, m in model.named_modules():
            if type(m) in _CHECKED and not isinstance(m, _EXACT_IN_FLOAT64) and \
                    any(p is not None for p in m._parameters.values()):
                return (f"{self.name}: float64 kernels of {type(m).__name__} layers ({mname!r}) are float32-accurate: "
                        f"nngeometry's JacobianFactory.kxy allocates its per-sample gradients in the default dtype")
        return None

    def _probe(self, model, x1):
        """One forward of the batch: every checked layer called once, on the whole batch (nngeometry pairs a
        layer's rows with the batch's samples: a layer run on ``x[mask]`` gives a wrong kernel), with gradient (a
        layer run under ``torch.no_grad()`` makes it fail), with inputs of the rank its rule expects."""
        calls: dict[nn.Module, int] = {}
        problems: list[str] = []
        names = {m: n for n, m in model.named_modules()}

        def hook(m, inputs, out):
            calls[m] = calls.get(m, 0) + 1
            x = inputs[0]
            if x.shape[0] != x1.shape[0]:
                problems.append(f"it pairs each layer's rows with the batch's samples, and {names[m]!r} runs on "
                                f"{x.shape[0]} rows of a batch of {x1.shape[0]} (a sub-batch, e.g. x[mask] in a "
                                f"mixture of experts)")
            if isinstance(out, torch.Tensor) and not out.requires_grad:
                problems.append(f"it hooks each layer's output gradient, and {names[m]!r} runs without gradient "
                                f"(under torch.no_grad(), or on detached inputs with frozen parameters)")
            rank = _CHECKED[type(m)]
            if rank is None:  # LayerNorm
                if tuple(x.shape[1:]) != tuple(m.normalized_shape):
                    problems.append(f"its LayerNorm rule needs per-sample inputs of normalized_shape "
                                    f"{tuple(m.normalized_shape)}, and {names[m]!r} gets {tuple(x.shape[1:])}")
            elif x.dim() != rank:
                problems.append(f"its {type(m).__name__} rule needs inputs of rank {rank}, and {names[m]!r} gets "
                                f"shape {tuple(x.shape)}")

        with hooks_restored(model):
            for m in names:
                if type(m) in _CHECKED:
                    m.register_forward_hook(hook)
            with torch.enable_grad():
                model(x1)
        twice = [f"{names[m]!r} ({n} times)" for m, n in calls.items() if n > 1]
        if twice:
            problems.append(f"it keeps one input per layer, and {', '.join(twice)} is called more than once in "
                            f"one forward")
        if problems:
            raise UnsupportedModelError(f"{self.name}: {problems[0]}")

    def _setup(self, model, x1, x2, mode):
        if x2 is not None:
            raise UnsupportedModelError(f"{self.name}: GramMatrix computes the kernel of one set of examples with "
                                        f"itself (x2 = x1) only")
        if not x1.is_floating_point():
            raise UnsupportedModelError(f"{self.name}: GramMatrix sets requires_grad on the inputs, which "
                                        f"{x1.dtype} inputs cannot have")
        self._probe(model, x1)
        from nngeometry import GramMatrix
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(TensorDataset(x1), batch_size=x1.shape[0])

        def run():
            with hooks_restored(model), torch.enable_grad():  # (its hooks are removed only when it succeeds)
                try:
                    return GramMatrix(model=model, loader=loader)
                except RuntimeError as exc:
                    reraise_as_unsupported(exc, self.name, _UNSUPPORTED)
                    raise

        # FMatDense.to_torch(): (O, N, O, N) -> (N, N, O, O)
        return run, lambda out: reduce_full(out.to_torch().permute(1, 3, 0, 2).contiguous(), mode)


plugin = NNGeometryGram()
