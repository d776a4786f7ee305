"""Every registered plugin (ours and the peers) against neural-tangents, on every zoo problem it supports, the real
models included, in every mode.

Registering a plugin adds it here: the parametrisation reads ``implementations.names(origin=None)``.
"""

from __future__ import annotations

import pytest
import torch

from ntk_bench import implementations
from ntk_bench.bench.measurement.problems import ALL_PROBLEMS, FULL_MODE_ONLY, rel_err
from ntk_bench.implementations.core.contractions import reduce_full
from ntk_bench.implementations.core.tolerances import tolerance
from tests.conftest import DEVICES, reference_full, supported_model

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _hook_counts(model):
    return [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    ]


def check_against_reference(plugin, problem, mode, dtype, device):
    """Compute with ``plugin`` and assert agreement with neural-tangents and an untouched model; returns the model,
    the inputs and the kernel, for a caller with more to check on the same model."""
    model = supported_model(plugin, problem, dtype=dtype, device=device)
    x1, x2 = problem.inputs(dtype=dtype, device=device)
    model.eval()
    sentinel = torch.ones_like(next(model.parameters()))
    next(model.parameters()).grad = sentinel
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hooks = _hook_counts(model)

    inexact = getattr(plugin, "known_inexact", lambda *a: None)(model, dtype)
    # a peer's documented error (tests/implementations/peers/test_peers.py asserts it); the runner reports it as a
    # mismatch
    if inexact:
        pytest.skip(f"{plugin.name} is known to be inexact here: {inexact}")
    try:
        k = plugin.compute(model, x1, x2, mode=mode)
    except implementations.UnsupportedModelError as exc:  # a structure only running reveals
        pytest.skip(str(exc))

    ref = reduce_full(reference_full(problem.id), mode)
    assert k.shape == ref.shape
    assert k.dtype == dtype and k.device.type == torch.device(device).type
    err = rel_err(k, ref)
    assert err <= tolerance(dtype), f"{plugin.name} on {problem.id} ({mode}, {dtype}): rel err {err:.3e}"
    # The model is left as it was found.
    assert not model.training
    assert next(model.parameters()).grad is sentinel
    assert all(p.grad is None for p in list(model.parameters())[1:])
    assert all(torch.equal(before[k_], v) for k_, v in model.state_dict().items())
    assert _hook_counts(model) == hooks
    return model, x1, x2, k


# neural-tangents' peers compile an XLA program per case (seconds each): they are checked on the harness's small
# problems (every mode on three of them); tests/reference/test_reference_zoo.py checks neural-tangents on every real
# model.
NT_EVERY_MODE = {"mlp-relu-O3-N4M3", "mlp-relu-O3-x2None", "cnn-O4-N2M3"}


def _cases():
    """(plugin, problem, mode, dtype) to check: ours everywhere; a peer library's full kernel on every problem (in
    float64 only on the zoo's models: a library's float32 path is the same code on every model, and its loops over
    samples and outputs on the larger models are the suite's slowest cases), its trace and diagonal (reductions of
    its full kernel, or its own axes) and float32 on the harness's small problems."""
    from ntk_bench.bench.measurement.problems import PROBLEMS

    for plugin_name in implementations.names(origin=None):
        peer = implementations.origin_of(plugin_name) == "peer"
        nt = plugin_name.startswith("nt_")
        for problem in ALL_PROBLEMS:
            if nt and problem not in PROBLEMS:
                continue
            for mode in implementations.MODES:
                if mode != "full" and (problem.id in FULL_MODE_ONLY or (peer and problem not in PROBLEMS)
                                       or (nt and problem.id not in NT_EVERY_MODE)):
                    continue
                for dtype in DTYPES:
                    if peer and not nt and problem not in PROBLEMS and dtype != "float64":
                        continue
                    yield pytest.param(plugin_name, problem, mode, dtype,
                                       id=f"{plugin_name}-{problem.id}-{mode}-{dtype}")


@pytest.mark.usefixtures("kernel_reference")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plugin_name,problem,mode,dtype", list(_cases()))
def test_plugin_matches_neural_tangents(plugin_name, problem, mode, dtype, device):
    with torch.backends.cudnn.flags(allow_tf32=False):
        check_against_reference(implementations.get(plugin_name), problem, mode, DTYPES[dtype], device)
