"""The correctness suite, shipped in the package, for any plugin (yours included); ``ntk-bench check`` runs it.

For each plugin named (a registered name; ``--plugin package.module`` or ``--plugin path/to/file.py`` loads one;
packages declare theirs under the ``ntk_bench.plugins`` entry point group):

- **kernels**: every problem of the zoo and the real zoo (``bench/measurement/problems.py``: O = 1 and O > 1, N ≠ M and
  x2 = None) the plugin supports, in the three modes (full only for the two largest real models), float64 against
  the float64 reference (≤ 1e-10, relative Frobenius; a model that computes in float32 inside at what its
  reference is good to, ``reference.tolerance``, stated in the case and the summary) and float32 against the same
  float64 reference (≤ 1e-4, TF32 off). The reference is neural-tangents where it is installed and takes the model,
  else the harness's brute-force kernel (``bench/measurement/bruteforce.py``: one ``autograd.grad`` per sample and
  output, independent of every plugin); each case records which. Every call must also return a detached kernel
  of the right shape, dtype and device, and leave the model, its ``.grad``s, hooks, train/eval flags and the
  inputs as it found them.
- **the contract**: every ill-defined model of ``problems.ILL_DEFINED`` (train-mode BatchNorm, Dropout, ...)
  refused with ``IllDefinedKernelError`` naming the module, the model untouched; a train-mode model with
  ``.grad``s and inputs that require grad (and have a ``.grad``) left as found; a call under ``torch.no_grad()``.

A decline (``supports`` returning a reason, or ``UnsupportedModelError``) is a skip, not a failure; a plugin that
declines every problem fails (nothing was checked). ``check_plugin`` runs the cases; ``summary``,
``progress_line`` and ``write_junit`` report them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ntk_bench.implementations.core.contractions import reduce_full
from ntk_bench.implementations.core.tolerances import tolerance

from ..zoo import architectures
from . import bruteforce
from . import problems as zoo
from .problems import Problem, rel_err

DTYPES = {"float64": torch.float64, "float32": torch.float32}
_DEFAULT_TOLERANCES = {name: tolerance(dtype) for name, dtype in DTYPES.items()}
STATUSES = ("passed", "failed", "error", "skipped")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class UsageError(ValueError):
    """A plugin or problem that cannot be checked as named; the message says which and what is valid."""


@dataclasses.dataclass
class CaseResult:
    """One checked case: ``status`` is passed, failed (a wrong kernel or a broken contract), error (an unexpected
    exception) or skipped (the plugin declined; ``message`` says why)."""

    plugin: str
    group: str  # "kernel" or "contract"
    name: str  # "mlp-relu-O3-N4M3 diagonal float64", "refuses train BatchNorm", ...
    status: str
    message: str = ""
    seconds: float = 0.0
    reference: str = ""
    problem: str = ""
    tolerance: float | None = None  # the relative error a kernel case was allowed
    reduced: str = ""  # why that is looser than its dtype's default: the model computes in a lower precision inside


# -- the reference ------------------------------------------------------------------------------------------------

class References:
    """The float64 full kernel of each problem, computed once: neural-tangents' (structured derivatives, on the
    CPU) where ``use_neural_tangents`` and it is installed and takes the model, else the brute-force kernel."""

    def __init__(self, use_neural_tangents: bool = True):
        self.unavailable = None if use_neural_tangents else "--reference harness"
        if use_neural_tangents:
            from ntk_bench import reference

            self.unavailable = reference.available()
        self._cache: dict[str, tuple[torch.Tensor, str, str, float] | Exception] = {}

    def full(self, problem: Problem) -> tuple[torch.Tensor, str, str]:
        """(kernel, source, note): source ``neural_tangents:structured_derivatives`` or
        ``harness:bruteforce:float64:cpu``, the note saying why neural-tangents was not used ("" when it was)."""
        if problem.id not in self._cache:
            try:
                self._cache[problem.id] = self._compute(problem)
            except Exception as exc:  # raised again for each case of the problem, computed once
                self._cache[problem.id] = exc
        found = self._cache[problem.id]
        if isinstance(found, Exception):
            raise found
        return found[:3]

    def tolerance(self, problem: Problem) -> float:
        """What the problem's float64 reference is good to (``reference.tolerance``): 1e-10, or 100 eps of float32
        for a float64 model that computes in float32 inside, whose kernel is defined only to that precision."""
        self.full(problem)
        return self._cache[problem.id][3]

    def _compute(self, problem: Problem) -> tuple[torch.Tensor, str, str, float]:
        model = problem.model()
        x1, x2 = problem.inputs()
        note = self.unavailable
        if note is None:
            from ntk_bench import reference

            note = reference.supports(model, x1)
            if note is None:
                try:
                    kernel = reference.ntk(model, x1, x2, mode="full", quick_compile=True)
                    return kernel, "neural_tangents:structured_derivatives", "", reference.tolerance(model, x1)
                except Exception as exc:  # neural-tangents failing on a model: the brute force, saying why
                    note = f"neural-tangents failed: {type(exc).__name__}: {str(exc)[:200]}"
        from ntk_bench.reference import forward_tolerance  # (torch only: no JAX needed)

        return (bruteforce.ntk(model, x1, x2, "full"), "harness:bruteforce:float64:cpu", note,
                forward_tolerance(model, x1))


# -- the model as found ------------------------------------------------------------------------------------------

def _hook_counts(module: nn.Module) -> list[int]:
    return [len(getattr(module, d, None) or {}) for d in _HOOK_DICTS]


class _AsFound:
    """What a call may not change, recorded before it: each module's train flag and hooks, the parameter objects
    in their slots with ``requires_grad``, the values of the state dict, a sentinel ``.grad`` on the first
    parameter (None on the others), and the inputs' values and ``.grad``."""

    def __init__(self, model: nn.Module, inputs: tuple):
        self.model = model
        self.training = [(name, m.training) for name, m in model.named_modules()]
        self.hooks = [(name, _hook_counts(m)) for name, m in model.named_modules()]
        self.slots = [(name, p, p.requires_grad) for name, p in model.named_parameters(remove_duplicate=False)]
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        params = list({id(p): p for _, p, _ in self.slots}.values())
        self.sentinel = None
        if params:
            self.sentinel = torch.full_like(params[0], 7.0)
            params[0].grad = self.sentinel
        self.params = params
        self.inputs = [(x, x.detach().clone(), x.grad, None if x.grad is None else x.grad.clone())
                       for x in inputs if isinstance(x, torch.Tensor)]

    def changes(self) -> list[str]:
        """What the call changed, in words (empty when nothing)."""
        found = []
        model = self.model
        flags, hooks = dict(self.training), dict(self.hooks)
        moved = [n or "the model" for n, m in model.named_modules() if n in flags and m.training != flags[n]]
        if moved:
            found.append(f"train/eval flag changed on {', '.join(moved[:3])}")
        hooked = [n or "the model" for n, m in model.named_modules()
                  if n in hooks and _hook_counts(m) != hooks[n]]
        if hooked:
            found.append(f"hooks added or removed on {', '.join(hooked[:3])}")
        now = list(model.named_parameters(remove_duplicate=False))
        if [(n, id(p)) for n, p in now] != [(n, id(p)) for n, p, _ in self.slots]:
            found.append("parameters replaced or removed (a module's nn.Parameter is no longer in its slot)")
        elif [p.requires_grad for _, p in now] != [r for _, _, r in self.slots]:
            found.append("requires_grad changed")
        state = model.state_dict()
        if state.keys() != self.state.keys():
            found.append("the state dict gained or lost entries")
        else:
            changed = [k for k, v in state.items() if not torch.equal(v.detach(), self.state[k])]
            if changed:
                found.append(f"values changed: {', '.join(changed[:3])}")
        if any(p.grad is not (self.sentinel if i == 0 else None) for i, p in enumerate(self.params)):
            found.append("a parameter's .grad was replaced or created")
        elif self.sentinel is not None and not bool((self.sentinel == 7.0).all()):
            found.append("the call accumulated into a parameter's .grad")
        for k, (x, value, grad, grad_value) in enumerate(self.inputs):
            if x.grad is not grad or (grad is not None and not torch.equal(grad, grad_value)):
                found.append(f"x{k + 1}.grad changed")
            if not torch.equal(x.detach(), value):
                found.append(f"x{k + 1}'s values changed")
        return found


# -- the cases ---------------------------------------------------------------------------------------------------

def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _declines(plugin, model, result) -> bool:
    """Whether ``plugin`` declines ``model`` (the result then says so: skipped, or an error when supports()
    raised instead of answering)."""
    try:
        reason = _declined(plugin, model)
    except Exception as exc:  # supports() must answer, not raise
        result.status, result.message = "error", f"supports() raised {_error(exc)}"
        return True
    if reason is not None:
        result.status, result.message = "skipped", reason
        return True
    return False


def _declined(plugin, model: nn.Module) -> str | None:
    """The plugin's reason to decline the model up front (its ``supports``, or a peer's documented inexactness)."""
    reason = plugin.supports(model)
    if reason is not None:
        return f"declined: {reason}"
    dtype = next(model.parameters()).dtype
    inexact = getattr(plugin, "known_inexact", lambda *a: None)(model, dtype)
    return f"known to be inexact here: {inexact}" if inexact else None


def _kernel_problems(kernel, expected_shape, dtype, device) -> list[str]:
    if not isinstance(kernel, torch.Tensor):
        return [f"returned a {type(kernel).__name__}, not a tensor"]
    found = []
    if tuple(kernel.shape) != tuple(expected_shape):
        found.append(f"shape {tuple(kernel.shape)}, expected {tuple(expected_shape)}")
    if kernel.dtype != dtype:
        found.append(f"dtype {kernel.dtype}, expected {dtype}")
    if kernel.device.type != torch.device(device).type:
        found.append(f"on {kernel.device}, expected {device}")
    if kernel.requires_grad or kernel.grad_fn is not None:
        found.append("the kernel is attached to an autograd graph")
    return found


def check_kernel(plugin, problem: Problem, mode: str, dtype: str, device: str, references: References) -> CaseResult:
    """One kernel case: ``plugin`` on ``problem`` in ``mode`` and ``dtype`` against the float64 reference."""
    from ntk_bench.implementations import UnsupportedModelError

    result = CaseResult(plugin.name, "kernel", f"{problem.id} {mode} {dtype}", "passed", problem=problem.id)
    start = time.perf_counter()
    try:
        torch_dtype = DTYPES[dtype]
        try:
            model = problem.model(dtype=torch_dtype, device=device)
        except ImportError as exc:  # torchvision for the real zoo
            result.status, result.message = "skipped", f"cannot build the model here: {_error(exc)}"
            return result
        x1, x2 = problem.inputs(dtype=torch_dtype, device=device)
        if _declines(plugin, model, result):
            return result
        ref, result.reference, note = references.full(problem)
        ref = reduce_full(ref, mode)
        # A model that computes in float32 inside a float64 model has a kernel defined only to that precision:
        # every method, the reference included, rounds differently there.
        result.tolerance = tol = max(tolerance(torch_dtype), references.tolerance(problem))
        if tol > tolerance(torch_dtype):
            result.reduced = "the model computes in a lower precision inside"
        as_found = _AsFound(model, (x1, x2))
        try:
            kernel = plugin.compute(model, x1, x2, mode=mode)
        except UnsupportedModelError as exc:
            result.status, result.message = "skipped", f"declined at compute time: {exc}"
            return result
        except Exception as exc:  # the contract: a kernel or a decline, never another error
            result.status, result.message = "error", f"raised {_error(exc)}"
            return result
        failures = _kernel_problems(kernel, ref.shape, torch_dtype, device)
        failures += [f"left the model or inputs changed: {c}" for c in as_found.changes()]
        if isinstance(kernel, torch.Tensor) and tuple(kernel.shape) == tuple(ref.shape):
            err = rel_err(kernel, ref)
            why = f" ({result.reduced})" if result.reduced else ""
            if not err <= tol:
                failures.insert(0, f"rel err {err:.2e} > {tol:g}{why} against {result.reference}")
            result.message = f"rel err {err:.2e} (tolerance {tol:g}{why})" + (f" (reference: {note})" if note else "")
        if failures:
            result.status, result.message = "failed", "; ".join(failures)
    except Exception as exc:  # the check itself could not run (the reference failing, say): an error, reported
        result.status, result.message = "error", f"the check failed: {_error(exc)}"
    finally:
        result.seconds = time.perf_counter() - start
    return result


def check_refusal(plugin, case: str) -> CaseResult:
    """One ill-defined model of ``problems.ILL_DEFINED``: refused with IllDefinedKernelError, model untouched."""
    from ntk_bench.implementations.core.validation import IllDefinedKernelError

    make, shape, words = zoo.ILL_DEFINED[case]
    result = CaseResult(plugin.name, "contract", f"refuses {case}", "passed")
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):  # the same model and batch every time; the caller's RNG kept
            torch.manual_seed(0)
            model = make()
            x = zoo.ill_defined_inputs(shape)
        as_found = _AsFound(model, (x,))
        try:
            plugin.compute(model, x)
            failures = [(f"computed a kernel for an ill-defined model ({case}: {words}) instead of raising "
                         "IllDefinedKernelError")]
        except IllDefinedKernelError as exc:
            failures = [] if words in str(exc) else [f"the refusal does not say {words!r}: {exc}"]
        except Exception as exc:
            failures = [f"raised {_error(exc)} instead of IllDefinedKernelError ({words})"]
        failures += [f"left the model or inputs changed: {c}" for c in as_found.changes()]
        if failures:
            result.status, result.message = "failed", "; ".join(failures)
    except Exception as exc:
        result.status, result.message = "error", f"the check failed: {_error(exc)}"
    finally:
        result.seconds = time.perf_counter() - start
    return result


def _train_mode_mlp():
    arch = architectures.build("mlp", in_features=4, width=5, depth=1, out=2, dtype=torch.float64)
    return arch.model.train(), architectures.inputs(arch, 3, dtype=torch.float64)


def check_untouched(plugin, how: str) -> CaseResult:
    """A well-defined model in train mode (Linear/activation only) with ``.grad``s, inputs that require grad and
    have one (``how="grads"``), or a call under ``torch.no_grad()`` (``how="no_grad"``): the right kernel, and
    everything left as found."""
    from ntk_bench.implementations import UnsupportedModelError

    label = {"grads": "leaves a train-mode model, .grads and inputs as found",
             "no_grad": "works under torch.no_grad()"}[how]
    result = CaseResult(plugin.name, "contract", label, "passed", reference="harness:bruteforce:float64:cpu")
    start = time.perf_counter()
    try:
        model, x = _train_mode_mlp()
        expected = bruteforce.ntk(model, x)
        if _declines(plugin, model, result):
            return result
        if how == "grads":
            x = x.clone().requires_grad_(True)
            x.grad = torch.full_like(x, 3.0)
        as_found = _AsFound(model, (x,))
        try:
            with torch.no_grad() if how == "no_grad" else contextlib.nullcontext():
                kernel = plugin.compute(model, x)
        except UnsupportedModelError as exc:
            result.status, result.message = "skipped", f"declined at compute time: {exc}"
            return result
        except Exception as exc:
            result.status, result.message = "error", f"raised {_error(exc)}"
            return result
        failures = [f"left the model or inputs changed: {c}" for c in as_found.changes()]
        failures += _kernel_problems(kernel, expected.shape, torch.float64, "cpu")
        if not failures:
            err = rel_err(kernel, expected)
            if not err <= tolerance(torch.float64):
                failures.append(f"rel err {err:.2e} > {tolerance(torch.float64):g} against the brute-force kernel")
        if failures:
            result.status, result.message = "failed", "; ".join(failures)
    except Exception as exc:
        result.status, result.message = "error", f"the check failed: {_error(exc)}"
    finally:
        result.seconds = time.perf_counter() - start
    return result


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """float32 is checked against float64 with TF32 off (the flags put back afterwards)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def check_plugin(plugin, problems: list[Problem], dtypes=("float64", "float32"), device: str = "cpu",
                 references: References | None = None,
                 progress: Callable[[str, list[CaseResult]], None] | None = None) -> list[CaseResult]:
    """Every case of the check for ``plugin`` (an NTKPlugin): the kernels of ``problems`` in every mode and dtype,
    then the contract. ``progress(title, results)`` is called after each problem and each contract group."""
    from ntk_bench.implementations import MODES

    references = references or References()
    results: list[CaseResult] = []
    with _no_tf32():
        for problem in problems:
            modes = ("full",) if problem.id in zoo.FULL_MODE_ONLY else MODES
            batch = [check_kernel(plugin, problem, mode, dtype, device, references)
                     for mode in modes for dtype in dtypes]
            results += batch
            if progress:
                progress(problem.id, batch)
        if problems and all(r.status == "skipped" for r in results):
            results.append(CaseResult(plugin.name, "kernel", "computes at least one problem", "failed",
                                      "no problem was computed (each one declined, or not buildable here): "
                                      "nothing was checked"))
            if progress:
                progress("computes at least one problem", results[-1:])
        batch = [check_refusal(plugin, case) for case in zoo.ILL_DEFINED]
        results += batch
        if progress:
            progress("contract: ill-defined models refused", batch)
        batch = [check_untouched(plugin, how) for how in ("grads", "no_grad")]
        results += batch
        if progress:
            progress("contract: a train-mode model left as found", batch)
    return results


# -- plugins and problems by name ----------------------------------------------------------------------------------

def load_plugins(specs: list[str]) -> list[str]:
    """Import each ``package.module`` or ``path/to/file.py`` and register its plugins; return their names."""
    from ntk_bench import implementations

    # a plugin module in the working directory imports; without --plugin the directory stays off the path (a
    # numpy.py in a downloaded folder is never imported)
    if specs and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    loaded: list[str] = []
    for spec in specs:
        try:
            if spec.endswith(".py") or os.sep in spec or "/" in spec:
                path = Path(spec).expanduser()
                if not path.is_file():
                    raise UsageError(f"--plugin {spec}: no such file")
                module = architectures._import_file(path)  # under a private module name, as --model files are
                names = implementations.load_module(module.__name__)
            else:
                names = implementations.load_module(spec)
        except UsageError:
            raise
        except Exception as exc:  # the user's module: say which and why, in one line
            raise UsageError(f"--plugin {spec}: {_error(exc)}") from None
        loaded += [n for n in names if n not in loaded]
    return loaded


def _builtin_names() -> set[str]:
    from ntk_bench import implementations

    return set(implementations._BUILTIN) | set(implementations._BUILTIN_PEERS)


def resolve_plugins(names: list[str], loaded: list[str]) -> list:
    """The plugins to check: those named, else those ``--plugin`` loaded, else every plugin registered from
    outside this package (entry points); UsageError for an unknown name or when there is none."""
    from ntk_bench import implementations

    every = implementations.names(None)
    if not names:
        names = loaded or [n for n in every if n not in _builtin_names()]
        if not names:
            raise UsageError("no plugin to check: name one (ntk-bench check NAME), load yours with --plugin "
                             "package.module or --plugin path/to/file.py, or declare it under the ntk_bench.plugins "
                             f"entry point group; registered: {', '.join(every)}")
    unknown = [n for n in names if n not in every]
    if unknown:
        raise UsageError(f"unknown plugin {', '.join(map(repr, unknown))}; registered: {', '.join(every)} "
                         "(load yours with --plugin package.module or --plugin path/to/file.py)")
    return [implementations.get(n) for n in dict.fromkeys(names)]


def select_problems(quick: bool = False, patterns: list[str] | None = None) -> list[Problem]:
    """All problems, the quick subset, or those whose ids match ``patterns`` (ids or shell-style globs)."""
    if quick:
        return [zoo.BY_ID[i] for i in zoo.QUICK]
    if not patterns:
        return list(zoo.ALL_PROBLEMS)
    chosen = []
    for pattern in patterns:
        hits = [p for p in zoo.ALL_PROBLEMS if fnmatch.fnmatchcase(p.id, pattern)]
        if not hits:
            raise UsageError(f"--problems: no problem matches {pattern!r}; problems: "
                             f"{', '.join(p.id for p in zoo.ALL_PROBLEMS)}")
        chosen += [p for p in hits if p not in chosen]
    return chosen


# -- output --------------------------------------------------------------------------------------------------------

def counts(results: list[CaseResult]) -> dict[str, int]:
    return {s: n for s in STATUSES if (n := sum(r.status == s for r in results))}


def _tally(results: list[CaseResult]) -> str:
    return ", ".join(f"{n} {s}" for s, n in counts(results).items()) or "no cases"


def progress_line(title: str, batch: list[CaseResult]) -> str:
    """``  ok    mlp-relu-O3-N4M3          6 passed  0.4 s`` (the first failure, or the reason for a skip)."""
    bad = [r for r in batch if r.status in ("failed", "error")]
    word = "FAIL" if bad else "skip" if all(r.status == "skipped" for r in batch) else "ok"
    line = f"  {word:<5} {title:<46} {_tally(batch):<22} {sum(r.seconds for r in batch):6.2f} s"
    if bad:
        line += f"  {bad[0].name}: {bad[0].message}"
    elif word == "skip":
        line += f"  {batch[0].message[:160]}"
    return line


def summary(results: list[CaseResult], plugin: str) -> list[str]:
    """The plugin's verdict, each failing case, and which reference each problem was checked against."""
    mine = [r for r in results if r.plugin == plugin]
    bad = [r for r in mine if r.status in ("failed", "error")]
    lines = [f"{plugin}: {'FAILED' if bad else 'passed'}: {_tally(mine)} in {sum(r.seconds for r in mine):.1f} s"]
    lines += [f"  {r.status.upper()} {r.name}: {r.message}" for r in bad]
    sources: dict[str, list[str]] = {}
    for r in mine:
        if r.group == "kernel" and r.reference and r.problem and r.problem not in sources.get(r.reference, []):
            sources.setdefault(r.reference, []).append(r.problem)
    for source, ids in sources.items():
        lines.append(f"  reference {source}: {len(ids)} problem(s)")
    loosened: dict[tuple, list[str]] = {}
    for r in mine:
        if r.group == "kernel" and r.reduced and r.problem not in loosened.get((r.tolerance, r.reduced), []):
            loosened.setdefault((r.tolerance, r.reduced), []).append(r.problem)
    for (tol, why), ids in loosened.items():
        lines.append(f"  checked at tolerance {tol:g} ({why}; default "
                     f"{', '.join(f'{d} {t:g}' for d, t in _DEFAULT_TOLERANCES.items())}): {', '.join(ids)}")
    return lines


def write_junit(results: list[CaseResult], path: Path, properties: dict[str, str] | None = None) -> None:
    """JUnit XML: a ``<testsuite>`` per plugin, a ``<testcase>`` per case (``<failure>``, ``<error>``,
    ``<skipped>`` with the message), each case's reference as a property."""
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites", name="ntk-bench check")
    plugins = list(dict.fromkeys(r.plugin for r in results))
    for plugin in plugins:
        mine = [r for r in results if r.plugin == plugin]
        c = counts(mine)
        suite = ET.SubElement(root, "testsuite", name=f"ntk-bench check {plugin}", tests=str(len(mine)),
                              failures=str(c.get("failed", 0)), errors=str(c.get("error", 0)),
                              skipped=str(c.get("skipped", 0)), time=f"{sum(r.seconds for r in mine):.3f}")
        if properties:
            props = ET.SubElement(suite, "properties")
            for k, v in properties.items():
                ET.SubElement(props, "property", name=k, value=str(v))
        for r in mine:
            case = ET.SubElement(suite, "testcase", classname=f"ntk_bench.check.{plugin}.{r.group}", name=r.name,
                                 time=f"{r.seconds:.3f}")
            if r.reference or r.tolerance is not None:
                props = ET.SubElement(case, "properties")
                if r.reference:
                    ET.SubElement(props, "property", name="reference", value=r.reference)
                if r.tolerance is not None:
                    ET.SubElement(props, "property", name="tolerance", value=f"{r.tolerance:g}")
            if r.status == "failed":
                ET.SubElement(case, "failure", message=r.message[:500]).text = r.message
            elif r.status == "error":
                ET.SubElement(case, "error", message=r.message[:500]).text = r.message
            elif r.status == "skipped":
                ET.SubElement(case, "skipped", message=r.message[:500])
    for key in ("tests", "failures", "errors", "skipped"):
        root.set(key, str(sum(int(s.get(key)) for s in root)))
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
