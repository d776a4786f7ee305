"""Sweep files: the built-in sweeps (the TOML files beside this module) and a user's .toml or .json."""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path

from .schema import SweepError


def builtin_sweeps() -> dict[str, dict]:
    """The built-in sweeps: the TOML files beside this module (``<name>.toml``), by name, read as a user's
    sweep file is read."""
    folder = resources.files(__package__)
    out = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            spec = tomllib.loads(entry.read_text(encoding="utf-8"))
            out[spec.setdefault("name", entry.name.removesuffix(".toml"))] = spec
    return out


SWEEPS = builtin_sweeps()


# What ``--model`` runs by default: the plugins and peers whose calls stay under a second on small models, the
# registry's tag ``fast`` (our plugins but the autograd loop, neural-tangents' three, laplace-torch).
MODEL_IMPLS = ["tag:fast"]


def default_sweep_name() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "quick"


def _absolute_refs(spec: dict, base_dir: Path) -> dict:
    """The spec with relative factory files made absolute (relative to ``base_dir``)."""
    from ..zoo import architectures

    entries = spec.get("arch")
    if not isinstance(entries, list):
        return spec
    fixed = []
    for e in entries:
        if isinstance(e, dict):
            e = dict(e)
            for key in ("factory", "inputs_factory"):
                if isinstance(e.get(key), str) and architectures.is_factory_ref(e[key]):
                    e[key] = architectures.absolute_ref(e[key], base_dir)
        fixed.append(e)
    return {**spec, "arch": fixed}


def load(name_or_path: str) -> dict:
    """A built-in sweep by name, or a sweep file (.toml or .json); factory files relative to the file's folder."""
    if name_or_path == "default":
        name_or_path = default_sweep_name()
    if name_or_path in SWEEPS:
        return SWEEPS[name_or_path]
    path = Path(name_or_path)
    if path.is_dir():
        raise SweepError(f"{name_or_path}: is a directory, not a sweep file (.toml or .json)")
    if not path.exists():
        raise SweepError(f"no sweep named {name_or_path!r} and no such file; built-in sweeps: {', '.join(SWEEPS)}")
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SweepError(f"{path}: not valid {kind}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SweepError(f"{path}: not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise SweepError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: a sweep is a table of keys, got a JSON {type(spec).__name__}")
    spec.setdefault("name", path.stem)
    return _absolute_refs(spec, path.resolve().parent)
