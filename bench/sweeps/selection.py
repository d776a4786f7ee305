"""Which plugins a sweep's ``impls`` selects: names, kinds, tags and patterns read from the registry."""

from __future__ import annotations

import fnmatch


def select_plugins(selectors: list[str]) -> tuple[list[str], list[str]]:
    """(the plugins a sweep's ``impls`` list selects, in the order it adds them; one line per selector that is wrong).

    Each selector adds plugins to the selection, or with a leading ``-`` removes them, applied left to right:
    a registered name; ``all``; ``ours`` or ``peers`` (the registry's origins); ``tag:NAME`` (the plugins carrying
    that tag, ``NTKPlugin.tags``); a shell pattern over the names (``nt_*``). ``["ours", "-tag:loop",
    "tag:neural_tangents"]`` is our plugins but the autograd loop, and neural-tangents' three.
    """
    from ntk_bench import implementations

    every = all_impls()
    # ("all" and "ours" leave the compiled variants out: each first call compiles for seconds; name them)
    origins = {"all": implementations.names("ours") + implementations.names("peer"),
               "ours": implementations.names("ours"), "peers": implementations.names("peer")}
    chosen: dict[str, None] = {}  # ordered: the order the selectors add them (an origin, a tag: the registry's)
    wrong: list[str] = []
    named: list[str] = []
    for selector in selectors:
        remove = selector.startswith("-")
        key = selector[1:] if remove else selector
        if key in origins:
            matched = origins[key]
        elif key.startswith("tag:"):
            tag = key[4:]
            matched = implementations.names(None, tag=tag, compiled=True)
            if not matched:
                wrong.append(f"no plugin carries the tag {tag!r} ({selector!r}); tags: "
                             f"{', '.join(implementations.all_tags()) or 'none'}")
        elif any(c in key for c in "*?["):
            matched = fnmatch.filter(every, key)
            if not matched:
                wrong.append(f"the pattern {selector!r} matches no plugin; valid: {', '.join(every)}")
        elif key in every:
            matched = [key]
            named.append(key)
        else:
            wrong.append(f"unknown plugin {key!r}; valid: {', '.join(every)} (or all, ours, peers, tag:NAME, "
                         "a pattern, each with a leading - to remove)")
            continue
        for name in matched:
            if remove:
                chosen.pop(name, None)
            else:
                chosen.setdefault(name)
    twice = sorted({n for n in named if named.count(n) > 1})
    if twice:
        wrong.append(f"a plugin is named twice in {selectors}: {', '.join(twice)}")
    if not chosen and not wrong:
        wrong.append(f"{selectors} selects no plugin")
    return list(chosen), wrong


def all_impls() -> list[str]:
    """Every plugin a sweep can name: ours (the compiled variants included), then the peers."""
    from ntk_bench import implementations

    return implementations.names("ours", compiled=True) + implementations.names("peer")


def origin_of(impl: str) -> str:
    """"ours" or "peer" (the registry's origin)."""
    from ntk_bench import implementations

    return implementations.origin_of(impl)


def _order(impl: str) -> int:
    """Ours first, then auto (timed against the fastest of them), then the peers."""
    return 2 if origin_of(impl) == "peer" else 1 if impl == "auto" else 0
