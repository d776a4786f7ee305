"""The structured plugin: its kernel assembly (symmetric blocks, the output layer's shortcut, the layers taken in
the Jacobian order contracted together), the CPU convolution backend it picks, its cost model, and a decline at
run time. The rules themselves: test_structured_rules.py; whole models: test_structured_models.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ntk_bench import implementations
from ntk_bench.bench.measurement.problems import rel_err


def test_structured_declines_at_run_time_a_module_mixing_samples():
    """What only the forward shows is declined from compute (an UnsupportedModelError naming the module)."""

    class BatchCentred(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            h = self.lin(x)
            return h - h.mean(0)

    from ntk_bench.implementations.core.validation import IllDefinedKernelError

    model, x = nn.Sequential(BatchCentred(), nn.Linear(3, 2)), torch.randn(4, 3)
    with pytest.raises(IllDefinedKernelError, match="depends on the other samples"):  # the engine's probe, first
        implementations.get("structured").compute(model, x)
    # structured's own check (behind the engine's), naming the module
    with pytest.raises(implementations.UnsupportedModelError, match=r"output of 0 \(BatchCentred\)"):
        implementations.get("structured")._kernel(model, x, None, "full")


@pytest.mark.parametrize("problem_id", ["mlp-relu-O3-x2None", "mlp-sigmoid-depth1-O4-x2None", "cnn-O4-x2None", "tutorial_cnn-O10-x2None"])
@pytest.mark.parametrize("plugin_name", ["structured", "explicit_mlp"])
def test_symmetric_kernels_from_three_blocks_equal_the_plain_sum(plugin_name, problem_id, monkeypatch):
    """x2 = None: the blocks on and above the diagonal computed and the lower ones mirrored give the same kernel,
    odd N included, in halves and in as many blocks as samples."""
    from ntk_bench.bench.measurement.problems import BY_ID
    from ntk_bench.implementations.core import contractions as base
    from tests.conftest import supported_model

    problem = BY_ID[problem_id]
    plugin = implementations.get(plugin_name)
    model = supported_model(plugin, problem)
    x1, _ = problem.inputs()
    plain = implementations.get("jacobian_contraction").compute(model, x1)
    monkeypatch.setattr(base, "SYMMETRIC_SPLIT_MIN_ROWS_CPU", 1)
    calls = []
    blocks = base.symmetric_blocks
    monkeypatch.setattr(base, "symmetric_blocks", lambda rows, device: calls.append(rows) or blocks(rows, device))
    for min_rows in (10**9, 1):  # halves; one sample a block
        monkeypatch.setattr(base, "SYMMETRIC_BLOCK_MIN_ROWS", min_rows)
        for n in (x1.shape[0], x1.shape[0] - 1):
            split = plugin.compute(model, x1[:n])
            assert split.is_contiguous() and rel_err(split, plain[:n, :n]) <= 1e-12
    assert calls or "cnn" in problem_id  # the split was taken (the CNNs: Jacobian terms, tested below)


@pytest.mark.parametrize("mode", implementations.MODES)
@pytest.mark.parametrize("plugin_name", ["structured", "explicit_mlp"])
@pytest.mark.parametrize("layers", [
    lambda: [nn.Linear(5, 3)],  # the output layer alone: only the identity term
    lambda: [nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False)],
    lambda: [nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Sigmoid()],  # an activation after the last Linear
], ids=["single-linear", "no-bias", "final-activation"])
def test_output_layer_shortcut_matches_jacobian_contraction(plugin_name, layers, mode):
    """The output Linear's G is the identity, its term (X X'ᵀ + 1) ⊗ I is added without a GEMM; and where an
    activation follows it, G is not the identity and the general path runs."""
    torch.manual_seed(0)
    model = nn.Sequential(*layers()).double()
    x1, x2 = torch.randn(4, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    jc, plugin = implementations.get("jacobian_contraction"), implementations.get(plugin_name)
    for a, b in ((x1, x2), (x1, None)):
        assert rel_err(plugin.compute(model, a, b, mode=mode), jc.compute(model, a, b, mode=mode)) <= 1e-12


@pytest.mark.parametrize("mode", implementations.MODES)
def test_identity_gram_as_first_or_later_term(mode):
    """KernelSum.add_identity_gram adds xx[n, m]·δ_op whether or not a term came before it."""
    from ntk_bench.implementations.core.contractions import KernelSum, reduce_full

    g = torch.Generator().manual_seed(0)
    n, m, o, c = 3, 4, 2, 5
    xx, yy = torch.randn(n, m, generator=g, dtype=torch.float64), torch.randn(n, m, generator=g, dtype=torch.float64)
    g1, g2 = torch.randn(o, n, c, generator=g, dtype=torch.float64), torch.randn(o, m, c, generator=g, dtype=torch.float64)
    identity = xx[:, :, None, None] * torch.eye(o, dtype=torch.float64)
    gram = yy[:, :, None, None] * torch.einsum("onc,pmc->nmop", g1, g2)
    alone, after = KernelSum(mode), KernelSum(mode)
    alone.add_identity_gram(xx, o)
    after.add_gram(yy, g1, g2)
    after.add_identity_gram(xx, o)
    assert torch.allclose(alone.result(), reduce_full(identity, mode))
    assert torch.allclose(after.result(), reduce_full(identity + gram, mode))


@pytest.mark.parametrize("mode", implementations.MODES)
@pytest.mark.parametrize("first", [True, False], ids=["first-term", "after-a-term"])
def test_scaled_gram_equals_the_gram_of_the_weights_scaled_per_sample(mode, first):
    """KernelSum.add_scaled_gram (G[o, n, c] = w[o, c]·d[n, c], trace mode from Σ_o w² without G) adds what
    add_gram adds for that G, x2 given or not, as the first term or after another."""
    from ntk_bench.implementations.core.contractions import KernelSum

    g = torch.Generator().manual_seed(0)
    n, m, o, c = 4, 3, 3, 6
    w = torch.randn(o, c, generator=g, dtype=torch.float64)
    d1, d2 = torch.rand(n, c, generator=g, dtype=torch.float64), torch.rand(m, c, generator=g, dtype=torch.float64)
    other = torch.randn(o, n, c, generator=g, dtype=torch.float64), torch.randn(o, m, c, generator=g, dtype=torch.float64)
    for b, xx in ((d2, torch.randn(n, m, generator=g, dtype=torch.float64)),
                  (d1, (lambda a: a @ a.T)(torch.randn(n, 2, generator=g, dtype=torch.float64)))):
        scaled, plain = KernelSum(mode), KernelSum(mode)
        for total in (scaled, plain):
            if not first:
                total.add_gram(torch.ones_like(xx), other[0], other[0] if b is d1 else other[1])
        scaled.add_scaled_gram(xx, w, d1, b, symmetric=b is d1)
        plain.add_gram(xx, w.unsqueeze(1) * d1, w.unsqueeze(1) * b, symmetric=b is d1)
        assert torch.allclose(scaled.result(), plain.result(), atol=1e-12)


@pytest.mark.parametrize("mode", implementations.MODES)
@pytest.mark.parametrize("layers", [
    lambda: [nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 7), nn.GELU(), nn.Tanh(), nn.Linear(7, 3, bias=False)],
    lambda: [nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 7), nn.Linear(7, 3)],  # no activation below the output
    lambda: [nn.Linear(5, 6), nn.Sigmoid(), nn.Linear(6, 1)],  # O = 1
], ids=["two-activations", "no-activation", "one-output"])
def test_explicit_mlp_layer_below_the_output_matches_jacobian_contraction(layers, mode):
    """explicit_mlp takes the layer below a Linear output layer from its scaled-weights form in trace mode
    (add_scaled_gram): with two activations, none, and a single output."""
    torch.manual_seed(0)
    model = nn.Sequential(*layers()).double()
    x1, x2 = torch.randn(5, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    jc, plugin = implementations.get("jacobian_contraction"), implementations.get("explicit_mlp")
    for a, b in ((x1, x2), (x1, None)):
        assert rel_err(plugin.compute(model, a, b, mode=mode), jc.compute(model, a, b, mode=mode)) <= 1e-12


def test_explicit_mlp_factors_contract_to_its_kernel_and_refuse_another_model():
    """explicit_mlp.factors / contract (a dataset kernel's per-block path) give _kernel's result bit for bit in
    every mode, x2 given or not, also from factors kept as state; state from other layers, another block size or
    dtype is StaleFactors, not contracted."""
    from ntk_bench.implementations.core.base import StaleFactors

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    a, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    plugin = implementations.get("explicit_mlp")
    fa, fb = plugin.factors(model, a), plugin.factors(model, b)
    kept = plugin.factors_from_state(model, a, plugin.factors_state(fa))
    for mode in implementations.MODES:
        assert torch.equal(plugin.contract(fa, fb, mode), plugin._kernel(model, a, b, mode))
        assert torch.equal(plugin.contract(fa, None, mode), plugin._kernel(model, a, None, mode))
        assert torch.equal(plugin.contract(kept, fb, mode), plugin.contract(fa, fb, mode))
    assert 0 < fa.nbytes() < 10_000
    other = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    for wrong_model, x in ((other, a), (model, b), (copy.deepcopy(model).float(), a.float())):
        with pytest.raises(StaleFactors):
            plugin.factors_from_state(wrong_model, x, plugin.factors_state(fa))


@pytest.mark.parametrize("rows", [(3, 2, 5), (40, 3, 7), (214, 3, 7)])  # N·O under 64, halves, 642 rows: 5 blocks
def test_jacobian_blocks_in_either_row_order_and_symmetric_halves(rows):
    """KernelSum.add_jacobians gives J1 J2ᵀ for (N, O, P) blocks stored as (N, O, P) or as views of (O, N, P)
    (linear_jacobian's layout), mixed, and for a symmetric kernel (J2 is J1) from its upper blocks."""
    from ntk_bench.implementations.core.contractions import KernelSum

    n, o, p = rows
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, o, p, generator=g, dtype=torch.float64)
    b = torch.randn(n + 1, o, p, generator=g, dtype=torch.float64)
    a_t, b_t = a.transpose(0, 1).contiguous().transpose(0, 1), b.transpose(0, 1).contiguous().transpose(0, 1)
    for j1, j2, symmetric in ((a, b, False), (a_t, b_t, False), (a_t, b, False), (a, a, True), (a_t, a_t, True)):
        total = KernelSum("full")
        total.add_jacobians(j1, j2)
        total.add_jacobians(j1, j2)  # a second term, added to the first
        ref = 2 * torch.einsum("nap,mbp->nmab", a, a if symmetric else b)
        assert torch.allclose(total.result(), ref, atol=1e-12)


def test_cpu_convolution_backend_is_the_measured_faster_one():
    """oneDNN is kept unless PyTorch's own convolutions run the kernel >10% faster; slow calls skip the trial."""
    import time

    from ntk_bench.implementations.core.onednn import is_faster as _onednn_is_faster

    onednn = torch._C._get_mkldnn_enabled
    calls = []

    def run(fast_with_onednn, slow=0.0):
        calls.append(onednn())
        time.sleep(slow or (0.001 if onednn() == fast_with_onednn else 0.004))

    assert _onednn_is_faster(lambda: run(True)) and not _onednn_is_faster(lambda: run(False))
    calls.clear()
    assert _onednn_is_faster(lambda: run(False, slow=0.06)) and all(calls)  # over 50 ms: native never tried


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this build")
def test_structured_leaves_the_onednn_flag_as_it_was_and_agrees_on_both_backends():
    import importlib

    from ntk_bench.bench.measurement.problems import BY_ID
    from ntk_bench.implementations.core import onednn

    structured = importlib.import_module("ntk_bench.implementations.structured.plugin")  # (the module, not `plugin`)

    problem = BY_ID["cnn-O4-N2M3"]  # in float32: oneDNN has no float64 convolutions, and is not tried there
    model, (x1, x2) = problem.model(torch.float32), problem.inputs(torch.float32)
    plugin, before = implementations.get("structured"), torch._C._get_mkldnn_enabled()
    kernel = plugin.compute(model, x1, x2)
    assert torch._C._get_mkldnn_enabled() == before and len(structured._BACKEND[model]) == 1
    for enabled in (True, False):
        with onednn.enabled(enabled):
            assert rel_err(plugin._layer_sum(model, x1, x2, "full"), kernel) <= 1e-5
    assert model.double() not in structured._BACKEND or len(structured._BACKEND[model]) == 1
    plugin.compute(model, x1.double(), x2.double())
    assert len(structured._BACKEND[model]) == 1  # no trial in float64


@pytest.mark.parametrize("mode", implementations.MODES)
@pytest.mark.parametrize("layers, shape", [
    # one output: the output Linear's Jacobian [X, 1] joins the conv layers' blocks
    (lambda: [nn.Conv2d(2, 3, 3, stride=2, dilation=1, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, bias=False, dilation=2),
              nn.Flatten(), nn.Linear(8, 1)], (2, 7, 7)),
    # a Linear with one input feature takes the Jacobian order (N = M = 12: 1008 FLOPs against the Gram order's 1152)
    (lambda: [nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1)], (1,)),
    (lambda: [nn.Conv2d(1, 2, (3, 2), padding=(1, 0)), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 5 * 4, 3), nn.Tanh()],
     (1, 5, 5)),
], ids=["conv-O1", "linear-jacobian-order", "conv-final-activation"])
def test_layers_contracted_together_match_jacobian_contraction(layers, shape, mode):
    """The Jacobian-order layers' blocks, concatenated and contracted in one GEMM, give Jacobian contraction's
    kernel in float64, with x2 given and x2 = None."""
    torch.manual_seed(0)
    model = nn.Sequential(*layers()).double()
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(n, *shape, generator=g, dtype=torch.float64) for n in (12, 5))
    structured, jc = implementations.get("structured"), implementations.get("jacobian_contraction")
    for a, b in ((x1, x2), (x1, None)):
        assert rel_err(structured.compute(model, a, b, mode=mode), jc.compute(model, a, b, mode=mode)) <= 1e-12


@pytest.mark.parametrize("name, params", [
    ("resnet18", dict(image=16)), ("mobilenet_v3_small", dict(image=16)), ("vit_tiny", {}), ("text_transformer", {}),
    ("lstm", {}), ("mlp_tied", {}), ("conv_variants", dict(groups=4)), ("cnn_groupnorm", {})])
def test_cost_model_knows_every_rule(name, params):
    """structured's cost view (its layers, from the plan on one sample) has one layer per rule the plan uses,
    covering every trainable parameter, and its estimate grows with N and counts at least the kernel's bytes."""
    from ntk_bench.bench.zoo import architectures
    from ntk_bench.implementations.core.costs import cost_stats, kernel_numel

    arch = architectures.build(name, **params)
    x = architectures.inputs(arch, 2)
    stats = cost_stats(arch.model, x[:1])
    plugin = implementations.get("structured")
    plan = plugin.plan(arch.model, x)
    layers = plugin.layers(stats)
    assert {layer.kind for _, layer in layers} == {e.kind for e in plan.entries}
    covered = sum(layer.p for _, layer in layers)
    assert covered >= stats.p == sum(p.numel() for p in arch.model.parameters())
    small, large = plugin.estimate(stats, 2, 2, "full", False), plugin.estimate(stats, 8, 8, "full", False)
    assert 0 < small.flops < large.flops and small.bytes < large.bytes
    assert large.bytes >= kernel_numel(8, 8, stats.o, "full") * 4


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this build")
def test_explicit_mlp_gemms_agree_on_both_cpu_backends_and_leave_the_flag():
    """explicit_mlp's float32 GEMMs by oneDNN's linear or by MKL: the same kernel as float64, the flag restored."""
    from ntk_bench.bench.measurement.problems import BY_ID
    from ntk_bench.implementations.core import onednn
    from ntk_bench.implementations.plugins import explicit_mlp

    problem = BY_ID["mlp-relu-O3-N4M3"]
    model, (x1, x2) = problem.model(torch.float32), problem.inputs(torch.float32)
    exact = implementations.get("explicit_mlp").compute(problem.model(torch.float64), *problem.inputs(torch.float64))
    plugin, before = implementations.get("explicit_mlp"), torch._C._get_mkldnn_enabled()
    kernel = plugin.compute(model, x1, x2)
    assert torch._C._get_mkldnn_enabled() == before and len(explicit_mlp._GEMM_BACKEND[model]) == 1
    for enabled in (True, False):
        with onednn.enabled(enabled), torch.no_grad():
            assert rel_err(plugin._recursion(model, x1, x2, "full").double(), exact) <= 1e-5
    assert rel_err(kernel.double(), exact) <= 1e-5


def test_onednn_linear_is_f_linear():
    from ntk_bench.implementations.core import onednn

    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 7), torch.randn(6, 7), torch.randn(6)
    for flag in (True, False):
        with onednn.enabled(flag), torch.no_grad():
            assert torch.allclose(onednn.linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5)
            assert torch.allclose(onednn.linear(x.transpose(1, 2).transpose(1, 2), w.t().contiguous().t()),
                                  x @ w.t(), atol=1e-5)
    with torch.enable_grad():  # autograd: PyTorch's own linear
        xr = x.clone().requires_grad_()
        assert onednn.linear(xr, w, b).grad_fn is not None


class _Tied(nn.Module):
    """An embedding tied to the output head, on int64 ids."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(7, 4), nn.Linear(4, 7)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).mean(1))


class _Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


# name -> (model factory, per-sample input shape, int64 ids, the rules its plan takes)
_AGREEMENT = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)), (5,), False, {"linear"}),
    "cnn-batchnorm": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                                            nn.Linear(3 * 4 * 4, 2)).eval(), (2, 6, 6), False,
                      {"conv", "norm", "linear"}),
    "transformer-layer": (lambda: nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Flatten(),
                                                nn.Linear(3 * 8, 2)).eval(), (3, 8), False,
                          {"linear_op", "linear", "norm"}),
    "rnn": (_Tagger, (5, 3), False, {"generic", "linear"}),
    "tied": (_Tied, (4,), True, {"embedding", "linear"}),
}


@pytest.mark.parametrize("name", list(_AGREEMENT))
def test_the_cost_model_and_the_plan_agree(name):
    """The cost model's view of the layers (from one sample) is the plan's (from a batch): the same rules on the
    same parameters, layer for layer, with the same geometry."""
    from ntk_bench.implementations.core.costs import cost_stats

    make, shape, ids, kinds = _AGREEMENT[name]
    torch.manual_seed(0)
    model = make()
    x = torch.randint(0, 7, (3, *shape)) if ids else torch.randn(3, *shape)
    plugin = implementations.get("structured")
    plan = plugin.plan(model, x)
    view = plugin.layers(cost_stats(model, x[:1]))

    def geometry(rule, layer):
        return rule.__name__, layer.kind, layer.s, layer.k, layer.c, layer.groups, layer.p, layer.is_output

    from_plan = [geometry(type(e.rule), layer) for e in plan.entries for layer in e.rule.layers(e, lambda m: 0)]
    assert [geometry(*v) for v in view] == from_plan
    assert {kind for _, kind, *_ in from_plan} == kinds


def test_the_cost_view_is_kept_with_the_stats_and_falls_back_once_the_model_is_gone():
    """structured reads its layers into the stats once (the stats hold their model weakly): read while the model
    lives, they stay; stats whose model is gone cost the whole model as one generic layer."""
    import gc

    from ntk_bench.implementations.core.costs import cost_stats

    plugin, x = implementations.get("structured"), torch.randn(1, 5)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    stats = cost_stats(model, x)
    read = plugin.layers(stats)
    other = cost_stats(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)), x)
    del model
    gc.collect()
    assert plugin.layers(stats) == read and [layer.kind for _, layer in read] == ["linear", "linear"]
    assert [(layer.kind, layer.p) for _, layer in plugin.layers(other)] == [("generic", other.p)]


def test_factors_kept_as_a_state_contract_bit_for_bit_and_refuse_another_plan():
    """What a dataset kernel writes to disk: the state rebuilds the factors against this process's plan (equal
    contractions, bit for bit); a state recorded with another plan, or of another block size, is refused."""
    import copy
    import io

    from ntk_bench.implementations.core import engine
    from ntk_bench.implementations.structured import StaleFactors

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(12, 4))
    xa, xb = torch.randn(5, 2, 4, 4), torch.randn(6, 2, 4, 4)
    p = implementations.get("structured")
    ca, cb = engine.validated(p, net, xa, None, "trace"), engine.validated(p, net, xb, None, "trace")
    with engine.running(net):
        fa, fb = p.factors(ca.net, ca.x1), p.factors(cb.net, cb.x1)
        buf = io.BytesIO()
        torch.save(p.factors_state(fb), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=False)
        back = p.factors_from_state(cb.net, cb.x1, state)
        assert torch.equal(p.contract(fa, back, "full"), p.contract(fa, fb, "full"))
        assert torch.equal(p.contract(back, None, "trace"), p.contract(fb, None, "trace"))
        other = dict(state, plan=state["plan"][:-1] + [state["plan"][-1] + 1])
        with pytest.raises(StaleFactors):
            p.factors_from_state(cb.net, cb.x1, other)
        with pytest.raises(StaleFactors):
            p.factors_from_state(ca.net, ca.x1, copy.copy(state))  # 5 samples, the state holds 6
