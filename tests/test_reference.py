"""The reference checks itself: the JAX translation reproduces the torch model, and
neural-tangents' implementations agree with each other on the zoo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import reference_full
from problems import BY_ID, PROBLEMS, rel_err

pytestmark = pytest.mark.usefixtures("nt_available")

ONE_PER_ARCH = [p for p in PROBLEMS if p.id in (
    "mlp-relu-O3-N4M3", "mlp-gelu-nobias-O2-N3M2", "tutorial_cnn-O10-N2M3", "cnn-O4-N2M3", "resnet_tiny-O3-N2M3")]


@pytest.mark.parametrize("problem", ONE_PER_ARCH, ids=lambda p: p.id)
def test_translation_reproduces_the_torch_forward(problem):
    from ntk_bench import reference

    model = problem.model()
    x1, _ = problem.inputs()
    apply_fn, params = reference.to_jax(model)
    out = np.asarray(apply_fn(params, reference.to_numpy64(x1)))
    expected = model(x1).detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("implementation", ["ntk_vector_products", "structured_derivatives", "auto"])
@pytest.mark.parametrize("problem", ONE_PER_ARCH, ids=lambda p: p.id)
def test_neural_tangents_implementations_agree(problem, implementation):
    from ntk_bench import reference

    x1, x2 = problem.inputs()
    k = reference.ntk(problem.model(), x1, x2, implementation=implementation)
    assert rel_err(k, reference_full(problem.id)) <= 1e-12


@pytest.mark.parametrize("mode", ["trace", "diagonal"])
def test_native_modes_match_the_reduced_full_kernel(mode):
    """neural-tangents' own trace_axes/diagonal_axes (used when timing it as a peer) mean what ours mean."""
    from ntk_bench import reference
    from ntk_bench.implementations.kernels import reduce_full

    p = BY_ID["mlp-relu-O3-N4M3"]
    x1, x2 = p.inputs()
    native = reference.kernel_fn(p.model(), mode=mode)(reference.to_numpy64(x1), reference.to_numpy64(x2))
    assert rel_err(torch.from_numpy(np.asarray(native).copy()), reduce_full(reference_full(p.id), mode)) <= 1e-12


def test_reference_is_float64_in_plugin_shapes():
    p = BY_ID["cnn-O4-N2M3"]
    k = reference_full(p.id)
    assert k.dtype == torch.float64 and k.shape == (2, 3, 4, 4)


def test_unknown_op_is_named():
    from ntk_bench import reference

    class Sine(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return torch.sin(self.lin(x))

    with pytest.raises(reference.UnsupportedOpError, match="sin"):
        reference.to_jax(Sine().double())
    with pytest.raises(reference.UnsupportedOpError, match="LSTMCell"):
        reference.to_jax(nn.Sequential(nn.LSTMCell(3, 2)))
