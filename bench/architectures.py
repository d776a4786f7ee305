"""The model zoo: named, parameterised architectures built deterministically from a seed.

``build(name, seed=0, **params)`` returns an :class:`Architecture`: the model
(in eval mode) and the :class:`InputSpec` of one sample; ``inputs(arch, n, ...)``
draws a batch. A factory returns ``(model, spec)``, the spec an InputSpec or a
plain per-sample shape (float inputs). The toy nets are here; the real models
(torchvision's resnet18 and mobilenet_v3_small, a ViT, transformers, RNNs,
norm layers) are in ``real_models``.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
    "identity": nn.Identity, "silu": nn.SiLU,
}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One sample's input: its shape, and float (standard normal, in the model's dtype) or integer ids in
    [low, high) (int64, e.g. token ids for an Embedding)."""

    shape: tuple[int, ...]
    integer_range: tuple[int, int] | None = None

    @property
    def is_integer(self) -> bool:
        return self.integer_range is not None


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    model: nn.Module
    input_spec: InputSpec
    params: dict  # every constructor argument, defaults included
    num_outputs: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.input_spec.shape

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def activation_module(name: str, inplace: bool = False) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    cls = ACTIVATIONS[name]
    return cls(inplace=True) if inplace and "inplace" in inspect.signature(cls).parameters else cls()


def mlp(in_features: int = 784, width: int = 512, depth: int = 2, out: int = 10,
        activation: str = "relu", bias: bool = True, inplace: bool = False) -> tuple[nn.Module, tuple[int, ...]]:
    """``depth`` hidden Linear layers of ``width``, then a Linear to ``out``: an nn.Sequential
    (``inplace``: activations that overwrite their input, as torchvision's)."""
    activation_module(activation)
    layers, d = [], in_features
    for _ in range(depth):
        layers += [nn.Linear(d, width, bias=bias), activation_module(activation, inplace)]
        d = width
    layers.append(nn.Linear(d, out, bias=bias))
    return nn.Sequential(*layers), (in_features,)


class TutorialCNN(nn.Module):
    """The CNN of the PyTorch NTK tutorial, exactly: a custom module calling .relu() and .flatten(1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, (3, 3))
        self.conv2 = nn.Conv2d(32, 32, (3, 3))
        self.conv3 = nn.Conv2d(32, 32, (3, 3))
        self.fc = nn.Linear(21632, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = x.relu()
        x = self.conv2(x)
        x = x.relu()
        x = self.conv3(x)
        x = x.flatten(1)
        x = self.fc(x)
        return x


def tutorial_cnn() -> tuple[nn.Module, tuple[int, ...]]:
    return TutorialCNN(), (3, 32, 32)


def cnn(channels: int = 8, image: int = 8, out: int = 10, in_channels: int = 3,
        inplace: bool = False) -> tuple[nn.Module, tuple[int, ...]]:
    """An nn.Sequential conv net BackPACK fully supports: conv-relu-conv(stride 2)-relu-flatten-linear."""
    s1 = image - 2
    s2 = (s1 - 3) // 2 + 1
    model = nn.Sequential(
        nn.Conv2d(in_channels, channels, 3), nn.ReLU(inplace=inplace),
        nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU(inplace=inplace),
        nn.Flatten(), nn.Linear(channels * s2 * s2, out),
    )
    return model, (in_channels, image, image)


class ResidualBlockNet(nn.Module):
    """conv stem, one residual block (x + conv(relu(conv(x)))), pooling, linear head."""

    def __init__(self, channels: int, image: int, out: int, in_channels: int):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(channels * (image // 2) ** 2, out)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        return self.head(torch.flatten(self.pool(x), 1))


def resnet_tiny(channels: int = 4, image: int = 8, out: int = 10, in_channels: int = 3) -> tuple[nn.Module, tuple[int, ...]]:
    return ResidualBlockNet(channels, image, out, in_channels), (in_channels, image, image)


ZOO: dict = {"mlp": mlp, "tutorial_cnn": tutorial_cnn, "cnn": cnn, "resnet_tiny": resnet_tiny}


def register(name: str, factory) -> None:
    """Add an architecture: ``factory(**params) -> (model, InputSpec or per-sample shape)``."""
    if name in ZOO and ZOO[name] is not factory:
        raise ValueError(f"an architecture named {name!r} is already registered")
    ZOO[name] = factory


def names() -> list[str]:
    _load_real_models()
    return list(ZOO)


def _load_real_models() -> None:
    from . import real_models  # noqa: F401 - registers itself


def factory(name: str):
    _load_real_models()
    if name not in ZOO:
        raise KeyError(f"unknown architecture {name!r}; valid names: {', '.join(ZOO)}")
    return ZOO[name]


def check_params(name: str, params: dict) -> None:
    """Raise TypeError naming a parameter ``name`` does not take."""
    make = factory(name)
    try:
        inspect.signature(make).bind(**params)
    except TypeError as exc:
        valid = ", ".join(inspect.signature(make).parameters) or "none"
        raise TypeError(f"{name}: {exc}; valid parameters: {valid}") from None


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
          **params) -> Architecture:
    """Build ``name`` with ``params``, its weights drawn from ``seed`` (the same seed, the same weights), in eval mode."""
    make = factory(name)
    check_params(name, params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, spec = make(**params)
    if not isinstance(spec, InputSpec):
        spec = InputSpec(tuple(spec))
    defaults = {k: v.default for k, v in inspect.signature(make).parameters.items()
                if v.default is not inspect.Parameter.empty}
    model = model.to(dtype=dtype, device=device).eval()
    arch = Architecture(name, model, spec, {**defaults, **params}, 0)
    with torch.no_grad():
        y = model(inputs(arch, 1, dtype=dtype, device=device))
    o = 1 if y.dim() == 1 else y.shape[1]
    return dataclasses.replace(arch, num_outputs=o)


def inputs(arch: Architecture, n: int, seed: int = 1, dtype: torch.dtype = torch.float32,
           device: str | torch.device = "cpu") -> torch.Tensor:
    """A batch of ``n`` inputs for ``arch`` drawn from ``seed`` on the CPU: standard normal numbers rounded to
    float32 then cast to ``dtype`` (the same numbers in every dtype), or int64 ids in the spec's range."""
    g = torch.Generator().manual_seed(seed)
    spec = arch.input_spec
    if spec.is_integer:
        low, high = spec.integer_range
        return torch.randint(low, high, (n, *spec.shape), generator=g).to(device=device)
    x = torch.randn((n, *spec.shape), generator=g, dtype=torch.float64).to(torch.float32)
    return x.to(dtype=dtype, device=device)
