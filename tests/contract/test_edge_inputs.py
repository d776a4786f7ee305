"""Edge inputs, each injected into every registered plugin (ours and the peers): the same clear error from all of
them, or the right kernel (checked against a brute-force float64 kernel) from every plugin that does not decline
the model by name. ``compute`` and ``prepare`` (the runner's path) alike."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from ntk_bench import implementations
from ntk_bench.bench.measurement import bruteforce
from ntk_bench.bench.measurement.problems import rel_err
from ntk_bench.implementations import UnsupportedModelError

EVERY = implementations.names(origin=None)


def _mlp(i=3, o=2, dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(i, 4), nn.Tanh(), nn.Linear(4, o)).to(dtype)


def _x(n=3, i=3, dtype=torch.float64):
    return torch.randn(n, i, generator=torch.Generator().manual_seed(1), dtype=dtype)


class NoGradForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x):
        with torch.no_grad():
            return self.lin(x)


class DetachedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x):
        return torch.tanh(self.lin(x)).detach()


class UnusedParameter(nn.Module):
    """``self.spare`` holds parameters the forward never reads: their Jacobian rows are zero."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 4).double()
        self.spare = nn.Linear(3, 2).double()
        self.out = nn.Linear(4, 2).double()

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)))


def _scripted():
    return nn.Sequential(torch.jit.script(nn.Linear(3, 4).double()), nn.Tanh(), nn.Linear(4, 2).double())


# case -> (model and inputs, the error, what its message must say ({name}: the plugin's name))
REFUSED = {
    "no outputs (O = 0)": (lambda: (_mlp(o=0), _x()), ValueError, r"the model has no outputs.*its NTK is empty"),
    "samples without features": (lambda: (_mlp(i=0), _x(i=0)), ValueError,
                                 r"x1 has samples without features \(shape \(3, 0\)\)"),
    "meta tensors": (lambda: (_mlp().to("meta"), torch.empty(3, 3, dtype=torch.float64, device="meta")), ValueError,
                     r"the model's parameters are on the meta device"),
    "forward under no_grad": (lambda: (NoGradForward(), _x()), ValueError,
                              r"the model's output has no autograd history \(requires_grad=False\)"),
    "detached output": (lambda: (DetachedOutput(), _x()), ValueError, r"output has no autograd history"),
    "TorchScript submodule": (lambda: (_scripted(), _x()), UnsupportedModelError,
                              r"^{name}: 0 \(RecursiveScriptModule\) is a TorchScript module"),
    "traced model": (lambda: (torch.jit.trace(_mlp(), _x()), _x()), UnsupportedModelError,
                     r"^{name}: the model itself \(TopLevelTracedModule\) is a TorchScript module"),
}


def _run(plugin, entry, model, x, **kwargs):
    if entry == "compute":
        return plugin.compute(model, x, **kwargs)
    run, to_torch = plugin.prepare(model, x, **kwargs)
    return to_torch(run())


@pytest.mark.parametrize("entry", ["compute", "prepare"])
@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize("plugin_name", EVERY)
def test_edge_input_gets_the_same_clear_error_from_every_plugin(plugin_name, case, entry):
    """Not a ZeroDivisionError, a reshape or oneDNN error, `Tensor.item() cannot be called on meta tensors`,
    `'OrderedDictWrapper' object has no attribute 'get'`, nor an all-zero kernel from some plugins and an autograd
    error from others: one message, before any plugin runs (so the same whether or not a peer is installed)."""
    make, error, message = REFUSED[case]
    model, x = make()
    with pytest.raises(error, match=message.format(name=plugin_name)):
        _run(implementations.get(plugin_name), entry, model, x)


def _kernel_or_decline(plugin, model, x, **kwargs):
    """The kernel, or None where the plugin declines the model by name (``supports`` or UnsupportedModelError)."""
    reason = plugin.supports(model)
    if reason is not None:
        assert reason.startswith(plugin.name), reason
        return None
    try:
        return plugin.compute(model, x, **kwargs)
    except UnsupportedModelError as exc:
        assert str(exc).startswith(plugin.name) or plugin.origin == "peer", exc
        return None


def _sparse_embedding():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2)).double()


@pytest.mark.parametrize("plugin_name", EVERY)
def test_sparse_embedding_gets_the_dense_models_kernel(plugin_name):
    """``sparse=True`` changes how the gradient is stored, not its values: torch.func and the libraries cannot
    reshape a sparse gradient (`Could not run 'aten::view' ... 'SparseCPU'`), so the call computes with dense
    gradients and puts the flag back."""
    model = _sparse_embedding()
    ids = torch.tensor([[0, 4], [2, 2], [4, 1]])
    dense = copy.deepcopy(model)
    dense[0].sparse = False
    k = _kernel_or_decline(implementations.get(plugin_name), model, ids)
    assert model[0].sparse is True
    if k is not None:
        assert rel_err(k, bruteforce.ntk(dense, ids)) < 1e-10


@pytest.mark.parametrize("plugin_name", EVERY)
def test_a_parameter_the_forward_never_uses_has_zero_jacobian_rows(plugin_name):
    """BackPACK's BatchGrad leaves no ``grad_batch`` on such a parameter (an AttributeError before): zero rows, as
    autograd and every other plugin have them."""
    model = UnusedParameter()
    x = _x()
    k = _kernel_or_decline(implementations.get(plugin_name), model, x)
    if k is not None:
        assert rel_err(k, bruteforce.ntk(model, x)) < 1e-10


@pytest.mark.parametrize("plugin_name", EVERY)
def test_bfloat16_is_computed_or_declined_naming_the_dtype(plugin_name):
    """A bfloat16 kernel close to the float64 kernel of the same weights (to bfloat16's precision), or a decline
    that says bfloat16 is the reason (structured said its rules "do not add up" before)."""
    model, x = _mlp(dtype=torch.bfloat16), _x(dtype=torch.bfloat16)
    plugin = implementations.get(plugin_name)
    reason = plugin.supports(model)
    if reason is None:
        try:
            k = plugin.compute(model, x)
        except UnsupportedModelError as exc:
            reason = str(exc)
    if reason is not None:
        if "is not installed" not in reason:
            assert "bfloat16" in reason, reason
        return
    assert k.dtype == torch.bfloat16
    assert rel_err(k, bruteforce.ntk(model.double(), x.double())) < 5e-2


@pytest.mark.parametrize("budget", [np.int64(1 << 30), np.uint32(1 << 30)])
@pytest.mark.parametrize("plugin_name", EVERY)
def test_a_budget_of_any_integral_type_is_accepted(plugin_name, budget):
    model, x = _mlp(), _x()
    k = _kernel_or_decline(implementations.get(plugin_name), model, x, memory_budget_bytes=budget)
    if k is not None:
        assert rel_err(k, bruteforce.ntk(model, x)) < 1e-10


@pytest.mark.parametrize("budget", [True, np.bool_(True), 0, -5, np.int64(-1), 1.5e9, np.float64(1e9), "1e9"])
@pytest.mark.parametrize("plugin_name", EVERY)
def test_a_malformed_budget_gets_one_clear_line(plugin_name, budget):
    with pytest.raises(ValueError, match=r"^memory_budget_bytes must be a positive whole number of bytes, got "):
        implementations.get(plugin_name).compute(_mlp(), _x(), memory_budget_bytes=budget)
