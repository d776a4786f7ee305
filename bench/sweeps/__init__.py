"""Sweeps are data: axes and values, validated in full, expanded into cases.

A sweep is a mapping (a Python dict here, or a TOML/JSON file a user passes):

    name = "mine"
    impls = ["all"]             # selectors, left to right: a name, all, ours, peers, tag:NAME, a pattern (nt_*);
                                # a leading "-" removes: ["ours", "-tag:loop", "tag:neural_tangents"]
    modes = ["full"]
    dtypes = ["float32"]
    devices = ["cpu"]           # "cpu", "cuda", "cuda:K"
    time_budget_s = 0.3         # timing budget per case, after one warm-up call
    timeout_s = 120             # a case running longer (from its worker's ready signal) is recorded as `timeout`

    [[arch]]
    name = "mlp"
    params = { in_features = 64, width = 256 }
    N = [4, 16, 64]             # N = M, x2 = None
    NM = [[32, 8]]              # extra N != M cases
    O = [1, 10]                 # sets the architecture's `out`
    modes = ["full", "trace"]   # optional: overrides the sweep's modes for this entry
    impls = ["structured"]      # optional: overrides the sweep's plugins for this entry
    memory_budget_gib = 8       # optional (also top-level): every case computes blocked under this budget

    [[arch]]                    # your own model
    name = "mynet"              # optional: the factory's function name by default
    factory = "mypackage.models:make_net"      # or "path/to/file.py:make_net" (relative to the sweep file)
    params = { width = 64 }     # keyword arguments of the factory
    inputs = { shape = [3, 32, 32] }           # one sample; dtype "float" (default) or "int64" with a range:
    # inputs = { shape = [16], dtype = "int64", range = [0, 100] }
    # inputs_factory = "mypackage.models:batch"   # instead: f(n, seed) -> tensor
    N = [8]

The factory returns an ``nn.Module`` (or ``(module, input spec)``); O comes from the model (or, when the factory
takes ``out``, from ``O``). Every value is checked before any work (:func:`expand`: a pydantic schema, then the
plugin and architecture names and parameter types), one line per problem; :func:`check_models` then builds
each problem's model once on the CPU, so a value that passes the schema but cannot build (``activation =
"swish"``) is caught before the sweep starts too.

The built-in sweeps are files of this form (``<name>.toml`` in this package's folder), read as a user's file is.

Each (arch entry, O, N/M, mode, dtype, device, impl) is one :class:`Case`; a :class:`Problem` carries what the
worker needs to rebuild the model (the zoo name or the factory reference and its parameters).

The package by job: ``schema`` (the pydantic models and their one-line errors), ``files`` (the built-in sweeps and
a user's file), ``selection`` (``impls`` read from the registry), ``expansion`` (a sweep into its cases),
``cases`` (``Case``, ``Problem``, ``ModelSource``), ``models`` (building a problem's model) and ``checks`` (before
any work). torch, the zoo and the plugin registry, which import it, are imported inside the functions that build
models or read the registry: loading and checking a sweep file's schema, and ``ntk-bench --help``, do without them.
"""

from __future__ import annotations

from ntk_bench.modes import MODES

from .cases import Case, ModelSource, Problem
from .checks import CheckedModel, check_devices, check_models
from .expansion import expand, fingerprint, user_files
from .files import MODEL_IMPLS, SWEEPS, builtin_sweeps, default_sweep_name, load
from .models import build_architecture
from .schema import SweepError
from .selection import all_impls, origin_of, select_plugins

DTYPES = ("float32", "float64")

__all__ = ["DTYPES", "MODES", "MODEL_IMPLS", "SWEEPS", "Case", "CheckedModel", "ModelSource", "Problem", "SweepError",
           "all_impls", "build_architecture", "builtin_sweeps", "check_devices", "check_models", "default_sweep_name",
           "expand", "fingerprint", "load", "origin_of", "select_plugins", "user_files"]
