"""Auto: pick the implementation for (model, N, M, O, mode, device) from the cost model.

Every other built-in plugin that supports the model gives a cost-model
estimate (FLOPs and peak bytes, from the layer shapes, P and [FP] measured by
FlopCounterMode); the predicted time is ``overhead_s + flops · s_per_flop``
(+ ``traffic · s_per_element + ops · s_per_op`` where a plugin's estimate counts
the numbers its memory-bound operators move and its operator calls, and those
constants are fitted) with constants per plugin and device type fitted to measured runs
(``auto_calibration.json``, written by ``ntkbench calibrate``). A plugin whose
peak does not fit the memory budget is costed as blocked: its tiles' times
add up. The cheapest prediction wins; ``last_choice`` says which and why.
Where the runner-up is predicted within ``TRIAL_WITHIN`` times the pick and the
pick under ``TRIAL_UNDER_S`` (a cost model in FLOPs cannot rank a vmapped
attention layer against a GEMM within a factor 3), the first four calls for a
model and input shapes run the two in turn (a, b, a, b: each one's second call
timed, each call's kernel returned) and the calls after keep the faster, like
cudnn.benchmark spread over calls: the first call costs what the pick costs.
When the pick declines the model at compute time (a structure only running
reveals), the next-cheapest candidate runs, and ``last_choice`` says so; a
declined pick is remembered for that model and input shapes.
Cost: one forward pass on one sample to read the model (reused for a model of the same structure and input
shape: ``stats_by_structure``), then the pick's own.

The constants are package data (``auto_calibration.json``); a file named by the
environment variable ``NTK_BENCH_CALIBRATION`` (written by ``ntk-bench calibrate
RUN --out PATH``) overrides them, plugin by plugin.
"""

from __future__ import annotations

import functools
import json
import math
import types
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import torch

from ntk_bench.envvars import env

from ..core.base import NTKPlugin, UnsupportedModelError
from ..core.costs import cost_stats
from ..core.module_walks import shape_keyed_cache

CALIBRATION_FILE = Path(__file__).with_name("auto_calibration.json")
CALIBRATION_ENV = "NTK_BENCH_CALIBRATION"
# Used for a plugin/device without fitted constants: 1 ms per call, 10 GFLOP/s (CPU) or 5 TFLOP/s (CUDA).
DEFAULT_CONSTANTS = {"cpu": {"overhead_s": 1e-3, "s_per_flop": 1e-10}, "cuda": {"overhead_s": 1e-3, "s_per_flop": 2e-13}}
TRIAL_WITHIN, TRIAL_UNDER_S = 3.0, 0.5
# Auto's candidates are the registry's plugins tagged "auto". When the cost model cannot rank them (its measuring
# forward failed) they are tried in this order, the more specialised first (they decline a model they cannot
# handle at once and are the fastest where they apply); a candidate not named here comes after, in the registry's.
TRY_FIRST = ("explicit_mlp", "structured", "jacobian_contraction", "backpack_sqrtggn", "backpack_batchgrad",
             "ntk_vector_products", "autograd_loop")


class CalibrationError(ValueError):
    """A calibration file that cannot be used: one line naming the file and what is wrong."""


def validate_calibration(table, source: str) -> dict:
    """``table`` checked against the calibration schema: ``{"cpu"|"cuda": {plugin: {"overhead_s": x,
    "s_per_flop": y, ...}}}`` with x and y finite and non-negative; CalibrationError in one line otherwise."""
    from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

    class Constants(BaseModel):
        model_config = ConfigDict(extra="allow")  # ``cases``: how many rows the fit used
        overhead_s: float = Field(ge=0, allow_inf_nan=False)
        s_per_flop: float = Field(ge=0, allow_inf_nan=False)
        s_per_element: float | None = Field(default=None, ge=0, allow_inf_nan=False)
        s_per_op: float | None = Field(default=None, ge=0, allow_inf_nan=False)

    class Table(RootModel):
        root: dict[Literal["cpu", "cuda"], dict[str, Constants]]

    try:
        Table.model_validate(table)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if p != "root") or "the top level"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise CalibrationError(f"{source}: {where}: {err['msg']} (got {err.get('input')!r:.60}){more}; expected "
                               '{"cpu"|"cuda": {plugin: {"overhead_s": s, "s_per_flop": s}}}, non-negative '
                               "and finite") from None
    return table


def read_calibration(path: Path) -> dict:
    """A calibration file, read and validated (CalibrationError naming the file and the problem)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        table = json.loads(text)
    except ValueError as exc:
        raise CalibrationError(f"{path}: not JSON ({exc})") from None
    return validate_calibration(table, str(path))


def load_calibration(path: Path | None = None) -> dict:
    """The packaged constants, overridden plugin by plugin by ``path`` or the file ``$NTK_BENCH_CALIBRATION`` names.

    A file that is missing or fails the schema (``validate_calibration``) is not used: a warning says why in one
    line, and the packaged constants stand."""
    table = json.loads(CALIBRATION_FILE.read_text()) if CALIBRATION_FILE.exists() else {}
    override = path or env(CALIBRATION_ENV)
    if override:
        source = f"{override} (from {CALIBRATION_ENV})" if not path else str(override)
        try:
            if not Path(override).is_file():
                raise CalibrationError(f"{source} does not exist")
            extra = read_calibration(Path(override))
        except CalibrationError as exc:
            warnings.warn(f"auto: calibration file not used, the packaged constants instead: {exc}",
                          CalibrationWarning, stacklevel=2)
            return table
        for device, plugins in extra.items():
            table.setdefault(device, {}).update(plugins)
    return table


class CalibrationWarning(UserWarning):
    """A calibration file that auto could not use (it falls back to the packaged constants)."""


def default_memory_budget(device: torch.device) -> int:
    """80% of the free device memory, the allocator's cache included (CUDA), or half the available RAM (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks PyTorch's caching allocator holds but no tensor uses are free to this process too: counting
        # them out made auto split a kernel that fits into blocks, many times slower, whenever the case before it had
        # left that much memory cached.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(0.8 * (free + cached))
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"] // 2
    except (OSError, KeyError):
        return 8 << 30


# model structure and input shape -> CostStats, most recent last: a fresh instance of an architecture already
# measured (a new model object per call, a copy, the same network rebuilt) skips the cost model's measuring forward.
_STATS_BY_STRUCTURE: OrderedDict[tuple, object] = OrderedDict()
STATS_BY_STRUCTURE_SIZE = 64
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size)


def _plain(value):
    """``value`` as a hashable key part when it is plain data (numbers, strings; tuples, lists and string-keyed
    dicts of them; a class, a module-level function or a partial of one); ``_UNKNOWN`` otherwise."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)):
        parts = tuple(_plain(v) for v in value)
        return _UNKNOWN if any(v is _UNKNOWN for v in parts) else (type(value), parts)
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):  # a config (timm's default_cfg)
        parts = tuple((k, _plain(v)) for k, v in sorted(value.items()))
        return _UNKNOWN if any(v is _UNKNOWN for _, v in parts) else (dict, parts)
    if isinstance(value, type):  # a class (a layer type to build from): the same class, the same code
        return value
    if isinstance(value, functools.partial):
        parts = (_plain(value.func), _plain(value.args), _plain(value.keywords))
        return _UNKNOWN if any(v is _UNKNOWN for v in parts) else (functools.partial, parts)
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        name = getattr(value, "__qualname__", "")
        # a closure or lambda may capture anything: only a named module-level function is the same code everywhere
        return (value.__module__, name) if name and "<" not in name else _UNKNOWN
    return _UNKNOWN


_UNKNOWN = object()


def structure_key(model: torch.nn.Module) -> tuple | None:
    """What the cost model's measuring forward depends on besides the input: every module's class, name, train/eval
    flag and plain settings (stride, eps, a flag: its public attributes of plain data), and its parameters' and
    buffers' shapes, dtypes and ``requires_grad``; None where that does not pin it down (a hook, an attribute
    holding an object or a closure the key cannot compare), so that the model is measured itself."""
    from torch.nn.modules import module as module_mod

    if module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks:
        return None
    parts = []
    stack = [("", model)]
    while stack:
        name, m = stack.pop()
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
            return None
        attrs = []
        for k, v in m.__dict__.items():
            if k.startswith("_"):
                continue
            if isinstance(v, torch.Tensor):  # a plain tensor attribute: its shape matters, not its numbers
                v = ("tensor", tuple(v.shape), v.dtype, v.device)
            else:
                v = _plain(v)
                if v is _UNKNOWN:
                    return None
            attrs.append((k, v))
        tensors = tuple((kind, k, tuple(t.shape), t.dtype, t.device, t.requires_grad)
                        for kind, d in (("p", m._parameters), ("b", m._buffers)) for k, t in d.items() if t is not None)
        parts.append((name, type(m), tuple(attrs), tensors, tuple(m._modules)))
        stack.extend((f"{name}.{k}", c) for k, c in reversed(m._modules.items()) if c is not None)
    return tuple(parts)


def stats_by_structure(model: torch.nn.Module, x_single: torch.Tensor):
    """``cost_stats(model, x_single)``, reused for a model of the same structure (``structure_key``) and input
    shape measured before: the stats are numbers read off the architecture, not the weights. A stale entry can
    only mis-rank the candidates (each still checks the model it runs on), never change a kernel."""
    try:
        skey = structure_key(model)
    except (AttributeError, TypeError, RuntimeError):  # a module the walk cannot read: measure it
        skey = None
    if skey is None:
        return cost_stats(model, x_single)
    key = (skey, tuple(x_single.shape), x_single.dtype, x_single.device)
    try:
        stats = _STATS_BY_STRUCTURE[key]
    except KeyError:
        stats = _STATS_BY_STRUCTURE[key] = cost_stats(model, x_single)
        while len(_STATS_BY_STRUCTURE) > STATS_BY_STRUCTURE_SIZE:
            _STATS_BY_STRUCTURE.popitem(last=False)
    except TypeError:  # an unhashable part after all
        return cost_stats(model, x_single)
    else:
        _STATS_BY_STRUCTURE.move_to_end(key)
    return stats


class Auto(NTKPlugin):
    """The plugin that picks another: the cheapest supporting plugin by the cost model's predicted time, with a timed
    trial of the first calls where the prediction is close (see the module docstring)."""

    name = "auto"

    def __init__(self, calibration: dict | None = None):
        self._calibration = calibration
        self._choices: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._declined: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> shapes -> {name: why}
        self._measured: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> rank key -> (name, note)
        self._trials: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> rank key -> turns left
        self.last_choice: tuple[str, str] | None = None

    @property
    def calibration(self) -> dict:
        """The cost model's constants per device type and plugin: the packaged ones, unless given to the constructor,
        loaded on first use (``load_calibration``)."""
        if self._calibration is None:
            self._calibration = load_calibration()
        return self._calibration

    def supports(self, model):
        """None when at least one other plugin supports ``model``, otherwise why auto cannot pick one."""
        from ntk_bench import implementations

        # one supporting candidate is enough here (the ranking checks them all): stop at the first
        if any(implementations.get(n).supports(model) is None for n in Auto._candidate_names()):
            return None
        return "auto: no plugin supports this model"

    @staticmethod
    def _candidate_names() -> list[str]:
        """The registry's plugins tagged "auto", in ``TRY_FIRST``'s order, then the registry's."""
        from ntk_bench import implementations

        names = implementations.names(tag="auto")
        names.sort(key=lambda n: TRY_FIRST.index(n) if n in TRY_FIRST else len(TRY_FIRST))  # (stable: registry order)
        return names

    @staticmethod
    def _candidates(model):
        from ntk_bench import implementations

        return [implementations.get(n) for n in Auto._candidate_names()
                if implementations.get(n).supports(model) is None]

    def predict(self, plugin, stats, n, m, mode, symmetric, device_type, budget) -> tuple[float, int]:
        """(predicted seconds, tile edge) for ``plugin`` on an N x M kernel under ``budget`` bytes."""
        from ..core.tiling import tile_size

        c = self.calibration.get(device_type, {}).get(plugin.name, DEFAULT_CONSTANTS[device_type])
        b = tile_size(plugin.with_budget(budget), stats, n, m, mode, budget, symmetric)
        def seconds(est):  # (the per-number and per-operator constants: where fitted, else none)
            return (c["overhead_s"] + est.flops * c["s_per_flop"] + est.traffic * c.get("s_per_element", 0.0)
                    + est.ops * c.get("s_per_op", 0.0))

        if b >= max(n, m):
            return seconds(plugin.estimate(stats, n, m, mode, symmetric)), b
        tiles = math.ceil(n / b) * math.ceil(m / b)
        if symmetric:
            tiles = (tiles + math.ceil(n / b)) // 2
        return tiles * seconds(plugin.estimate(stats, min(b, n), min(b, m), mode, False)), b

    def choose(self, model, x1, x2=None, mode="full", memory_budget_bytes=None):
        """(the chosen plugin, why, the budget to compute it under or None, predicted seconds): the cost model's
        pick, or the faster of the two timed over the first calls; a candidate that declined this model at compute
        time is passed over."""
        key = (tuple(x1.shape), None if x2 is None else tuple(x2.shape), x1.dtype, x1.device)
        declined = self._declined.get(model, {}).get(key, {})
        ranked = [r for r in self._ordered(model, x1, x2, mode, memory_budget_bytes) if r[0].name not in declined]
        if not ranked:
            raise UnsupportedModelError("auto: every candidate declined this model")
        return ranked[0]

    @staticmethod
    def _trial_key(model, x1, x2, mode, memory_budget_bytes):
        from ..core.module_walks import _parameter_signature

        return (_parameter_signature(model), *Auto._rank_key(x1, x2, mode, memory_budget_bytes))

    @staticmethod
    def _rank_key(x1, x2, mode, memory_budget_bytes):
        return (tuple(x1.shape), None if x2 is None else tuple(x2.shape), x1.dtype, x1.device, mode,
                memory_budget_bytes)

    def _ordered(self, model, x1, x2, mode, memory_budget_bytes):
        """``rank``, the winner of a timing trial first (its note added to its reason)."""
        ranked = self.rank(model, x1, x2, mode, memory_budget_bytes)
        won = self._measured.get(model, {}).get(self._trial_key(model, x1, x2, mode, memory_budget_bytes))
        if won is None:
            return ranked
        name, note = won
        first = [(p, why + note, b, s) for p, why, b, s in ranked if p.name == name]
        return first + [r for r in ranked if r[0].name != name]

    def _explore(self, model, x1, x2, mode, memory_budget_bytes, declined):
        """While the two cheapest predictions are close and small, run them in turn over the first four calls for a
        model and input shapes (a, b, a, b: each one's first call builds its plan, its second is timed), keep the
        faster for the calls after, and return this call's kernel; None when there is nothing to try (or the plugin
        whose turn it is declined the model). A single call costs what the cost model's pick costs alone."""
        import time

        tkey = self._trial_key(model, x1, x2, mode, memory_budget_bytes)
        trials = self._trials.setdefault(model, {})
        state = trials.get(tkey)
        if state is None:
            live = [r for r in self.rank(model, x1, x2, mode, memory_budget_bytes) if r[0].name not in declined]
            if len(live) < 2 or live[0][3] > TRIAL_UNDER_S or live[1][3] > TRIAL_WITHIN * live[0][3]:
                return None
            state = trials[tkey] = {"turns": [live[0], live[1], live[0], live[1]], "times": {}}
        plugin, why, budget, _ = state["turns"].pop(0)
        timed = len(state["turns"]) < 2  # (each plugin's second call: its plan made)
        try:
            if x1.device.type == "cuda":
                torch.cuda.synchronize(x1.device)
            t0 = time.perf_counter()
            out = plugin.dispatch(model, x1, x2, mode, budget)
            if x1.device.type == "cuda":
                torch.cuda.synchronize(x1.device)
            seconds = time.perf_counter() - t0
        except UnsupportedModelError as exc:
            declined[plugin.name] = str(exc)
            trials.pop(tkey, None)
            return None
        if timed:
            state["times"][plugin.name] = seconds
        note = "; trying the two cheapest predictions in turn over the first four calls"
        if not state["turns"]:
            times = state["times"]
            name = min(times, key=times.get)
            note = "; timed over the first calls: " + ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in times.items())
            self._measured.setdefault(model, {})[tkey] = (name, note)
            trials.pop(tkey, None)
        self.last_choice = (plugin.name, why + note + self._fallback_note(declined))
        return out

    def turns_left(self, model, x1, x2=None, mode="full", memory_budget_bytes=None) -> int:
        """Calls left before auto settles on one plugin for these inputs (it tries two in turn over its first
        calls): a benchmark times auto after that many more calls."""
        state = self._trials.get(model, {}).get(self._trial_key(model, x1, x2, mode, memory_budget_bytes))
        return 0 if state is None else len(state["turns"])

    def rank(self, model, x1, x2=None, mode="full", memory_budget_bytes=None):
        """[(plugin, why, the budget to compute it under or None, predicted seconds)], cheapest first, from the
        cost model.

        Cached per model, input shapes, dtype, device, mode and budget: the weights do not change the order.
        """
        key = self._rank_key(x1, x2, mode, memory_budget_bytes)
        return shape_keyed_cache(self._choices, model, key,
                                 lambda: self._rank(model, x1, x2, mode, memory_budget_bytes))

    def _rank(self, model, x1, x2, mode, memory_budget_bytes):
        try:
            stats = stats_by_structure(model, x1[:1])
        except (RuntimeError, NotImplementedError) as exc:
            return self._unknown_cost(model, memory_budget_bytes, exc)
        n, m = x1.shape[0], (x1 if x2 is None else x2).shape[0]
        device_type = "cuda" if x1.device.type == "cuda" else "cpu"
        budget = memory_budget_bytes or default_memory_budget(x1.device)
        costs = []
        for plugin in self._candidates(model):
            try:
                seconds, tile = self.predict(plugin, stats, n, m, mode, x2 is None, device_type, budget)
            except MemoryError:
                continue
            costs.append((seconds, plugin, tile))
        if not costs:
            raise MemoryError(f"auto: no plugin fits a memory budget of {budget:.3g} bytes")
        costs.sort(key=lambda c: c[0])
        ranked = []
        for i, (seconds, plugin, tile) in enumerate(costs):
            runner_up = f"; next {costs[i + 1][1].name} {costs[i + 1][0]:.3g} s" if i + 1 < len(costs) else ""
            blocked = tile < max(n, m)
            why = (f"{plugin.name}: predicted {seconds:.3g} s{f', blocked in {tile}x{tile} tiles' if blocked else ''}"
                   f"{runner_up} (P={stats.p}, O={stats.o}, [FP]={stats.fp_flops})")
            ranked.append((plugin, why, budget if blocked else memory_budget_bytes, seconds))
        return ranked

    def _unknown_cost(self, model, memory_budget_bytes, exc):
        """The candidates in their default order at an unknown (infinite) cost, when the cost model's measuring
        forward fails (a forward that takes gradients itself cannot run under its counters): the call goes on,
        each candidate computing or declining in turn."""
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        why = f"cost unknown: the cost model's measuring forward failed ({type(exc).__name__}: {first})"
        return [(plugin, f"{plugin.name}: {why}", memory_budget_bytes, math.inf) for plugin in self._candidates(model)]

    @staticmethod
    def _fallback_note(declined) -> str:
        notes = "; ".join(f"{name} declined at compute time: {reason}" for name, reason in declined.items())
        return f" (fallback: {notes})" if notes else ""

    def dispatch(self, model, x1, x2, mode, memory_budget_bytes):
        """Run the cheapest candidate (or, over the first calls, the two cheapest in turn: ``_explore``); when it
        declines the model at compute time, the next one."""
        key = (tuple(x1.shape), None if x2 is None else tuple(x2.shape), x1.dtype, x1.device)
        declined = self._declined.setdefault(model, {}).setdefault(key, {})
        if self._trial_key(model, x1, x2, mode, memory_budget_bytes) not in self._measured.get(model, {}):
            out = self._explore(model, x1, x2, mode, memory_budget_bytes, declined)
            if out is not None:
                return out
        for plugin, why, budget, _ in self._ordered(model, x1, x2, mode, memory_budget_bytes):
            if plugin.name in declined:
                continue
            try:
                out = plugin.dispatch(model, x1, x2, mode, budget)
            except UnsupportedModelError as exc:
                declined[plugin.name] = str(exc)
                continue
            self.last_choice = (plugin.name, why + self._fallback_note(declined))
            return out
        raise UnsupportedModelError("auto: every candidate declined this model: " +
                                    "; ".join(f"{n}: {r}" for n, r in declined.items()))


plugin = Auto()
