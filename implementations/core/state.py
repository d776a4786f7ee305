"""The caller's model, as found: what a call may touch, put back when it ends, failing or not.

Recorded per module: the train/eval flag, the parameter and buffer objects in their slots (torch.func's
``functional_call`` on a module reachable under two names leaves plain tensors where the ``nn.Parameter``s
were), each parameter's ``.grad`` and ``requires_grad``, and the hook dictionaries. A buffer whose contents a
call changed cannot be put back without a copy: the refusal of stateful forwards (``validation``) keeps that
from happening, and a change is reported as an error rather than left behind silently.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Iterator

from torch import nn

from .module_walks import submodules
from .unchanged import same, state

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


# Modules whose ``sparse=True`` makes their weight's gradient a sparse tensor, which torch.func's transforms and
# the libraries' per-sample gradients cannot reshape or vmap; it changes the gradient's storage, not its values.
_SPARSE_GRADIENT_MODULES = (nn.Embedding, nn.EmbeddingBag)


class Snapshot:
    """What ``preserved`` records of a model's structure: the modules, their train/eval flags, the objects in their
    parameter and buffer slots, each parameter's ``requires_grad`` and the hook dictionaries' contents. A call adds
    its own part (``take``: the parameters' ``.grad`` and the buffers' versions), and ``restore`` puts back what a
    call changed. Everything recorded here is part of ``unchanged.state``: a snapshot taken in one state serves
    every later call made in the same state (the engine keeps one per state), so an unchanged model costs a call
    two walks of its state instead of this record and its comparison."""

    # (the model itself is not held: the engine keeps snapshots in a cache weak in the model; it is passed in)
    __slots__ = ("rest", "flags", "params", "buffers", "unique", "hooks", "sparse", "first_trainable")

    def __init__(self, model: nn.Module):
        modules = list(dict.fromkeys(submodules(model)))
        self.rest = modules[1:]
        self.flags = [m.training for m in modules]
        self.params = [dict(m._parameters) for m in modules]
        self.buffers = [(i, k, b) for i, m in enumerate(modules) for k, b in m._buffers.items()]
        unique = list({id(p): p for ps in self.params for p in ps.values() if p is not None}.values())
        self.unique = [(p, p.requires_grad) for p in unique]
        self.hooks = [(i, name, dict(d) if d else None) for i, m in enumerate(modules) for name in _HOOK_DICTS
                      if (d := getattr(m, name, None)) is not None]
        # Sparse-gradient Embeddings (``dense_gradients``) and the first trainable parameter (what the inputs'
        # device and dtype are checked against), read off the same walk.
        self.sparse = [i for i, m in enumerate(modules) if isinstance(m, _SPARSE_GRADIENT_MODULES) and m.sparse]
        self.first_trainable = next((p for m in modules for p in m._parameters.values()
                                     if p is not None and p.requires_grad), None)

    def take(self) -> tuple[list, list]:
        """A call's own part: each parameter's ``.grad`` and each buffer's version, as the call starts."""
        return [p.grad for p, _ in self.unique], [None if b is None else b._version for _, _, b in self.buffers]

    def unchanged(self, taken: tuple[list, list]) -> bool:
        """Whether the ``.grad``s and buffer versions are those ``take`` recorded."""
        grads, versions = taken
        return all(map(operator.is_, grads, [p.grad for p, _ in self.unique])) and \
            versions == [None if b is None else b._version for _, _, b in self.buffers]

    def sparse_modules(self, model: nn.Module) -> list[nn.Module]:
        """The sparse-gradient Embeddings of ``model`` (the model the snapshot was taken of)."""
        return [model if i == 0 else self.rest[i - 1] for i in self.sparse]

    def restore(self, model: nn.Module, taken: tuple[list, list]) -> None:
        """Put back what differs from the record on ``model`` (the model the snapshot was taken of); RuntimeError
        naming the buffers changed in place."""
        grads, versions = taken
        modules = [model, *self.rest]
        for m, flag in zip(modules, self.flags):
            if m.training != flag:  # (nn.Module's attribute setter is slow; most calls change nothing)
                m.training = flag
        for m, slots in zip(modules, self.params):
            if len(m._parameters) != len(slots) or any(m._parameters.get(k) is not v for k, v in slots.items()):
                m._parameters.clear()
                m._parameters.update(slots)
                for k in slots:  # a plain attribute left by functional_call would shadow the parameter
                    m.__dict__.pop(k, None)
        for (p, requires_grad), grad in zip(self.unique, grads):
            if p.grad is not grad:
                p.grad = grad
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
        for i, name, found in self.hooks:
            current = getattr(modules[i], name)
            if (current or None) != found:
                current.clear()
                current.update(found or {})
        changed = []
        for (i, k, b), version in zip(self.buffers, versions):
            m = modules[i]
            if m._buffers.get(k) is not b:
                m._buffers[k] = b
            if b is not None and b._version != version:
                changed.append(f"{type(m).__name__}.{k}")
        if changed:
            raise RuntimeError(f"the call changed the model's buffers {changed} in place and they cannot be put "
                               "back; this is a bug of the plugin or a forward pass with state")


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """The model put back as found when the block ends (``Snapshot``), failing or not."""
    snapshot = Snapshot(model)
    taken = snapshot.take()
    try:
        yield
    finally:
        snapshot.restore(model, taken)


class as_found:  # (a class, not a generator: it runs on every call)
    """``preserved`` and ``dense_gradients`` together, for a model whose ``unchanged.state`` as the block starts is
    ``before`` and whose ``snapshot`` was taken in that state: when the block ends the state is walked again and
    compared by identity, and the ``.grad``s and buffer versions with the call's own record; ``snapshot.restore``
    runs only where something differs. Where it wins: every call on an unchanged model (two walks of the state
    instead of a fresh record and a comparison of each slot); what it costs: nothing beyond that."""

    __slots__ = ("model", "snapshot", "before", "taken", "sparse")

    def __init__(self, model: nn.Module, snapshot: Snapshot, before: list):
        self.model, self.snapshot, self.before = model, snapshot, before
        self.sparse = snapshot.sparse_modules(model) if snapshot.sparse else ()

    def __enter__(self) -> None:
        self.taken = self.snapshot.take()
        for m in self.sparse:
            m.sparse = False

    def __exit__(self, *exc) -> None:
        for m in self.sparse:
            m.sparse = True
        if not (same(self.before, state(self.model)) and self.snapshot.unchanged(self.taken)):
            self.snapshot.restore(self.model, self.taken)


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
