"""Other people's models, as a new user would bring them: timm, torchvision and transformers architectures built
from tiny configs with random weights (no download), and hand-written models with the structures that broke
plugins before (vmap-unfriendly ops, custom autograd Functions, data-dependent routing, gradients taken inside the
forward, wrappers). Each is small enough that a float64 per-sample brute force takes well under a second.

``EXTRA_MODELS`` maps an id to a :class:`ZooModel`; ``well_defined=False`` marks a model whose kernel is ill-defined
(train-mode BatchNorm or Dropout), which every method must refuse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

IMAGE = (3, 32, 32)


@dataclasses.dataclass(frozen=True)
class ZooModel:
    id: str
    build: Callable[[], nn.Module]  # float32, seeded; the test converts it to float64
    input_shape: tuple
    vocab: int | None = None  # int64 token ids in [0, vocab) when set
    well_defined: bool = True
    needs: str | None = None  # a module to import first (timm, transformers, torchvision)

    def model(self, dtype=torch.float64) -> nn.Module:
        torch.manual_seed(0)
        return self.build().to(dtype)

    def inputs(self, n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if self.vocab is not None:
            return torch.randint(0, self.vocab, (n, *self.input_shape), generator=g)
        return torch.randn(n, *self.input_shape, generator=g).to(dtype)


# --- timm --------------------------------------------------------------------------------------------------------

def _efficientnet_b0():
    # efficientnet_b0's block sequence (depthwise-separable and inverted-residual blocks with squeeze-excite,
    # BatchNormAct, SiLU) at a tenth of its channels and a quarter of its depth
    from timm.models import efficientnet

    return efficientnet._gen_efficientnet("efficientnet_b0", channel_multiplier=0.1, depth_multiplier=0.25,
                                          pretrained=False, num_classes=3)


def _convnext_atto():
    import timm

    return timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1), dims=(8, 8, 16, 16),
                             num_classes=3)


def _deit():
    import timm

    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=16, depth=1, num_heads=2, num_classes=3)


def _swin():
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=8,
                             window_size=2, embed_dim=8, depths=(1, 1), num_heads=(1, 2), num_classes=3)


def _mlp_mixer():
    from timm.models import mlp_mixer

    return mlp_mixer.MlpMixer(img_size=32, patch_size=8, num_blocks=1, embed_dim=16, num_classes=3)


def _regnetx_002():
    from timm.models import regnet

    cfg = dataclasses.replace(regnet.model_cfgs["regnetx_002"], depth=4, w0=8, wa=8, wm=1.3, group_size=4,
                              stem_width=8)
    return regnet.RegNet(cfg, num_classes=3)


def _poolformer():
    from timm.models import metaformer

    # poolformer_s12's configuration at one block of 8-16 channels per stage
    return metaformer.MetaFormer(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), downsample_norm=None, mlp_act=nn.GELU,
                                 mlp_bias=True, norm_layers=metaformer.GroupNorm1, layer_scale_init_values=1e-5,
                                 res_scale_init_values=None, use_mlp_head=False, num_classes=3)


# --- torchvision -------------------------------------------------------------------------------------------------

def _densenet():
    from torchvision.models import DenseNet

    return DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=3)


def _shufflenet():
    from torchvision.models import ShuffleNetV2

    return ShuffleNetV2(stages_repeats=[1, 1, 1], stages_out_channels=[8, 16, 32, 64, 32], num_classes=3)


# --- transformers ------------------------------------------------------------------------------------------------

VOCAB, SEQ = 11, 5


class Logits(nn.Module):
    """A transformers model as a tensor-to-tensor function: token ids (N, L) -> (N, O)."""

    def __init__(self, model: nn.Module, last_token: bool = False):
        super().__init__()
        self.model = model
        self.last_token = last_token

    def forward(self, ids):
        logits = self.model(input_ids=ids).logits
        return logits[:, -1] if self.last_token else logits


class PooledEncoder(nn.Module):
    """An encoder-only model's last hidden state, averaged over the tokens, then a linear head."""

    def __init__(self, encoder: nn.Module, width: int, out: int = 3):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, out)

    def forward(self, ids):
        return self.head(self.encoder(input_ids=ids).last_hidden_state.mean(1))


def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()  # (tiny vocabularies make it warn about the default special token ids)


_TINY = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "max_position_embeddings": 16}


def _bert():
    _quiet_transformers()
    from transformers import BertConfig, BertForSequenceClassification

    return Logits(BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        num_labels=3, pad_token_id=0, **_TINY)))


def _distilbert():
    _quiet_transformers()
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    return Logits(DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=VOCAB, dim=8, n_layers=1, n_heads=2, hidden_dim=16, max_position_embeddings=16, dropout=0.0,
        attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=3, pad_token_id=0)))


def _roberta():
    _quiet_transformers()
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return Logits(RobertaForSequenceClassification(RobertaConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        num_labels=3, pad_token_id=0, bos_token_id=0, eos_token_id=1, **_TINY)))


def _gpt2():
    _quiet_transformers()
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                       eos_token_id=0))
    assert model.lm_head.weight is model.transformer.wte.weight  # the tied head this model is here for
    return Logits(model, last_token=True)


def _t5_encoder():
    _quiet_transformers()
    from transformers import T5Config, T5EncoderModel

    return PooledEncoder(T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                                 num_heads=2, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                                                 decoder_start_token_id=0)), 8)


# --- hand-written ------------------------------------------------------------------------------------------------

class UNet(nn.Module):
    """Two-level U-Net: conv, pool, conv, bilinear upsampling, skip concatenation, a 3-channel map averaged."""

    def __init__(self, batchnorm: bool = False):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2) if batchnorm else nn.Identity(),
                                  nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh())
        self.up = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        d = self.down(x)
        m = self.mid(F.max_pool2d(d, 2))
        u = F.interpolate(m, size=d.shape[-2:], mode="bilinear", align_corners=False)
        return self.up(torch.cat([d, u], 1)).mean((2, 3))


def _prelu():
    return nn.Sequential(nn.Linear(10, 16), nn.PReLU(), nn.Linear(16, 3))


class BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bilinear = nn.Bilinear(3, 3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.bilinear(x[:, :3], x[:, 3:])))


class BagNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, 6, mode="mean")
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.bag(ids))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (B A, rank 2)."""

    def __init__(self, base: nn.Linear, rank: int = 2, alpha: float = 4.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) * 0.3)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank) * 0.3)
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.lora_a.T) @ self.lora_b.T


def _lora():
    return nn.Sequential(LoRALinear(nn.Linear(6, 8)), nn.Tanh(), LoRALinear(nn.Linear(8, 3)))


class OldStyleSquare(torch.autograd.Function):
    """x², an autograd.Function written the old way (``forward`` takes ctx; no ``setup_context``, no vmap rule)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class OldStyleFunctionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(OldStyleSquare.apply(self.fc1(x)))


class Sine(nn.Module):
    def __init__(self, w0: float = 30.0):
        super().__init__()
        self.w0 = w0

    def forward(self, x):
        return torch.sin(self.w0 * x)


def _siren():
    torch.manual_seed(0)
    layers = [nn.Linear(2, 16), Sine(), nn.Linear(16, 16), Sine(1.0), nn.Linear(16, 3)]
    with torch.no_grad():  # SIREN's initialisation
        layers[0].weight.uniform_(-1 / 2, 1 / 2)
        layers[2].weight.uniform_(-(6 / 16) ** 0.5 / 30, (6 / 16) ** 0.5 / 30)
    return nn.Sequential(*layers)


class FourierFeatures(nn.Module):
    """Random Fourier features of the input (a fixed buffer, not trained), then an MLP."""

    def __init__(self):
        super().__init__()
        self.register_buffer("b", torch.randn(2, 8) * 2.0)
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        proj = 2 * torch.pi * x @ self.b
        return self.mlp(torch.cat([torch.sin(proj), torch.cos(proj)], -1))


class GraphNet(nn.Module):
    """A two-layer graph convolution (a fixed normalised adjacency) on (N, nodes, features), mean-pooled."""

    def __init__(self, nodes: int = 5, features: int = 4):
        super().__init__()
        a = torch.eye(nodes) + torch.diag(torch.ones(nodes - 1), 1) + torch.diag(torch.ones(nodes - 1), -1)
        d = a.sum(1).rsqrt()
        self.register_buffer("adj", d[:, None] * a * d[None, :])
        self.gc1, self.gc2 = nn.Linear(features, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.adj @ self.gc1(x))
        h = torch.tanh(self.adj @ self.gc2(h))
        return self.head(h.mean(1))


class Top1MoE(nn.Module):
    """Top-1 mixture of experts: each sample goes to its gate's argmax expert, which runs on ``x[mask]``, scaled by
    the gate's probability. With four experts and a few samples some expert gets no sample."""

    def __init__(self, experts: int = 4):
        super().__init__()
        self.gate = nn.Linear(5, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
                                     for _ in range(experts))

    def forward(self, x):
        probs = torch.softmax(self.gate(x), -1)
        top = probs.argmax(-1)
        out = x.new_zeros(x.shape[0], 3)
        for i, expert in enumerate(self.experts):
            mask = top == i
            if mask.any():
                out[mask] = expert(x[mask]) * probs[mask, i:i + 1]
        return out


class NoGradBranch(nn.Module):
    """A student plus a frozen teacher run under ``torch.no_grad()`` (an EMA branch): the teacher's parameters
    require grad but get none, so their Jacobian is zero."""

    def __init__(self):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        self.teacher = nn.Sequential(nn.Linear(5, 3))

    def forward(self, x):
        with torch.no_grad():
            t = self.teacher(x)
        return self.student(x) + t


class PINN(nn.Module):
    """A physics-informed net: u(x) and its input gradient du/dx, taken in the forward by ``torch.autograd.grad``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            u = self.net(x)
            (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        return torch.cat([u, du], 1)


def _mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _compiled():
    return torch.compile(_mlp())


def _data_parallel():
    return nn.DataParallel(_mlp())


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).T


def _parametrized():
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    return model


def _train(build):
    return lambda: build().train()


def _eval(build):
    return lambda: build().eval()


def _entries():
    img = {"input_shape": IMAGE}
    text = {"input_shape": (SEQ,), "vocab": VOCAB, "needs": "transformers"}
    yield ZooModel("timm-efficientnet_b0", _eval(_efficientnet_b0), needs="timm", input_shape=(3, 16, 16))
    yield ZooModel("timm-convnext_atto", _eval(_convnext_atto), needs="timm", **img)
    yield ZooModel("timm-deit", _eval(_deit), needs="timm", **img)
    yield ZooModel("timm-swin", _eval(_swin), needs="timm", **img)
    yield ZooModel("timm-mlp_mixer", _eval(_mlp_mixer), needs="timm", **img)
    yield ZooModel("timm-regnetx_002", _eval(_regnetx_002), needs="timm", **img)
    yield ZooModel("timm-poolformer", _eval(_poolformer), needs="timm", **img)
    yield ZooModel("tv-densenet", _eval(_densenet), needs="torchvision", **img)
    yield ZooModel("tv-shufflenet", _eval(_shufflenet), needs="torchvision", **img)
    yield ZooModel("hf-bert", _eval(_bert), **text)
    yield ZooModel("hf-distilbert", _eval(_distilbert), **text)
    yield ZooModel("hf-roberta", _eval(_roberta), **text)
    yield ZooModel("hf-gpt2-tied", _eval(_gpt2), **text)
    yield ZooModel("hf-t5-encoder", _eval(_t5_encoder), **text)
    yield ZooModel("unet", _eval(UNet), input_shape=(2, 6, 6))
    yield ZooModel("prelu", _prelu, input_shape=(10,))
    yield ZooModel("bilinear", BilinearNet, input_shape=(6,))
    yield ZooModel("embedding_bag", BagNet, input_shape=(4,), vocab=VOCAB)
    yield ZooModel("lora", _lora, input_shape=(6,))
    yield ZooModel("old_style_function", OldStyleFunctionNet, input_shape=(5,))
    yield ZooModel("siren", _siren, input_shape=(2,))
    yield ZooModel("fourier_features", FourierFeatures, input_shape=(2,))
    yield ZooModel("graph_net", GraphNet, input_shape=(5, 4))
    yield ZooModel("moe_top1", Top1MoE, input_shape=(5,))
    yield ZooModel("no_grad_branch", NoGradBranch, input_shape=(5,))
    yield ZooModel("pinn", PINN, input_shape=(2,))
    yield ZooModel("torch_compile", _compiled, input_shape=(5,))
    yield ZooModel("data_parallel", _data_parallel, input_shape=(5,))
    yield ZooModel("parametrized", _parametrized, input_shape=(6,))
    # train mode: BatchNorm's batch statistics or Dropout's masks make the kernel ill-defined
    yield ZooModel("train-timm-efficientnet_b0", _train(_efficientnet_b0), needs="timm", well_defined=False,
                   input_shape=(3, 16, 16))
    yield ZooModel("train-tv-densenet", _train(_densenet), needs="torchvision", well_defined=False, **img)
    yield ZooModel("train-hf-bert", _train(lambda: _bert_dropout()), well_defined=False, **text)
    yield ZooModel("train-unet-batchnorm", _train(lambda: UNet(batchnorm=True)), input_shape=(2, 6, 6),
                   well_defined=False)


def _bert_dropout():
    _quiet_transformers()
    from transformers import BertConfig, BertForSequenceClassification

    return Logits(BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        num_labels=3, pad_token_id=0, max_position_embeddings=16)))


EXTRA_MODELS = {z.id: z for z in _entries()}


def plain(model: nn.Module) -> nn.Module:
    """The module a wrapper runs (torch.compile's, DataParallel's): the brute force differentiates that."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else None)
        if inner is None:
            return model
        model = inner
