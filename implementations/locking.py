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

import contextlib
import threading
from typing import Iterator

from torch import nn

from .modelinfo import submodules

_CONDITION = threading.Condition()
_HOLDERS: dict[int, tuple[int, int]] = {}  # id(module) -> (holding thread's ident, how many claims it holds)


@contextlib.contextmanager
def model_claimed(model: nn.Module) -> Iterator[None]:
    """Hold ``model`` and its submodules for the current thread until the block ends (waiting while another thread
    holds any of them)."""
    keys = {id(m) for m in submodules(model)}
    me = threading.get_ident()
    with _CONDITION:
        while any(_HOLDERS.get(k, (me, 0))[0] != me for k in keys):
            _CONDITION.wait()
        for k in keys:
            _HOLDERS[k] = (me, _HOLDERS.get(k, (me, 0))[1] + 1)
    try:
        yield
    finally:
        with _CONDITION:
            for k in keys:
                owner, count = _HOLDERS[k]
                if count == 1:
                    del _HOLDERS[k]
                else:
                    _HOLDERS[k] = (owner, count - 1)
            _CONDITION.notify_all()


__all__ = ["model_claimed"]
