"""Building a problem's model: the zoo's architecture, or a user's factory with its inputs."""

from __future__ import annotations

import dataclasses

from .cases import Problem


def build_architecture(problem: Problem, dtype=None, device: str = "cpu", seed: int = 0):
    """The problem's Architecture: the zoo's, or the user's factory with its inputs."""
    import torch

    from ..zoo import architectures

    dtype = dtype or torch.float32
    params = dict(problem.arch_params)
    src = problem.source
    if src is None:
        return architectures.build(problem.arch, seed=seed, dtype=dtype, device=device, **params)
    inputs_fn = None if src.inputs_factory is None else architectures.load_callable(src.inputs_factory)
    arch = architectures.build(src.factory, seed=seed, dtype=dtype, device=device, input_spec=src.input_spec(),
                               inputs_fn=inputs_fn, call_eval=src.call_eval, **params)
    return dataclasses.replace(arch, name=problem.arch)
