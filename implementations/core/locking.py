"""One call at a time per model: several threads computing the NTK of one model object take turns.

A call changes the model while it runs and puts it back at the end (``torch.func.functional_call`` swaps its
parameters, ``structured`` wraps layers' ``forward``, BackPACK and the peer libraries register hooks, ``auto``
times trials, ``state.preserved`` restores flags and grads): two calls on one model at once would see each
other's substitutions and return wrong kernels. So every call claims the model and all its submodules (a
submodule shared by two models is claimed by a call on either) and a call on a module another thread holds
waits. The claim is re-entrant (a call inside a call of the same thread goes through) and all-or-nothing (a
call claims its whole set at once or waits holding none of it, so two calls cannot each hold half of what the
other needs). Calls on different models run side by side. Nothing is kept once a call ends: modules are keyed
by ``id`` only while a call holds them (and so keeps them alive).
"""

from __future__ import annotations

import threading
from collections.abc import Collection

from torch import nn

from .module_walks import submodules

_LOCK = threading.Lock()  # guards _OWNERS; taken directly on the fast path (a Condition's methods are Python)
_CONDITION = threading.Condition(_LOCK)
_OWNERS: dict[int, int] = {}  # id(module) -> the ident of the thread holding it
_WAITING = [0]  # threads waiting for a claim (none: nobody to wake)


class model_claimed:  # (a class, not a generator: it runs on every call)
    """Hold ``model`` and its submodules for the current thread until the ``with`` block ends (waiting while another
    thread holds any of them). A claim nested in one of the same thread takes only what the outer one does not
    hold, and gives back only that."""

    __slots__ = ("keys", "taken")

    def __init__(self, model: nn.Module):
        self.keys = {id(m) for m in submodules(model)}
        self.taken: Collection[int] = ()

    def __enter__(self) -> None:
        keys, owners = self.keys, _OWNERS
        with _LOCK:
            if owners.keys().isdisjoint(keys):  # (the usual case: nobody holds any of them)
                self.taken = keys
            else:
                me = threading.get_ident()
                while any(owners.get(k, me) != me for k in keys):
                    _WAITING[0] += 1
                    try:
                        _CONDITION.wait()
                    finally:
                        _WAITING[0] -= 1
                self.taken = [k for k in keys if k not in owners]
            owners.update(dict.fromkeys(self.taken, threading.get_ident()))

    def __exit__(self, *exc) -> None:
        with _LOCK:
            for k in self.taken:
                del _OWNERS[k]
            if _WAITING[0]:
                _CONDITION.notify_all()


__all__ = ["model_claimed"]
