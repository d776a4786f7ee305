"""The real-model zoo: the layers people's models are made of, at sizes a CPU can check in float64.

torchvision's ``resnet18`` and ``mobilenet_v3_small`` (in-place ReLU, eval BatchNorm,
Hardswish, squeeze-excitation), a small torchvision ``vit_tiny`` (class token and
positional embedding as raw parameters, MultiheadAttention, LayerNorm), a
``text_transformer`` on int64 token ids, ``lstm`` and ``gru`` sequence classifiers,
``mlp_layernorm``, ``cnn_groupnorm``, ``cnn_batchnorm``, ``conv1d_net``,
``conv_variants`` (grouped, depthwise, dilated, every padding mode) and
``mlp_tied`` (one module used twice, or two modules sharing a weight).

Every model is built in eval mode; normalisation layers get random affine
parameters and running statistics (torchvision's identity initialisation would
let a wrong normalisation rule pass).
"""

from __future__ import annotations

import torch
from torch import nn

from .architectures import InputSpec, activation_module, register


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics for every normalisation layer."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0.0, 0.1)
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def resnet18(image: int = 32, out: int = 10):
    """torchvision's ResNet-18 (11.2M parameters, in-place ReLU, ``out += identity``, eval BatchNorm)."""
    from torchvision.models import resnet18 as make

    return _randomise_norms(make(num_classes=out)), (3, image, image)


def mobilenet_v3_small(image: int = 32, out: int = 10, width_mult: float = 1.0):
    """torchvision's MobileNetV3-small: depthwise convs, Hardswish, squeeze-excitation (Hardsigmoid), BatchNorm
    (``width_mult`` scales its channels, torchvision's own option)."""
    from torchvision.models import mobilenet_v3_small as make

    return _randomise_norms(make(num_classes=out, width_mult=width_mult)), (3, image, image)


def vit_tiny(image: int = 16, patch: int = 8, layers: int = 2, heads: int = 2, hidden: int = 16, mlp: int = 32,
             out: int = 10):
    """torchvision's VisionTransformer, small: patch conv, class token, positional embedding, attention, LayerNorm."""
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=image, patch_size=patch, num_layers=layers, num_heads=heads,
                              hidden_dim=hidden, mlp_dim=mlp, num_classes=out)
    with torch.no_grad():  # torchvision zero-initialises the head and the class token
        model.heads.head.weight.normal_(0.0, hidden ** -0.5)
        model.class_token.normal_(0.0, 0.02)
    return _randomise_norms(model), (3, image, image)


class TextTransformer(nn.Module):
    """Embedding of int64 token ids -> TransformerEncoderLayer -> mean over tokens -> Linear."""

    def __init__(self, vocab: int, d_model: int, heads: int, ff: int, layers: int, out: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, out)

    def forward(self, ids):
        """Logits (N, out) of a batch of token ids (N, T)."""
        return self.head(self.encoder(self.embed(ids)).mean(1))


def text_transformer(vocab: int = 50, seq: int = 8, d_model: int = 16, heads: int = 2, ff: int = 32, layers: int = 1,
                     out: int = 10):
    """A small text transformer (:class:`TextTransformer`, dropout 0.1: eval mode makes it deterministic) on
    ``seq`` token ids in [0, vocab)."""
    return _randomise_norms(TextTransformer(vocab, d_model, heads, ff, layers, out)), InputSpec((seq,), (0, vocab))


class RecurrentClassifier(nn.Module):
    """LSTM or GRU over a (T, F) sequence, batch first; the last step's output -> Linear."""

    def __init__(self, cell: str, features: int, hidden: int, layers: int, out: int):
        super().__init__()
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](features, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        """Logits (N, out) of a batch of sequences (N, T, F)."""
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def lstm(features: int = 4, seq: int = 6, hidden: int = 8, layers: int = 1, out: int = 10):
    """An LSTM classifier (:class:`RecurrentClassifier`) on (seq, features) sequences."""
    return RecurrentClassifier("lstm", features, hidden, layers, out), (seq, features)


def gru(features: int = 4, seq: int = 6, hidden: int = 8, layers: int = 1, out: int = 10):
    """A GRU classifier (:class:`RecurrentClassifier`) on (seq, features) sequences."""
    return RecurrentClassifier("gru", features, hidden, layers, out), (seq, features)


def mlp_layernorm(in_features: int = 8, width: int = 16, depth: int = 2, out: int = 10, activation: str = "relu"):
    """Linear -> LayerNorm -> activation, ``depth`` times, then a Linear."""
    layers, d = [], in_features
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.LayerNorm(width), activation_module(activation)]
        d = width
    return _randomise_norms(nn.Sequential(*layers, nn.Linear(d, out))), (in_features,)


def _norm_cnn(norm, channels: int, image: int, out: int, in_channels: int):
    model = nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1), norm(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, stride=2), norm(channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * channels, out),
    )
    return _randomise_norms(model), (in_channels, image, image)


def cnn_groupnorm(channels: int = 4, image: int = 8, groups: int = 2, out: int = 10, in_channels: int = 3):
    """Two convolutions, each followed by GroupNorm with ``groups`` groups and a ReLU, then pooling and a Linear."""
    return _norm_cnn(lambda c: nn.GroupNorm(groups, c), channels, image, out, in_channels)


def cnn_batchnorm(channels: int = 4, image: int = 8, out: int = 10, in_channels: int = 3):
    """Two convolutions, each followed by BatchNorm2d and a ReLU, then pooling and a Linear (built in eval mode: the
    running statistics, randomised, are used)."""
    return _norm_cnn(nn.BatchNorm2d, channels, image, out, in_channels)


def conv1d_net(channels: int = 4, length: int = 16, out: int = 10, in_channels: int = 2):
    """Conv1d -> ReLU -> MaxPool1d -> Conv1d (stride 2) -> ReLU -> Flatten -> Linear."""
    l1 = (length - 2) // 2
    l2 = (l1 - 3) // 2 + 1
    model = nn.Sequential(
        nn.Conv1d(in_channels, channels, 3), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(channels, channels, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(channels * l2, out),
    )
    return model, (in_channels, length)


def conv_variants(channels: int = 4, image: int = 8, out: int = 10, groups: int = 2, padding_mode: str = "zeros",
                  dilation: int = 1, bias: bool = True):
    """A plain conv, then one with ``groups`` (``groups = channels``: depthwise), ``dilation`` and
    ``padding_mode`` (zeros, reflect, replicate, circular), then a Linear."""
    model = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, padding_mode=padding_mode, bias=bias), nn.Tanh(),
        nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, groups=groups, stride=2,
                  padding_mode=padding_mode, bias=bias), nn.Tanh(),
        nn.Flatten(), nn.Linear(channels * ((image - 1) // 2 + 1) ** 2, out),
    )
    return model, (3, image, image)


class TiedMLP(nn.Module):
    """Shared weights: ``how="module"`` applies one hidden Linear twice; ``how="weight"`` gives two Linears one
    weight tensor (``b.weight = a.weight``, their biases separate)."""

    def __init__(self, in_features: int, width: int, out: int, how: str):
        super().__init__()
        if how not in ("module", "weight"):
            raise ValueError(f"unknown tying {how!r}; valid: module, weight")
        self.inp = nn.Linear(in_features, width)
        self.a = nn.Linear(width, width)
        self.b = self.a if how == "module" else nn.Linear(width, width)
        if how == "weight":
            self.b.weight = self.a.weight
        self.head = nn.Linear(width, out)

    def forward(self, x):
        """inp, a, b (which is a, or shares a's weight), head, with tanh between them."""
        return self.head(torch.tanh(self.b(torch.tanh(self.a(torch.tanh(self.inp(x)))))))


def mlp_tied(in_features: int = 6, width: int = 8, out: int = 10, how: str = "module"):
    """An MLP with shared weights (:class:`TiedMLP`): one Linear used twice (``how='module'``) or two Linears sharing
    a weight (``'weight'``)."""
    return TiedMLP(in_features, width, out, how), (in_features,)


for _factory in (resnet18, mobilenet_v3_small, vit_tiny, text_transformer, lstm, gru, mlp_layernorm, cnn_groupnorm,
                 cnn_batchnorm, conv1d_net, conv_variants, mlp_tied):
    register(_factory.__name__, _factory)
