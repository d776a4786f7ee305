"""Each of structured's rules, alone, equals a brute-force float64 kernel (one autograd backward per sample and
output), in both orders where the rule has two, in every mode, with x2 given (N != M) and x2 = None.

The model around the layer is ``layer -> tanh -> flatten -> a frozen Linear``: G is not trivial, and the only
trainable parameters are the layer's, so the kernel is that rule's term. ``LAYERS`` is the rule-test table: every
rule of the table (``implementations/structured/table.py``) and of the plan needs a row (checked below), so
adding a rule is one rule file, one table line and one row here.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from ntk_bench import implementations
from ntk_bench.bench.measurement.bruteforce import ntk as brute_force_kernel
from ntk_bench.bench.measurement.problems import rel_err
from ntk_bench.implementations.structured import Structured, table
from ntk_bench.implementations.structured.rules import conv, embedding, generic, linear, norms, prelu, taps

D = torch.float64


class Head(nn.Module):
    """layer -> tanh -> flatten -> frozen Linear to 3 outputs (or the layer's own first output leaf)."""

    def __init__(self, layer, out_numel, take_first=False):
        super().__init__()
        self.layer, self.take_first = layer, take_first
        self.head = nn.Linear(out_numel, 3)
        self.head.requires_grad_(False)

    def forward(self, x):
        z = self.layer(x)
        if self.take_first:
            z = z[0]
        return self.head(torch.tanh(z).flatten(1))


class SelfAttention(nn.Module):
    """MultiheadAttention as models call it: self-attention (its projections become linear ops), with the averaged
    weights and masks, or cross-attention (PyTorch's own function: the generic rule)."""

    def __init__(self, how="self"):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.how = how

    def forward(self, x):
        if self.how == "cross":
            return self.mha(x, 2 * x, 2 * x, need_weights=False)[0]
        if self.how == "weights-masks":
            t = x.shape[1]
            padding = x[:, :, 0] > 1.0  # (per sample: a key ignored where its first feature is large)
            out, weights = self.mha(x, x, x, attn_mask=torch.ones(t, t, dtype=torch.bool).triu(1),
                                    key_padding_mask=padding & ~padding[:, :1])
            return out + weights.sum(-1, keepdim=True)
        return self.mha(x, x, x, need_weights=False)[0]


class FunctionalLinear(nn.Module):
    """A user's own module calling F.linear on its parameters: on (N, S, K) tokens (a linear op), or on the
    tokens merged with the batch (N·S, K) (no batch dimension to read: the generic rule)."""

    def __init__(self, merged=False):
        super().__init__()
        self.weight, self.bias, self.merged = nn.Parameter(torch.randn(4, 5)), nn.Parameter(torch.randn(4)), merged

    def forward(self, x):
        import torch.nn.functional as F

        if self.merged:
            return F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


class ScaleShift(nn.Module):
    """A user's own module: raw parameters used in its forward."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.token = nn.Parameter(torch.randn(1, 1, 4))

    def forward(self, x):
        return torch.cat([self.token.expand(x.shape[0], -1, -1), x * self.scale], 1)


def _randomised_bn(bn):
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    return bn


_RMS = [("rmsnorm", lambda: nn.RMSNorm(4), (3, 4), "float", norms.RMSNormRule)] if hasattr(nn, "RMSNorm") else []

# The rule-test table. id -> (layer factory, per-sample input shape, "float" | (low, high) for int64 ids, the rule
# the row exercises: its plan must use it)
LAYERS = {i: (make, shape, kind, rule) for i, make, shape, kind, rule in [
    ("linear", lambda: nn.Linear(5, 4), (5,), "float", linear.LinearRule),
    ("linear-tokens", lambda: nn.Linear(5, 4), (3, 5), "float", linear.LinearRule),
    ("linear-4d-nobias", lambda: nn.Linear(5, 4, bias=False), (2, 3, 5), "float", linear.LinearRule),
    ("conv1d-reflect-stride", lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1, padding_mode="reflect"), (2, 9), "float",
     conv.ConvRule),
    ("conv2d-groups-dilated-circular",
     lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2, padding_mode="circular"), (4, 6, 6), "float",
     conv.ConvRule),
    ("conv2d-depthwise-same-replicate",
     lambda: nn.Conv2d(3, 3, (3, 2), groups=3, padding="same", padding_mode="replicate"), (3, 5, 4), "float",
     conv.ConvRule),
    ("conv3d", lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1, bias=False), (2, 3, 4, 3), "float",
     conv.ConvRule),
    ("embedding-padding-idx", lambda: nn.Embedding(6, 3, padding_idx=1), (5,), (0, 6), embedding.EmbeddingRule),
    ("embedding-2d-ids", lambda: nn.Embedding(4, 2), (2, 3), (0, 4), embedding.EmbeddingRule),
    ("batchnorm1d", lambda: _randomised_bn(nn.BatchNorm1d(3)).eval(), (3, 5), "float", norms.BatchNormRule),
    ("batchnorm2d", lambda: _randomised_bn(nn.BatchNorm2d(3)).eval(), (3, 3, 2), "float", norms.BatchNormRule),
    ("layernorm-2d-shape", lambda: nn.LayerNorm((3, 4)), (2, 3, 4), "float", norms.LayerNormRule),
    ("groupnorm", lambda: nn.GroupNorm(2, 4), (4, 3, 2), "float", norms.GroupNormRule),
    ("prelu-channels", lambda: nn.PReLU(3, init=0.3), (3, 4), "float", prelu.PReLURule),
    *_RMS,
    ("attention-self-linear-ops", SelfAttention, (3, 4), "float", linear.LinearOpRule),
    ("attention-weights-masks-linear-ops", lambda: SelfAttention("weights-masks"), (3, 4), "float",
     linear.LinearOpRule),
    ("generic-attention-cross", lambda: SelfAttention("cross"), (3, 4), "float", generic.GenericRule),
    ("linear-op-functional", FunctionalLinear, (3, 5), "float", linear.LinearOpRule),
    ("generic-functional-linear-merged-batch", lambda: FunctionalLinear(merged=True), (3, 5), "float",
     generic.GenericRule),
    ("generic-lstm", lambda: nn.LSTM(3, 4, batch_first=True), (5, 3), "float", generic.GenericRule),
    ("generic-gru-2layers-bidirectional", lambda: nn.GRU(3, 2, num_layers=2, bidirectional=True, batch_first=True),
     (4, 3), "float", generic.GenericRule),
    ("tap-conv-transpose", lambda: nn.ConvTranspose1d(2, 3, 3, stride=2), (2, 4), "float", taps.TapRule),
    ("generic-raw-parameters", ScaleShift, (2, 4), "float", taps.TapRule),
]}


@functools.lru_cache(maxsize=None)
def _problem(layer_id):
    make, shape, kind, _ = LAYERS[layer_id]
    torch.manual_seed(0)
    layer = make()
    g = torch.Generator().manual_seed(1)

    def draw(n):
        if kind == "float":
            return torch.randn(n, *shape, generator=g, dtype=D)
        return torch.randint(kind[0], kind[1], (n, *shape), generator=g)

    x1, x2 = draw(4), draw(3)
    if kind != "float":  # repeated ids, the padding id included
        x1[0, 0], x1[1, -1], x2[0, 0] = 1, 1, 1
    take_first = isinstance(layer, (nn.RNNBase, nn.MultiheadAttention))
    with torch.no_grad():
        z = layer.to(D)(x1[:1])
        out = (z[0] if take_first else z)[0].numel()
    model = Head(layer, out, take_first).to(D).eval()
    return model, x1, x2


@functools.lru_cache(maxsize=None)
def _reference(layer_id, mode, symmetric):
    model, x1, x2 = _problem(layer_id)
    return brute_force_kernel(model, x1, None if symmetric else x2, mode)


@functools.lru_cache(maxsize=None)
def _plugin(**options):
    """A structured plugin with these switches (its own plans)."""
    return Structured(**options)


@pytest.mark.parametrize("order", ["gram", "jacobian"])
@pytest.mark.parametrize("layer_id", list(LAYERS))
def test_rule_equals_brute_force_kernel(layer_id, order):
    _assert_brute_force_kernel(layer_id, _plugin(order=order))


def _assert_brute_force_kernel(layer_id, plugin):
    """structured's kernel on the layer's problem equals the brute-force one in every mode, x2 given and None."""
    model, x1, x2 = _problem(layer_id)
    for mode in implementations.MODES:
        for symmetric in (False, True):
            kernel = plugin._kernel(model, x1, None if symmetric else x2, mode)
            assert rel_err(kernel, _reference(layer_id, mode, symmetric)) <= 1e-10, (mode, symmetric)


def test_every_rule_has_a_sample():
    """Every module type in the rule table, and every rule of the plan's own, has a row in ``LAYERS`` whose plan
    really uses that rule (for that module type)."""
    used = {}
    for layer_id, (_, _, _, rule) in LAYERS.items():
        model, x1, _ = _problem(layer_id)
        plan = _plugin().plan(model, x1)
        kinds = {type(e.rule) for e in plan.entries}
        assert rule in kinds, (layer_id, rule, kinds)
        for e in plan.entries:
            used.setdefault(type(e.rule), set()).add(type(e.module))
    for key, rule in table.TABLE.items():
        assert any(issubclass(t, key) for t in used.get(rule, ())), f"no row of LAYERS covers {key.__name__}"
    for rule in table.PLAN_RULES:
        assert rule in used, f"no row of LAYERS covers {rule.__name__}"


def test_rules_the_layers_take():
    """Which rule each layer takes (a dedicated one where there is one; a subclass overriding forward and
    a parametrized weight take the generic rule), and the problems that decline a layer."""
    from torch.nn.utils import parametrizations

    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class PlainSubclass(nn.Conv1d):  # keeps Conv1d's forward: Conv1d's rule
        pass

    expected = [(linear.LinearRule, nn.Linear(2, 3)), (conv.ConvRule, nn.Conv1d(2, 3, 1)),
                (conv.ConvRule, PlainSubclass(2, 3, 1)), (embedding.EmbeddingRule, nn.Embedding(3, 2)),
                (norms.GroupNormRule, nn.GroupNorm(1, 2)), (norms.BatchNormRule, nn.BatchNorm1d(2)),
                (None, MyLinear(2, 3)), (None, parametrizations.weight_norm(nn.Linear(2, 3))),
                (None, nn.ConvTranspose2d(2, 3, 2))]
    for rule, module in expected:
        assert table.rule_for(module) is rule, module
    assert "batch statistics" in table.rule_for(nn.BatchNorm2d(3).train()).problem(nn.BatchNorm2d(3).train())
    assert "max_norm" in embedding.EmbeddingRule.problem(nn.Embedding(3, 2, max_norm=1.0))


@pytest.mark.parametrize("kernel, dilation, stride, padding, mode", [
    (3, 1, 1, 1, "zeros"), (3, 2, 1, 2, "reflect"), ((2, 3), (1, 2), (2, 1), (0, 1), "circular"),
    (1, 1, 1, 0, "zeros"), (5, 1, 3, 2, "replicate")])
def test_conv_patches_are_the_padded_inputs_unfolded(kernel, dilation, stride, padding, mode):
    """conv_patches equals F.unfold of the input padded the conv's way, element for element, grouped."""
    import torch.nn.functional as F

    from ntk_bench.implementations.structured.rules.conv import conv_patches

    conv = nn.Conv2d(4, 4, kernel, dilation=dilation, stride=stride, padding=padding, padding_mode=mode, groups=2)
    x = torch.randn(2, 4, 11, 9, generator=torch.Generator().manual_seed(0))
    ph, pw = conv.padding
    padded = F.pad(x, (pw, pw, ph, ph), mode="constant" if mode == "zeros" else mode)
    expected = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    got = conv_patches(x, conv)
    assert got.shape[:2] == (2, 2) and torch.equal(got.reshape(expected.shape), expected)
    # the patches times the weight are the convolution
    y = torch.einsum("ngks,gck->ngcs", got, conv.weight.detach().reshape(2, 2, -1)).reshape(2, 4, -1)
    assert torch.allclose(y + conv.bias.detach()[:, None], conv(x).detach().flatten(2), atol=1e-5)


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize("options", [dict(batch_first=True), dict(num_layers=2, bidirectional=True, bias=False)])
def test_functional_rnn_is_the_modules_forward(cls, options):
    """The per-step RNN the generic rule vmaps gives the module's outputs (batched and unbatched input, given hx)."""
    from ntk_bench.implementations.structured.rewrites import functional_rnn

    torch.manual_seed(0)
    module = cls(3, 4, **options).to(D)
    flat = lambda out: torch.cat([t.reshape(-1) for t in torch.utils._pytree.tree_leaves(out)])  # noqa: E731
    x = torch.randn(2, 5, 3, dtype=D)  # (N, T, F) batch first, else (T, N, F)
    n = x.shape[0] if module.batch_first else x.shape[1]
    h0 = torch.randn(module.num_layers * (2 if module.bidirectional else 1), n, 4, dtype=D)
    hx = (h0, torch.randn_like(h0)) if cls is nn.LSTM else h0
    with torch.no_grad():
        for args in ((x,), (x[0],), (x, hx)):
            assert torch.allclose(flat(functional_rnn(module, {}, args, {})), flat(module(*args)), atol=1e-14)


class DirectAttention(nn.Module):
    """A user's own attention on (N, T, 4) tokens: softmax or scaled_dot_product_attention called directly (the
    structured plugin swaps both for forms vmap batches; the kernel must not change)."""

    def __init__(self, how):
        super().__init__()
        self.qkv, self.head, self.how = nn.Linear(4, 12), nn.Linear(4 * 3, 2), how

    def forward(self, x):
        import torch.nn.functional as F

        q, k, v = self.qkv(x).chunk(3, -1)
        t = x.shape[1]
        if self.how == "sdpa-causal":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.how == "sdpa-bool-mask":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(t, t, dtype=torch.bool).triu())
        elif self.how == "sdpa-float-mask":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.linspace(-1, 1, t * t).view(t, t).to(x),
                                                 scale=0.3)
        elif self.how == "tensor-softmax":
            out = (q @ k.transpose(-2, -1) / 2).softmax(-1) @ v
        else:
            out = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        return self.head(out.flatten(1))


@pytest.mark.parametrize("how", ["sdpa-causal", "sdpa-bool-mask", "sdpa-float-mask", "tensor-softmax", "torch-softmax"])
def test_attention_called_directly_gives_the_brute_force_kernel(how):
    torch.manual_seed(0)
    model = DirectAttention(how).to(D)
    x1, x2 = torch.randn(3, 3, 4, dtype=D), torch.randn(2, 3, 4, dtype=D)
    got = implementations.get("structured").compute(model, x1, x2)
    assert rel_err(got, brute_force_kernel(model, x1, x2)) <= 1e-10


def test_batchable_softmax_and_attention_equal_torchs_and_torch_is_left_alone():
    import torch.nn.functional as F

    from ntk_bench.implementations.structured.rewrites import attention as _attention
    from ntk_bench.implementations.structured.rewrites import batchable
    from ntk_bench.implementations.structured.rewrites import softmax as _softmax

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=D, requires_grad=True) for _ in range(3))
    mask = torch.randn(5, 5, dtype=D)
    for ours, theirs in ((lambda: _softmax(q, -1), lambda: torch.softmax(q, -1)),
                         (lambda: _attention(q, k, v, mask, scale=0.7),
                          lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.7)),
                         (lambda: _attention(q, k, v, is_causal=True),
                          lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))):
        a, b = ours(), theirs()
        assert torch.allclose(a, b, atol=1e-13)
        ga = torch.autograd.grad(a.sin().sum(), (q, k, v), allow_unused=True, materialize_grads=True)
        gb = torch.autograd.grad(b.sin().sum(), (q, k, v), allow_unused=True, materialize_grads=True)
        assert all(torch.allclose(x, y, atol=1e-12) for x, y in zip(ga, gb))
    before = (F.softmax, F.scaled_dot_product_attention, F.multi_head_attention_forward)
    with batchable(direct=True, attention=True) as mode:  # (a torch function mode: nothing reassigned)
        assert (F.softmax, F.scaled_dot_product_attention, F.multi_head_attention_forward) == before
        torch.softmax(q, -1)
        assert mode.direct_hits == 1
    assert (F.softmax, F.scaled_dot_product_attention, F.multi_head_attention_forward) == before


@pytest.mark.parametrize("sparse_below", [1.0, -1.0])  # every pair one by one / always the dense equality matrix
@pytest.mark.parametrize("layer_id", ["embedding-padding-idx", "embedding-2d-ids"])
def test_embedding_gram_by_equal_id_pairs_or_dense_equality(layer_id, sparse_below):
    _assert_brute_force_kernel(layer_id, _plugin(order="gram", embedding_sparse_below=sparse_below))


def test_the_plan_takes_linear_ops_where_a_module_applies_f_linear_to_batched_tokens():
    """Self-attention's two projections (with or without masks and weights) and a user's F.linear on tokens are
    "linear_op" entries; cross-attention and F.linear on batch-merged rows keep the generic rule."""
    expected = {"attention-self-linear-ops": ["linear_op", "linear_op"],
                "attention-weights-masks-linear-ops": ["linear_op", "linear_op"],
                "generic-attention-cross": ["generic"], "linear-op-functional": ["linear_op"],
                "generic-functional-linear-merged-batch": ["generic"]}
    for layer_id, kinds in expected.items():
        model, x1, _ = _problem(layer_id)
        plan = implementations.get("structured").plan(model, x1)
        assert [e.kind for e in plan.entries] == kinds, layer_id
        if kinds[0] == "linear_op":
            assert all("F.linear on" in e.name for e in plan.entries)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("masks", ["none", "bool-causal", "float", "3d", "padding", "causal-hint"])
def test_projected_attention_equals_pytorchs_multi_head_attention(batch_first, need_weights, average, masks):
    """``_projected_mha`` (MultiheadAttention's projections as F.linear on (L, N, E)) gives PyTorch's values and
    gradients, and is counted; configurations it does not cover go to PyTorch's function, uncounted."""
    from ntk_bench.implementations.structured import rewrites

    torch.manual_seed(0)
    n, t, e, heads = 3, 5, 8, 2
    mha = nn.MultiheadAttention(e, heads, batch_first=batch_first, dtype=D)
    x = torch.randn((n, t, e) if batch_first else (t, n, e), dtype=D, requires_grad=True)
    kw = {}
    if masks == "bool-causal":
        kw["attn_mask"] = torch.ones(t, t, dtype=torch.bool).triu(1)
    elif masks == "float":
        kw["attn_mask"] = torch.randn(t, t, dtype=D)
    elif masks == "3d":
        kw["attn_mask"] = torch.randn(n * heads, t, t, dtype=D)
    elif masks == "padding":
        kw["key_padding_mask"] = torch.zeros(n, t, dtype=torch.bool)
        kw["key_padding_mask"][0, -2:] = True
    elif masks == "causal-hint":
        kw = dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(t, dtype=D), is_causal=True)

    def run():
        out, weights = mha(x, x, x, need_weights=need_weights, average_attn_weights=average, **kw)
        loss = out.sin().sum() + (0 if weights is None else weights.cos().sum())
        return [out] + ([] if weights is None else [weights]) + list(torch.autograd.grad(loss, [x, *mha.parameters()]))

    theirs = run()
    with rewrites.batchable(direct=False, attention=True) as mode:
        ours = run()
    assert (mode.attention_calls, mode.projected) == (1, 1)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-12)
    with rewrites.batchable(direct=False, attention=True) as mode:  # cross-attention, unbatched: PyTorch's own
        mha(x, 2 * x, 2 * x)
        mha(x[0], x[0], x[0])
    assert (mode.attention_calls, mode.projected) == (2, 0)
    import torch.nn.functional as F

    assert F.multi_head_attention_forward is rewrites._F_MHA


def test_a_projected_attention_that_differs_from_pytorchs_is_refused(monkeypatch):
    """Fault injected: were ``_projected_mha`` to compute another function, the plan refuses the model (naming the
    decomposition) instead of computing that function's kernel."""
    from ntk_bench.implementations.structured import plan, rewrites

    real = rewrites.projected_mha

    def off_by_a_little(*args, **kwargs):
        out, weights = real(*args, **kwargs)
        return out * 1.01, weights

    monkeypatch.setattr(rewrites, "projected_mha", off_by_a_little)
    model, x1, _ = _problem("attention-self-linear-ops")
    with pytest.raises(implementations.UnsupportedModelError, match="MultiheadAttention computed as two Linears"):
        plan.discover(model, x1)


class _ScaledLinear(nn.Linear):
    """A user's own module type: a Linear whose forward is its own (the table does not know it)."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _registered(module_type, rule):
    """register_rule for one test; the table as it was afterwards."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        table.register_rule(module_type, rule)
        try:
            yield
        finally:
            table.TABLE.pop(module_type)
            table.changed()
    return scope()


def test_a_registered_rule_computes_a_users_module_type():
    """register_rule: the user's type takes the rule (not the generic one), and the kernel is exact."""
    torch.manual_seed(0)
    model = Head(_ScaledLinear(5, 4), 4).to(D)
    x1, x2 = torch.randn(4, 5, dtype=D), torch.randn(3, 5, dtype=D)
    assert [e.kind for e in Structured().plan(model, x1).entries] == ["linear_op"]  # (unregistered: its F.linear)
    with _registered(_ScaledLinear, linear.LinearRule):
        plugin = Structured()
        assert [e.kind for e in plugin.plan(model, x1).entries] == ["linear"]
        assert rel_err(plugin._kernel(model, x1, x2, "full"), brute_force_kernel(model, x1, x2)) <= 1e-10
    with pytest.raises(TypeError, match="not a subclass of structured's Rule"):
        table.register_rule(_ScaledLinear, object)


def test_a_rule_registered_after_a_models_first_call_is_used_on_its_next():
    """The plan made before register_rule is made again: the module takes the new rule, and after the rule is
    taken out of the table again, its old plan (no rule for the type) comes back."""
    torch.manual_seed(0)
    model = Head(_ScaledLinear(5, 4), 4).to(D)
    x1 = torch.randn(4, 5, dtype=D)
    plugin = Structured()
    before = plugin._kernel(model, x1, None, "full")
    assert [e.kind for e in plugin.plan(model, x1).entries] == ["linear_op"]
    with _registered(_ScaledLinear, linear.LinearRule):
        assert [e.kind for e in plugin.plan(model, x1).entries] == ["linear"]
        assert rel_err(plugin._kernel(model, x1, None, "full"), before) <= 1e-12
    assert [e.kind for e in plugin.plan(model, x1).entries] == ["linear_op"]


def test_a_rule_whose_output_breaks_its_invariants_is_named():
    """Fault injected: a rule whose side has the wrong layout (G's outputs and positions swapped) is stopped where
    it is called, naming the module and the rule, instead of contracting a wrong kernel."""

    class Swapped(linear.LinearRule):
        def side(self, use, grads, checking=False):
            s = super().side(use, grads, checking)
            return linear.PatchSide(s.x, s.g.transpose(3, 4))

    torch.manual_seed(0)
    model = Head(_ScaledLinear(5, 4), 8).to(D)
    x = torch.randn(4, 2, 5, dtype=D)  # (two positions, so that the swap changes the shape)
    with _registered(_ScaledLinear, Swapped), \
            pytest.raises(implementations.UnsupportedModelError,
                          match=r"linear rule of _ScaledLinear broke its invariant: G \(O, N, groups, C, S\)"):
        Structured()._kernel(model, x, None, "full")


def test_torch_functions_stay_the_originals_in_other_threads_during_and_after_a_call():
    """The attention rewrites are a torch function mode of the calling thread: while structured records a model with
    self-attention and its own softmax in one thread, another thread sees torch.nn.functional's own objects and
    its softmax calls are PyTorch's; and so does everyone after the call."""
    import threading

    import torch.nn.functional as F

    originals = (F.softmax, F.scaled_dot_product_attention, F.multi_head_attention_forward)
    inside, resume, seen = threading.Event(), threading.Event(), {}

    class Paused(nn.Module):
        """Self-attention then the model's own softmax; the first call waits for the other thread's look."""

        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            z = torch.softmax(self.mha(x, x, x, need_weights=False)[0], -1)
            if not inside.is_set():
                inside.set()
                resume.wait(30)
            return z

    torch.manual_seed(0)
    model = Head(Paused(), 12).to(D)
    x = torch.randn(3, 3, 4, dtype=D)
    worker = threading.Thread(target=lambda: seen.setdefault("kernel", Structured()._kernel(model, x, None, "full")))
    worker.start()
    try:
        assert inside.wait(60)
        seen["during"] = (F.softmax, F.scaled_dot_product_attention, F.multi_head_attention_forward)
        t = torch.randn(2, 3, dtype=D, requires_grad=True)
        seen["grad_fn"] = type(torch.softmax(t, -1).grad_fn).__name__
    finally:
        resume.set()
        worker.join(120)
    assert seen["during"] == originals and seen["grad_fn"] == "SoftmaxBackward0"
    assert (F.softmax, F.scaled_dot_product_attention, F.multi_head_attention_forward) == originals
    assert rel_err(seen["kernel"], brute_force_kernel(model, x)) <= 1e-10
