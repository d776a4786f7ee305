"""Sweeps are data: axes and values, validated in full, expanded into cases.

A sweep is a mapping (a Python dict here, or a TOML/JSON file a user passes):

    name = "mine"
    impls = ["all"]             # registered plugins and peers by name, or "all"
    modes = ["full"]
    dtypes = ["float32"]
    devices = ["cpu"]           # "cpu", "cuda", "cuda:K"
    time_budget_s = 0.3         # timing budget per case, after one warm-up call
    timeout_s = 120             # a case running longer (from its worker's ready signal) is recorded as `timeout`

    [[arch]]
    name = "mlp"
    params = { in_features = 64, width = 256 }
    N = [4, 16, 64]             # N = M, x2 = None
    NM = [[32, 8]]              # extra N != M cases
    O = [1, 10]                 # sets the architecture's `out`
    modes = ["full", "trace"]   # optional: overrides the sweep's modes for this entry
    impls = ["structured"]      # optional: overrides the sweep's plugins for this entry
    memory_budget_gib = 8       # optional (also top-level): every case computes blocked under this budget

    [[arch]]                    # your own model
    name = "mynet"              # optional: the factory's function name by default
    factory = "mypackage.models:make_net"      # or "path/to/file.py:make_net" (relative to the sweep file)
    params = { width = 64 }     # keyword arguments of the factory
    inputs = { shape = [3, 32, 32] }           # one sample; dtype "float" (default) or "int64" with a range:
    # inputs = { shape = [16], dtype = "int64", range = [0, 100] }
    # inputs_factory = "mypackage.models:batch"   # instead: f(n, seed) -> tensor
    N = [8]

The factory returns an ``nn.Module`` (or ``(module, input spec)``); O comes from the model (or, when the factory
takes ``out``, from ``O``). Every value is checked before any work (:func:`expand`: a pydantic schema, then the
plugin and architecture names and parameter types), one line per problem; :func:`check_models` then builds
each problem's model once on the CPU, so a value that passes the schema but cannot build (``activation =
"swish"``) is caught before the sweep starts too.

Each (arch entry, O, N/M, mode, dtype, device, impl) is one :class:`Case`; a :class:`Problem` carries what the
worker needs to rebuild the model (the zoo name or the factory reference and its parameters).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import tomllib
from pathlib import Path
from typing import Any

# neural-tangents' three implementations as peers (implementations/peers/neural_tangents.py).
NT_PEERS = ("nt_jacobian_contraction", "nt_ntk_vector_products", "nt_structured_derivatives")
# Our plugins but the autograd loop (one backward pass per sample and output: seconds a call from small models
# on), neural-tangents' three, and the one PyTorch NTK library whose calls stay under seconds on small CNNs
# (asdl, nngeometry and curvlinops took 2-8 s a call on the tutorial CNN at N=8): what --model runs by default.
FAST_OURS = ("jacobian_contraction", "ntk_vector_products", "explicit_mlp", "backpack_batchgrad", "backpack_sqrtggn",
             "structured", "auto")
MODEL_IMPLS = [*FAST_OURS, *NT_PEERS, "laplace"]
DTYPES = ("float32", "float64")
MODES = ("full", "trace", "diagonal")


class SweepError(ValueError):
    """An invalid sweep; the message has one line per problem found."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A user's model: the factory reference (a file reference made absolute) and how to draw its inputs."""

    factory: str
    input_shape: tuple[int, ...] | None = None
    input_dtype: str = "float"  # "float" | "int64"
    input_range: tuple[int, int] | None = None  # int64: ids in [low, high)
    inputs_factory: str | None = None  # f(n, seed) -> tensor, instead of the shape
    call_eval: bool = False  # call .eval() on the model (--eval; `eval = true`): otherwise it runs as returned

    @classmethod
    def from_dict(cls, d: dict | None) -> "ModelSource | None":
        if d is None:
            return None
        return cls(d["factory"], None if d.get("input_shape") is None else tuple(d["input_shape"]),
                   d.get("input_dtype", "float"), None if d.get("input_range") is None else tuple(d["input_range"]),
                   d.get("inputs_factory"), bool(d.get("call_eval", False)))

    def input_spec(self):
        from ..zoo import architectures

        if self.input_shape is None:
            return None
        return architectures.InputSpec(tuple(self.input_shape), self.input_range if self.input_dtype == "int64" else None)

    def refs(self) -> tuple[str, ...]:
        return (self.factory,) + ((self.inputs_factory,) if self.inputs_factory else ())


@dataclasses.dataclass(frozen=True)
class Problem:
    """What a kernel is computed for: the model and the inputs (shared by every impl, mode, dtype)."""

    arch: str
    arch_params: tuple  # sorted (key, value) pairs, `out` included where the architecture has it
    n: int
    m: int | None  # None: x2 = None, M = N
    source: ModelSource | None = None  # a user's factory; None: the zoo architecture `arch`

    @property
    def M(self) -> int:
        return self.n if self.m is None else self.m

    @property
    def id(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.arch_params)
        return f"{self.arch}({params})/N={self.n}/M={'x1' if self.m is None else self.m}"

    @property
    def model_key(self) -> tuple:
        """The same model (whatever N and M)."""
        return self.arch, self.arch_params, self.source

    @classmethod
    def from_dict(cls, p: dict) -> "Problem":
        return cls(p["arch"], tuple(tuple(kv) for kv in p["arch_params"]), p["n"], p["m"],
                   ModelSource.from_dict(p.get("source")))


@dataclasses.dataclass(frozen=True)
class Case:
    impl: str
    problem: Problem
    mode: str
    dtype: str
    device: str
    time_budget_s: float = 0.3
    timeout_s: float = 120.0
    memory_budget_bytes: int | None = None
    # Not part of the case's identity:
    # auto cases only: plugins to time auto against in alternating blocks, as well as its own pick. The runner
    # sets it from the group's earlier rows (the ones near the fastest).
    compare_with: tuple[str, ...] = ()
    # set by the runner when the kernel's OOM killer ended the first try: compute blocked under a budget that
    # respects the worker's memory limit
    retry_blocked: bool = False
    # "wall" or "cpu" (process CPU time with one thread: bench/measurement/timing.py); the run's header records it
    clock: str = "wall"

    @property
    def id(self) -> str:
        """Stable key of the case (a key only, never parsed back)."""
        budget = "" if self.memory_budget_bytes is None else f"/budget={self.memory_budget_bytes}B"
        return f"{self.impl}/{self.problem.id}/{self.mode}/{self.dtype}/{self.device}{budget}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        return cls(**{**d, "problem": Problem.from_dict(d["problem"]),
                      "compare_with": tuple(d.get("compare_with", ()))})


# -- the schema ----------------------------------------------------------------

_UNITS = {"memory_budget_gib": " of GiB", "time_budget_s": " of seconds", "timeout_s": " of seconds"}


@functools.lru_cache(maxsize=None)
def _schema():
    """The pydantic models of a sweep (built on first use: pydantic is imported only when a sweep is checked)."""
    from typing import Annotated, Literal

    try:
        from pydantic import BaseModel, ConfigDict, Field, model_validator
    except ImportError as exc:
        raise SweepError(f"checking a sweep needs pydantic 2 (pip install 'pydantic>=2'): {exc}") from None

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

    PosInt = Annotated[int, Field(gt=0)]
    PosNum = Annotated[float, Field(gt=0, allow_inf_nan=False)]
    Name = Annotated[str, Field(min_length=1)]
    Mode = Literal["full", "trace", "diagonal"]
    Device = Annotated[str, Field(pattern=r"^(cpu|cuda(:[0-9]+)?)$")]

    class Inputs(Strict):
        shape: list[PosInt]
        dtype: Literal["float", "int64"] = "float"
        range: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None

        @model_validator(mode="after")
        def _range(self):
            if self.dtype == "int64" and self.range is None:
                raise ValueError("int64 inputs need range = [low, high]")
            if self.range is not None and self.dtype != "int64":
                raise ValueError('range is for dtype = "int64" inputs (token ids)')
            if self.range is not None and self.range[0] >= self.range[1]:
                raise ValueError(f"range = {self.range}: needs low < high")
            return self

    class Arch(Strict):
        name: Name | None = None
        factory: Name | None = None
        params: dict[str, Any] = {}
        inputs: Inputs | None = None
        inputs_factory: Name | None = None
        eval: bool = False
        N: list[PosInt] = []
        NM: list[Annotated[list[PosInt], Field(min_length=2, max_length=2)]] = []
        O: Annotated[list[PosInt], Field(min_length=1)] | None = None
        modes: Annotated[list[Mode], Field(min_length=1)] | None = None
        impls: Annotated[list[Name], Field(min_length=1)] | None = None
        memory_budget_gib: PosNum | None = None

        @model_validator(mode="after")
        def _entry(self):
            if self.name is None and self.factory is None:
                raise ValueError("needs a name (a zoo architecture) or a factory")
            if not self.N and not self.NM:
                raise ValueError("give N and/or NM")
            if self.factory is None and (self.inputs is not None or self.inputs_factory is not None):
                raise ValueError("inputs and inputs_factory go with a factory")
            if self.inputs is not None and self.inputs_factory is not None:
                raise ValueError("give inputs or inputs_factory, not both")
            if self.factory is None and self.eval:
                raise ValueError("eval goes with a factory (the zoo's models are built in eval mode)")
            return self

    class Sweep(Strict):
        name: Name = "sweep"
        description: str = ""
        impls: Annotated[list[Name], Field(min_length=1)] = ["all"]
        modes: Annotated[list[Mode], Field(min_length=1)] = ["full"]
        dtypes: Annotated[list[Literal["float32", "float64"]], Field(min_length=1)] = ["float32"]
        devices: Annotated[list[Device], Field(min_length=1)] = ["cpu"]
        time_budget_s: PosNum = 0.3
        timeout_s: PosNum = 120.0
        memory_budget_gib: PosNum | None = None
        arch: Annotated[list[Arch], Field(min_length=1)]

    return Sweep, Arch, Inputs


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _schema_problems(name: str, exc) -> list[str]:
    """One line per pydantic error: where, the value, what was expected."""
    Sweep, Arch, Inputs = _schema()
    lines = []
    for err in exc.errors():
        loc, kind, value = err["loc"], err["type"], err.get("input")
        where = f"sweep {name!r}"
        rest = list(loc)
        model = Sweep
        if len(rest) >= 2 and rest[0] == "arch" and isinstance(rest[1], int):
            where += f", arch entry {rest[1] + 1}"
            rest, model = rest[2:], Arch
            if rest[:1] == ["inputs"]:
                model = Inputs
        path = ""
        for part in rest:
            path += f"[{part + 1}]" if isinstance(part, int) else ("." if path else "") + str(part)
        field = next((p for p in reversed(rest) if isinstance(p, str)), "")
        if kind == "extra_forbidden":
            msg = f"unknown key {path!r}; valid: {', '.join(sorted(model.model_fields))}"
        elif loc == ("arch",) and kind in ("missing", "too_short"):
            msg = "no [[arch]] entries"
        elif kind == "missing":
            msg = f"{path}: required"
        elif kind in ("value_error", "assertion_error"):
            msg = (f"{path}: " if path else "") + err["msg"].removeprefix("Value error, ")
        else:
            if field in _UNITS and kind in ("greater_than", "finite_number", "float_type", "float_parsing"):
                expected = f"expected a positive finite number{_UNITS[field]}"
            elif kind == "greater_than":
                expected = "expected a positive integer" if isinstance(value, int) else f"must be > {err['ctx']['gt']}"
            elif kind == "list_type":
                expected = "expected a list" + (f", e.g. {field} = [{value!r}]" if isinstance(value, (int, float, str))
                                                and field in ("N", "O", "impls", "modes", "dtypes", "devices") else "")
            elif kind in ("too_short", "too_long") and field == "NM":
                expected = "expected a pair [N, M]"
            elif kind == "too_short":
                expected = "expected at least one value"
            elif kind == "int_type":
                expected = "expected an integer"
            elif kind == "string_type":
                expected = "expected a string"
            else:
                expected = err["msg"]
            msg = f"{path} = {_describe(value)}: {expected}"
        lines.append(f"{where}: {msg}")
    return lines


# -- built-in sweeps -------------------------------------------------------------

def _builtin_sweeps() -> dict[str, dict]:
    mlp = {"in_features": 64, "width": 256, "depth": 2}
    mlp512 = {"in_features": 784, "width": 512, "depth": 2}
    mlp2048 = {"in_features": 784, "width": 2048, "depth": 2}
    # On the GPU at N >= 128 the per-sample loops (autograd, NTK-VP) and BackPACK took tens of seconds per call
    # (NTK-VP before its per-sample-vjp form; not re-measured on a GPU since).
    fast = ["jacobian_contraction", "structured", "explicit_mlp", "auto", *NT_PEERS]
    # Jacobian contraction too at MLP N=512 with O=100 (2·N²·O²·P = 3.5e15 FLOP) or width 2048 (3e14 FLOP, blocked).
    fastest = fast[1:]
    # Every plugin but the autograd loop, which takes seconds a case from N=32 on a CPU; every peer.
    no_loops = ["jacobian_contraction", "ntk_vector_products", "explicit_mlp", "backpack_batchgrad", "backpack_sqrtggn",
                "structured", "auto", *NT_PEERS]
    every_but_torch_peers = ["jacobian_contraction", "ntk_vector_products", "autograd_loop", "explicit_mlp",
                             "backpack_batchgrad", "backpack_sqrtggn", "structured", "auto", *NT_PEERS]
    small_cnn, tiny_resnet = {"channels": 16, "image": 16}, {"channels": 8, "image": 8}
    # Real networks: neural-tangents' notebook MLP, and small but real transformer / RNN configurations.
    nt_mlp = {"in_features": 3072, "width": 2048, "depth": 3}
    vit = {"image": 32, "patch": 4, "layers": 4, "heads": 4, "hidden": 64, "mlp": 128}
    text = {"vocab": 1000, "seq": 32, "d_model": 64, "heads": 4, "ff": 128, "layers": 2}
    rnn = {"features": 16, "seq": 32, "hidden": 64}
    gpu_real = ["jacobian_contraction", "ntk_vector_products", "structured", "auto"]
    torch_peers = ["asdl", "nngeometry", "curvlinops", "laplace"]
    real_impls = [*gpu_real, *NT_PEERS]
    fast_ours = list(FAST_OURS)
    # the plugins that stay fast on every zoo model here; explicit_mlp declines the CNNs at once
    quick_core = ["jacobian_contraction", "explicit_mlp", "structured", "auto", "nt_jacobian_contraction",
                  "nt_structured_derivatives"]
    # BackPACK's O backward passes with per-sample hooks ran past a minute a case on the CNNs at load
    quick_ours = [i for i in fast_ours if not i.startswith("backpack")]
    return {
        "quick": {
            "name": "quick",
            "description": "CPU default: the four small zoo architectures at N = 4, 8, 16 (three sizes: a slope with "
                           "its band), our fast plugins and neural-tangents' JC and structured derivatives on each, "
                           "NTK-vector products and laplace on the MLP; the calls that take seconds (the autograd "
                           "loop, BackPACK, the PyTorch NTK libraries, NTK-vector products on the CNNs) are in "
                           "`full`",
            "impls": [*fast_ours, *NT_PEERS], "modes": ["full"], "dtypes": ["float32"], "devices": ["cpu"],
            "time_budget_s": 0.1, "timeout_s": 60,
            "arch": [
                {"name": "mlp", "params": mlp, "N": [4, 8, 16], "O": [10],
                 "impls": [*quick_ours, *NT_PEERS, "laplace"]},
                {"name": "mlp", "params": mlp, "N": [16], "O": [1], "impls": quick_core},
                {"name": "mlp", "params": mlp, "N": [16], "O": [10], "modes": ["trace", "diagonal"],
                 "impls": quick_core},
                {"name": "tutorial_cnn", "N": [4, 8, 16], "impls": quick_core},
                {"name": "cnn", "params": small_cnn, "N": [4, 8, 16], "O": [10], "impls": quick_core},
                {"name": "resnet_tiny", "params": tiny_resnet, "N": [4, 8, 16], "O": [10], "impls": quick_core},
            ],
        },
        "full": {
            "name": "full",
            "description": "CPU, everything: every plugin and zoo architecture, 4 N values, O in {1, 10}, the "
                           "autograd loop up to N=16, the PyTorch NTK libraries on the MLP and the CNN (calls of "
                           "seconds; over an hour on 2 busy cores)",
            "impls": ["all"], "modes": ["full"], "dtypes": ["float32"], "devices": ["cpu"],
            "time_budget_s": 0.1, "timeout_s": 60,
            "arch": [
                {"name": "mlp", "params": mlp, "N": [4, 8, 16], "O": [1, 10]},
                {"name": "mlp", "params": mlp, "N": [32], "O": [1, 10], "NM": [[32, 8]], "impls": no_loops},
                {"name": "mlp", "params": mlp, "N": [16], "O": [10], "modes": ["trace", "diagonal"]},
                {"name": "mlp", "params": mlp, "N": [32], "O": [10], "modes": ["trace", "diagonal"], "impls": no_loops},
                {"name": "tutorial_cnn", "N": [2, 4, 8], "impls": [*every_but_torch_peers]},
                {"name": "tutorial_cnn", "N": [16], "impls": no_loops},
                {"name": "cnn", "params": small_cnn, "N": [4, 8, 16], "O": [1, 10]},
                {"name": "cnn", "params": small_cnn, "N": [32], "O": [1, 10], "impls": no_loops},
                {"name": "resnet_tiny", "params": tiny_resnet, "N": [4, 8, 16], "O": [1, 10], "impls": [*every_but_torch_peers]},
                {"name": "resnet_tiny", "params": tiny_resnet, "N": [32], "O": [1, 10], "impls": no_loops},
            ],
        },
        "mlp_cpu": {
            "name": "mlp_cpu",
            "description": "The 670k-parameter MLP 784-512-512-10 at N=M=128 on the CPU (the brief's CPU case); "
                           "NTK-VP left out: N²·O = 163,840 vjp/jvp pairs of a 670k-parameter net",
            "impls": ["jacobian_contraction", "autograd_loop", "explicit_mlp", "backpack_batchgrad", "backpack_sqrtggn",
                      "structured", "auto", "nt_jacobian_contraction", "nt_structured_derivatives"],
            "modes": ["full"], "dtypes": ["float32"], "devices": ["cpu"],
            "time_budget_s": 1.0, "timeout_s": 300,
            "arch": [{"name": "mlp", "params": {"in_features": 784, "width": 512, "depth": 2}, "N": [128], "O": [10]}],
        },
        "gpu": {
            "name": "gpu",
            "description": "One 80 GB GPU: the MLP targets first (MLP N=512; O=100 under an 8 GiB budget), then "
                           "the tutorial CNN, MLPs of width 512 and 2048 and a CNN, N up to 512, the slow loops only "
                           "where they finish in seconds (170 cases); then the "
                           "real networks (resnet18 at 224x224 with O = 8, 128, 1000; 3 x Dense(2048))",
            "impls": ["all"], "modes": ["full"], "dtypes": ["float32"], "devices": ["cuda"],
            "time_budget_s": 0.5, "timeout_s": 120,
            "arch": [
                {"name": "mlp", "params": mlp512, "N": [512], "O": [10], "impls": fast},
                # (SqrtGGN left out: like BatchGrad, per-sample work for 100 outputs under 8 GiB exceeds the timeout)
                {"name": "mlp", "params": mlp512, "N": [128], "O": [100], "memory_budget_gib": 8,
                 "impls": ["jacobian_contraction", "ntk_vector_products", "backpack_batchgrad",
                           "structured", "explicit_mlp", "auto"]},
                {"name": "tutorial_cnn", "N": [20, 64], "NM": [[20, 5]]},
                {"name": "tutorial_cnn", "N": [128, 256], "impls": fast},
                {"name": "mlp", "params": mlp512, "N": [32, 128], "O": [10]},
                {"name": "mlp", "params": mlp512, "N": [128], "O": [10], "modes": ["trace", "diagonal"]},
                {"name": "mlp", "params": mlp512, "N": [32], "O": [100]},
                {"name": "mlp", "params": mlp512, "N": [512], "O": [100], "impls": fastest},
                {"name": "mlp", "params": mlp2048, "N": [32], "O": [10]},
                {"name": "mlp", "params": mlp2048, "N": [128], "O": [10], "impls": fast},
                {"name": "mlp", "params": mlp2048, "N": [512], "O": [10], "impls": fastest},
                {"name": "cnn", "params": {"channels": 32, "image": 32}, "N": [32], "O": [10]},
                {"name": "cnn", "params": {"channels": 32, "image": 32}, "N": [128, 512], "O": [10], "impls": fast},
                # Real networks (neural-tangents runs on the CPU only: its published numbers are the peer)
                {"name": "mlp", "params": nt_mlp, "N": [16], "O": [8], "impls": gpu_real + ["explicit_mlp"]},
                {"name": "resnet18", "params": {"image": 224}, "N": [8], "O": [8], "impls": gpu_real},
                {"name": "resnet18", "params": {"image": 224}, "N": [1], "O": [128, 1000], "impls": gpu_real},
            ],
        },
        "real": {
            "name": "real",
            "description": "Real networks on the CPU against neural-tangents' three implementations: "
                           "neural-tangents' notebook MLP (3 x Dense(2048), O=8, N=16), the tutorial CNN, "
                           "resnet18 at 32x32 and 224x224, a small ViT, a text transformer and an LSTM at N=16, "
                           "the PyTorch NTK libraries where they take seconds",
            "impls": real_impls, "modes": ["full"], "dtypes": ["float32"], "devices": ["cpu"],
            "time_budget_s": 1.0, "timeout_s": 600,
            "arch": [
                {"name": "mlp", "params": nt_mlp, "N": [16], "O": [8], "impls": [*real_impls, "explicit_mlp"]},
                {"name": "tutorial_cnn", "N": [16], "impls": [*real_impls, *torch_peers]},
                {"name": "resnet18", "params": {"image": 32}, "N": [8], "O": [10],
                 "impls": [*real_impls, "asdl", "curvlinops", "laplace"]},
                {"name": "resnet18", "params": {"image": 224}, "N": [4], "O": [10],
                 "impls": ["jacobian_contraction", "structured", "auto", "nt_jacobian_contraction",
                           "nt_structured_derivatives"]},
                {"name": "vit_tiny", "params": vit, "N": [16], "O": [10], "impls": [*real_impls, *torch_peers]},
                {"name": "text_transformer", "params": text, "N": [16], "O": [10], "impls": [*real_impls, *torch_peers]},
                {"name": "lstm", "params": rnn, "N": [16], "O": [10], "impls": [*real_impls, *torch_peers]},
            ],
        },
        "smoke": {
            "name": "smoke",
            "description": "Seconds: one tiny MLP, every plugin (used by the tests)",
            "impls": ["all"], "modes": ["full"], "dtypes": ["float32"], "devices": ["cpu"],
            "time_budget_s": 0.01, "timeout_s": 60,
            "arch": [{"name": "mlp", "params": {"in_features": 4, "width": 8, "depth": 1}, "N": [3], "O": [2]}],
        },
    }


SWEEPS = _builtin_sweeps()


def default_sweep_name() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "quick"


def _absolute_refs(spec: dict, base_dir: Path) -> dict:
    """The spec with relative factory files made absolute (relative to ``base_dir``)."""
    from ..zoo import architectures

    entries = spec.get("arch")
    if not isinstance(entries, list):
        return spec
    fixed = []
    for e in entries:
        if isinstance(e, dict):
            e = dict(e)
            for key in ("factory", "inputs_factory"):
                if isinstance(e.get(key), str) and architectures.is_factory_ref(e[key]):
                    e[key] = architectures.absolute_ref(e[key], base_dir)
        fixed.append(e)
    return {**spec, "arch": fixed}


def load(name_or_path: str) -> dict:
    """A built-in sweep by name, or a sweep file (.toml or .json); factory files relative to the file's folder."""
    if name_or_path == "default":
        name_or_path = default_sweep_name()
    if name_or_path in SWEEPS:
        return SWEEPS[name_or_path]
    path = Path(name_or_path)
    packaged = Path(__file__).parent / f"{name_or_path}.toml"  # the sweep files shipped here (small.toml)
    if path.name == name_or_path and not path.suffix and packaged.is_file():
        path = packaged
    if path.is_dir():
        raise SweepError(f"{name_or_path}: is a directory, not a sweep file (.toml or .json)")
    if not path.exists():
        raise SweepError(f"no sweep named {name_or_path!r} and no such file; built-in sweeps: {', '.join(SWEEPS)}")
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SweepError(f"{path}: not valid {kind}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SweepError(f"{path}: not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise SweepError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: a sweep is a table of keys, got a JSON {type(spec).__name__}")
    spec.setdefault("name", path.stem)
    return _absolute_refs(spec, path.resolve().parent)


def all_impls() -> list[str]:
    """Every plugin a sweep can name: ours (the compiled variants included), then the peers."""
    from ntk_bench import implementations

    return implementations.names("ours", compiled=True) + implementations.names("peer")


def kind_of(impl: str) -> str:
    """"ours" or "peer" (the registry's kind)."""
    from ntk_bench import implementations

    return implementations.kind_of(impl)


def _order(impl: str) -> int:
    """Ours first, then auto (timed against the fastest of them), then the peers."""
    return 2 if kind_of(impl) == "peer" else 1 if impl == "auto" else 0


def expand(spec: dict, impls_override: list[str] | None = None, base_dir: str | Path | None = None) -> list[Case]:
    """Every case of a sweep, every value validated first; an invalid sweep raises SweepError, one line a problem.

    ``impls_override`` replaces every plugin list of the sweep (``--impls``); ``base_dir`` is where relative
    factory files are (the working directory by default; :func:`load` resolves a file's own).
    """
    from ..zoo import architectures

    Sweep, _, _ = _schema()
    from pydantic import ValidationError

    name = spec.get("name", "sweep") if isinstance(spec, dict) else "sweep"
    if not isinstance(spec, dict):
        raise SweepError(f"sweep: expected a table of keys, got {type(spec).__name__}")
    try:
        sweep = Sweep.model_validate(_absolute_refs(spec, Path(base_dir or Path.cwd())))
    except ValidationError as exc:
        raise SweepError(_schema_problems(name, exc)) from None
    problems: list[str] = []
    valid_impls = all_impls()

    def impl_list(values, where) -> list[str]:
        if values == ["all"]:  # (the compiled variants only where named: each first call compiles for seconds)
            return [i for i in valid_impls if not i.endswith("_compiled")]
        for impl in values:
            if impl not in valid_impls:
                problems.append(f"{where}: unknown plugin {impl!r}; valid: {', '.join(valid_impls)}")
        if len(set(values)) != len(values):
            problems.append(f"{where}: a plugin is named twice in {values}")
        return [i for i in values if i in valid_impls]

    where_top = f"sweep {name!r}"
    if impls_override is not None:
        if not impls_override or not all(isinstance(i, str) and i for i in impls_override):
            problems.append(f"{where_top}: --impls: give at least one plugin name")
        top_impls = impl_list(impls_override, f"{where_top}, --impls")
    else:
        top_impls = impl_list(sweep.impls, where_top)
    zoo = architectures.names()
    cases = []
    for i, entry in enumerate(sweep.arch):
        where = f"{where_top}, arch entry {i + 1}"
        params = dict(entry.params)
        source = None
        if entry.factory is not None:
            try:
                make = architectures.load_callable(entry.factory)
                if entry.inputs_factory is not None:
                    architectures.load_callable(entry.inputs_factory)
            except architectures.FactoryError as exc:
                problems.append(f"{where}: {exc}")
                continue
            arch = entry.name or make.__name__
            sig = inspect.signature(make)
            takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
            try:
                sig.bind(**params)
            except TypeError as exc:
                problems.append(f"{where}: params: {exc}; {make.__name__} takes: {', '.join(sig.parameters) or 'none'}")
            if entry.O is not None and "out" not in sig.parameters and not takes_kwargs:
                problems.append(f"{where}: O: {make.__name__} takes no `out` parameter; O comes from the model")
            inputs = entry.inputs
            source = ModelSource(
                entry.factory,
                None if inputs is None else tuple(inputs.shape),
                "float" if inputs is None else inputs.dtype,
                None if inputs is None or inputs.range is None else tuple(inputs.range),
                entry.inputs_factory,
                entry.eval,
            )
        else:
            arch = entry.name
            if arch not in zoo:
                problems.append(f"{where}: unknown architecture {arch!r}; valid: {', '.join(zoo)} "
                                "(or give a factory = \"package.module:function\")")
                continue
            for p in architectures.param_problems(arch, params):
                problems.append(f"{where} ({arch}): params.{p}" if not p.startswith("got ") else f"{where}: {arch}: {p}")
            if entry.O is not None and "out" not in inspect.signature(architectures.factory(arch)).parameters:
                problems.append(f"{where}: {arch} has a fixed O = {architectures.build(arch).num_outputs}; leave O out")
        outs = entry.O or [None]
        sizes = [(n, None) for n in entry.N] + [(n, m) for n, m in entry.NM]
        impls = top_impls if impls_override is not None or entry.impls is None else impl_list(entry.impls, where)
        # auto runs after our other plugins of its problem, so the runner can time it against the fastest of them.
        impls = sorted(impls, key=_order)
        budget_gib = entry.memory_budget_gib if "memory_budget_gib" in entry.model_fields_set else sweep.memory_budget_gib
        budget = None if budget_gib is None else int(budget_gib * 2**30)
        modes = entry.modes or sweep.modes
        for o in outs:
            p = params if o is None else {**params, "out": o}
            for n, m in sizes:
                problem = Problem(arch, tuple(sorted(p.items())), n, m, source)
                for mode in modes:
                    for dtype in sweep.dtypes:
                        for device in sweep.devices:
                            for impl in impls:
                                cases.append(Case(impl, problem, mode, dtype, device,
                                                  time_budget_s=float(sweep.time_budget_s),
                                                  timeout_s=float(sweep.timeout_s), memory_budget_bytes=budget))
    ids = [c.id for c in cases]
    if not problems and len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        problems.append(f"{where_top}: the same case appears twice: {twice[0]}"
                        + (f" (and {len(twice) - 1} more)" if len(twice) > 1 else "")
                        + "; give each factory entry its own name")
    if problems:
        raise SweepError(problems)
    return cases


# -- checks before any work ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A problem's model as built once before the sweep: its size and the cost model's stats."""

    o: int
    p: int
    fp_flops: int | None
    stats: Any = None  # implementations.core.costs.ModelStats, for predictions
    declined: frozenset = frozenset()  # the sweep's plugins whose supports() declines this model


def build_architecture(problem: Problem, dtype=None, device: str = "cpu", seed: int = 0):
    """The problem's Architecture: the zoo's, or the user's factory with its inputs."""
    from ..zoo import architectures

    import torch

    dtype = dtype or torch.float32
    params = dict(problem.arch_params)
    src = problem.source
    if src is None:
        return architectures.build(problem.arch, seed=seed, dtype=dtype, device=device, **params)
    inputs_fn = None if src.inputs_factory is None else architectures.load_callable(src.inputs_factory)
    arch = architectures.build(src.factory, seed=seed, dtype=dtype, device=device, input_spec=src.input_spec(),
                               inputs_fn=inputs_fn, call_eval=src.call_eval, **params)
    return dataclasses.replace(arch, name=problem.arch)


def check_models(cases: list[Case]) -> dict[tuple, ModelInfo]:
    """Build each problem's model once on the CPU (float32) and read its size; SweepError naming every failure.

    This catches what a schema cannot: ``activation = "swish"``, a factory that raises, a model whose output is
    not (N,) or (N, O), inputs the model cannot take.
    """
    from ..zoo import architectures

    import torch

    problems, infos = [], {}
    impls: dict[tuple, set[str]] = {}
    for case in cases:
        impls.setdefault(case.problem.model_key, set()).add(case.impl)
    for case in cases:
        key = case.problem.model_key
        if key in infos or any(key == k for k, _ in problems):
            continue
        p = case.problem
        label = f"{p.arch}({', '.join(f'{k}={v!r}' for k, v in p.arch_params)})"
        try:
            arch = build_architecture(p)
            x = architectures.inputs(arch, 1, dtype=torch.float32)
            stats = None
            try:
                from ntk_bench.implementations.core.costs import model_stats

                stats = model_stats(arch.model, x)
            except Exception:  # the cost model cannot read every model; only predictions need it
                pass
            infos[key] = ModelInfo(arch.num_outputs, arch.num_parameters, getattr(stats, "fp_flops", None), stats,
                                   _declined(arch.model, impls[key]))
        except (architectures.InputsError, architectures.TrainModeError) as exc:  # the inputs or the model's mode
            problems.append((key, f"{label}: {exc}"[:600]))
        except Exception as exc:  # anything the user's factory or the zoo raises: name it, go on checking
            text = str(exc).splitlines()[0] if str(exc) else ""
            problems.append((key, f"{label}: cannot build the model: {type(exc).__name__}: {text}"[:400]))
    if problems:
        raise SweepError([line for _, line in problems])
    return infos


def _declined(model, impls) -> frozenset:
    """The plugins among ``impls`` that decline ``model`` (for predictions only: each case asks again)."""
    from ntk_bench import implementations

    out = set()
    for impl in impls:
        try:
            if impl in implementations.names(None) and implementations.get(impl).supports(model) is not None:
                out.add(impl)
        except Exception:  # a plugin that cannot even say: its case will tell
            continue
    return frozenset(out)


def check_devices(cases: list[Case], cuda_count: int | None = None) -> None:
    """SweepError when a case's device is not on this machine (``cuda`` without CUDA, ``cuda:3`` of 2 GPUs)."""
    wanted = sorted({c.device for c in cases if c.device != "cpu"})
    if not wanted:
        return
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    problems = []
    for device in wanted:
        if cuda_count == 0:
            problems.append(f"device {device!r}: CUDA is not available here (torch.cuda.is_available() is False); "
                            "run the sweep on a GPU machine, or with devices = [\"cpu\"]")
        elif ":" in device and int(device.split(":")[1]) >= cuda_count:
            problems.append(f"device {device!r}: this machine has {cuda_count} CUDA device(s) (cuda:0 to "
                            f"cuda:{cuda_count - 1})")
    if problems:
        raise SweepError(problems)


def fingerprint(cases: list[Case]) -> str:
    """What makes two runs of a sweep comparable: the cases, their timing budgets and model sources (not the
    timeouts: a resumed run may give slow cases longer)."""
    items = sorted(json.dumps({"id": c.id, "time_budget_s": c.time_budget_s,
                               "source": None if c.problem.source is None else dataclasses.asdict(c.problem.source)},
                              sort_keys=True) for c in cases)
    return hashlib.sha1("\n".join(items).encode()).hexdigest()[:12]


def user_files(cases: list[Case]) -> list[Path]:
    """The source files of the sweep's user factories (their contents belong to the run's identity)."""
    from ..zoo import architectures

    refs = sorted({r for c in cases if c.problem.source is not None for r in c.problem.source.refs()})
    files = [architectures.ref_file(r) for r in refs]
    return sorted({f for f in files if f is not None})
