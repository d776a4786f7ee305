"""Explicit MLP: the closed-form layer recursion of torchntk.explicit, for any O.

For z_l = W_l h_{l-1} + b_l, h_l = φ_l(z_l), the NTK is a sum over layers of
(H_{l-1}¹ H_{l-1}²ᵀ + 1) ⊙ (G_l¹ G_l²ᵀ), where G_l = ∂f/∂z_l comes from the
recursion G_{l-1} = (G_l W_l) ⊙ φ'(z_{l-1}) with closed-form derivatives: no
autograd at all. Widths, biases and activation derivatives are read straight
off the ``nn.Sequential``. Cost per layer: N·M·(d_in + O²·d_out) for full
mode, never N·O·P memory. Wins by orders of magnitude on wide MLPs; handles
nothing else (``supports`` says what it found). On the CPU in float32 its
GEMMs (the forward and the recursion G W) go to oneDNN's linear or MKL's,
whichever ran the model's first call faster (``onednn.is_faster``). On a GPU,
calls replay a captured CUDA graph (cuda_graphs). In a dataset's kernel
(``kernel_matrix``) each block's forward and recursion run once (``factors``)
and a tile costs only its Grams (``contract``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref

import torch
from torch import nn

from ..core import onednn
from ..core.base import NTKPlugin, StaleFactors
from ..core.contractions import KernelSum, input_gram
from ..core.module_walks import structure_problem, submodules

# Per model and input shapes: whether oneDNN's GEMMs ran the kernel faster than MKL's (CPU, float32).
_GEMM_BACKEND: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _gelu_derivative(module: nn.GELU, z):
    if module.approximate == "tanh":
        c = math.sqrt(2 / math.pi)
        inner = c * (z + 0.044715 * z**3)
        t = torch.tanh(inner)
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return cdf + z * pdf


def _silu_derivative(module, z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


# Activation -> φ'(z), in closed form.
ACTIVATION_DERIVATIVES = {
    nn.ReLU: lambda m, z: (z > 0).to(z.dtype),
    nn.Tanh: lambda m, z: 1 - torch.tanh(z) ** 2,
    nn.Sigmoid: lambda m, z: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
    nn.GELU: _gelu_derivative,
    nn.Identity: lambda m, z: torch.ones_like(z),
    nn.LeakyReLU: lambda m, z: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, m.negative_slope)),
    nn.SiLU: _silu_derivative,
    nn.Softplus: lambda m, z: torch.sigmoid(m.beta * z) if m.threshold >= 20 else
    torch.where(m.beta * z > m.threshold, torch.ones_like(z), torch.sigmoid(m.beta * z)),
}


def _layers(model):
    """Flatten nested Sequentials into a list of modules."""
    out = []
    for m in model._modules.values() if isinstance(model, nn.Sequential) else [model]:
        if m is not None:  # (a direct walk: children()'s generators cost more per call)
            out.extend(_layers(m) if isinstance(m, nn.Sequential) else [m])
    return out


def _linear_shapes(model, x_single):
    """(K, C, whether its output is the model's) of each Linear of an explicit_mlp model, in order; None where
    the model is gone (the cost model's stats outlived it)."""
    if model is None:
        return None
    layers = _layers(model)
    return [(m.in_features, m.out_features, m is layers[-1]) for m in layers if isinstance(m, nn.Linear)]


class ExplicitMLP(NTKPlugin):
    name = "explicit_mlp"
    capturable = True  # on a GPU, replayed from a CUDA graph (cuda_graphs)

    def supports(self, model):
        if not isinstance(model, nn.Sequential):
            return f"explicit_mlp: needs an nn.Sequential of Linear/activation layers, found {type(model).__name__}"
        layers = _layers(model)
        for m in layers:
            if not isinstance(m, (nn.Linear, nn.Flatten, *ACTIVATION_DERIVATIVES)):
                return f"explicit_mlp: needs Linear/activation layers only, found {type(m).__name__}"
            if isinstance(m, nn.Flatten) and m is not layers[0]:
                return "explicit_mlp: nn.Flatten is only supported as the first layer"
        if not any(isinstance(m, nn.Linear) for m in layers):
            return "explicit_mlp: needs at least one Linear layer"
        if any(p is not None and not p.requires_grad for m in submodules(model) for p in m._parameters.values()):
            return "explicit_mlp: every parameter must require grad"
        return structure_problem(model, "explicit_mlp", "computes the layer recursion from the layers' weights")

    def estimate(self, stats, n, m, mode, symmetric):
        """Per layer: X1 X2ᵀ (N·M·K), G1 G2ᵀ (N·M·O²·C in full mode, N·M·C in trace mode below a Linear output)
        and the recursion G W (O·C·K per sample); the output layer only X1 X2ᵀ and its diagonal add (N·M·O)."""
        from ..core.costs import Estimate, kernel_numel

        side = n if symmetric else n + m
        oo = stats.o * stats.o if mode == "full" else stats.o
        layers = stats.view("explicit_mlp", _linear_shapes) or [(max(1, stats.p // max(1, stats.o)), stats.o, True)]
        # In trace mode the layer below a Linear output layer takes Σ_o w² instead of its O-wide Gram.
        below_output = len(layers) - 2 if layers[-1][2] and mode == "trace" else None
        flops = sum(2 * n * m * k + (n * m * stats.o if is_output else
                                     2 * n * m * (1 if i == below_output else oo) * c + 2 * side * stats.o * c * k)
                    for i, (k, c, is_output) in enumerate(layers))
        peak = side * (stats.o * sum(c for _, c, _ in layers) + stats.activations) * stats.itemsize
        return Estimate(flops + side * stats.fp_flops, peak + 2 * kernel_numel(n, m, stats.o, mode) * stats.itemsize)

    @staticmethod
    def _forward(layers, x):
        """Inputs h_{l-1} of each Linear layer and the derivative chain after it."""
        h = x.flatten(1) if isinstance(layers[0], nn.Flatten) else x
        inputs, linears, derivs = [], [], []  # derivs[l]: list of φ'(·) after Linear l
        for m in layers:
            if isinstance(m, nn.Flatten):
                continue
            if isinstance(m, nn.Linear):
                inputs.append(h)
                linears.append(m)
                derivs.append([])
                h = onednn.linear(h, m.weight, m.bias)
            else:
                if derivs:
                    derivs[-1].append(ACTIVATION_DERIVATIVES[type(m)](m, h))
                h = m(h)
        return inputs, linears, derivs

    @staticmethod
    def _output_gradients(linears, derivs, n):
        """G_l = ∂f/∂z_l for every Linear layer l, shape (O, N, d_out_l): views of (N, O, d_out_l) tensors, the
        layout the Gram GEMM reads without a copy."""
        o = linears[-1].out_features
        w = linears[-1].weight
        g = torch.eye(o, dtype=w.dtype, device=w.device).expand(n, o, o)
        for d in derivs[-1]:  # activations after the last Linear
            g = g * d.unsqueeze(1)
        grads = [g]
        for l in range(len(linears) - 1, 0, -1):
            g = onednn.linear(g, linears[l].weight.t())  # ∂f/∂h_{l-1} = G W
            for d in reversed(derivs[l - 1]):
                g = g * d.unsqueeze(1)
            grads.append(g)
        return [g.transpose(0, 1) for g in grads[::-1]]

    @torch.no_grad()
    def _kernel(self, model, x1, x2, mode):
        if not onednn.usable(x1):
            return self._recursion(model, x1, x2, mode)
        key = (tuple(x1.shape), None if x2 is None else tuple(x2.shape), mode)
        return onednn.on_faster_backend(_GEMM_BACKEND, model, key, lambda: self._recursion(model, x1, x2, mode))

    def pure_kernel(self, model, x1, x2, mode):
        """The recursion as a function of the inputs alone, for ``compiled`` (no backend trial inside: the large
        GEMMs take the eager kernel's choice when they run, ``compile_context``; the small ones are Inductor's)."""
        def kernel(model, x1, x2):
            with torch.no_grad():
                return self._recursion(model, x1, x2, mode)

        return kernel

    def compile_context(self, model, x1, x2, mode):
        """Around the compiled kernel: oneDNN's GEMMs or MKL's, as the eager kernel's trial found faster for this
        model and shapes (the compiled kernel's large GEMMs choose when they run: ``onednn.linear``)."""
        if not onednn.usable(x1):
            return contextlib.nullcontext()
        key = (tuple(x1.shape), None if x2 is None else tuple(x2.shape), mode)

        def run():
            with torch.no_grad():
                self._recursion(model, x1, x2, mode)

        return onednn.enabled(onednn.choice(_GEMM_BACKEND, model, key, run))

    def _recursion(self, model, x1, x2, mode):
        layers = _layers(model)
        linears, *side1 = self._block(layers, x1)
        side2 = side1 if x2 is None else self._block(layers, x2)[1:]
        return self._sum(linears, side1, side2, mode, x2 is None)

    def _block(self, layers, x):
        """One block's (Linear layers, their inputs H, their G (O, N, C), Π φ' below a Linear output layer or None,
        whether the output layer is the last Linear): what its kernel with any other block needs."""
        inputs, linears, derivs = self._forward(layers, x)
        grads = self._output_gradients(linears, derivs, x.shape[0])
        identity_output = not derivs[-1]
        below = self._derivative_product(derivs[-2], x.shape[0], linears[-2]) \
            if identity_output and len(linears) >= 2 else None
        return linears, inputs, grads, below, identity_output

    @staticmethod
    def _sum(linears, side1, side2, mode, symmetric):
        """Σ over Linear layers of (H1 H2ᵀ + 1) ⊙ (G1 G2ᵀ), from two blocks' ``_block`` data."""
        (in1, g1, below1, identity_output), (in2, g2, below2, _) = side1, side2
        total = KernelSum(mode)
        # Where the output layer is the last Linear, G_L = I: its term is (H H'ᵀ + 1) ⊗ I, with no GEMM; and the
        # layer below has G[o, n, c] = W_L[o, c]·φ'(z)[n, c], whose trace-mode Gram is O times cheaper from that
        # form (the other modes' is not: KernelSum.add_scaled_gram).
        last = len(linears) - 1
        for l, (h1, h2, a, b, lin) in enumerate(zip(in1, in2, g1, g2, linears)):
            xx = input_gram(h1, h2, lin.bias is not None)
            if identity_output and l == last:
                total.add_identity_gram(xx, lin.out_features)
            elif below1 is not None and l == last - 1 and mode == "trace":
                total.add_scaled_gram(xx, linears[last].weight, below1, below2, symmetric=symmetric)
            else:
                total.add_gram(xx, a, b, symmetric=symmetric)
        return total.result()

    # -- one block's factors, reused across the tiles of a dataset's kernel ----------------------------------------

    @torch.no_grad()
    def factors(self, model, x) -> "MLPFactors":
        """One block's layer inputs and output gradients, which ``contract`` combines with another block's into
        their kernel: a dataset's kernel computes each block's forward and recursion once (linear in N) and only
        the Grams per tile (quadratic), instead of both blocks' recursion for every tile."""
        linears, inputs, grads, below, identity_output = self._block(_layers(model), x)
        w = linears[-1].weight
        return MLPFactors(linears, inputs, grads, below, identity_output, x.shape[0], w.dtype, w.device)

    def factors_state(self, f: "MLPFactors") -> dict:
        """What of ``f`` is kept on disk (``torch.save``): its tensors and the layer shapes they belong to."""
        return {"inputs": f.inputs, "grads": f.grads, "below": f.below, "identity_output": f.identity_output,
                "n": f.n, "dtype": f.dtype, "shapes": _shapes(f.linears)}

    def factors_from_state(self, model, x, state: dict) -> "MLPFactors":
        """The factors ``factors_state`` kept, of the block ``x``, for ``model``; ``StaleFactors`` where they were
        recorded for other layer shapes, another block size or dtype (then record them again)."""
        linears = [m for m in _layers(model) if isinstance(m, nn.Linear)]
        w = linears[-1].weight
        if state.get("shapes") != _shapes(linears) or state.get("n") != x.shape[0] or state.get("dtype") != w.dtype:
            raise StaleFactors("the kept factors were recorded for other layers, another block or dtype")
        return MLPFactors(linears, state["inputs"], state["grads"], state["below"], state["identity_output"],
                          state["n"], w.dtype, w.device)

    @torch.no_grad()
    def contract(self, f1: "MLPFactors", f2: "MLPFactors | None", mode: str) -> torch.Tensor:
        """Θ of two blocks from their factors (``f2=None``: the block against itself, its symmetric path)."""
        side1 = (f1.inputs, f1.grads, f1.below, f1.identity_output)
        side2 = side1 if f2 is None else (f2.inputs, f2.grads, f2.below, f2.identity_output)
        return self._sum(f1.linears, side1, side2, mode, f2 is None)

    @staticmethod
    def _derivative_product(derivs, n, linear):
        """Π φ'(·) of the activations after ``linear``, shape (N, d_out): the factor of its G beyond the next
        layer's weights."""
        if not derivs:
            return linear.weight.new_ones(n, linear.out_features)
        d = derivs[0]
        for e in derivs[1:]:
            d = d * e
        return d


def _shapes(linears) -> list:
    """(in, out, bias) of each Linear: what factors recorded for one model fit another by."""
    return [(m.in_features, m.out_features, m.bias is not None) for m in linears]


@dataclasses.dataclass
class MLPFactors:
    """One block's factors (``ExplicitMLP.factors``): the model's Linear layers (not counted, not kept on disk),
    each one's input H (N, K) and G = ∂f/∂z (O, N, C), Π φ' below a Linear output layer (N, C) or None, whether
    the output layer is the last Linear, the block's N, dtype and device."""

    linears: list
    inputs: list
    grads: list
    below: torch.Tensor | None
    identity_output: bool
    n: int
    dtype: torch.dtype
    device: torch.device

    def nbytes(self) -> int:
        """The bytes of the storages the factors keep alive (each once: G's are views, the first input may be
        the block itself)."""
        storages = {}
        for t in [*self.inputs, *self.grads, self.below]:
            if t is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())


plugin = ExplicitMLP()
