"""A problem's model and inputs as every job builds them: the same numbers in every dtype and on every device."""

from __future__ import annotations

import torch

from ..sweeps import Problem, build_architecture
from ..zoo import architectures

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_problem(problem: Problem, dtype: torch.dtype, device: str):
    """The model and the inputs x1, x2 (x2 None when M is x1): the same numbers in every dtype."""
    arch = build_architecture(problem, dtype=dtype, device=device)
    model = arch.model
    x1 = architectures.inputs(arch, problem.n, seed=1, dtype=dtype, device=device)
    x2 = None
    if problem.m is not None:
        x2 = architectures.inputs(arch, problem.m, seed=2, dtype=dtype, device=device)
    return arch, model, x1, x2


def problem_size(problem: Problem) -> dict:
    """O and P of the problem's model (built on the CPU, no kernel computed)."""
    arch = build_architecture(problem)
    return {"O": arch.num_outputs, "P": arch.num_parameters}
