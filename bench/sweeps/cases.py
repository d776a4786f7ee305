"""The cases a sweep expands into: a :class:`Problem` (the model and inputs), a :class:`Case` (a problem, a
plugin, a mode, a dtype, a device), and a user's :class:`ModelSource`."""

from __future__ import annotations

import dataclasses


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
