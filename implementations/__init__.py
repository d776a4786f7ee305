"""The NTK plugin registry: ``names()`` lists the plugins, ``get(name)`` returns one.

Plugins are modules of this package exposing ``plugin``; heavy dependencies
(BackPACK, JAX) are imported inside the plugins that need them, so listing and
using the rest works where they are missing.
"""

from __future__ import annotations

import importlib

from .base import MODES, NTKPlugin, UnsupportedModelError

# name -> module that defines ``plugin``; the order is the order of the tables.
_BUILTIN = {
    "jacobian_contraction": "jacobian_contraction",
    "ntk_vector_products": "ntk_vector_products",
    "autograd_loop": "autograd_loop",
    "explicit_mlp": "explicit_mlp",
    "backpack_batchgrad": "backpack_batchgrad",
    "backpack_sqrtggn": "backpack_sqrtggn",
    "structured": "structured",
    "auto": "auto",
}
_registered: dict[str, NTKPlugin] = {}


def names() -> list[str]:
    """Every registered plugin name, built-ins first."""
    return list(_BUILTIN) + [n for n in _registered if n not in _BUILTIN]


def get(name: str) -> NTKPlugin:
    """The plugin called ``name``; an unknown name raises a KeyError listing the valid ones."""
    if name in _registered:
        return _registered[name]
    if name not in _BUILTIN:
        raise KeyError(f"unknown NTK plugin {name!r}; valid names: {', '.join(names())}")
    plugin = importlib.import_module(f".{_BUILTIN[name]}", __name__).plugin
    _registered[name] = plugin
    return plugin


def register(plugin: NTKPlugin) -> NTKPlugin:
    """Add a plugin under ``plugin.name`` (it then appears in ``names()`` and in the test suite)."""
    if not plugin.name:
        raise ValueError("a plugin needs a non-empty name")
    if plugin.name in names():
        raise ValueError(f"a plugin named {plugin.name!r} is already registered")
    _registered[plugin.name] = plugin
    return plugin


def unregister(name: str) -> None:
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in plugin and cannot be unregistered")
    _registered.pop(name, None)


__all__ = ["MODES", "NTKPlugin", "UnsupportedModelError", "get", "names", "register", "unregister"]
