"""Models the reference once got wrong or could not translate: a ``torch.no_grad()`` branch, interpolation,
``nn.Bilinear``, ``nn.EmbeddingBag``, transformers' GPT-2 and T5 (built from tiny configs, random weights), a
float32 cast inside a float64 model. Each kernel is checked against a float64 torch brute force
(``ntk_bench.bench.measurement.bruteforce``: one ``autograd.grad`` per sample and output)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ntk_bench.bench.measurement import bruteforce
from ntk_bench.bench.measurement.problems import rel_err

pytestmark = pytest.mark.usefixtures("nt_available")
F64 = torch.float64


class FrozenTeacher(nn.Module):
    """A student whose output is gated by a teacher branch computed under ``torch.no_grad()`` (or detached)."""

    def __init__(self, how: str = "no_grad"):
        super().__init__()
        self.how = how
        self.student = nn.Linear(4, 6)
        self.teacher = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        if self.how == "no_grad":
            with torch.no_grad():
                gate = torch.tanh(self.teacher(x))
        elif self.how == "set_grad_enabled":
            with torch.set_grad_enabled(False):
                gate = torch.tanh(self.teacher(x))
        else:
            gate = torch.tanh(self.teacher(x)).detach()
        return self.head(torch.tanh(self.student(x)) * gate + gate)


@pytest.mark.parametrize("how", ["no_grad", "set_grad_enabled", "detach"])
def test_a_no_grad_branch_contributes_no_gradient(how):
    """The teacher's parameters get no gradient in torch; neither do they in neural-tangents."""
    from ntk_bench import reference

    torch.manual_seed(0)
    model = FrozenTeacher(how).double()
    x1, x2 = torch.randn(3, 4, dtype=F64), torch.randn(2, 4, dtype=F64)
    k = reference.ntk(model, x1, x2, quick_compile=True)
    assert rel_err(k, bruteforce.ntk(model, x1, x2)) <= 1e-12


def test_without_the_gradient_stops_the_kernel_is_wrong(monkeypatch):
    """Injected fault: the translator forgets the no_grad block (as torch's decompositions do when they inline
    it). The forward still matches, so only the kernel shows it: the teacher's parameters then count."""
    from ntk_bench import reference
    from ntk_bench.reference import translate

    monkeypatch.setattr(translate, "_mark_gradient_stops", lambda program: 0)
    torch.manual_seed(0)
    model = FrozenTeacher("no_grad").double()
    x = torch.randn(3, 4, dtype=F64)
    assert reference.supports(model, x) is None
    assert rel_err(reference.ntk(model, x, quick_compile=True), bruteforce.ntk(model, x)) > 1e-2


class Interpolating(nn.Module):
    """A conv, an ``F.interpolate`` in one of its modes, a conv: the U-Net decoder's pattern."""

    def __init__(self, **interpolate):
        super().__init__()
        self.interpolate = interpolate
        self.down = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.up = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        y = torch.tanh(self.down(x))
        return self.up(nn.functional.interpolate(y, **self.interpolate)).flatten(1)[:, ::7]


class BilinearHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.bilinear = nn.Bilinear(4, 3, 2)

    def forward(self, x):
        return self.bilinear(torch.tanh(x[:, :4]), x[:, 4:])


class Bags(nn.Module):
    """``nn.EmbeddingBag`` on (N, L) ids (one bag per sample) then a Linear."""

    def __init__(self, mode: str, weighted: bool = False, padding_idx=None):
        super().__init__()
        self.weighted = weighted
        self.bag = nn.EmbeddingBag(12, 4, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(4, 2)

    def forward(self, ids):
        weights = (ids.to(self.bag.weight.dtype) + 1) / 12 if self.weighted else None
        return self.head(self.bag(ids, per_sample_weights=weights))


MODELS = {
    "interpolate-bilinear-size": (lambda: Interpolating(size=(7, 5), mode="bilinear"), (2, 6, 6)),
    "interpolate-bilinear-align_corners": (
        lambda: Interpolating(scale_factor=2, mode="bilinear", align_corners=True), (2, 5, 6)),
    "interpolate-bilinear-scale": (lambda: Interpolating(scale_factor=1.7, mode="bilinear"), (2, 6, 5)),
    "interpolate-bilinear-antialias": (lambda: Interpolating(size=(2, 2), mode="bilinear", antialias=True),
                                       (2, 8, 8)),
    "interpolate-nearest": (lambda: Interpolating(scale_factor=2, mode="nearest"), (2, 5, 6)),
    "interpolate-nearest-scale": (lambda: Interpolating(scale_factor=1.5, mode="nearest"), (2, 6, 6)),
    "bilinear": (BilinearHead, (7,)),
    "embedding_bag-sum": (lambda: Bags("sum"), "ids"),
    "embedding_bag-mean-padding": (lambda: Bags("mean", padding_idx=0), "ids"),
    "embedding_bag-max": (lambda: Bags("max"), "ids"),
    "embedding_bag-weighted": (lambda: Bags("sum", weighted=True), "ids"),
}


@pytest.mark.parametrize("name", MODELS)
def test_new_ops_through_a_model(name):
    from ntk_bench import reference

    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().double()
    if shape == "ids":
        x1, x2 = torch.randint(0, 12, (3, 5)), torch.randint(0, 12, (2, 5))
        x1[0, :2] = 0  # (a padding id, where the model has one)
    else:
        x1, x2 = torch.randn(3, *shape, dtype=F64), torch.randn(2, *shape, dtype=F64)
    assert reference.supports(model, x1) is None
    k = reference.ntk(model, x1, x2, quick_compile=True)
    assert rel_err(k, bruteforce.ntk(model, x1, x2)) <= 1e-10


def gpt2_head():
    """GPT-2 from a tiny config (random weights, the LM head tied to the token embedding): the last position's
    logits."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                                     eos_token_id=0, tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)

    class GPT2Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = transformers.GPT2LMHeadModel(config)

        def forward(self, ids):
            return self.lm(input_ids=ids).logits[:, -1, :]

    return GPT2Head()


# In its own process (the serial run): whether torch.export decomposes the symbolic batch depends on state other
# tests leave in a process (it did in one parallel worker), and this test is about the path a fresh process takes.
@pytest.mark.serial
def test_gpt2_is_exported_per_sample_when_a_symbolic_batch_does_not_decompose():
    """transformers' Conv1D views a transposed (batch, seq, features) tensor, which torch cannot prove valid
    for a symbolic batch; the model is exported for one sample instead, and batches are that program vmapped."""
    from ntk_bench import reference
    from ntk_bench.reference import translate

    torch.manual_seed(0)
    model = gpt2_head().double().eval()
    assert model.lm.lm_head.weight is model.lm.transformer.wte.weight
    x1, x2 = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (2, 5))
    assert reference.supports(model, x1) is None
    assert translate.program(model, x1).per_sample
    apply_fn, params = reference.to_jax(model, x1)
    assert "lm.lm_head.weight" not in params  # the tied head is the embedding: one parameter
    np.testing.assert_allclose(np.asarray(apply_fn(params, x1.numpy())), model(x1).detach().numpy(),
                               rtol=0, atol=1e-12)
    k = reference.ntk(model, x1, x2, quick_compile=True)
    assert rel_err(k, bruteforce.ntk(model, x1, x2)) <= 1e-10


class Float32Inside(nn.Module):
    """A float64 model whose middle computes in float32 on purpose: T5's RMS norm (its variance in float32)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.scale = nn.Parameter(torch.ones(6))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.inp(x)
        variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.head(self.scale * (h * torch.rsqrt(variance + 1e-6)))


def test_a_float32_cast_inside_a_float64_model_is_translated_and_checked_at_float32_precision():
    """Not refused by the 1e-10 forward check: the translation computes the variance in float32 too, and the
    reference states what that allows."""
    from ntk_bench import reference

    torch.manual_seed(0)
    model = Float32Inside().double()
    x1, x2 = torch.randn(3, 4, dtype=F64), torch.randn(2, 4, dtype=F64)
    assert reference.supports(model, x1) is None
    assert reference.reduced_precision(model, x1) == ["float32"]
    tol = reference.tolerance(model, x1)
    assert tol == pytest.approx(100 * np.finfo(np.float32).eps)
    out, expected = reference.forward(model, x1), model(x1).detach().numpy()
    assert 0 < np.abs(out - expected).max() <= tol * np.abs(expected).max()
    k = reference.ntk(model, x1, x2, quick_compile=True)
    assert rel_err(k, bruteforce.ntk(model, x1, x2)) <= tol


def test_a_float32_model_casting_to_float32_gets_a_float64_translation_checked_at_float32_precision():
    """In a float32 model the cast is the model's own dtype: the translation computes in float64 throughout, and
    is checked against torch's float64 copy of the model (which still casts) at float32's precision."""
    from ntk_bench import reference

    torch.manual_seed(0)
    model = Float32Inside()
    x = torch.randn(3, 4)
    assert reference.supports(model, x) is None
    assert reference.reduced_precision(model, x) == []
    assert reference.tolerance(model, x) == pytest.approx(100 * np.finfo(np.float32).eps)


def t5_encoder_head():
    """transformers' T5 encoder from a tiny config (random weights); T5LayerNorm computes its variance in
    float32."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=11, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)

    class T5EncoderHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = transformers.T5EncoderModel(config)
            self.head = nn.Linear(16, 3)

        def forward(self, ids):
            return self.head(self.encoder(input_ids=ids).last_hidden_state[:, 0])

    return T5EncoderHead()


def test_t5_in_float64_is_checked_at_its_float32_layer_norms_precision():
    from ntk_bench import reference

    torch.manual_seed(0)
    model = t5_encoder_head().double().eval()
    x1, x2 = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (2, 5))
    assert reference.supports(model, x1) is None
    assert reference.reduced_precision(model, x1) == ["float32"]
    k = reference.ntk(model, x1, x2, quick_compile=True)
    assert rel_err(k, bruteforce.ntk(model, x1, x2)) <= reference.tolerance(model, x1)
