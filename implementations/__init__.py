"""The NTK plugin registry: ``names()`` lists the plugins, ``get(name)`` returns one.

Two kinds share the registry: ``"ours"`` (this project's algorithms, the ones
``auto`` chooses from) and ``"peer"`` (other libraries' NTK routines run the way
their authors run them: neural-tangents, ASDL, nngeometry, curvlinops,
laplace-torch), so that every row of a sweep, peers included, goes through the
same agreement check.

Built-ins are modules of this package exposing ``plugin``; heavy dependencies
(BackPACK, JAX, the peer libraries) are imported inside the plugins that need
them, so listing and using the rest works where they are missing. Plugins from
outside come through the ``ntk_bench.plugins`` entry point group (each entry
point names a plugin object, or a module exposing ``plugin``) or
``load_module("package.module")``.
"""

from __future__ import annotations

import importlib

from .core import engine as _engine  # noqa: F401 - installs itself in core.base: plugin.compute runs through it
from .core.base import MODES, NTKPlugin, UnsupportedModelError

# name -> module that defines ``plugin``; the order is the order of the tables.
_BUILTIN = {
    "jacobian_contraction": "plugins.jacobian_contraction",
    "ntk_vector_products": "plugins.ntk_vector_products",
    "autograd_loop": "plugins.autograd_loop",
    "explicit_mlp": "plugins.explicit_mlp",
    "backpack_batchgrad": "plugins.backpack_batchgrad",
    "backpack_sqrtggn": "plugins.backpack_sqrtggn",
    "structured": "structured",
    "auto": "plugins.auto",
}
# Peers: other libraries' NTK routines (kind "peer").
_BUILTIN_PEERS: dict[str, str] = {
    **{n: "peers.neural_tangents" for n in
       ("nt_jacobian_contraction", "nt_ntk_vector_products", "nt_structured_derivatives")},
    "asdl": "peers.asdl",
    "nngeometry": "peers.nngeometry",
    "curvlinops": "peers.curvlinops",
    "laplace": "peers.laplace",
}
# Compiled variants of ours (``compiled``): not in ``names()`` unless asked for (their first call compiles for
# seconds; the suite checks them in their own test), never among auto's candidates.
_BUILTIN_COMPILED = {n: "plugins.compiled" for n in
                     ("explicit_mlp_compiled", "jacobian_contraction_compiled", "structured_compiled")}
_registered: dict[str, NTKPlugin] = {}
_entry_points_loaded = False
KINDS = ("ours", "peer")


def _builtin_kind(name: str) -> str:
    return "peer" if name in _BUILTIN_PEERS else "ours"


def _load_entry_points() -> None:
    """Register the plugins other packages declare under the ``ntk_bench.plugins`` entry point group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="ntk_bench.plugins"):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party package must not break the registry: say which one
            raise ImportError(f"the ntk_bench.plugins entry point {ep.name!r} ({ep.value}) failed to load: "
                              f"{type(exc).__name__}: {exc}") from exc
        _register_object(obj, f"entry point {ep.name!r} ({ep.value})")


def _register_object(obj, where: str) -> list[str]:
    """Register a plugin, or a module's ``plugin`` / ``plugins``; return the names registered."""
    plugins = [obj] if isinstance(obj, NTKPlugin) else list(getattr(obj, "plugins", ())) or \
        ([obj.plugin] if isinstance(getattr(obj, "plugin", None), NTKPlugin) else [])
    if not plugins:
        raise TypeError(f"{where}: expected an NTKPlugin, or a module exposing `plugin` or `plugins`")
    for p in plugins:
        if p.name not in _registered or _registered[p.name] is not p:
            register(p)
    return [p.name for p in plugins]


def load_module(module: str) -> list[str]:
    """Import ``module`` (``package.module``) and register its ``plugin`` / ``plugins``; return their names.

    Importing a module that calls :func:`register` itself registers nothing more.
    """
    before = set(_registered)
    mod = importlib.import_module(module)
    added = [n for n in _registered if n not in before]
    if added:
        return added
    return _register_object(mod, f"module {module!r}")


def names(kind: str | None = "ours", tag: str | None = None, compiled: bool = False) -> list[str]:
    """Registered plugin names, built-ins first: ``kind="ours"`` (the default), ``"peer"``, or None for all; with
    ``tag``, only the plugins carrying that tag (``NTKPlugin.tags``); with ``compiled=True`` the compiled variants
    of ours too (``explicit_mlp_compiled``, ...)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}; valid: {', '.join(KINDS)}")
    _load_entry_points()
    every = list(_BUILTIN) + (list(_BUILTIN_COMPILED) if compiled else []) + list(_BUILTIN_PEERS) + \
        [n for n in _registered if n not in _BUILTIN and n not in _BUILTIN_PEERS and n not in _BUILTIN_COMPILED]
    return [n for n in every if (kind is None or kind_of(n) == kind) and (tag is None or tag in tags_of(n))]


def tags_of(name: str) -> frozenset[str]:
    """The plugin's tags (``NTKPlugin.tags``): what family of algorithm it is."""
    return frozenset(getattr(get(name), "tags", ()))


def all_tags() -> list[str]:
    """Every tag some registered plugin carries, sorted."""
    return sorted({t for n in names(None, compiled=True) for t in tags_of(n)})


def kind_of(name: str) -> str:
    if name in _BUILTIN or name in _BUILTIN_PEERS or name in _BUILTIN_COMPILED:
        return _builtin_kind(name)
    return getattr(get(name), "kind", "ours")


def get(name: str) -> NTKPlugin:
    """The plugin called ``name``; an unknown name raises a KeyError listing the valid ones."""
    if name in _registered:
        return _registered[name]
    module = _BUILTIN.get(name) or _BUILTIN_PEERS.get(name) or _BUILTIN_COMPILED.get(name)
    if module is None:
        _load_entry_points()
        if name in _registered:
            return _registered[name]
        raise KeyError(f"unknown NTK plugin {name!r}; valid names: {', '.join(names(None))}")
    mod = importlib.import_module(f".{module}", __name__)
    plugin = getattr(mod, name, None) or mod.plugin  # (a module defining several plugins names each)
    _registered[name] = plugin
    return plugin


def register(plugin: NTKPlugin) -> NTKPlugin:
    """Add a plugin under ``plugin.name`` (it then appears in ``names()`` and in the test suite)."""
    if not isinstance(plugin, NTKPlugin):
        raise TypeError(f"a plugin must be an NTKPlugin, got {type(plugin).__name__}")
    if not plugin.name:
        raise ValueError("a plugin needs a non-empty name")
    if getattr(plugin, "kind", "ours") not in KINDS:
        raise ValueError(f"plugin {plugin.name!r} has kind {plugin.kind!r}; valid: {', '.join(KINDS)}")
    if plugin.name in _BUILTIN or plugin.name in _BUILTIN_PEERS or plugin.name in _BUILTIN_COMPILED \
            or plugin.name in _registered:
        raise ValueError(f"a plugin named {plugin.name!r} is already registered")
    _registered[plugin.name] = plugin
    return plugin


def unregister(name: str) -> None:
    if name in _BUILTIN or name in _BUILTIN_PEERS or name in _BUILTIN_COMPILED:
        raise ValueError(f"{name!r} is a built-in plugin and cannot be unregistered")
    _registered.pop(name, None)


__all__ = ["KINDS", "MODES", "NTKPlugin", "UnsupportedModelError", "all_tags", "get", "kind_of", "load_module",
           "names", "register", "tags_of", "unregister"]
