"""torch.func's errors on models its transforms cannot take, turned into declines that name the cause.

Plugins built on ``torch.func`` (vmap, jacrev, jvp, functional_call) meet three kinds of model it refuses with
errors that do not say which part of the model is at fault: an ``autograd.Function`` written the old way (no
``setup_context``), a module wrapped in ``nn.DataParallel`` inside the model, and a forward that takes gradients
itself (``torch.autograd.grad`` or ``requires_grad_`` in the forward, as a PINN does). ``transform_declines``
recognises them and raises :class:`UnsupportedModelError` naming the Function, the module or the forward, which
``auto`` falls back on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .base import UnsupportedModelError

# fragments of torch's messages -> the kind of problem
_OLD_STYLE = "setup_context"
_DATA_PARALLEL = "stateless API can't be used with nn.DataParallel"
_GRAD_IN_FORWARD = ("being transformed by a functorch transform", "_will_engine_execute_node")


def old_style_functions(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The autograd.Function classes without ``setup_context`` that one forward of a sample of ``x`` applies,
    read off the autograd graph of its output (their nodes keep the Function's class)."""
    with torch.enable_grad():
        y = model(x[:1])
    found: dict[str, None] = {}
    seen: set[int] = set()
    stack: list[torch.autograd.graph.Node | None] = []
    if isinstance(y, torch.Tensor) and y.grad_fn is not None:
        stack.append(y.grad_fn)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and getattr(cls, "setup_context", None) is torch.autograd.Function.setup_context:
            found[f"{cls.__module__}.{cls.__qualname__}"] = None
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found)


def _data_parallel_modules(model: nn.Module) -> list[str]:
    return [name or "the model itself" for name, m in model.named_modules()
            if isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel))]


def transform_problem(exc: BaseException, model: nn.Module, x: torch.Tensor) -> str | None:
    """Why torch.func cannot take ``model``, when ``exc`` is one of the errors above (naming the Function or the
    module), else None."""
    text = str(exc)
    if _OLD_STYLE in text:
        try:
            functions = old_style_functions(model, x)
        except (RuntimeError, NotImplementedError, TypeError):  # the forward fails here too: no class named
            functions = []
        which = f"autograd.Function {', '.join(functions)}" if functions else "an autograd.Function of the model"
        return (f"{which} has no setup_context staticmethod (an old-style Function whose forward takes ctx), and "
                f"torch.func's transforms (vmap, jacrev, jvp) need one")
    if _DATA_PARALLEL in text:
        wrapped = _data_parallel_modules(model)
        which = f"{wrapped[0]!r} is" if wrapped else "a submodule is"
        return (f"torch.func.functional_call cannot run nn.DataParallel, and {which} one (pass the module it "
                f"wraps, `.module`)")
    if any(fragment in text for fragment in _GRAD_IN_FORWARD):
        return (f"the forward of {type(model).__name__} takes gradients itself (torch.autograd.grad or "
                f"requires_grad_ inside forward, as a PINN does), which torch.func's transforms cannot "
                f"differentiate through")
    return None


@contextlib.contextmanager
def transform_declines(plugin: str, model: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """Re-raise torch.func's errors on an old-style Function, a DataParallel submodule or a gradient taken in the
    forward as ``UnsupportedModelError("<plugin>: <the cause>")``; other errors pass unchanged."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as exc:
        why = transform_problem(exc, model, x)
        if why is None:
            raise
        raise UnsupportedModelError(f"{plugin}: {why}") from exc
