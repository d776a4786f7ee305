"""The model zoo: named, parameterised architectures built deterministically from a seed.

``build(name, seed=0, **params)`` returns an :class:`Architecture`: the model
(in eval mode) and the :class:`InputSpec` of one sample; ``inputs(arch, n, ...)``
draws a batch. A factory returns ``(model, spec)``, the spec an InputSpec or a
plain per-sample shape (float inputs). The toy nets are here; the real models
(torchvision's resnet18 and mobilenet_v3_small, a ViT, transformers, RNNs,
norm layers) are in ``real_models``.

Your own model: ``name`` may also be a factory reference, ``"package.module:function"``
or ``"path/to/file.py:function"`` (:func:`load_callable`), returning a model or
``(model, spec)``; give ``input_spec=InputSpec(...)`` when it returns a model alone,
or ``inputs_fn=f`` with ``f(n, seed) -> tensor`` to draw the batches yourself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

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
        """Whether the inputs are integer ids (int64 in ``integer_range``) rather than floats."""
        return self.integer_range is not None


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A built zoo model and how to draw its inputs: what ``build`` returns (``params`` holds every constructor
    argument, defaults included, so that a run's rows name the model exactly)."""

    name: str
    model: nn.Module
    input_spec: InputSpec
    params: dict  # every constructor argument, defaults included
    num_outputs: int
    # a user's ``f(n, seed) -> tensor`` drawing the batches instead of ``input_spec`` (see ``inputs``)
    inputs_fn: Callable | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's input shape (no batch dimension)."""
        return self.input_spec.shape

    @property
    def num_parameters(self) -> int:
        """The number of trainable parameters, P."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def activation_module(name: str, inplace: bool = False) -> nn.Module:
    """A fresh activation module by name (``ACTIVATIONS``); ``inplace`` where the module takes it. ValueError names
    the valid ones."""
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
        """The tutorial's forward, as written there (method calls, not modules, for the activations)."""
        x = self.conv1(x)
        x = x.relu()
        x = self.conv2(x)
        x = x.relu()
        x = self.conv3(x)
        x = x.flatten(1)
        x = self.fc(x)
        return x


def tutorial_cnn() -> tuple[nn.Module, tuple[int, ...]]:
    """The PyTorch NTK tutorial's CNN and its per-sample input shape (3, 32, 32)."""
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
        """stem, residual block, 2x2 average pooling, flatten, head."""
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        return self.head(torch.flatten(self.pool(x), 1))


def resnet_tiny(channels: int = 4, image: int = 8, out: int = 10, in_channels: int = 3) -> tuple[nn.Module, tuple[int, ...]]:
    """A conv net with one residual block (:class:`ResidualBlockNet`) and its per-sample input shape."""
    return ResidualBlockNet(channels, image, out, in_channels), (in_channels, image, image)


ZOO: dict = {"mlp": mlp, "tutorial_cnn": tutorial_cnn, "cnn": cnn, "resnet_tiny": resnet_tiny}
# Integer parameters of the zoo must be positive, but these may be 0 (mlp with depth 0: a linear model).
ZERO_ALLOWED = {("mlp", "depth")}


def register(name: str, factory) -> None:
    """Add an architecture: ``factory(**params) -> (model, InputSpec or per-sample shape)``."""
    if name in ZOO and ZOO[name] is not factory:
        raise ValueError(f"an architecture named {name!r} is already registered")
    ZOO[name] = factory


def names() -> list[str]:
    """The names of every registered architecture, the real models' included (the ``zoo`` package imports
    ``real_models``, which registers them)."""
    return list(ZOO)


class FactoryError(ValueError):
    """A factory reference that cannot be imported or called; the message is one line naming it."""


def is_factory_ref(name: str) -> bool:
    """True for ``"package.module:function"`` and ``"path/to/file.py:function"`` (a zoo name has no colon)."""
    return ":" in name


def split_factory_ref(ref: str) -> tuple[str, str]:
    """(module or file, function) of a factory reference; FactoryError when it is not one."""
    where, _, func = ref.rpartition(":")
    if not where or not func or not func.isidentifier():
        raise FactoryError(f"factory {ref!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    return where, func


def is_file_ref(ref: str) -> bool:
    """True when a factory reference names a Python file (``path/to/file.py:function``) rather than a module."""
    where, _, _ = ref.rpartition(":")
    return where.endswith(".py") or "/" in where or "\\" in where


def absolute_ref(ref: str, base_dir: str | Path | None = None) -> str:
    """The reference with a relative file made absolute (relative to ``base_dir``, else the working directory)."""
    if not is_factory_ref(ref) or not is_file_ref(ref):
        return ref
    where, func = split_factory_ref(ref)
    path = Path(where).expanduser()
    if not path.is_absolute():
        path = Path(base_dir or Path.cwd()) / path
    return f"{path.resolve()}:{func}"


def ref_file(ref: str) -> Path | None:
    """The source file behind a factory reference (a file reference's file, or the module's), if it can be found."""
    where, _ = split_factory_ref(ref)
    if is_file_ref(ref):
        return Path(where)
    try:
        spec = importlib.util.find_spec(where)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


_FILE_MODULES: dict[Path, object] = {}


def _import_file(path: Path):
    path = path.resolve()
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    if not path.is_file():
        raise FactoryError(f"no such file {str(path)!r}")
    name = f"ntk_bench_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))  # the file may import its neighbours, as a script would
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(str(path.parent))
    _FILE_MODULES[path] = module
    return module


def load_callable(ref: str) -> Callable:
    """The function behind ``"package.module:function"`` or ``"path/to/file.py:function"``.

    A file is imported under a private module name (its directory searchable while it runs); any failure is a
    :class:`FactoryError` with one line naming the reference and the cause.
    """
    where, func = split_factory_ref(ref)
    try:
        module = _import_file(Path(where)) if is_file_ref(ref) else importlib.import_module(where)
    except FactoryError as exc:
        raise FactoryError(f"factory {ref!r}: {exc}") from None
    except Exception as exc:  # the user's module failed at import: say how, in one line
        raise FactoryError(f"factory {ref!r}: importing {where!r} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        name = Path(where).name if is_file_ref(ref) else where
        raise FactoryError(f"factory {ref!r}: {name!r} has no function {func!r}")
    return fn


def factory(name: str):
    """The factory of a zoo name, or the function behind a factory reference (``"pkg.mod:fn"``, ``"file.py:fn"``)."""
    if is_factory_ref(name):
        return load_callable(name)
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


def param_problems(name: str, params: dict) -> list[str]:
    """What is wrong with ``params`` for the zoo architecture ``name``, one line each (empty when nothing).

    Checks each value against the type of the factory's annotation or default (``width = "wide"`` for an int,
    ``bias = 1`` for a bool) and that integers are positive (``depth = -3``). A value of the right type can still
    fail to build (``activation = "swish"``): building the model once tells (``build``).
    """
    make = factory(name)
    sig = inspect.signature(make)
    problems = []
    try:
        sig.bind(**params)
    except TypeError as exc:
        valid = ", ".join(sig.parameters) or "none"
        return [f"{exc}; valid parameters: {valid}"]
    for key, value in params.items():
        p = sig.parameters.get(key)
        if p is None or p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        expected = p.default if p.default is not inspect.Parameter.empty else None
        kind = type(expected) if isinstance(expected, (bool, int, float, str)) else None
        if kind is bool and not isinstance(value, bool):
            problems.append(f"{key} = {value!r}: expected true or false")
        elif kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            problems.append(f"{key} = {value!r}: expected an integer")
        elif kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f"{key} = {value!r}: expected a number")
        elif kind is str and not isinstance(value, str):
            problems.append(f"{key} = {value!r}: expected a string")
        elif kind is int and (value < 0 or (value == 0 and (name, key) not in ZERO_ALLOWED)):
            problems.append(f"{key} = {value!r}: expected a positive integer")
    return problems


class InputsError(FactoryError):
    """The model cannot take the inputs it was given (their shape, or token ids past its vocabulary)."""


class TrainModeError(FactoryError):
    """A user's model returned in a mode whose kernel is ill-defined (train-mode BatchNorm, Dropout)."""


def _as_architecture(name: str, made, input_spec: InputSpec | None, inputs_fn: Callable | None):
    """(model, InputSpec) from what a factory returned: a model, or (model, spec)."""
    spec = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        made, spec = made
    if not isinstance(made, nn.Module):
        raise FactoryError(f"{name}: the factory returned {type(made).__name__}, expected an nn.Module "
                           "or (nn.Module, input spec)")
    spec = input_spec if input_spec is not None else spec
    if spec is None and inputs_fn is None:
        raise InputsError(f"{name}: the factory returned a model alone; give its inputs: --input-shape (with "
                           "--input-dtype int64 and --input-range for token ids) or --inputs-factory on the command "
                           "line, inputs = {shape = [...]} or inputs_factory in a sweep file")
    if spec is not None and not isinstance(spec, InputSpec):
        spec = InputSpec(tuple(spec))
    return made, spec


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
          input_spec: InputSpec | None = None, inputs_fn: Callable | None = None, call_eval: bool = False,
          **params) -> Architecture:
    """Build ``name`` with ``params``.

    A zoo name's weights are drawn from ``seed`` (the same seed, the same weights), in eval mode. A factory
    reference (``"pkg.mod:fn"``, ``"file.py:fn"``) is the user's model as the factory returns it: its own seeding
    (the process's generator is left as it was found), its own train/eval mode unless ``call_eval`` asks for
    ``.eval()`` (a train-mode model whose kernel is ill-defined is refused by every plugin, as in the API).
    ``input_spec`` gives (or replaces) the factory's per-sample input, ``inputs_fn(n, seed) -> tensor`` draws
    batches instead.
    """
    make = factory(name)
    check_params(name, params)
    users = is_factory_ref(name)
    with torch.random.fork_rng(devices=[]):
        if not users:
            torch.manual_seed(seed)
        made = make(**params)
    model, spec = _as_architecture(name, made, input_spec, inputs_fn)
    defaults = {k: v.default for k, v in inspect.signature(make).parameters.items()
                if v.default is not inspect.Parameter.empty}
    model = model.to(dtype=dtype, device=device)
    if call_eval or not users:
        model.eval()
    else:
        from ntk_bench.implementations.core.validation import IllDefinedKernelError, refuse_ill_defined_modules

        try:
            refuse_ill_defined_modules(model)  # before a forward that would update or fail on its batch statistics
        except IllDefinedKernelError as exc:
            raise TrainModeError(f"{exc} (the model runs as the factory returns it: --eval, or eval = true in a "
                                 f"sweep file, calls .eval() on it)") from None
    arch = Architecture(name, model, spec or InputSpec(()), {**defaults, **params}, 0, inputs_fn)
    x = inputs(arch, 1, dtype=dtype, device=device)
    given = ("the inputs function's batch" if inputs_fn is not None else
             f"the per-sample input shape {','.join(map(str, arch.input_spec.shape)) or '()'} (--input-shape, or "
             f"inputs.shape in a sweep file)" + (f" with ids in [{arch.input_spec.integer_range[0]}, "
                                                 f"{arch.input_spec.integer_range[1]}) (--input-range, "
                                                 f"inputs.range)" if arch.input_spec.is_integer else ""))
    from ntk_bench.implementations.core.input_errors import InputMismatchError, named_input_errors

    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), named_input_errors(model, x, given):
            y = model(x)  # (a train-mode model may draw random numbers: the caller's generator is kept)
    except InputMismatchError as exc:
        raise InputsError(str(exc)) from None
    if not isinstance(y, torch.Tensor) or y.dim() not in (1, 2):
        what = type(y).__name__ if not isinstance(y, torch.Tensor) else f"a tensor of shape {tuple(y.shape)}"
        raise FactoryError(f"{name}: the model returned {what} for a batch of 1; expected (N,) or (N, O)")
    o = 1 if y.dim() == 1 else y.shape[1]
    if o < 1:
        raise FactoryError(f"{name}: the model has no outputs (O = 0)")
    return dataclasses.replace(arch, num_outputs=o)


def inputs(arch: Architecture, n: int, seed: int = 1, dtype: torch.dtype = torch.float32,
           device: str | torch.device = "cpu") -> torch.Tensor:
    """A batch of ``n`` inputs for ``arch`` drawn from ``seed`` on the CPU: standard normal numbers rounded to
    float32 then cast to ``dtype`` (the same numbers in every dtype), or int64 ids in the spec's range; or what
    the architecture's ``inputs_fn(n, seed)`` returns (floating point cast to ``dtype``)."""
    if arch.inputs_fn is not None:
        x = arch.inputs_fn(n, seed)
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != n:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise FactoryError(f"{arch.name}: the inputs function returned {got} for n={n}; expected a tensor "
                               f"of {n} samples")
        return (x.to(dtype=dtype) if x.is_floating_point() else x).to(device=device)
    g = torch.Generator().manual_seed(seed)
    spec = arch.input_spec
    if spec.is_integer:
        low, high = spec.integer_range
        return torch.randint(low, high, (n, *spec.shape), generator=g).to(device=device)
    x = torch.randn((n, *spec.shape), generator=g, dtype=torch.float64).to(torch.float32)
    return x.to(dtype=dtype, device=device)
