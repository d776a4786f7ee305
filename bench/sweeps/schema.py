"""The schema of a sweep (pydantic models) and its errors, one line per problem found."""

from __future__ import annotations

import functools
from typing import Any


class SweepError(ValueError):
    """An invalid sweep; the message has one line per problem found."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


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
