"""The model zoo: named, parameterised architectures built deterministically from a seed.

``build(name, seed=0, **params)`` returns an :class:`Architecture` with the
model and its per-sample input shape; ``inputs(arch, n, ...)`` draws a batch.
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
class Architecture:
    name: str
    model: nn.Module
    input_shape: tuple[int, ...]
    params: dict  # every constructor argument, defaults included
    num_outputs: int

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def mlp(in_features: int = 784, width: int = 512, depth: int = 2, out: int = 10,
        activation: str = "relu", bias: bool = True) -> tuple[nn.Module, tuple[int, ...]]:
    """``depth`` hidden Linear layers of ``width``, then a Linear to ``out``: an nn.Sequential."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    layers, d = [], in_features
    for _ in range(depth):
        layers += [nn.Linear(d, width, bias=bias), ACTIVATIONS[activation]()]
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


def cnn(channels: int = 8, image: int = 8, out: int = 10, in_channels: int = 3) -> tuple[nn.Module, tuple[int, ...]]:
    """An nn.Sequential conv net BackPACK fully supports: conv-relu-conv(stride 2)-relu-flatten-linear."""
    s1 = image - 2
    s2 = (s1 - 3) // 2 + 1
    model = nn.Sequential(
        nn.Conv2d(in_channels, channels, 3), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU(),
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


ZOO = {"mlp": mlp, "tutorial_cnn": tutorial_cnn, "cnn": cnn, "resnet_tiny": resnet_tiny}


def names() -> list[str]:
    return list(ZOO)


def check_params(name: str, params: dict) -> None:
    """Raise TypeError naming a parameter ``name`` does not take."""
    try:
        inspect.signature(ZOO[name]).bind(**params)
    except TypeError as exc:
        valid = ", ".join(inspect.signature(ZOO[name]).parameters) or "none"
        raise TypeError(f"{name}: {exc}; valid parameters: {valid}") from None


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
          **params) -> Architecture:
    """Build ``name`` with ``params``, its weights drawn from ``seed`` (the same seed, the same weights)."""
    if name not in ZOO:
        raise KeyError(f"unknown architecture {name!r}; valid names: {', '.join(ZOO)}")
    check_params(name, params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, shape = ZOO[name](**params)
    defaults = {k: v.default for k, v in inspect.signature(ZOO[name]).parameters.items()}
    model = model.to(dtype=dtype, device=device)
    with torch.no_grad():
        o = model(torch.zeros((1, *shape), dtype=dtype, device=device)).shape[1]
    return Architecture(name, model, shape, {**defaults, **params}, o)


def inputs(arch: Architecture, n: int, seed: int = 1, dtype: torch.dtype = torch.float32,
           device: str | torch.device = "cpu") -> torch.Tensor:
    """A batch of ``n`` standard-normal inputs for ``arch``, drawn from ``seed`` on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *arch.input_shape), generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
