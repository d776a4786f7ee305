"""Wrappers that run another module unchanged: ``torch.compile``'s ``OptimizedModule`` (``._orig_mod``) and
``nn.DataParallel`` / ``DistributedDataParallel`` (``.module``). The NTK of a wrapper is the NTK of the module it
wraps (the same function of the same parameters), and plugins read modules and call ``torch.func`` on it, which
the wrappers break (dynamo's tracing under functorch, the stateless API's refusal of DataParallel), so every call
starts from the module inside."""

from __future__ import annotations

import sys

from torch import nn


def _optimized_module_type():
    # An OptimizedModule exists only once torch._dynamo is imported: no import (a second or more) otherwise.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module a torch.compile / DataParallel / DistributedDataParallel wrapper runs (through nested
    wrappers); any other module as it is."""
    optimized = _optimized_module_type()
    while True:
        if optimized is not None and isinstance(model, optimized):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model
