"""The plugin contract on the models people use: each plugin returns the right kernel or declines with
a reason; ill-defined kernels are refused before any work; the caller's model, inputs and grads are left as found;
integer inputs, (N,) outputs, calls under no_grad work; a tuple output gets an error that says what to do; auto
falls back when its pick declines. Every case here injects the fault it guards against."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ntk_bench import implementations
from ntk_bench.bench.measurement import bruteforce
from ntk_bench.bench.measurement.problems import ILL_DEFINED, ill_defined_inputs, rel_err
from ntk_bench.bench.zoo import architectures
from ntk_bench.implementations import UnsupportedModelError
from ntk_bench.implementations.core.engine import NonFiniteKernelError
from ntk_bench.implementations.core.validation import IllDefinedKernelError

EVERY = implementations.names(origin=None)
OURS = implementations.names()


def _compute_or_decline(plugin, model, x1, x2=None, mode="full"):
    """The kernel, or None when the plugin declines (in ``supports`` or with UnsupportedModelError)."""
    reason = plugin.supports(model)
    if reason is not None:
        assert reason.startswith(plugin.name), reason
        return None
    dtype = next(model.parameters()).dtype
    if getattr(plugin, "known_inexact", lambda *a: None)(model, dtype):  # a peer's documented error (test_peers)
        return None
    try:
        return plugin.compute(model, x1, x2, mode=mode)
    except UnsupportedModelError as exc:
        assert str(exc).startswith(plugin.name) or plugin.origin == "peer", exc
        return None


# -- ill-defined kernels are refused -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(ILL_DEFINED))
@pytest.mark.parametrize("plugin_name", EVERY)
def test_ill_defined_kernels_are_refused_before_any_work(plugin_name, case):
    make, shape, message = ILL_DEFINED[case]
    torch.manual_seed(0)
    model = make()
    x = ill_defined_inputs(shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plugin = implementations.get(plugin_name)
    with pytest.raises(IllDefinedKernelError, match="model.eval()") as info:
        plugin.compute(model, x)
    assert message in str(info.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), \
        "a refused call changed the model's parameters or buffers"


def test_train_mode_without_batch_statistics_or_randomness_is_fine():
    """train() alone changes nothing for a net of Linear/ReLU: the kernel is computed, and train mode kept."""
    model = architectures.build("mlp", in_features=4, width=5, depth=1, out=2, dtype=torch.float64).model.train()
    x = torch.randn(3, 4, dtype=torch.float64)
    k = implementations.get("jacobian_contraction").compute(model, x)
    assert model.training and rel_err(k, bruteforce.ntk(model, x)) <= 1e-12


# -- the caller's model, inputs and grads are left as found --------------------------------------------------------

def _slots(model):
    return [(name, p) for name, p in model.named_parameters(remove_duplicate=False)]


@pytest.mark.parametrize("how", ["module", "weight"])
@pytest.mark.parametrize("plugin_name", EVERY)
def test_shared_parameters_stay_parameters_and_the_kernel_is_right(plugin_name, how):
    """JC and NTK-VP used to leave plain tensors where a module used twice had its nn.Parameters (an optimizer
    built earlier stopped training them, deepcopy raised); several plugins ignored the second use."""
    arch = architectures.build("mlp_tied", how=how, out=3, dtype=torch.float64)
    model = arch.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    slots = _slots(model)
    x1, x2 = architectures.inputs(arch, 3, dtype=torch.float64), architectures.inputs(arch, 2, seed=2, dtype=torch.float64)
    k = _compute_or_decline(implementations.get(plugin_name), model, x1, x2)
    assert [(n, id(p)) for n, p in _slots(model)] == [(n, id(p)) for n, p in slots]
    assert all(type(p) is nn.Parameter for _, p in _slots(model))
    copy.deepcopy(model)
    if k is not None:
        assert rel_err(k, bruteforce.ntk(model, x1, x2)) <= 1e-10
    before = model.a.weight.detach().clone()
    model(x1).sum().backward()
    optimizer.step()
    assert not torch.equal(model.a.weight, before), "the optimizer no longer trains the shared weight"


@pytest.mark.parametrize("plugin_name", EVERY)
def test_inputs_grads_hooks_and_flags_are_left_as_found(plugin_name):
    arch = architectures.build("mlp", in_features=4, width=5, depth=1, out=2, dtype=torch.float64)
    model = arch.model.train()
    calls = []
    handle = model[0].register_forward_hook(lambda m, i, o: calls.append(1))
    grads = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    x1 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x1.grad = torch.full_like(x1, 3.0)
    x1_grad = x1.grad
    hooks_before = dict(model[0]._forward_hooks)
    plugin = implementations.get(plugin_name)
    k = _compute_or_decline(plugin, model, x1)
    assert x1.grad is x1_grad and bool((x1_grad == 3).all()), "the call accumulated into x1.grad"
    assert all(p.grad is g and bool((g == 7).all()) for p, g in zip(model.parameters(), grads))
    assert model.training and dict(model[0]._forward_hooks) == hooks_before
    if k is not None:
        assert not k.requires_grad and k.grad_fn is None, "the kernel keeps the autograd graph alive"
        assert rel_err(k, bruteforce.ntk(model, x1.detach())) <= 1e-10
    handle.remove()


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("plugin_name", EVERY)
def test_calls_work_under_no_grad_and_inference_mode(plugin_name, context):
    arch = architectures.build("mlp", in_features=4, width=5, depth=1, out=2, dtype=torch.float64)
    x = architectures.inputs(arch, 3, dtype=torch.float64)
    plugin = implementations.get(plugin_name)
    expected = bruteforce.ntk(arch.model, x)
    with getattr(torch, context)():
        k = _compute_or_decline(plugin, arch.model, x.clone())
    if k is not None:
        assert rel_err(k, expected) <= 1e-10


# -- inputs and outputs people have --------------------------------------------------------------------------------

@pytest.mark.parametrize("plugin_name", EVERY)
def test_integer_token_ids(plugin_name):
    arch = architectures.build("text_transformer", out=3, dtype=torch.float64)
    x1, x2 = architectures.inputs(arch, 2), architectures.inputs(arch, 3, seed=2)
    assert x1.dtype == torch.int64
    k = _compute_or_decline(implementations.get(plugin_name), arch.model, x1, x2)
    if k is not None:
        assert k.dtype == torch.float64
        assert rel_err(k, bruteforce.ntk(arch.model, x1, x2)) <= 1e-10


@pytest.mark.parametrize("mode", implementations.MODES)
@pytest.mark.parametrize("plugin_name", EVERY)
def test_a_vector_output_is_one_output(plugin_name, mode):
    torch.manual_seed(0)
    column = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    vector = nn.Sequential(column, nn.Flatten(0))
    x1, x2 = torch.randn(3, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    k = _compute_or_decline(implementations.get(plugin_name), vector, x1, x2, mode)
    if k is not None:
        assert k.shape == {"full": (3, 2, 1, 1), "trace": (3, 2), "diagonal": (3, 2, 1)}[mode]
        assert rel_err(k, bruteforce.ntk(column, x1, x2, mode)) <= 1e-10


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x), x


class DictOut(TupleOut):
    def forward(self, x):
        return {"logits": self.lin(x)}


@pytest.mark.parametrize("model_cls, hint", [(TupleOut, r"model\(x\)\[0\]"), (DictOut, r"model\(x\)\['logits'\]")])
@pytest.mark.parametrize("plugin_name", EVERY)
def test_tuple_and_dict_outputs_say_how_to_wrap_the_model(plugin_name, model_cls, hint):
    with pytest.raises(ValueError, match=hint):
        implementations.get(plugin_name).compute(model_cls(), torch.randn(2, 3))


@pytest.mark.parametrize("plugin_name", EVERY)
def test_an_overflowing_kernel_is_an_error_not_inf(plugin_name):
    model = architectures.build("mlp", in_features=4, width=5, depth=1, out=2).model
    x = torch.full((2, 4), 1e30)  # finite inputs; X Xᵀ overflows float32
    plugin = implementations.get(plugin_name)
    if plugin.supports(model) is not None:
        pytest.skip(plugin.supports(model))
    with pytest.raises((NonFiniteKernelError, UnsupportedModelError)):
        plugin.compute(model, x)


# -- auto --------------------------------------------------------------------------------------------------------

def test_auto_falls_back_when_its_pick_declines_at_compute_time(monkeypatch):
    arch = architectures.build("mlp", in_features=4, width=5, depth=1, out=2, dtype=torch.float64)
    x = architectures.inputs(arch, 3, dtype=torch.float64)
    auto = implementations.get("auto")
    first = auto.choose(arch.model, x)[0]

    def declines(self, *args):
        raise UnsupportedModelError(f"{self.name}: declined at compute time (injected)")

    monkeypatch.setattr(type(first), "_kernel", declines)
    k = auto.compute(arch.model, x)
    name, why = auto.last_choice
    assert name != first.name and f"{first.name} declined at compute time" in why
    assert rel_err(k, bruteforce.ntk(arch.model, x)) <= 1e-10


# -- every plugin on the real-model zoo: the right kernel or a decline ----------------------------------------------

ZOO_SMALL = {"mlp": dict(in_features=6, width=8, out=3), "cnn": dict(channels=3, image=8, out=3),
             "resnet_tiny": dict(channels=2, image=6, out=3), "resnet18": dict(image=16, out=2),
             "mobilenet_v3_small": dict(image=16, out=2, width_mult=0.25), "vit_tiny": dict(out=3), "text_transformer": dict(out=3),
             "mlp_tied": dict(out=3), "conv_variants": dict(padding_mode="reflect", out=3),
             "mlp_layernorm": dict(out=3), "cnn_groupnorm": dict(out=3), "cnn_batchnorm": dict(out=3),
             "conv1d_net": dict(out=3), "lstm": dict(out=3), "gru": dict(out=3), "tutorial_cnn": {}}
_ZOO_CACHE: dict = {}


def _zoo_problem(name):
    if name not in _ZOO_CACHE:
        arch = architectures.build(name, dtype=torch.float64, **ZOO_SMALL.get(name, {}))
        x1, x2 = architectures.inputs(arch, 2, seed=1, dtype=torch.float64), \
            architectures.inputs(arch, 3, seed=2, dtype=torch.float64)
        _ZOO_CACHE[name] = (arch.model, x1, x2, bruteforce.ntk(arch.model, x1, x2))
    return _ZOO_CACHE[name]


def test_the_zoo_is_covered():
    assert set(architectures.names()) == set(ZOO_SMALL), "a zoo architecture without a contract test"


# neural-tangents' peers compile an XLA program per model (tens of seconds for these three on 2 cores): their
# structured derivatives on them are tests/reference/test_reference_zoo.py's, against the same brute-force kernel.
NT_HEAVY = {"resnet18", "mobilenet_v3_small", "vit_tiny"}


@pytest.mark.parametrize("plugin_name,arch", [(p, a) for p in EVERY for a in ZOO_SMALL
                                              if not (p.startswith("nt_") and a in NT_HEAVY)])
def test_every_plugin_on_the_zoo_computes_the_kernel_or_declines(plugin_name, arch):
    model, x1, x2, expected = _zoo_problem(arch)
    k = _compute_or_decline(implementations.get(plugin_name), model, x1, x2)
    if k is not None:
        assert rel_err(k, expected) <= 1e-10


def _scaled_output_hook(module, inputs, output):
    return 2.0 * output


def _hooked():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[0].register_forward_hook(_scaled_output_hook)
    return model


def _spectral():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    torch.nn.utils.parametrizations.spectral_norm(model[0])
    return model.eval()


def _weight_norm():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    torch.nn.utils.parametrizations.weight_norm(model[2])
    return model


def _frozen():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[0].weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("make", [_hooked, _spectral, _weight_norm, _frozen], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("plugin_name", EVERY)
def test_hooks_parametrisations_and_frozen_parameters(plugin_name, make):
    """A forward hook that changes a layer's output, spectral_norm / weight_norm parametrisations (their weight is
    computed from other parameters), a frozen weight: the kernel of the model's real forward, or a decline."""
    torch.manual_seed(0)
    model = make()
    x1, x2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    k = _compute_or_decline(implementations.get(plugin_name), model, x1, x2)
    if k is not None:
        assert rel_err(k, bruteforce.ntk(model, x1, x2)) <= 1e-10


@pytest.mark.parametrize("plugin_name, model, words", [
    ("backpack_batchgrad", lambda: architectures.build("conv_variants", padding_mode="circular").model,
     "padding_mode='circular'"),
    ("backpack_sqrtggn", lambda: architectures.build("conv_variants", padding_mode="replicate").model,
     "padding_mode='replicate'"),
    ("backpack_batchgrad", lambda: architectures.build("cnn", inplace=True).model, "1 (ReLU) is in place"),
    ("backpack_batchgrad", _hooked, "0 (Linear: forward hooks)"),
    ("explicit_mlp", _hooked, "0 (Linear: forward hooks)"),
    ("explicit_mlp", _spectral, "0 (ParametrizedLinear)"),
    ("backpack_batchgrad", lambda: architectures.build("mlp_tied", how="weight").model, "a.weight = b.weight"),
])
def test_declines_name_the_module_and_why(plugin_name, model, words):
    reason = implementations.get(plugin_name).supports(model())
    assert reason is not None and reason.startswith(plugin_name) and words in reason, reason
