"""A sweep expanded into its cases, every value validated first; what makes two runs of a sweep the same."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from pathlib import Path

from .cases import Case, ModelSource, Problem
from .files import _absolute_refs
from .schema import SweepError, _schema, _schema_problems
from .selection import _order, select_plugins


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

    def impl_list(values, where) -> list[str]:
        chosen, wrong = select_plugins(values)
        problems.extend(f"{where}: {w}" for w in wrong)
        return chosen

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
