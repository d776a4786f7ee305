"""The model put back as found on calls that reuse the snapshot of an unchanged model (``state.as_found``): each
fault a kernel could leave behind is injected on a call made after the snapshot was cached, and the model must
come out exactly as it went in (or the call fail naming the change it cannot undo)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ntk_bench.implementations.core import engine, unchanged
from ntk_bench.implementations.core.base import NTKPlugin
from ntk_bench.implementations.core.state import Snapshot


class _Faulty(NTKPlugin):
    """A zero kernel whose call first does ``fault(model)`` (None: nothing)."""

    name = "faulty_test_plugin"

    def __init__(self):
        self.fault = None

    def _kernel(self, model, x1, x2, mode):
        if self.fault is not None:
            self.fault(model)
        n, m = x1.shape[0], (x1 if x2 is None else x2).shape[0]
        return torch.zeros(n, m, 2, 2, dtype=x1.dtype)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double().eval()


X = torch.randn(3, 4, dtype=torch.float64)


def _cached():
    """A model, a plugin, and the proof that the next call takes the cached snapshot."""
    model, plugin = _model(), _Faulty()
    plugin.compute(model, X)
    call = engine.validated(plugin, model, X, None, "full")
    assert call.snapshot is not None and unchanged.same(call.state, unchanged.state(model))
    return model, plugin


def _record(model):
    return ([m.training for m in model.modules()], [(k, p) for k, p in model.named_parameters()],
            [(p.grad, p.requires_grad) for p in model.parameters()],
            [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()])


def _same(a, b):
    flags_a, params_a, grads_a, hooks_a = a
    flags_b, params_b, grads_b, hooks_b = b
    return flags_a == flags_b and hooks_a == hooks_b and len(params_a) == len(params_b) and \
        all(ka == kb and pa is pb for (ka, pa), (kb, pb) in zip(params_a, params_b)) and \
        all(ga is gb and ra == rb for (ga, ra), (gb, rb) in zip(grads_a, grads_b))


def _swap_slot(model):
    model[0]._parameters["weight"] = model[0].weight.detach().clone()  # (what functional_call can leave)


def _rename(model):
    p = model[2]._parameters
    p["moved"] = p.pop("bias")  # (the same objects under another name)


def _grads(model):
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[2].bias.grad = None


@pytest.mark.parametrize("fault", [
    lambda m: m.train(), _swap_slot, _rename, _grads,
    lambda m: m[2].weight.requires_grad_(False),
    lambda m: m[1].register_forward_hook(lambda mod, i, o: o),
    lambda m: m[0].register_forward_pre_hook(lambda mod, i: None),
], ids=["train flag", "parameter slot", "renamed slot", "grads", "requires_grad", "forward hook", "pre hook"])
def test_a_kernel_that_changes_the_model_on_a_cached_call_leaves_it_as_found(fault):
    model, plugin = _cached()
    model[2].bias.grad = torch.full_like(model[2].bias, 3.0)  # (a grad of the caller's: not part of the state)
    before = _record(model)
    plugin.fault = fault
    plugin.compute(model, X)
    assert _same(_record(model), before)
    plugin.fault = None
    plugin.compute(model, X)  # and the next call goes on from the model as found


def test_a_buffer_changed_in_place_on_a_cached_call_is_an_error():
    model, plugin = _cached()
    model[0].register_buffer("count", torch.zeros(()))
    plugin.compute(model, X)  # (a new state: a new snapshot, cached)
    plugin.fault = lambda m: m[0].count.add_(1)
    with pytest.raises(RuntimeError, match=r"buffers \['Linear.count'\] in place"):
        plugin.compute(model, X)


def test_a_parameter_replaced_between_calls_is_put_back_not_the_old_one():
    model, plugin = _cached()
    new = nn.Parameter(model[0].weight.detach().clone() + 1)
    model[0].weight = new  # a new state: the cached snapshot holds the old parameter and must not be used
    plugin.fault = _swap_slot
    plugin.compute(model, X)
    assert model[0].weight is new
    plugin.compute(model, X)
    assert model[0].weight is new


def test_a_model_whose_checks_change_it_gets_no_snapshot_and_is_put_back_all_the_same():
    """The call whose checks changed the model's state runs without the cached snapshot (the record is taken as
    the kernel starts); a faulty kernel on a later call is undone either way."""
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2).double()

        def forward(self, x):
            self.last_batch = x.shape[0]  # (an attribute rebound by every forward: its state never settles)
            return self.lin(x)

    model, plugin = Counting(), _Faulty()
    call = engine.validated(plugin, model, X, None, "full")
    assert call.snapshot is None
    plugin.fault = lambda m: m.train(False) or m.lin._parameters.__setitem__("bias", None)
    bias = model.lin.bias
    plugin.compute(model, X)
    assert model.lin.bias is bias and model.training


def test_state_sees_a_value_moved_to_another_name():
    model = _model()
    before = unchanged.state(model)
    _rename(model)
    assert not unchanged.same(before, unchanged.state(model))


def test_snapshot_restore_names_a_replaced_buffer_and_puts_it_back():
    model = _model()
    model[0].register_buffer("scale", torch.ones(()))
    snapshot = Snapshot(model)
    taken = snapshot.take()
    original = model[0].scale
    model[0]._buffers["scale"] = torch.zeros(())
    snapshot.restore(model, taken)
    assert model[0].scale is original
