"""Every zoo model through the reference: the translation reproduces its float64 forward, and neural-tangents'
kernel through it (structured derivatives, the implementation the runner's reference uses) agrees with a
brute-force float64 torch kernel (one ``autograd.grad`` per sample and output). Small configurations, so the
file runs in about two minutes on 2 cores."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from ntk_bench.bench.measurement.problems import rel_err
from ntk_bench.bench.zoo import architectures
from tests.reference.test_reference import brute_force_ntk

pytestmark = pytest.mark.usefixtures("nt_available")

# id -> (architecture, parameters, N, M or None for x2 = x1)
ZOO = {
    "mlp": ("mlp", dict(in_features=6, width=8, depth=2, out=3), 2, 3),
    "mlp-inplace": ("mlp", dict(in_features=6, width=8, depth=2, out=3, inplace=True), 2, 3),
    "tutorial_cnn": ("tutorial_cnn", {}, 2, None),
    "cnn": ("cnn", dict(channels=3, image=8, out=4), 2, 3),
    "resnet_tiny": ("resnet_tiny", dict(channels=2, image=6, out=3), 2, 3),
    "resnet18": ("resnet18", dict(image=16, out=2), 2, None),
    "mobilenet_v3_small": ("mobilenet_v3_small", dict(image=16, out=2), 2, None),
    "vit_tiny": ("vit_tiny", dict(out=3, layers=1), 2, 3),
    "text_transformer": ("text_transformer", dict(out=3), 2, 3),
    "lstm": ("lstm", dict(out=3), 2, 3),
    "lstm-2layers": ("lstm", dict(out=2, layers=2, seq=3), 2, None),
    "gru": ("gru", dict(out=3), 2, 3),
    "mlp_layernorm": ("mlp_layernorm", dict(out=3), 2, 3),
    "cnn_groupnorm": ("cnn_groupnorm", dict(out=3), 2, 3),
    "cnn_batchnorm": ("cnn_batchnorm", dict(out=3), 2, 3),
    "conv1d_net": ("conv1d_net", dict(out=3), 2, 3),
    "conv_variants": ("conv_variants", dict(out=3), 2, 3),
    "conv_variants-reflect": ("conv_variants", dict(out=2, padding_mode="reflect"), 2, 3),
    "conv_variants-replicate-depthwise": ("conv_variants", dict(out=2, padding_mode="replicate", groups=4), 2, None),
    "conv_variants-circular-dilated": ("conv_variants", dict(out=2, padding_mode="circular", dilation=2, bias=False),
                                       2, None),
    "mlp_tied-module": ("mlp_tied", dict(out=3, how="module"), 2, 3),
    "mlp_tied-weight": ("mlp_tied", dict(out=3, how="weight"), 2, 3),
}


def test_every_zoo_architecture_is_covered():
    assert set(architectures.names()) <= {arch for arch, *_ in ZOO.values()}


@functools.lru_cache(maxsize=None)
def case(case_id):
    """(model, x1, x2): one model object per case, so the translation is exported once for both tests."""
    arch_name, params, n, m = ZOO[case_id]
    arch = architectures.build(arch_name, seed=0, dtype=torch.float64, **params)
    x1 = architectures.inputs(arch, n, seed=1, dtype=torch.float64)
    x2 = None if m is None else architectures.inputs(arch, m, seed=2, dtype=torch.float64)
    return arch.model, x1, x2


@pytest.mark.parametrize("case_id", ZOO)
def test_translation_reproduces_the_forward(case_id):
    """Evaluated one sample at a time, as neural-tangents differentiates it (and as ``supports`` checks it)."""
    from ntk_bench import reference

    model, x1, _ = case(case_id)
    assert reference.supports(model, x1) is None
    out = reference.forward(model, x1)
    expected = model(x1).detach().numpy()
    np.testing.assert_allclose(out, expected.reshape(out.shape), rtol=1e-10, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize("case_id", ZOO)
def test_structured_derivatives_match_a_brute_force_kernel(case_id):
    from ntk_bench import reference

    model, x1, x2 = case(case_id)
    k = reference.ntk(model, x1, x2, implementation="structured_derivatives", quick_compile=True)
    assert rel_err(k, brute_force_ntk(model, x1, x2)) <= 1e-10
