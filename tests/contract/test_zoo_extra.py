"""Every plugin and torch peer on other people's models (tests/helpers/zoo_extra.py), against a float64 per-sample
brute force (ntk_bench.bench.measurement.bruteforce): each call, on two different batches (x2 = None with as many
samples as outputs, and N != M; the first only for the loops over samples on library architectures), either
matches the brute force or declines with ``UnsupportedModelError`` (``IllDefinedKernelError`` for the train-mode
models, which every method must refuse); ``auto`` computes every well-defined model; no call changes the model,
its gradients or its hooks.

neural-tangents' peers (``nt_*``) are left out: they run the reference translator, whose coverage of these models
tests/reference/test_reference*.py checks.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from ntk_bench import implementations
from ntk_bench.bench.measurement import bruteforce
from ntk_bench.bench.measurement.problems import rel_err
from ntk_bench.implementations.core.tolerances import tolerance
from ntk_bench.implementations.core.validation import IllDefinedKernelError
from tests.helpers.zoo_extra import EXTRA_MODELS, plain

PLUGINS = [n for n in implementations.names(origin=None) if not n.startswith("nt_")]
# Models whose float64 forward computes a part in float32 (T5LayerNorm's variance): every method's kernel is then
# defined only to about float32's precision, each rounding differently.
FLOAT32_INSIDE = {"hf-t5-encoder"}
FLOAT32_ACCURATE = 1e-6
# Small models are checked in the parallel suite; the library architectures (timm, torchvision, transformers)
# take seconds per call on 2 loaded cores and carry the zoo_extra marker (make test runs them too).
LIBRARY_PREFIXES = ("timm-", "tv-", "hf-", "train-timm-", "train-tv-", "train-hf-")


def _batches(z):
    """(x1, x2) pairs: x2 = None with N = O = 3 (where torch's vmap of PReLU went wrong), and N = 2, M = 3."""
    return [(z.inputs(3, seed=1), None), (z.inputs(2, seed=3), z.inputs(3, seed=2))]


@functools.cache
def _reference(model_id: str) -> tuple[torch.Tensor, ...]:
    z = EXTRA_MODELS[model_id]
    model = plain(z.model())  # (a wrapper's NTK is that of the module it runs)
    return tuple(bruteforce.ntk(model, x1, x2) for x1, x2 in _batches(z))


def _snapshot(model):
    """Everything a call could change: values, train/eval flags, hooks, which parameters require grad."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def _assert_untouched(model, before, sentinel):
    state, modes, hooks, requires = before
    now = _snapshot(model)
    assert now[0].keys() == state.keys() and all(torch.equal(state[k], v) for k, v in now[0].items())
    assert (now[1], now[2], now[3]) == (modes, hooks, requires)
    params = list(model.parameters())
    assert params[0].grad is sentinel and all(p.grad is None for p in params[1:])


# efficientnet's depthwise convolutions have a float64 CPU backward that loops over the groups: the brute force
# alone takes tens of seconds, and the methods that loop over samples and outputs (autograd_loop and the peers)
# minutes; it is checked with the batched methods.
LOOPED = {"autograd_loop", "asdl", "nngeometry", "curvlinops", "laplace"}
SLOW_BACKWARD = {"timm-efficientnet_b0"}


def _cases():
    for model_id in EXTRA_MODELS:
        marks = [pytest.mark.zoo_extra] if model_id.startswith(LIBRARY_PREFIXES) else []
        for name in PLUGINS:
            if model_id in SLOW_BACKWARD and name in LOOPED:
                continue
            yield pytest.param(model_id, name, id=f"{model_id}-{name}", marks=marks)


@pytest.mark.parametrize("model_id, plugin_name", list(_cases()))
def test_plugin_on_extra_model(model_id, plugin_name):
    z = EXTRA_MODELS[model_id]
    if z.needs and importlib.util.find_spec(z.needs) is None:
        pytest.skip(f"{z.needs} is not installed (the testzoo extra)")
    plugin = implementations.get(plugin_name)
    model = z.model()
    first = next(model.parameters())
    sentinel = torch.ones_like(first)
    first.grad = sentinel
    before = _snapshot(model)
    refs = _reference(model_id) if z.well_defined else None
    tol = FLOAT32_ACCURATE if model_id in FLOAT32_INSIDE else tolerance(torch.float64)
    inexact = getattr(plugin, "known_inexact", lambda *a: None)(plain(model), torch.float64)
    if inexact:  # a peer's documented float32-accurate path (tests/implementations/peers/test_peers.py asserts it)
        tol = max(tol, FLOAT32_ACCURATE)

    batches = _batches(z)
    if plugin_name in LOOPED and model_id.startswith(LIBRARY_PREFIXES):
        # a loop over samples and outputs on a library architecture: tens of seconds a batch. x2 handling is the
        # plugin's own code, the same on every model, checked on the small models' second batch.
        batches = batches[:1]
    for i, (x1, x2) in enumerate(batches):
        if not z.well_defined:
            with pytest.raises(IllDefinedKernelError, match="not well defined"):
                plugin.compute(model, x1, x2)
            continue
        try:
            k = plugin.compute(model, x1, x2)
        except implementations.UnsupportedModelError as exc:
            assert plugin_name != "auto", f"auto declined {model_id}, which other plugins compute: {exc}"
            assert str(exc).strip(), "a decline says why"
            continue
        assert k.shape == refs[i].shape and k.dtype == torch.float64
        err = rel_err(k, refs[i])
        assert err <= tol, f"{plugin_name} on {model_id}, batch {i}: relative error {err:.3g} (tolerance {tol:g})"
    _assert_untouched(model, before, sentinel)
