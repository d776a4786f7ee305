"""The package's version and the folder it is imported from, for the harness, which sits below the package's API
(``ntk_bench/__init__``) and so does not import it."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.2.0"


def package_parent() -> Path:
    """The folder that holds ``ntk_bench`` (a checkout's root, or site-packages): what a child process needs on
    its path to import this same ntk_bench."""
    return Path(__file__).resolve().parent.parent
