"""The caller's model, as found: what a call may touch, put back when it ends, failing or not.

Recorded per module: the train/eval flag, the parameter and buffer objects in their slots (torch.func's
``functional_call`` on a module reachable under two names leaves plain tensors where the ``nn.Parameter``s
were), each parameter's ``.grad`` and ``requires_grad``, and the hook dictionaries. A buffer whose contents a
call changed cannot be put back without a copy: the refusal of stateful forwards (``validation``) keeps that
from happening, and a change is reported as an error rather than left behind silently.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from .module_walks import submodules

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    modules = list(dict.fromkeys(submodules(model)))
    flags = [m.training for m in modules]
    params = [(m, dict(m._parameters)) for m in modules]
    buffers = [(m, {k: (b, None if b is None else b._version) for k, b in m._buffers.items()}) for m in modules]
    unique = list({id(p): p for _, ps in params for p in ps.values() if p is not None}.values())
    grads = [(p, p.grad, p.requires_grad) for p in unique]
    hooks = [(m, name, dict(d) if d else None) for m in modules for name in _HOOK_DICTS
             if (d := getattr(m, name, None)) is not None]
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            if m.training != flag:  # (nn.Module's attribute setter is slow; most calls change nothing)
                m.training = flag
        for m, slots in params:
            if len(m._parameters) != len(slots) or any(m._parameters.get(k) is not v for k, v in slots.items()):
                m._parameters.clear()
                m._parameters.update(slots)
                for k in slots:  # a plain attribute left by functional_call would shadow the parameter
                    m.__dict__.pop(k, None)
        for p, grad, requires_grad in grads:
            if p.grad is not grad:
                p.grad = grad
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
        for m, name, found in hooks:
            current = getattr(m, name)
            if (current or None) != found:
                current.clear()
                current.update(found or {})
        changed = []
        for m, slots in buffers:
            for k, (b, version) in slots.items():
                if m._buffers.get(k) is not b:
                    m._buffers[k] = b
                if b is not None and b._version != version:
                    changed.append(f"{type(m).__name__}.{k}")
        if changed:
            raise RuntimeError(f"the call changed the model's buffers {changed} in place and they cannot be put "
                               "back; this is a bug of the plugin or a forward pass with state")


# Modules whose ``sparse=True`` makes their weight's gradient a sparse tensor, which torch.func's transforms and
# the libraries' per-sample gradients cannot reshape or vmap; it changes the gradient's storage, not its values.
_SPARSE_GRADIENT_MODULES = (nn.Embedding, nn.EmbeddingBag)


@contextlib.contextmanager
def dense_gradients(model: nn.Module) -> Iterator[None]:
    """``sparse=False`` on the model's Embedding/EmbeddingBag modules for the duration of a call, put back after: the
    kernel is the same, and every plugin can differentiate a dense gradient."""
    sparse = [m for m in dict.fromkeys(submodules(model)) if isinstance(m, _SPARSE_GRADIENT_MODULES) and m.sparse]
    for m in sparse:
        m.sparse = False
    try:
        yield
    finally:
        for m in sparse:
            m.sparse = True
