"""Sweeps are data: axes and values, expanded into cases.

A sweep is a mapping (a Python dict here, or a TOML/JSON file a user passes):

    name = "mine"
    impls = ["all"]             # plugin names, "nt_*" peers, or "all" (every plugin + peers)
    modes = ["full"]
    dtypes = ["float32"]
    devices = ["cpu"]
    time_budget_s = 0.3         # timing budget per case, after one warm-up call
    timeout_s = 120             # a case running longer is recorded as `timeout`

    [[arch]]
    name = "mlp"
    params = { in_features = 64, width = 256 }
    N = [4, 16, 64]             # N = M, x2 = None
    NM = [[32, 8]]              # extra N != M cases
    O = [1, 10]                 # sets the architecture's `out`
    modes = ["full", "trace"]   # optional: overrides the sweep's modes for this entry
    impls = ["structured"]      # optional: overrides the sweep's plugins for this entry
    memory_budget_gib = 8       # optional (also top-level): every case computes blocked under this budget

Each (arch entry, O, N/M, mode, dtype, device, impl) is one :class:`Case`.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

from . import architectures

NT_PEERS = ("nt_jacobian_contraction", "nt_ntk_vector_products", "nt_structured_derivatives")
DTYPES = ("float32", "float64")
TOP_KEYS = {"name", "impls", "modes", "dtypes", "devices", "time_budget_s", "timeout_s", "arch", "description",
            "memory_budget_gib"}
ARCH_KEYS = {"name", "params", "N", "NM", "O", "modes", "impls", "memory_budget_gib"}


class SweepError(ValueError):
    """An invalid sweep; the message is one line naming the problem."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """What a kernel is computed for: the model and the inputs (shared by every impl, mode, dtype)."""

    arch: str
    arch_params: tuple  # sorted (key, value) pairs, `out` included where the architecture has it
    n: int
    m: int | None  # None: x2 = None, M = N

    @property
    def M(self) -> int:
        return self.n if self.m is None else self.m

    @property
    def id(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.arch_params)
        return f"{self.arch}({params})/N={self.n}/M={'x1' if self.m is None else self.m}"


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
    # auto cases only: plugins to time auto against in alternating blocks, as well as its own pick. The runner
    # sets it from the case's earlier rows (the ones near the fastest); not part of the case's identity.
    compare_with: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        """Stable key of the case (a key only, never parsed back)."""
        budget = "" if self.memory_budget_bytes is None else f"/budget={self.memory_budget_bytes}B"
        return f"{self.impl}/{self.problem.id}/{self.mode}/{self.dtype}/{self.device}{budget}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        p = d["problem"]
        problem = Problem(p["arch"], tuple(tuple(kv) for kv in p["arch_params"]), p["n"], p["m"])
        return cls(**{**d, "problem": problem, "compare_with": tuple(d.get("compare_with", ()))})


def _builtin_sweeps() -> dict[str, dict]:
    mlp = {"in_features": 64, "width": 256, "depth": 2}
    mlp512 = {"in_features": 784, "width": 512, "depth": 2}
    mlp2048 = {"in_features": 784, "width": 2048, "depth": 2}
    # On the GPU at N >= 128 the per-sample loops (autograd, NTK-VP) and BackPACK took tens of seconds per call
    # (NTK-VP before its per-sample-vjp form; not re-measured on a GPU since).
    fast = ["jacobian_contraction", "structured", "explicit_mlp", "auto", *NT_PEERS]
    # Jacobian contraction too at MLP N=512 with O=100 (2·N²·O²·P = 3.5e15 FLOP) or width 2048 (3e14 FLOP, blocked).
    fastest = fast[1:]
    # Every plugin but the autograd loop, which takes seconds a case from N=32 on 2 cores; every peer.
    no_loops = ["jacobian_contraction", "ntk_vector_products", "explicit_mlp", "backpack_batchgrad", "backpack_sqrtggn",
                "structured", "auto", *NT_PEERS]
    small_cnn, tiny_resnet = {"channels": 16, "image": 16}, {"channels": 8, "image": 8}
    return {
        "quick": {
            "name": "quick",
            "description": "CPU default: every plugin and zoo architecture, 4 N values, O in {1, 10}, the autograd "
                           "loop up to N=16; about 9 minutes on 2 cores",
            "impls": ["all"], "modes": ["full"], "dtypes": ["float32"], "devices": ["cpu"],
            "time_budget_s": 0.1, "timeout_s": 60,
            "arch": [
                {"name": "mlp", "params": mlp, "N": [4, 8, 16], "O": [1, 10]},
                {"name": "mlp", "params": mlp, "N": [32], "O": [1, 10], "NM": [[32, 8]], "impls": no_loops},
                {"name": "mlp", "params": mlp, "N": [16], "O": [10], "modes": ["trace", "diagonal"]},
                {"name": "mlp", "params": mlp, "N": [32], "O": [10], "modes": ["trace", "diagonal"], "impls": no_loops},
                {"name": "tutorial_cnn", "N": [2, 4, 8]},
                {"name": "tutorial_cnn", "N": [16], "impls": no_loops},
                {"name": "cnn", "params": small_cnn, "N": [4, 8, 16], "O": [1, 10]},
                {"name": "cnn", "params": small_cnn, "N": [32], "O": [1, 10], "impls": no_loops},
                {"name": "resnet_tiny", "params": tiny_resnet, "N": [4, 8, 16], "O": [1, 10]},
                {"name": "resnet_tiny", "params": tiny_resnet, "N": [32], "O": [1, 10], "impls": no_loops},
            ],
        },
        "mlp_cpu": {
            "name": "mlp_cpu",
            "description": "The 670k-parameter MLP 784-512-512-10 at N=M=128 on the CPU (DESIGN.md's CPU case); "
                           "NTK-VP left out: N²·O = 163,840 vjp/jvp pairs of a 670k-parameter net",
            "impls": ["jacobian_contraction", "autograd_loop", "explicit_mlp", "backpack_batchgrad", "backpack_sqrtggn",
                      "structured", "auto", "nt_jacobian_contraction", "nt_structured_derivatives"],
            "modes": ["full"], "dtypes": ["float32"], "devices": ["cpu"],
            "time_budget_s": 1.0, "timeout_s": 300,
            "arch": [{"name": "mlp", "params": {"in_features": 784, "width": 512, "depth": 2}, "N": [128], "O": [10]}],
        },
        "gpu": {
            "name": "gpu",
            "description": "One 80 GB GPU, about 10 minutes on an H100: issue 4's targets first (MLP N=512; O=100 under an 8 GiB "
                           "budget), then the tutorial CNN, MLPs of width 512 and 2048 and a CNN, N up to 512; "
                           "the slow loops only where they finish in seconds",
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


def load(name_or_path: str) -> dict:
    """A built-in sweep by name, or a sweep file (.toml or .json)."""
    if name_or_path == "default":
        name_or_path = default_sweep_name()
    if name_or_path in SWEEPS:
        return SWEEPS[name_or_path]
    path = Path(name_or_path)
    if not path.exists():
        raise SweepError(f"no sweep named {name_or_path!r} and no such file; built-in sweeps: {', '.join(SWEEPS)}")
    try:
        text = path.read_text()
        spec = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SweepError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from None
    spec.setdefault("name", path.stem)
    return spec


def all_impls() -> list[str]:
    from ntk_bench import implementations

    return implementations.names() + list(NT_PEERS)


def expand(spec: dict, impls_override: list[str] | None = None) -> list[Case]:
    """Every case of a sweep, validated; an invalid sweep raises SweepError with one line."""
    from ntk_bench import implementations

    name = spec.get("name", "sweep")
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise SweepError(f"sweep {name!r}: unknown key(s) {sorted(unknown)}; valid: {sorted(TOP_KEYS)}")
    valid_impls = all_impls()

    def impl_list(value, where):
        impls = all_impls() if value == ["all"] else list(value)
        for impl in impls:
            if impl not in valid_impls:
                raise SweepError(f"{where}: unknown plugin {impl!r}; valid: {', '.join(valid_impls)}")
        return impls

    def budget_bytes(value, where):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SweepError(f"{where}: memory_budget_gib must be a positive number of GiB, got {value!r}")
        return int(value * 2**30)

    top_impls = impl_list(impls_override or spec.get("impls", ["all"]), f"sweep {name!r}")
    top_budget = budget_bytes(spec.get("memory_budget_gib"), f"sweep {name!r}")
    for key, valid in (("modes", implementations.MODES), ("dtypes", DTYPES)):
        for v in spec.get(key, []):
            if v not in valid:
                raise SweepError(f"sweep {name!r}: unknown {key[:-1]} {v!r}; valid: {', '.join(valid)}")
    entries = spec.get("arch")
    if not entries:
        raise SweepError(f"sweep {name!r}: no [[arch]] entries")
    cases = []
    for i, entry in enumerate(entries):
        where = f"sweep {name!r}, arch entry {i + 1}"
        if not isinstance(entry, dict) or "name" not in entry:
            raise SweepError(f"{where}: needs a name; valid architectures: {', '.join(architectures.names())}")
        bad = set(entry) - ARCH_KEYS
        if bad:
            raise SweepError(f"{where}: unknown key(s) {sorted(bad)}; valid: {sorted(ARCH_KEYS)}")
        arch = entry["name"]
        if arch not in architectures.names():
            raise SweepError(f"{where}: unknown architecture {arch!r}; valid: {', '.join(architectures.names())}")
        params = dict(entry.get("params", {}))
        try:
            architectures.check_params(arch, params)
        except (TypeError, ValueError) as exc:
            raise SweepError(f"{where}: {exc}") from None
        outs = entry.get("O", [None])
        if arch == "tutorial_cnn" and outs != [None]:
            raise SweepError(f"{where}: tutorial_cnn has a fixed O = 10; leave O out")
        sizes = [(n, None) for n in entry.get("N", [])] + [(n, m) for n, m in entry.get("NM", [])]
        if not sizes:
            raise SweepError(f"{where}: give N and/or NM")
        for n, m in sizes:
            if not isinstance(n, int) or n < 1 or (m is not None and (not isinstance(m, int) or m < 1)):
                raise SweepError(f"{where}: batch sizes must be positive integers, got N={n!r} M={m!r}")
        impls = impl_list(entry["impls"], where) if "impls" in entry and not impls_override else top_impls
        # auto runs after the other plugins of its problem, so the runner can time it against the fastest of them.
        impls = sorted(impls, key=lambda i: 2 if i.startswith("nt_") else 1 if i == "auto" else 0)
        budget = budget_bytes(entry.get("memory_budget_gib"), where) if "memory_budget_gib" in entry else top_budget
        modes = entry.get("modes", spec.get("modes", ["full"]))
        for mode in modes:
            if mode not in implementations.MODES:
                raise SweepError(f"{where}: unknown mode {mode!r}; valid: {', '.join(implementations.MODES)}")
        for o in outs:
            p = params if o is None else {**params, "out": o}
            for n, m in sizes:
                problem = Problem(arch, tuple(sorted(p.items())), n, m)
                for mode in modes:
                    for dtype in spec.get("dtypes", ["float32"]):
                        for device in spec.get("devices", ["cpu"]):
                            for impl in impls:
                                cases.append(Case(
                                    impl, problem, mode, dtype, device,
                                    time_budget_s=float(spec.get("time_budget_s", 0.3)),
                                    timeout_s=float(spec.get("timeout_s", 120)),
                                    memory_budget_bytes=budget,
                                ))
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise SweepError(f"sweep {name!r}: the same case appears twice")
    return cases
