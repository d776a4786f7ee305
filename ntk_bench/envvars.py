"""The package's environment variables: one prefix, ``NTK_BENCH_``, read through :func:`env`.

Four variables were once spelled ``NTKBENCH_…`` (``CUDA_GRAPHS``, ``PEERS_REAL_MODELS``, ``REFERENCE``,
``REQUIRE_REFERENCE``); :func:`env` still reads a variable under that old prefix when the new name is unset, with a
``DeprecationWarning`` naming both, so that scripts and CI jobs written for the old names keep working while they
move. This module imports nothing, so any layer (and the torch-free command line) can use it.
"""

from __future__ import annotations

import os
import warnings
from typing import Mapping

PREFIX = "NTK_BENCH_"
# The prefix before the package settled on one; read, with a warning, when the new name is unset.
OLD_PREFIX = "NTKBENCH_"


def env_name(name: str) -> str:
    """The full name of the package's variable ``name`` (``"THREADS"`` → ``"NTK_BENCH_THREADS"``)."""
    return name if name.startswith(PREFIX) else PREFIX + name


def env(name: str, default: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of ``NTK_BENCH_<name>`` (``name`` with or without the prefix) in ``environ`` (``os.environ``).

    When it is unset and the old spelling ``NTKBENCH_<name>`` is set, that value is returned with a
    ``DeprecationWarning`` naming both; the new name wins when both are set. ``default`` when neither is.
    """
    environ = os.environ if environ is None else environ
    new = env_name(name)
    value = environ.get(new)
    if value is not None:
        return value
    old = OLD_PREFIX + new[len(PREFIX):]
    value = environ.get(old)
    if value is not None:
        warnings.warn(f"the environment variable {old} is deprecated: set {new} instead", DeprecationWarning,
                      stacklevel=2)
        return value
    return default


def positive_int(name: str, environ: Mapping[str, str] | None = None) -> int | None:
    """``NTK_BENCH_<name>`` as a whole number of 1 or more (None when unset); ValueError naming the variable and its
    value otherwise."""
    text = env(name, environ=environ)
    if text is None:
        return None
    try:
        value = int(text.strip(), 10) if text.strip().isascii() else 0
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{env_name(name)}={text!r}: expected a whole number, 1 or more")
    return value
