"""Every registered plugin (ours and the peers) against neural-tangents, on every zoo problem it supports, the real
models included, in every mode.

Registering a plugin adds it here: the parametrisation reads ``implementations.names(kind=None)``.
"""

from __future__ import annotations

import pytest
import torch

from ntk_bench import implementations
from conftest import DEVICES, reference_full, supported_model
from ntk_bench.implementations.kernels import reduce_full
from problems import ALL_PROBLEMS, FULL_MODE_ONLY, TOLERANCE, rel_err

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _hook_counts(model):
    return [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    ]


def check_against_reference(plugin, problem, mode, dtype, device):
    """Compute with ``plugin`` and assert agreement with neural-tangents and an untouched model."""
    model = supported_model(plugin, problem, dtype=dtype, device=device)
    x1, x2 = problem.inputs(dtype=dtype, device=device)
    model.eval()
    sentinel = torch.ones_like(next(model.parameters()))
    next(model.parameters()).grad = sentinel
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hooks = _hook_counts(model)

    inexact = getattr(plugin, "known_inexact", lambda *a: None)(model, dtype)
    if inexact:  # a peer's documented error (tests/test_peers.py asserts it); the runner reports it as a mismatch
        pytest.skip(f"{plugin.name} is known to be inexact here: {inexact}")
    try:
        k = plugin.compute(model, x1, x2, mode=mode)
    except implementations.UnsupportedModelError as exc:  # a structure only running reveals
        pytest.skip(str(exc))

    ref = reduce_full(reference_full(problem.id), mode)
    assert k.shape == ref.shape
    assert k.dtype == dtype and k.device.type == torch.device(device).type
    err = rel_err(k, ref)
    assert err <= TOLERANCE[dtype], f"{plugin.name} on {problem.id} ({mode}, {dtype}): rel err {err:.3e}"
    # The model is left as it was found.
    assert not model.training
    assert next(model.parameters()).grad is sentinel
    assert all(p.grad is None for p in list(model.parameters())[1:])
    assert all(torch.equal(before[k_], v) for k_, v in model.state_dict().items())
    assert _hook_counts(model) == hooks


@pytest.mark.usefixtures("kernel_reference")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("mode", implementations.MODES)
@pytest.mark.parametrize("problem", ALL_PROBLEMS, ids=[p.id for p in ALL_PROBLEMS])
@pytest.mark.parametrize("plugin_name", implementations.names(kind=None))
def test_plugin_matches_neural_tangents(plugin_name, problem, mode, dtype, device):
    if problem.id in FULL_MODE_ONLY and mode != "full":
        pytest.skip("full mode only for this model (its layers are checked in every mode on the smaller ones)")
    with torch.backends.cudnn.flags(allow_tf32=False):
        check_against_reference(implementations.get(plugin_name), problem, mode, DTYPES[dtype], device)
