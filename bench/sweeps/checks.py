"""Checks before any work: every problem's model built once on the CPU, every device present."""

from __future__ import annotations

import dataclasses
from typing import Any

from .cases import Case
from .models import build_architecture
from .schema import SweepError


@dataclasses.dataclass(frozen=True)
class CheckedModel:
    """A problem's model as built once before the sweep: its size and the cost model's stats."""

    o: int
    p: int
    fp_flops: int | None
    stats: Any = None  # implementations.core.costs.CostStats, for predictions
    declined: frozenset = frozenset()  # the sweep's plugins whose supports() declines this model


def check_models(cases: list[Case]) -> dict[tuple, CheckedModel]:
    """Build each problem's model once on the CPU (float32) and read its size; SweepError naming every failure.

    This catches what a schema cannot: ``activation = "swish"``, a factory that raises, a model whose output is
    not (N,) or (N, O), inputs the model cannot take.
    """
    import torch

    from ..zoo import architectures

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
                from ntk_bench.implementations.core.costs import cost_stats

                stats = cost_stats(arch.model, x)
            except Exception:  # the cost model cannot read every model; only predictions need it
                pass
            declined = _declined(arch.model, impls[key])
            if stats is not None:
                _read_while_alive(stats, impls[key] - declined)
            infos[key] = CheckedModel(arch.num_outputs, arch.num_parameters, getattr(stats, "fp_flops", None), stats,
                                   declined)
        except (architectures.InputsError, architectures.TrainModeError) as exc:  # the inputs or the model's mode
            problems.append((key, f"{label}: {exc}"[:600]))
        except Exception as exc:  # anything the user's factory or the zoo raises: name it, go on checking
            text = str(exc).splitlines()[0] if str(exc) else ""
            problems.append((key, f"{label}: cannot build the model: {type(exc).__name__}: {text}"[:400]))
    if problems:
        raise SweepError([line for _, line in problems])
    return infos


def _read_while_alive(stats, impls) -> None:
    """Let the plugins that predictions may ask (``impls``, and auto's usual picks) read the model into ``stats``
    now (``CostStats.view``): the stats outlive the model, which they hold weakly."""
    from ntk_bench import implementations

    names = set(impls) | ({"structured", "explicit_mlp"} if "auto" in impls else set())
    for name in sorted(names):
        try:
            if name in implementations.names(None) and implementations.origin_of(name) == "ours":
                implementations.get(name).estimate(stats, 1, 1, "full", True)
        except Exception:  # a plugin the cost model cannot cost on this model: its predictions say so later
            continue


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
