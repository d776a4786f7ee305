"""ASDL (``asdfghjkl`` 0.1a5, imported as ``asdl``): ``asdl.empirical_implicit_ntk(model, x1, x2)``.

What it computes and how: the full (N, M, O, O) kernel without building a Jacobian. One forward of x1 and
a vjp with a dummy cotangent v1 kept in the graph (``create_graph=True``) give g(v1) = J(x1)ᵀv1 as a
function of v1; a second vjp through x2's forward gives J(x2) g as a function of v1; then one backward per
(sample of x2, output), M·O in all, differentiates that with respect to v1 and reads off a column block
of the kernel. Double-backward through the whole network: about M·O backward passes of a graph that is
itself a backward graph, so it grows with N·M·O·[FP]; memory is the double-backward graph of the two
batches, never N·O·P. It is called as ASDL's ``kernel`` module defines it, on the caller's model (it
registers no hooks and writes no ``.grad``); trace and diagonal are reduced from its full kernel (it has
no such modes).

Where it wins: nowhere on speed against a per-layer method, but it is exact wherever PyTorch can
differentiate the network twice (custom modules, recurrent layers, tied weights, every padding mode).
What it cannot do: layers whose backward has no derivative of its own (``Hardsigmoid``, as in
MobileNetV3; the fused scaled-dot-product attention inside ``nn.MultiheadAttention``); frozen parameters
(it differentiates every tensor of ``model.parameters()``).

ASDL's other kernels are not used: ``empirical_direct_ntk`` (per-sample gradients from ASDL's
``OP_BATCH_GRADS`` then J1 J2ᵀ) fails in 0.1a5 with ``torch.cat(): expected a non-empty list of
Tensors`` because it looks for ``module.operation``, which 0.1a5's ``extend`` no longer sets (the
operations live in the returned context); ``empirical_class_wise_direct_ntk`` (the diagonal mode) is
exact only on Linear/Conv2d/BatchNorm/LayerNorm nets and silently leaves out the parameters of the
modules it does not know (against the float64 brute force: 2e-2 to 0.4 relative error on the zoo's
GroupNorm, Conv1d, LSTM and GRU models, 2.5e-3 on resnet18; it raises on grouped and dilated
convolutions), and its
``extend`` leaves ``_is_full_backward_hook = False`` on the caller's modules, after which BackPACK
refuses them.
"""

from __future__ import annotations

import torch

from ..core.contractions import reduce_full
from ._peer import PeerPlugin, reraise_as_unsupported

# Library errors that mean "this model is outside what the routine can do" (message fragment -> why).
_UNSUPPORTED = {
    "derivative for": "empirical_implicit_ntk differentiates the backward pass, and PyTorch has no derivative "
                      "for an operator of this model's backward",
    "double backward": "empirical_implicit_ntk differentiates the backward pass, which PyTorch cannot do for an "
                       "operator of this model",
    "not have been used in the graph": "a parameter does not affect the output, and empirical_implicit_ntk "
                                       "differentiates every parameter without allow_unused",
}


class AsdlImplicitNTK(PeerPlugin):
    """ASDL's implicit NTK as a peer: the full kernel by double backward (see the module docstring for what it
    declines)."""

    name = "asdl"
    package = "asdfghjkl (ASDL)"
    module = "asdl"

    def _supports(self, model):
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                return (f"{self.name}: empirical_implicit_ntk differentiates every tensor of model.parameters(), "
                        f"and {pname!r} is frozen (requires_grad=False)")
        for mname, m in model.named_modules():
            if isinstance(m, torch.nn.Hardsigmoid):
                return (f"{self.name}: empirical_implicit_ntk differentiates the backward pass, and PyTorch has no "
                        f"derivative for hardsigmoid_backward (Hardsigmoid {mname!r})")
            if isinstance(m, torch.nn.MultiheadAttention):
                return (f"{self.name}: empirical_implicit_ntk differentiates the backward pass, and PyTorch has no "
                        f"derivative for the fused scaled-dot-product attention backward (MultiheadAttention "
                        f"{mname!r})")
        return None

    def _setup(self, model, x1, x2, mode):
        import asdl

        def run():
            with torch.enable_grad():
                try:
                    return asdl.empirical_implicit_ntk(model, x1, x2)
                except (RuntimeError, NotImplementedError) as exc:
                    reraise_as_unsupported(exc, self.name, _UNSUPPORTED)
                    raise

        return run, lambda out: reduce_full(out, mode)


plugin = AsdlImplicitNTK()
