"""laplace-torch 0.3: ``FunctionalLaplace``'s NTK, from its curvature backend's ``jacobians()``.

What it computes and how: laplace's GP view of a network (``FunctionalLaplace``, "linearised Laplace") is
built on the empirical NTK, and computes it from the backend's Jacobians: ``_jacobians(x1)`` gives J1
(N, O, P), then ``_kernel_batch_star(J1, x2)`` computes J2 and contracts ``einsum("bcp,dep->bdce")``
(x2 = None: ``_kernel_star(J1, joint=True)``, ``einsum("acp,bep->abce")``). With
``independent_outputs=True`` (its "diagonal of the GP kernel") the same methods return (N, M, O): this
plugin uses that for the diagonal mode and sums it for the trace. Those methods and the backend are
called as ``FunctionalLaplace`` calls them; its ``fit`` (posterior, marginal likelihood) is not run.

The backend is ``CurvlinopsGGN`` (laplace's default backend), whose ``jacobians()`` is laplace's own
``torch.func.jacrev`` of ``functional_call(model, (params, buffers), x)`` over the *whole batch*: N·O
cotangents vmapped through the batch's backward, so its time grows as N²·O·[FP] and its memory as
N·O·P plus N·O copies of the batch's activations. Exact wherever torch.func runs (LayerNorm, attention,
recurrent layers, every padding mode).

The other backends, checked on this project's zoo in float64 (laplace-torch 0.3, asdfghjkl 0.1a5,
BackPACK 1.7.1, torch 2.14.1): ``AsdlGGN`` fails (laplace 0.3 requires asdfghjkl 0.1a4 and passes
``batch_size=`` to ``asdl.gradient.batch_gradient``, which 0.1a5 does not take); ``AsdfghjklGGN`` does not
import (the ``asdfghjkl`` module is gone in 0.1a5, which installs ``asdl``); ``BackPackGGN`` (the default
of ``FunctionalLaplace`` itself) extends the model in place, fails on in-place ReLU (torchvision models),
LayerNorm, GroupNorm, GRU and attention, and is *silently wrong* on convolutions with reflect padding
(8e-2 relative error) and on weights shared by two modules (5e-2). Hence one plugin, on the backend
that is right everywhere it runs.

What it cannot do: a submodule registered under two names (``torch.func.functional_call`` replaces its
parameters by plain tensors for good; jacrev then fails).
"""

from __future__ import annotations

import torch

from ..core.declines import transform_declines
from ._peer import PeerPlugin, shared_submodule


class LaplaceFunctionalNTK(PeerPlugin):
    """laplace-torch's FunctionalLaplace kernel as a peer: its backend's Jacobians, contracted by its own einsums
    (see the module docstring for what it declines)."""

    name = "laplace"
    package = "laplace-torch"
    module = "laplace"

    def _supports(self, model):
        shared = shared_submodule(model)
        if shared is not None:
            return (f"{self.name}: torch.func.functional_call, which its jacobians() use, replaces the parameters "
                    f"of a submodule registered under two names by plain tensors; module {shared}")
        return None

    def _setup(self, model, x1, x2, mode):
        from laplace import FunctionalLaplace
        from laplace.curvature import CurvlinopsGGN

        la = FunctionalLaplace(model, "regression", n_subset=x1.shape[0], backend=CurvlinopsGGN,
                               independent_outputs=mode != "full")
        with torch.no_grad():
            la.n_outputs = model(x1[:1]).shape[-1]  # what fit() sets from a forward pass
        la.backend  # (builds the backend now: set-up, not the kernel)

        def run():
            with transform_declines(self.name, model, x1):
                j1, _ = la._jacobians(x1, enable_backprop=False)
                if x2 is None:
                    return la._kernel_star(j1, joint=True)
                return la._kernel_batch_star(j1, x2)

        return run, (lambda out: out.sum(-1)) if mode == "trace" else (lambda out: out)


plugin = LaplaceFunctionalNTK()
