"""Structured: the NTK layer by layer from each layer's structure, never the whole Jacobian.

One forward pass records every Linear/Conv2d layer's input X and output Z;
one batched backward pass (``is_grads_batched``: all O output basis vectors
at once) gives G = ∂f_o/∂Z. A layer's weight then contributes

    Θ_W[n, m, o, p] = Σ_{s,t} (X1[n,s]·X2[m,t]) (G1[o,n,s]·G2[p,m,t])

with s, t over output positions (one for Linear; H_out·W_out for Conv2d,
whose X are the unfolded input patches). Per layer it takes the cheaper of
two orders: the Gram form above, N·M·S²·(K + O²·C) for K inputs per position
and C outputs, and the layer's own Jacobian contraction, (N+M)·O·S·C·K +
N·M·O²·C·K. Biases always contract their (N, O, C) Jacobians. Parameter-free
glue (activations, pooling, flatten, residual sums) is autograd's business.

Wins: every MLP by orders of magnitude over Jacobian contraction (O²·width
per pair instead of O²·P), and conv nets whose last layers are dense. Costs:
one forward and one O-way batched backward per input batch, plus G and X
per layer in memory, (N+M)·O·Σ S·C. The output Linear's G is the identity:
no backward for it, and its term is (X1 X2ᵀ + 1) ⊗ I. The layers taken in the
Jacobian order are contracted together: their blocks (bias: Σ_s G) are
concatenated into one (N, O, ΣP) matrix and multiplied once. On the CPU, the
first call for a conv net's shapes taking under 50 ms also runs it five times
each with oneDNN's convolutions and PyTorch's own, and keeps the faster. On a
GPU, calls replay a captured CUDA graph (cuda_graphs).
"""

from __future__ import annotations

import contextlib
import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .base import NTKPlugin, UnsupportedModelError
from .kernels import KernelSum, input_gram
from .modelinfo import shape_keyed_cache, submodules

_RULES = (nn.Linear, nn.Conv2d)


def _has_rule(m: nn.Module) -> str | None:
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            return f"Conv2d with padding_mode={m.padding_mode!r}"
        if isinstance(m.padding, str):
            return f"Conv2d with padding={m.padding!r}"
        if m.groups != 1:
            return f"Conv2d with groups={m.groups}"
        return None
    if isinstance(m, nn.Linear):
        return None
    return type(m).__name__


def _trainable(m: nn.Module) -> list[str]:
    """The names of the module's own parameters that require grad (``_parameters`` directly: this runs per call)."""
    return [k for k, p in m._parameters.items() if p is not None and p.requires_grad]


def _layer_problem(m: nn.Module, trainable: list[str]) -> str | None:
    """Why structured cannot take the module ``m`` with these trainable parameters ({name}: where it sits)."""
    problem = _has_rule(m)
    if problem is not None:
        return f"no rule for {problem} ({{name}} has parameters)"
    extra = set(trainable) - {"weight", "bias"}
    if extra:
        return f"{type(m).__name__} {{name}} has extra parameters {sorted(extra)}"
    if "weight" not in trainable:
        return f"{type(m).__name__} {{name}} has a frozen weight and a trainable bias"
    return None


def _record(model, x):
    """Forward with hooks: y, and per parameterised layer (module, input X, output Z)."""
    layers = [m for m in dict.fromkeys(submodules(model)) if _trainable(m)]
    seen, handles = {}, []

    def hook(module, inputs, output):
        if module in seen:
            raise UnsupportedModelError(f"structured: {type(module).__name__} is called more than once per forward "
                             "(shared weights); use another plugin")
        seen[module] = (inputs[0], output)

    for m in layers:
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    return y, [(m, *seen[m]) for m in layers if m in seen]


def _unfold(x, conv: nn.Conv2d):
    """F.unfold(x) for the convolution's patches: (N, C·kh·kw, S).

    On the CPU as a strided view copied once: PyTorch's CPU im2col took 4.5 ms where this took 0.47 ms on a
    (16, 32, 30, 30) input, and 196 against 81 us on (16, 8, 8, 8), on the 2-core machine here.
    """
    if x.device.type != "cpu":
        return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    (kh, kw), (dh, dw), (sh, sw), (ph, pw) = conv.kernel_size, conv.dilation, conv.stride, conv.padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    windows = x.unfold(2, (kh - 1) * dh + 1, sh)[..., ::dh].unfold(3, (kw - 1) * dw + 1, sw)[..., ::dw]
    n, c, ho, wo = windows.shape[:4]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)


def _positions(module, x, z, g):
    """X as (N, S, K) and G as (O, N, S, C): per output position, the layer's input patch and output gradient."""
    if isinstance(module, nn.Conv2d):
        return _unfold(x, module).transpose(1, 2), g.flatten(3).transpose(2, 3)
    k, c = x.shape[-1], g.shape[-1]
    return x.reshape(x.shape[0], -1, k), g.reshape(g.shape[0], g.shape[1], -1, c)


def _order_costs(n, m, o, s, t, k, c, mode):
    """FLOPs of the Gram order and of the per-layer Jacobian contraction, for one layer."""
    oo = o * o if mode == "full" else o
    gram = 2 * n * m * s * t * (k + oo * c)
    jac = 2 * (n * s + m * t) * o * c * k + 2 * n * m * oo * c * k
    return gram, jac


def _gram_is_cheaper(x1, g1, x2, mode):
    n, s, k = x1.shape
    o, _, _, c = g1.shape
    gram, jac = _order_costs(n, x2.shape[0], o, s, x2.shape[1], k, c, mode)
    return gram <= jac


def _add_gram_term(total: KernelSum, x1, g1, x2, g2, has_bias):
    """Add one weight's (and bias's) contribution in the Gram order: (X1 X2ᵀ) ⊙ (G1 G2ᵀ), summed over positions."""
    mode = total.mode
    symmetric = x2 is x1 and g2 is g1
    s, t = x1.shape[1], x2.shape[1]
    if s == 1 and t == 1:  # Linear: the bias's Gram is the weight's G Gram, so (X1 X2ᵀ + 1) ⊙ G1 G2ᵀ
        total.add_gram(input_gram(x1[:, 0], x2[:, 0], has_bias), g1[:, :, 0], g2[:, :, 0], symmetric=symmetric)
        return
    xx = torch.einsum("nsk,mtk->nmst", x1, x2)
    expr = {"full": "nmst,onsc,pmtc->nmop", "trace": "nmst,onsc,omtc->nm", "diagonal": "nmst,onsc,omtc->nmo"}[mode]
    total.add(torch.einsum(expr, xx, g1, g2))
    if has_bias:
        b1 = g1.sum(2)
        total.add_gram(torch.ones(x1.shape[0], x2.shape[0], dtype=b1.dtype, device=b1.device), b1,
                       b1 if symmetric else g2.sum(2), symmetric=symmetric)


def _layer_jacobian(x, g, has_bias):
    """The layer's per-sample Jacobian blocks: the weight's (N, O, C·K), then the bias's (N, O, C).

    J_W[n, o, c, k] = Σ_s G[o, n, s, c]·X[n, s, k], one batched GEMM; J_b[n, o, c] = Σ_s G[o, n, s, c].
    """
    o, n, s, c = g.shape
    weight = torch.bmm(g.permute(1, 0, 3, 2).reshape(n, o * c, s), x).view(n, o, -1)
    return [weight, g.sum(2).transpose(0, 1)] if has_bias else [weight]


def _output_jacobian(x, has_bias):
    """Jacobian blocks of an output Linear with one output: X as (N, 1, K), and ones for its bias."""
    x = x.unsqueeze(1)
    return [x, x.new_ones(x.shape[0], 1, 1)] if has_bias else [x]


def _layer_kernel(x1, g1, x2, g2, mode, has_bias, order):
    """One layer's contribution alone, in the mode's shape, in the given order ("gram" / "jacobian"; for tests)."""
    total = KernelSum(mode)
    if order == "gram":
        _add_gram_term(total, x1, g1, x2, g2, has_bias)
    else:
        total.add_jacobians(torch.cat(_layer_jacobian(x1, g1, has_bias), 2),
                            torch.cat(_layer_jacobian(x2, g2, has_bias), 2))
    return total.result()


# CPU convolutions: oneDNN's (mkldnn) or PyTorch's own kernels, whichever ran the kernel faster, per model and shapes.
# oneDNN sets each convolution up at a fixed cost (about 0.1-0.2 ms on 2 cores here) that dominates tiny ones: on
# an 8-channel 8x8 ResNet at N=4 its forward took 128 us against 45 us, while at 16 channels, 16x16, N=32 it was
# 2-3x faster than the native kernels. Which wins depends on the CPU, so it is measured, like cudnn.benchmark.
_CONV_BACKEND: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _onednn(enabled: bool):
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(enabled)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)


def _onednn_is_faster(run, repeats: int = 5, margin: float = 0.9, only_below_s: float = 0.05) -> bool:
    """Whether to keep oneDNN's convolutions for ``run``: unless PyTorch's own run it more than 10% faster.

    Best of ``repeats`` calls each, alternating, after a warm-up call each. A call that takes over ``only_below_s``
    with oneDNN keeps it untried (its set-up cost is small there, and the trial would cost seconds).
    """
    def timed(enabled):
        with _onednn(enabled):
            t0 = time.perf_counter()
            run()
            return time.perf_counter() - t0

    timed(True)
    on = [timed(True)]
    if on[0] > only_below_s:
        return True
    timed(False)
    off = []
    for _ in range(repeats):
        off.append(timed(False))
        on.append(timed(True))
    return min(off) >= margin * min(on)


class Structured(NTKPlugin):
    name = "structured"
    capturable = True  # on a GPU, replayed from a CUDA graph (cuda_graphs)

    def supports(self, model):
        from .modelinfo import inplace_modules

        inplace = inplace_modules(model)
        if inplace:
            return f"structured: {inplace[0]} works in place and would overwrite a recorded layer output"
        from .modelinfo import structure_problem

        problem = structure_problem(model, "structured", "reads each layer's input and output")
        if problem:
            return problem
        # Per call: a direct walk of the modules (named_modules' generators cost tens of us); names only for errors.
        for m in submodules(model):
            trainable = _trainable(m)
            problem = trainable and _layer_problem(m, trainable)
            if problem:
                name = next(name for name, mod in model.named_modules(remove_duplicate=False) if mod is m)
                return f"structured: {problem.format(name=name or 'the model itself')}"
        return None

    def estimate(self, stats, n, m, mode, symmetric):
        """Forward + O-wide backward per side, then per layer the cheaper of the two orders."""
        from .costs import Estimate, kernel_numel

        side = n if symmetric else n + m
        flops = side * (stats.fp_flops + 2 * stats.o * stats.fp_flops)
        gram_held, jac_held = 0, 0  # Gram order: one layer's N·M·S² at a time; Jacobian order: all layers' J
        for layer in stats.layers:
            if layer.is_output:  # (X1 X2ᵀ + 1) ⊗ I: one N x M GEMM, no G Gram
                flops += 2 * n * m * layer.k + n * m * stats.o
                continue
            gram, jac = _order_costs(n, m, stats.o, layer.s, layer.s, layer.k, layer.c, mode)
            flops += min(gram, jac)
            if gram <= jac:
                gram_held = max(gram_held, n * m * layer.s * layer.s)
            else:
                jac_held += side * stats.o * layer.c * (layer.k + 1)
        inter = max(gram_held, 2 * jac_held)  # (the layers' J and their concatenation)
        peak = side * (stats.o * stats.widths + stats.activations + sum(l.s * l.k for l in stats.layers)) * stats.itemsize
        return Estimate(flops, peak + (inter + 2 * kernel_numel(n, m, stats.o, mode)) * stats.itemsize)

    def _side(self, model, x):
        """Per layer (module, X, G), with G None for the output layer itself (a Linear whose output is the model's:
        G = I, no backward needed)."""
        y, layers = _record(model, x)
        n, o = y.shape
        output_layer = next((i for i, (_, _, z) in enumerate(layers) if z is y), None)
        zs = [z for i, (_, _, z) in enumerate(layers) if i != output_layer]
        if not zs:
            grads = []
        elif o == 1:  # one plain backward pass
            grads = [g.unsqueeze(0) for g in torch.autograd.grad(y, zs, grad_outputs=torch.ones_like(y))]
        else:  # all O output basis vectors in one vmapped backward pass
            basis = torch.eye(o, dtype=y.dtype, device=y.device).unsqueeze(1).expand(o, n, o)
            grads = torch.autograd.grad(y, zs, grad_outputs=basis, is_grads_batched=True)
        grads = iter(grads)
        out = []
        for i, (mod, xin, z) in enumerate(layers):
            if i == output_layer:
                out.append((mod, xin.detach().reshape(n, -1), None))
            else:
                out.append((mod, *_positions(mod, xin.detach(), z, next(grads))))
        return out

    def _kernel(self, model, x1, x2, mode):
        if x1.device.type != "cpu" or not torch._C._get_mkldnn_enabled() or \
                not any(isinstance(m, nn.Conv2d) for m in submodules(model)):
            return self._layer_sum(model, x1, x2, mode)
        key = (tuple(x1.shape), None if x2 is None else tuple(x2.shape), x1.dtype, mode)
        use_onednn = shape_keyed_cache(_CONV_BACKEND, model, key, lambda: _onednn_is_faster(
            lambda: self._layer_sum(model, x1, x2, mode)))
        with _onednn(use_onednn):
            return self._layer_sum(model, x1, x2, mode)

    def _layer_sum(self, model, x1, x2, mode):
        side1 = self._side(model, x1)
        side2 = side1 if x2 is None else self._side(model, x2)
        total = KernelSum(mode)
        jac1, jac2 = [], []  # Jacobian blocks of the Jacobian-order layers, contracted together in one GEMM
        for (mod, a1, b1), (_, a2, b2) in zip(side1, side2):
            has_bias = getattr(mod, "bias", None) is not None and mod.bias.requires_grad
            if b1 is None and mod.out_features == 1:  # the output layer, O = 1: its Jacobian is [X, 1]
                jac1 += _output_jacobian(a1, has_bias)
                jac2 += _output_jacobian(a2, has_bias) if x2 is not None else []
            elif b1 is None:  # the output layer: (X1 X2ᵀ + 1) ⊗ I
                total.add_identity_gram(input_gram(a1, a2, has_bias), mod.out_features)
            elif _gram_is_cheaper(a1, b1, a2, mode):
                _add_gram_term(total, a1, b1, a2, b2, has_bias)
            else:
                jac1 += _layer_jacobian(a1, b1, has_bias)
                jac2 += _layer_jacobian(a2, b2, has_bias) if x2 is not None else []
        if jac1:
            j1 = torch.cat(jac1, 2)
            total.add_jacobians(j1, j1 if x2 is None else torch.cat(jac2, 2))
        return total.result().detach()


plugin = Structured()
