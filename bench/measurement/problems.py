"""The correctness suite's problems, BackPACK-style: a model factory, inputs and an id; plugins are compared on
them (``ntk-bench check`` and the repository's tests). Also the ill-defined models every plugin must refuse."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ntk_bench.bench.zoo import architectures


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    arch: str
    params: tuple  # sorted (key, value) pairs for architectures.build
    n: int
    m: int | None  # None: x2 = None (the kernel of x1 with itself)

    def model(self, dtype=torch.float64, device="cpu"):
        return architectures.build(self.arch, seed=0, **dict(self.params)).model.to(dtype=dtype, device=device)

    def inputs(self, dtype=torch.float64, device="cpu"):
        """x1, x2 drawn in float32 (so float32 and float64 runs see the same numbers)."""
        arch = architectures.build(self.arch, seed=0, **dict(self.params))
        x1 = architectures.inputs(arch, self.n, seed=1, dtype=dtype, device=device)
        if self.m is None:
            return x1, None
        x2 = architectures.inputs(arch, self.m, seed=2, dtype=dtype, device=device)
        return x1, x2


def _p(id, arch, n, m, **params):
    return Problem(id, arch, tuple(sorted(params.items())), n, m)


SMALL_MLP = dict(in_features=6, width=8, depth=2)
SMALL_CNN = dict(channels=3, image=8)

# Each architecture with O = 1 and O > 1, N != M and x2 = None.
PROBLEMS = [
    _p("mlp-relu-O1-N4M3", "mlp", 4, 3, out=1, **SMALL_MLP),
    _p("mlp-relu-O3-N4M3", "mlp", 4, 3, out=3, **SMALL_MLP),
    _p("mlp-relu-O3-x2None", "mlp", 4, None, out=3, **SMALL_MLP),
    _p("mlp-tanh-O2-N3M5", "mlp", 3, 5, out=2, activation="tanh", **SMALL_MLP),
    _p("mlp-gelu-nobias-O2-N3M2", "mlp", 3, 2, out=2, activation="gelu", bias=False, **SMALL_MLP),
    _p("mlp-sigmoid-depth1-O4-x2None", "mlp", 3, None, in_features=5, width=7, depth=1, out=4, activation="sigmoid"),
    _p("tutorial_cnn-O10-N2M3", "tutorial_cnn", 2, 3),
    _p("tutorial_cnn-O10-x2None", "tutorial_cnn", 2, None),
    _p("cnn-O1-N3M2", "cnn", 3, 2, out=1, **SMALL_CNN),
    _p("cnn-O4-N2M3", "cnn", 2, 3, out=4, **SMALL_CNN),
    _p("cnn-O4-x2None", "cnn", 3, None, out=4, **SMALL_CNN),
    _p("resnet_tiny-O1-N3M2", "resnet_tiny", 3, 2, out=1, channels=2, image=6),
    _p("resnet_tiny-O3-N2M3", "resnet_tiny", 2, 3, out=3, channels=2, image=6),
    _p("resnet_tiny-O3-x2None", "resnet_tiny", 3, None, out=3, channels=2, image=6),
]
# The real-model zoo, at sizes a float64 CPU check takes seconds for (torchvision's resnet18 and mobilenet at 16x16,
# mobilenet at a quarter of its channels: PyTorch's CPU depthwise-conv backward loops over the groups).
REAL_PROBLEMS = [
    _p("resnet18-O2-N2M3", "resnet18", 2, 3, image=16, out=2),
    _p("mobilenet_v3_small-O2-x2None", "mobilenet_v3_small", 2, None, image=16, out=2, width_mult=0.25),
    _p("vit_tiny-O3-N2M3", "vit_tiny", 2, 3, out=3),
    _p("text_transformer-O3-N2M3", "text_transformer", 2, 3, out=3),
    _p("text_transformer-O1-x2None", "text_transformer", 3, None, out=1),
    _p("lstm-O3-N2M3", "lstm", 2, 3, out=3),
    _p("gru-O2-x2None", "gru", 3, None, out=2),
    _p("mlp_layernorm-O3-N2M3", "mlp_layernorm", 2, 3, out=3),
    _p("cnn_groupnorm-O3-N2M3", "cnn_groupnorm", 2, 3, out=3),
    _p("cnn_batchnorm-O1-x2None", "cnn_batchnorm", 3, None, out=1),
    _p("conv1d_net-O3-N2M3", "conv1d_net", 2, 3, out=3),
    _p("conv_variants-depthwise-reflect-O3-N2M3", "conv_variants", 2, 3, out=3, groups=4, padding_mode="reflect"),
    _p("conv_variants-grouped-dilated-circular-O2-x2None", "conv_variants", 3, None, out=2, groups=2, dilation=2,
       padding_mode="circular"),
    _p("mlp_tied-module-O3-N2M3", "mlp_tied", 2, 3, out=3, how="module"),
    _p("mlp_tied-weight-O2-x2None", "mlp_tied", 3, None, out=2, how="weight"),
    _p("mlp-inplace-O3-N2M3", "mlp", 2, 3, out=3, inplace=True, **SMALL_MLP),
    _p("cnn-inplace-O3-x2None", "cnn", 3, None, out=3, inplace=True, **SMALL_CNN),
]
# Only the full mode for these (their layers' rules are exercised in every mode by the smaller real models).
FULL_MODE_ONLY = {"resnet18-O2-N2M3", "mobilenet_v3_small-O2-x2None"}
ALL_PROBLEMS = PROBLEMS + REAL_PROBLEMS
BY_ID = {p.id: p for p in ALL_PROBLEMS}
# A subset that takes seconds: O = 1 and O > 1, N != M and x2 = None, Linear, Conv2d, a residual block, attention
# on token ids, a recurrent layer, a normalisation layer; no torchvision.
QUICK = ["mlp-relu-O1-N4M3", "mlp-relu-O3-x2None", "cnn-O4-N2M3", "resnet_tiny-O3-x2None",
         "text_transformer-O3-N2M3", "gru-O2-x2None", "mlp_layernorm-O3-N2M3"]

# (plugin, architecture) pairs a built-in plugin must decline, and a word its reason must contain.
EXPECTED_UNSUPPORTED = {
    ("explicit_mlp", "tutorial_cnn"): "TutorialCNN",
    ("explicit_mlp", "cnn"): "Conv2d",
    ("explicit_mlp", "resnet_tiny"): "ResidualBlockNet",
    ("backpack_sqrtggn", "tutorial_cnn"): "custom module",
    ("backpack_sqrtggn", "resnet_tiny"): "custom module",
}


def rel_err(k: torch.Tensor, ref: torch.Tensor) -> float:
    """‖K − K_ref‖_F / ‖K_ref‖_F, in float64 on the CPU."""
    k, ref = k.detach().cpu().double(), ref.detach().cpu().double()
    return float(torch.linalg.vector_norm(k - ref) / torch.linalg.vector_norm(ref))


# -- ill-defined kernels: every plugin must refuse these with IllDefinedKernelError, before any work -------------

class Noisy(nn.Module):
    """A random forward (noise added to the input)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x + 0.1 * torch.randn_like(x))


class Centred(nn.Module):
    """A forward that mixes the samples of the batch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x - x.mean(0, keepdim=True))


def _old_spectral_norm():
    return nn.Sequential(torch.nn.utils.spectral_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3)).train()


# name -> (model factory, x's shape or None for token ids, words the refusal must contain)
ILL_DEFINED = {
    "train BatchNorm": (lambda: architectures.build("cnn_batchnorm", channels=2, image=6, out=3).model.train(),
                        (3, 3, 6, 6), "1 (BatchNorm2d) is in train mode"),
    "BatchNorm without running stats": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 3)).eval(),
        (3, 4), "1 (BatchNorm1d) normalises with the statistics of the batch"),
    "train Dropout": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).train(), (3, 4),
                      "1 (Dropout) is in train mode"),
    "train RReLU": (lambda: nn.Sequential(nn.Linear(4, 5), nn.RReLU(), nn.Linear(5, 3)).train(), (3, 4),
                    "1 (RReLU) is in train mode"),
    "train transformer": (lambda: architectures.build("text_transformer", out=3).model.train(), None,
                          "self_attn (MultiheadAttention) is in train mode with dropout=0.1"),
    "train InstanceNorm with running stats": (
        lambda: nn.Sequential(nn.Conv2d(3, 2, 3), nn.InstanceNorm2d(2, track_running_stats=True), nn.Flatten(),
                              nn.Linear(32, 3)).train(), (3, 3, 6, 6), "1 (InstanceNorm2d) is in train mode"),
    "train spectral_norm": (_old_spectral_norm, (3, 4), "0 (Linear) changes its buffer 'weight_u'"),
    "random forward": (lambda: Noisy().eval(), (3, 4), "its forward pass is random"),
    "batch-dependent forward": (lambda: Centred().eval(), (3, 4), "depends on the other samples of the batch"),
}


def ill_defined_inputs(shape) -> torch.Tensor:
    """A batch for an ``ILL_DEFINED`` model: random numbers of ``shape``, or token ids when it is None."""
    if shape is None:  # the text transformer
        return torch.randint(0, 50, (3, 8))
    return torch.randn(shape)
