"""The reference store: each problem's float64 reference kernel, computed once per run directory by a job of
its own (``ensure_reference``) and kept under ``run_dir/references`` (written atomically, with its checksum: a damaged
file is recomputed, a failed reference is tried again by the next run); every case of the problem is checked
against it (``load_reference``).

The reference is neural-tangents' structured derivatives in float64 when it is installed and can take the model
(``reference.supports``); otherwise the harness's own float64 CPU result (Jacobian contraction, or the autograd loop
where that declines the model), recorded as such in the row's ``reference`` column with the reason in
``reference_note``. A row is ``ok`` or ``mismatch`` only after that check; without a reference it is
``unchecked``, with the reason.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
from pathlib import Path

import torch

from ntk_bench import implementations, reference

from ..store import safefs
from ..store.rundir import dumps, write_atomic
from ..sweeps import Problem
from ..zoo import architectures
from . import sysinfo
from .failures import status_of
from .problem_build import build_problem

REF_MAX_BLOCK = 64  # the reference covers the leading block of at most 64 x 64 samples ...
REF_MAX_ENTRIES = 4_000_000  # ... and at most this many kernel entries (O = 100: 20 x 20 samples)
HARNESS_REFERENCES = ("jacobian_contraction", "autograd_loop")


def reference_block(problem: Problem, o: int) -> tuple[int, int]:
    a = min(problem.n, REF_MAX_BLOCK, max(1, int(math.sqrt(REF_MAX_ENTRIES / (o * o)))))
    b = a if problem.m is None else min(problem.m, a)
    return a, b


_DIGESTS: dict[tuple, str] = {}


def _source_files(problem: Problem, model) -> list[Path]:
    """The source files the model's behaviour comes from: its factories' and every module class's that is not
    torch's own (the zoo's, the user's, a model library's)."""
    files = set()
    if problem.source is not None:
        files.update(f for f in (architectures.ref_file(r) for r in problem.source.refs()) if f is not None)
    for module in model.modules():
        cls = type(module)
        if cls.__module__.split(".")[0] == "torch":
            continue
        try:
            files.add(Path(inspect.getsourcefile(cls)))
        except (TypeError, OSError):  # a class without a source file: its structure and weights still count
            pass
    return sorted(files, key=lambda f: (f.name, f.read_bytes() if f.is_file() else b""))


def _digest_of(problem: Problem, model, x1, x2) -> str:
    """sha1 of the model's structure (its modules as printed), its weights and buffers, its source files and the
    inputs, as built for the reference (float64, CPU)."""
    digest = hashlib.sha1(problem.id.encode() + b"\0" + str(model).encode())
    for name, t in list(model.state_dict(keep_vars=False).items()) + [("x1", x1), ("x2", x2)]:
        if t is None:
            continue
        t = t.detach().cpu().contiguous()
        digest.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for f in _source_files(problem, model):  # by name and contents: the same code installed elsewhere agrees
        try:
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
        except OSError:
            digest.update(f.name.encode() + b"\0missing")
    return digest.hexdigest()


def model_digest(problem: Problem) -> str:
    """What the problem's reference depends on besides its name (``_digest_of``), once per process and problem;
    a model that cannot be built gets a digest of the error (its reference job records the failure)."""
    key = (problem.model_key, problem.n, problem.m)
    if key not in _DIGESTS:
        try:
            _, model, x1, x2 = build_problem(problem, torch.float64, "cpu")
            _DIGESTS[key] = _digest_of(problem, model, x1, x2)
        except Exception as exc:  # the reference job meets the same failure and records it
            _DIGESTS[key] = hashlib.sha1(f"{problem.id}\0unbuildable: {exc}".encode()).hexdigest()
    return _DIGESTS[key]


def _reference_path(problem: Problem, run_dir: Path) -> Path:
    """references/<key>: the key covers the problem's name and sizes, and the model's structure, weights, source
    files and inputs (``model_digest``): a model whose code or weights changed never meets a stale reference."""
    key = hashlib.sha1(f"{problem.id}\0{model_digest(problem)}".encode()).hexdigest()[:16]
    return Path(run_dir) / "references" / key


def _references_dir(run_dir: Path) -> Path:
    """The run's references/ folder, created when missing; a link or a file there is refused (UnsafeFileError)."""
    folder = Path(run_dir) / "references"
    if not safefs.check_dir(folder):
        folder.mkdir(parents=True, exist_ok=True)
        safefs.check_dir(folder)
    return folder


def _sha1_file(path: Path) -> str | None:
    try:
        return hashlib.sha1(safefs.read_bytes(path)).hexdigest()
    except (OSError, ValueError):
        return None


def read_reference_record(problem: Problem, run_dir: Path) -> dict | None:
    try:
        record = json.loads(safefs.read_bytes(_reference_path(problem, run_dir).with_suffix(".json")))
        return record if isinstance(record, dict) and record.get("model_digest") == model_digest(problem) else None
    except (OSError, ValueError):
        return None


def reference_ok(problem: Problem, run_dir: Path) -> bool:
    """True when the problem's reference is stored, ``ok`` and its kernel file intact (its checksum matches)."""
    record = read_reference_record(problem, run_dir)
    if not record or record.get("status") != "ok" or not record.get("sha1"):
        return False
    return _sha1_file(_reference_path(problem, run_dir).with_suffix(".pt")) == record["sha1"]


def _harness_reference(model, example) -> str | None:
    for name in HARNESS_REFERENCES:
        if implementations.get(name).supports(model) is None:
            return name
    return None


def _nt_reason(model, example) -> str | None:
    """None when neural-tangents can compute this model's reference, else why not."""
    reason = reference.available()
    if reason is None:
        reason = reference.supports(model, example)
    return reason


def ensure_reference(problem: Problem, run_dir: Path) -> dict:
    """Compute (once) the float64 reference kernel of the problem's leading block; return its record.

    A stored record is reused only when it is ``ok`` and its kernel file's checksum matches; a failed or damaged
    one is computed again.
    """
    if reference_ok(problem, run_dir):
        return read_reference_record(problem, run_dir)
    path = _reference_path(problem, run_dir)
    _references_dir(run_dir)
    record = {"problem": problem.id, "model_digest": model_digest(problem)}
    try:
        arch, model, x1, x2 = build_problem(problem, torch.float64, "cpu")
        a, b = reference_block(problem, arch.num_outputs)
        x1b, x2b = x1[:a], (None if x2 is None else x2[:b])
        record["block"] = [a, b]
        note = _nt_reason(model, x1b)
        kernel = None
        if note is None:
            for implementation in ("structured_derivatives", "jacobian_contraction"):
                try:
                    kernel = reference.ntk(model, x1b, x2b, implementation=implementation)
                    record["source"] = f"neural_tangents:{implementation}"
                    if reference.reduced_precision(model, x1b):  # the model casts to float32 inside: its precision
                        record["tolerance"] = reference.tolerance(model, x1b)
                        record["reduced_precision"] = reference.reduced_precision(model, x1b)
                    break
                except Exception as exc:
                    if "RESOURCE_EXHAUSTED" in str(exc):  # XLA out of memory: neural-tangents' next implementation
                        note = f"neural-tangents' {implementation} ran out of memory: {str(exc)[:200]}"
                        continue
                    if "unsupported" not in type(exc).__name__.lower():
                        raise
                    note = f"neural-tangents cannot take the model: {exc}"  # the translation: use the harness
                    break
        if kernel is None:
            name = _harness_reference(model, x1b)
            if name is None:
                raise RuntimeError("no harness reference supports the model (jacobian_contraction, autograd_loop)")

            kernel = implementations.get(name).compute(model, x1b, x2b,
                                                       memory_budget_bytes=sysinfo.cpu_memory_budget())
            record["source"] = f"harness:{name}:float64:cpu"
        record["note"] = note

        buf = io.BytesIO()
        torch.save(kernel.detach().cpu(), buf)
        data = buf.getvalue()
        write_atomic(path.with_suffix(".pt"), data)
        record.update(status="ok", sha1=hashlib.sha1(data).hexdigest())
    except Exception as exc:  # the reference itself failed: recorded (and tried again by the next run)
        record.update(status=status_of(exc), error=f"{type(exc).__name__}: {exc}"[:500])
    write_reference_record(problem, run_dir, record)
    return record


def write_reference_record(problem: Problem, run_dir: Path, record: dict) -> None:
    """Store a reference's record (atomically: a reader on any host sees the old file or the new one)."""
    meta_path = _reference_path(problem, run_dir).with_suffix(".json")
    _references_dir(run_dir)
    write_atomic(meta_path, dumps({**record, "problem": problem.id, "model_digest": model_digest(problem)}).encode())


def load_reference(problem: Problem, run_dir: Path):
    """(record, kernel) of the problem's reference; kernel None (and the record saying why) when unusable."""
    record = read_reference_record(problem, run_dir)
    if record is None:
        return None, None
    if record.get("status") != "ok":
        return record, None
    path = _reference_path(problem, run_dir).with_suffix(".pt")
    try:
        data = safefs.read_bytes(path)  # read once: the bytes checked are the bytes loaded
    except (OSError, ValueError) as exc:
        return {**record, "status": "error", "error": f"reference file unreadable: {exc}"}, None
    if record.get("sha1") and hashlib.sha1(data).hexdigest() != record["sha1"]:
        return {**record, "status": "error", "error": f"reference file {path.name} is damaged (checksum)"}, None
    try:
        # tensors only (an explicit weights_only=True is not overridden by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD): a
        # checksum in a file beside it is no signature, and a pickle from a tampered run directory must never run
        return record, torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # a truncated or unreadable file
        return {**record, "status": "error", "error": f"reference file unreadable: {type(exc).__name__}: {exc}"}, None
