"""What a failed call was (its status): out of memory, a plugin declining the model while computing, or an error."""

from __future__ import annotations

import torch

from ntk_bench.implementations import UnsupportedModelError


def status_of(exc: BaseException) -> str:
    """``oom`` for an out-of-memory error (torch's, Python's, an allocator's message), ``unsupported`` for a plugin
    declining the model while computing (what only running shows), else ``error``."""
    if isinstance(exc, UnsupportedModelError):
        return "unsupported"
    text = str(exc)
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text \
            or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "oom"
    return "error"


class CaseUnsupported(Exception):
    """The case's implementation cannot run this model here; the message says why."""


def error_text(exc: BaseException) -> str:
    """``Type: message``, at most 500 characters: a row's ``error``."""
    return f"{type(exc).__name__}: {exc}"[:500]
