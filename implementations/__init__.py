"""The NTK plugin registry: ``names()`` lists the plugins, ``get(name)`` returns one.

Two origins share the registry: ``"ours"`` (this project's algorithms, the ones
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

Tags (``NTKPlugin.tags``) select plugins by role instead of by a list of names: ``names(tag="auto")`` are
``auto``'s candidates, ``names(None, tag="neural_tangents")`` neural-tangents' implementations,
``names(None, tag="fast")`` what ``ntk-bench run --model`` runs by default.
"""

from __future__ import annotations

import importlib
import warnings

from .core import engine as _engine  # noqa: F401 - installs itself in core.base: plugin.compute runs through it
from .core.base import MODES, NTKPlugin, UnsupportedModelError

# name -> (module that defines ``plugin``, the roles the project gives it: tags added to the plugin's own
# ``NTKPlugin.tags``); the order is the order of the tables.
# Every list of plugin names elsewhere (auto's candidates, the neural-tangents peers, what ``run --model`` runs by
# default) is read from here, by origin or by tag.
_BUILTIN: dict[str, tuple[str, frozenset[str]]] = {
    "jacobian_contraction": ("plugins.jacobian_contraction", frozenset({"auto", "fast"})),
    "ntk_vector_products": ("plugins.ntk_vector_products", frozenset({"auto", "fast"})),
    "autograd_loop": ("plugins.autograd_loop", frozenset({"auto"})),
    "explicit_mlp": ("plugins.explicit_mlp", frozenset({"auto", "fast"})),
    "backpack_batchgrad": ("plugins.backpack_batchgrad", frozenset({"auto", "fast"})),
    "backpack_sqrtggn": ("plugins.backpack_sqrtggn", frozenset({"auto", "fast"})),
    "structured": ("structured", frozenset({"auto", "fast"})),
    "auto": ("plugins.auto", frozenset({"fast"})),
}
# Peers: other libraries' NTK routines (origin "peer"). Of the PyTorch libraries only laplace-torch stays under
# seconds a call on small CNNs (asdl, nngeometry and curvlinops took seconds on the tutorial CNN at N=8).
_BUILTIN_PEERS: dict[str, tuple[str, frozenset[str]]] = {
    **{n: ("peers.neural_tangents", frozenset({"fast"})) for n in
       ("nt_jacobian_contraction", "nt_ntk_vector_products", "nt_structured_derivatives")},
    "asdl": ("peers.asdl", frozenset()),
    "nngeometry": ("peers.nngeometry", frozenset()),
    "curvlinops": ("peers.curvlinops", frozenset()),
    "laplace": ("peers.laplace", frozenset({"fast"})),
}
# Compiled variants of ours (``compiled``): not in ``names()`` unless asked for (their first call compiles for
# seconds; the suite checks them in their own test), never among auto's candidates.
_BUILTIN_COMPILED: dict[str, tuple[str, frozenset[str]]] = {
    n: ("plugins.compiled", frozenset()) for n in
    ("explicit_mlp_compiled", "jacobian_contraction_compiled", "structured_compiled")}
_registered: dict[str, NTKPlugin] = {}
_entry_points_loaded = False
ORIGINS = ("ours", "peer")
KINDS = ORIGINS  # the name before ``kind`` became ``origin``
_UNSET = object()


def _builtin_origin(name: str) -> str:
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


def names(origin: str | None = "ours", tag: str | None = None, *, compiled: bool = False, kind=_UNSET) -> list[str]:
    """Registered plugin names, built-ins first: ``origin="ours"`` (the default), ``"peer"``, or None for all;
    with ``tag``, only the plugins carrying it (``NTKPlugin.tags``); with ``compiled=True`` the compiled variants
    of ours too (``explicit_mlp_compiled``, ...). (``kind=``: the old name of ``origin``.)"""
    if kind is not _UNSET:
        warnings.warn("names(kind=...) is deprecated: pass origin=...", DeprecationWarning, stacklevel=2)
        origin = kind
    if origin is not None and origin not in ORIGINS:
        raise ValueError(f"unknown plugin origin {origin!r}; valid: {', '.join(ORIGINS)}")
    _load_entry_points()
    every = list(_BUILTIN) + (list(_BUILTIN_COMPILED) if compiled else []) + list(_BUILTIN_PEERS) + \
        [n for n in _registered if n not in _BUILTIN and n not in _BUILTIN_PEERS and n not in _BUILTIN_COMPILED]
    return [n for n in every if (origin is None or origin_of(n) == origin) and (tag is None or tag in tags_of(n))]


def tags_of(name: str) -> frozenset[str]:
    """The plugin's tags (``NTKPlugin.tags``): what family of algorithm it is (its own), and for a built-in the roles
    the registry's table gives it."""
    return frozenset(getattr(get(name), "tags", ()))


def all_tags() -> list[str]:
    """Every tag some registered plugin carries, sorted."""
    return sorted({t for n in names(None, compiled=True) for t in tags_of(n)})


def origin_of(name: str) -> str:
    """``"ours"`` or ``"peer"``: where the plugin called ``name`` comes from (a built-in's without importing it)."""
    if name in _BUILTIN or name in _BUILTIN_PEERS or name in _BUILTIN_COMPILED:
        return _builtin_origin(name)
    return getattr(get(name), "origin", "ours")


def kind_of(name: str) -> str:
    """Deprecated name of :func:`origin_of`."""
    warnings.warn("implementations.kind_of is deprecated: use origin_of", DeprecationWarning, stacklevel=2)
    return origin_of(name)


def get(name: str) -> NTKPlugin:
    """The plugin called ``name``; an unknown name raises a KeyError listing the valid ones."""
    if name in _registered:
        return _registered[name]
    builtin = _BUILTIN.get(name) or _BUILTIN_PEERS.get(name) or _BUILTIN_COMPILED.get(name)
    if builtin is None:
        _load_entry_points()
        if name in _registered:
            return _registered[name]
        raise KeyError(f"unknown NTK plugin {name!r}; valid names: {', '.join(names(None))}")
    module, tags = builtin
    mod = importlib.import_module(f".{module}", __name__)
    plugin = getattr(mod, name, None) or mod.plugin  # (a module defining several plugins names each)
    plugin.tags = frozenset(plugin.tags) | tags  # its own (what it is) and the table's (its roles)
    _registered[name] = plugin
    return plugin


def register(plugin: NTKPlugin) -> NTKPlugin:
    """Add a plugin under ``plugin.name`` (it then appears in ``names()`` and in the test suite)."""
    if not isinstance(plugin, NTKPlugin):
        raise TypeError(f"a plugin must be an NTKPlugin, got {type(plugin).__name__}")
    if not plugin.name:
        raise ValueError("a plugin needs a non-empty name")
    if getattr(plugin, "origin", "ours") not in ORIGINS:
        raise ValueError(f"plugin {plugin.name!r} has origin {plugin.origin!r}; valid: {', '.join(ORIGINS)}")
    if plugin.name in _BUILTIN or plugin.name in _BUILTIN_PEERS or plugin.name in _BUILTIN_COMPILED \
            or plugin.name in _registered:
        raise ValueError(f"a plugin named {plugin.name!r} is already registered")
    _registered[plugin.name] = plugin
    return plugin


def unregister(name: str) -> None:
    if name in _BUILTIN or name in _BUILTIN_PEERS or name in _BUILTIN_COMPILED:
        raise ValueError(f"{name!r} is a built-in plugin and cannot be unregistered")
    _registered.pop(name, None)


__all__ = ["KINDS", "MODES", "ORIGINS", "NTKPlugin", "UnsupportedModelError", "all_tags", "get", "kind_of",
           "load_module", "names", "origin_of", "register", "tags_of", "unregister"]
