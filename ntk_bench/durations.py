"""A duration as people read it in progress lines and estimates (``4m12s``, ``1h05m``); no imports, so every layer
that prints one can use it."""

from __future__ import annotations


def fmt_duration(s: float | None) -> str:
    """``42s``, ``4m12s`` or ``1h05m``; ``?`` for an unknown duration."""
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
