"""curvlinops 3.0.1: the NTK as the linear operator J(x1) J(x2)ᵀ, materialised on the identity.

What it computes and how: ``JacobianLinearOperator(model, params, data)`` is the (N·O × P) Jacobian of
the model on a data set given, as in curvlinops' examples, as a list of ``(X, y)`` batches (here one
batch; the targets are never read by a Jacobian, a placeholder is passed). ``J1 @ J2.adjoint()`` chains
it with the transposed Jacobian of x2 into the (N·O × M·O) kernel operator, and multiplying that onto
the identity (``K @ eye``) materialises the kernel, the way curvlinops' tutorials materialise a Hessian or
GGN (``H @ eye(D)``). Inside: J2ᵀ I is M·O vjps of x2's batch, vmapped (it builds J2ᵀ, P × M·O numbers),
then J1 applied to its M·O columns is M·O jvps of x1's batch (``torch.func.jvp``, vmapped): about
(N + M)·M·O·[FP] time, P·M·O + N·M·O·activations memory. The operators are built in ``prepare``
(their constructor checks that model and data are deterministic with two forward passes and a matvec);
``run`` is the product alone. Trace and diagonal are reduced from the full kernel.

Where it wins: small M·O on models where forward-mode AD is cheap; exact everywhere it runs. What it
cannot do: ``nn.MultiheadAttention`` (the jvps run under ``no_grad``, where PyTorch takes the fused
attention fast path, which has no forward-mode derivative); any other operator without one (declined
when the library says so); a submodule registered under two names (``torch.func.functional_call``, which
curvlinops uses, replaces that module's parameters by plain tensors for good and gives a wrong kernel:
0.43 relative error against the brute force, and the caller's model damaged).
"""

from __future__ import annotations

import torch

from ..core.contractions import reduce_full
from ..core.declines import transform_declines
from ._peer import PeerPlugin, reraise_as_unsupported, shared_submodule

_UNSUPPORTED = {
    "forward AD": "the kernel operator applies J with forward-mode AD, which an operator of this model lacks",
    "Check for deterministic": "curvlinops' determinism check of the Jacobian operator failed",
}


class CurvlinopsJacobianNTK(PeerPlugin):
    """curvlinops' Jacobian operators as a peer: J(x1) J(x2)ᵀ applied to the identity (see the module docstring for
    what it declines)."""

    name = "curvlinops"
    package = "curvlinops-for-pytorch"
    module = "curvlinops"

    def _supports(self, model):
        shared = shared_submodule(model)
        if shared is not None:
            return (f"{self.name}: torch.func.functional_call replaces the parameters of a submodule registered "
                    f"under two names by plain tensors and gives a wrong kernel; module {shared}")
        for mname, m in model.named_modules():
            if isinstance(m, torch.nn.MultiheadAttention):
                return (f"{self.name}: its jvps run under no_grad, where MultiheadAttention ({mname!r}) takes "
                        f"PyTorch's fused fast path, which has no forward-mode derivative")
        return None

    def _setup(self, model, x1, x2, mode):
        from curvlinops import JacobianLinearOperator

        params = [p for p in model.parameters() if p.requires_grad]
        n, m = x1.shape[0], (x1 if x2 is None else x2).shape[0]

        def jacobian(x):
            y = torch.zeros(x.shape[0], device=x.device)  # a placeholder target: a Jacobian reads none
            return JacobianLinearOperator(model, params, [(x, y)])

        try:
            with transform_declines(self.name, model, x1), \
                    torch.random.fork_rng(devices=[x1.device] if x1.device.type == "cuda" else []):
                j1 = jacobian(x1)  # (its determinism check draws a random vector: the caller's stream is kept)
                j2 = j1 if x2 is None else jacobian(x2)
        except (RuntimeError, NotImplementedError) as exc:
            reraise_as_unsupported(exc, self.name, _UNSUPPORTED)
            raise
        kernel = j1 @ j2.adjoint()  # the (N·O) x (M·O) NTK as a linear operator
        identity = torch.eye(kernel.shape[1], dtype=x1.dtype if x1.is_floating_point() else params[0].dtype,
                             device=params[0].device)

        def run():
            try:
                with transform_declines(self.name, model, x1):
                    return kernel @ identity
            except (RuntimeError, NotImplementedError) as exc:
                reraise_as_unsupported(exc, self.name, _UNSUPPORTED)
                raise

        def to_torch(out):
            o = out.shape[0] // n
            return reduce_full(out.reshape(n, o, m, o).permute(0, 2, 1, 3).contiguous(), mode)

        return run, to_torch


plugin = CurvlinopsJacobianNTK()
