"""Whether a model is unchanged since a previous call, so that the checks whose answer depends only on the model's
structure (a plugin's ``supports``, the refusal of scripted and ill-defined modules, the output's form, the
probe of the forward pass) run once, not on every call.

A model's *state* here is every name and value bound in each submodule's ``__dict__`` (flags, hyperparameters,
bound ``forward`` overrides, the ``_parameters`` / ``_buffers`` / ``_modules`` / hook dictionaries' contents) and each
parameter's ``requires_grad``: names and values compared by identity, and held, so that an object freed and replaced by a
new one at the same address cannot look the same. Rebinding any attribute (``m.p = 0.5``, ``m.train()``, a new
parameter, a hook added or removed, a parametrisation, a replaced submodule) is a change. Not seen: a change
inside a plain container attribute (a list or dict a custom module mutates in place) and changes to a module's
class; the checks cached here read neither. Parameter values are not part of the state: no check depends on them.

Besides the verdicts, an entry keeps what a call records of the model's structure to put it back afterwards
(``state.Snapshot``): while the state is the same, so is that record, and a call compares the state after the kernel
with the one before instead of recording and comparing every flag, slot and hook dictionary itself.
"""

from __future__ import annotations

import itertools
import operator
import threading
import weakref

import torch
from torch import nn

from .module_walks import submodules

# Dict-valued module attributes whose contents matter (the rest of a module's dict attributes are bookkeeping).
_CONTAINERS = ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")
_containers = operator.itemgetter(*_CONTAINERS)


def state(model: nn.Module) -> list:
    """The model's state as a flat list of objects (see the module docstring)."""
    out: list = []
    for m in submodules(model):
        d = m.__dict__  # (the modules themselves are in their parents' _modules; the root is the store's key)
        out.extend(d)  # (names too: a value moved to another name is a change)
        out.extend(d.values())
        try:
            containers = _containers(d)
        except KeyError:  # (a module unpickled from an older torch lacks some hook dictionaries)
            containers = [d.get(name) for name in _CONTAINERS]
        for c in containers:
            if c:
                out.extend(c.keys())  # (keys(): a TorchScript module's containers do not iterate)
                out.extend(c.values())
        params = d.get("_parameters")
        if params:
            out.extend([p.requires_grad for p in params.values() if p is not None])
    return out


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


class Entry:
    """One state of a model: the state, the verdicts per key, its generation, and the model's ``state.Snapshot``
    taken in that state (None until a call stores one)."""

    __slots__ = ("state", "verdicts", "generation", "snapshot")

    def __init__(self, now: list, generation: int):
        self.verdicts: dict[tuple, tuple] = {}
        self.state, self.generation, self.snapshot = now, generation, None


class Verdicts:
    """Per model (weakly): results of structural checks, valid while the model's :func:`state` is unchanged."""

    def __init__(self):
        self._store: "weakref.WeakKeyDictionary[nn.Module, Entry]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._generations = itertools.count()

    def lookup(self, model: nn.Module) -> tuple[Entry | None, list]:
        """(the entry of the model's current state or None, that state to pass to ``put``)."""
        now = state(model)
        with self._lock:
            entry = self._store.get(model)
        if entry is not None and same(entry.state, now):
            return entry, now
        return None, now

    def get(self, model: nn.Module, key: tuple):
        """(the cached verdict or None, the model's current state to pass to ``put``)."""
        entry, now = self.lookup(model)
        return (None if entry is None else entry.verdicts.get(key)), now

    def put(self, model: nn.Module, now: list, key: tuple, verdict) -> Entry:
        """Keep ``verdict`` for ``key`` in the entry of state ``now`` (a new generation when the state changed)."""
        with self._lock:
            entry = self._store.get(model)
            if entry is None or not same(entry.state, now):
                entry = Entry(now, next(self._generations))
                self._store[model] = entry
            entry.verdicts[key] = verdict
            return entry

    def generation(self, model: nn.Module) -> int | None:
        """A number that changes whenever the model's state did between two ``put``s (None before the first): a
        cache keyed by it holds entries for one state of the model."""
        entry = self._store.get(model)
        return None if entry is None else entry.generation


def input_key(x1: torch.Tensor, x2: torch.Tensor | None) -> tuple:
    return (tuple(x1.shape[1:]), x1.dtype, x1.device, x1.shape[0] >= 2, x2 is None)


__all__ = ["Entry", "Verdicts", "input_key", "same", "state"]
