"""A run directory: its lock, and results.jsonl read and appended safely (no torch here).

``results.jsonl`` holds segments: a header line ``{"header": {...}}`` (the sweep,
the code, the environment), then one row per finished case. ``--resume`` appends
to the last segment; ``--force`` starts a new one with its own header. The last
row of a case wins.

Rows are strict JSON (NaN and infinities written as null) and appended by the
runner alone, each in one ``write`` followed by ``fsync``; a write that fails
(a full disk) is undone to the last whole line. Unreadable lines (a torn last
line, a line that is not UTF-8 or not a JSON object) are skipped with a warning.

**The lock.** A run directory is used by one runner at a time: the runner
holds a POSIX record lock (``fcntl.lockf``) on ``.ntk-bench.lock`` in it for
its whole run, and writes its host, pid and start time there. A second runner
is refused with that line. Across hosts the lock holds where the shared file
system implements POSIX locks across clients: NFSv4, and NFSv3 with the lock
manager (lockd) running, Lustre mounted with ``-o flock``, GPFS/Spectrum Scale,
CephFS, BeeGFS. It is host-local on NFS mounted with ``nolock`` or
``local_lock=all`` and on Lustre with ``localflock``: there, do not start two
runners on one directory from different hosts. The lock is released by the
kernel when the runner dies, however it dies. The workers never write rows:
they hand them to the runner (local pipes, Ray's object store, submitit's
result files); the references they write are written atomically (a temporary
file, fsync, ``os.replace``).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
import time
from pathlib import Path

from . import safefs
from .row import FORMAT_VERSION, Row, migrate, row_problems, split_unknown
from .safefs import UnsafeFileError, write_atomic  # noqa: F401 - write_atomic: its old home

log = logging.getLogger("ntk_bench.runner")

RESULTS = "results.jsonl"
LOCK = ".ntk-bench.lock"
# The layout of results.jsonl (``FORMAT_VERSION``, from the row schema) is written in every header
# (``format_version``); a header without one is format 1. A file of a later format is refused, never extended or
# reported as if it were this one; rows of an earlier one are migrated as they are read (``row.migrate``).


class RunDirError(RuntimeError):
    """A run directory that cannot be used (locked, read-only, full, another sweep); one clear line."""


# -- strict JSON ---------------------------------------------------------------------

def jsonable(obj):
    """``obj`` with NaN and infinities as None (recursively), tuples as lists: what strict JSON can hold."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return jsonable(obj.item())
    return obj


def dumps(obj) -> str:
    """One line of strict JSON (never a bare NaN token)."""
    return json.dumps(jsonable(obj), allow_nan=False, default=str)


# -- reading ---------------------------------------------------------------------------

def check_format(header: dict, path: str | Path) -> None:
    """RunDirError when ``header`` claims a format of results.jsonl this version cannot read."""
    version = header.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RunDirError(f"{path}: its header's format_version {version!r} is not a format of ntk-bench results")
    if version > FORMAT_VERSION:
        raise RunDirError(f"{path} was written in format {version} of ntk-bench results, by a newer ntk-bench; this "
                          f"one reads formats up to {FORMAT_VERSION}: upgrade ntk-bench, or use another --out")


def entries(path: str | Path):
    """The lines of a results file, one at a time: ``("header", header)``, ``("row", row)`` or
    ``("unreadable", why)``. Rows come migrated from their segment's format to the current one (a header of a later
    format is refused: ``check_format``); they are not validated here (``read_rows`` does, the report counts)."""
    version = 1
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield "unreadable", f"line {i + 1}: not UTF-8"
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                yield "unreadable", f"line {i + 1}: " + ("torn (the runner was killed while writing it)"
                                                         if not raw.endswith(b"\n") else "not JSON")
                continue
            if not isinstance(obj, dict):
                yield "unreadable", f"line {i + 1}: a JSON {type(obj).__name__}, not an object"
            elif "header" in obj:
                if not isinstance(obj["header"], dict):
                    yield "unreadable", f"line {i + 1}: a header that is not an object"
                    continue
                check_format(obj["header"], path)
                version = obj["header"].get("format_version", 1)
                yield "header", obj["header"]
            else:
                yield "row", migrate(obj, version)


def read_segments(path: str | Path, warn: bool = True) -> list[tuple[dict, list[dict]]]:
    """[(header, rows), ...] of a results file, one per segment, rows migrated to the current format; unreadable
    lines skipped (with a warning), and keys the row schema does not declare kept (with a warning naming them).

    RunDirError for a path that is not a file (a directory, a FIFO) or a header of a later format."""
    if not Path(path).is_file():
        raise RunDirError(f"{path} is not a regular file" if Path(path).exists() else f"{path} does not exist")
    segments: list[tuple[dict, list[dict]]] = []
    skipped = []
    unknown: set[str] = set()
    for what, obj in entries(path):
        if what == "header":
            segments.append((obj, []))
        elif what == "row" and "case_id" in obj:
            if not segments:
                segments.append(({}, []))
            segments[-1][1].append(obj)
            unknown.update(split_unknown(obj)[1])
        else:
            skipped.append(obj if what == "unreadable" else "a line that is neither a header nor a row")
    if skipped and warn:
        log.warning("%s: skipped %d unreadable line(s): %s", path, len(skipped), "; ".join(skipped[:5])
                    + ("; ..." if len(skipped) > 5 else ""))
    if unknown and warn:
        log.warning("%s: rows carry keys this version of the row schema does not declare (kept): %s", path,
                    ", ".join(sorted(unknown)))
    return segments


def read_rows(path: str | Path, warn: bool = True) -> list[Row]:
    """Every row of a results file (every segment, file order; the last row of a case wins: ``latest_rows``),
    migrated from its segment's format and validated against :class:`Row`. A row that does not match the schema
    is left out with a warning naming the first problems (the report, which must show every row, counts them)."""
    rows, bad = [], []
    for _, segment in read_segments(path, warn):
        for r in segment:
            problem = row_problems(r)
            if problem is None:
                rows.append(Row.model_validate(split_unknown(r)[0]))
            else:
                bad.append(problem)
    if bad and warn:
        log.warning("%s: left out %d row(s) that do not match the row schema: %s", path, len(bad),
                    "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else ""))
    return rows


def read_results(path: str | Path, warn: bool = True) -> tuple[dict, list[dict]]:
    """(header, rows) of a results file: the last segment's header (with ``segments``, every segment's header,
    when there are several) and every row of every segment, in file order (the last row of a case wins)."""
    segments = read_segments(path, warn)
    if not segments:
        return {}, []
    header = dict(segments[-1][0])
    if len(segments) > 1:
        header["segments"] = [h for h, _ in segments]
    return header, [r for _, rows in segments for r in rows]


def latest_rows(rows):
    """case id -> its last row (dicts or :class:`Row`)."""
    out = {}
    for r in rows:
        out[r.case_id if isinstance(r, Row) else r["case_id"]] = r
    return out


# -- the lock -------------------------------------------------------------------------------

_HELD: dict[Path, "RunLock"] = {}  # POSIX locks are per process: a second lock in this process is refused here


class RunLock:
    """An exclusive lock on a run directory for the life of one runner (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir).resolve() / LOCK
        self.fd: int | None = None

    def _holder(self) -> str:
        try:
            info = json.loads(safefs.read_bytes(self.path, limit=4096) or b"{}")
            return f"pid {info['pid']} on {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def acquire(self) -> "RunLock":
        """Take the lock and write this runner's host, pid and start time into the lock file; RunDirError naming the
        holder when another runner (in this process or another) has it."""
        if self.path in _HELD:
            raise RunDirError(f"{self.path.parent} is in use by another runner in this process: wait for it to "
                              "finish, or use another --out")
        try:
            fd = safefs.open_fd(self.path, os.O_RDWR | os.O_CREAT)
        except UnsafeFileError as exc:
            raise RunDirError(str(exc)) from None
        except OSError as exc:
            raise RunDirError(unwritable(self.path.parent, exc)) from None
        try:
            import fcntl

            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock (documented); the directory is the user's to keep apart
            pass
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise RunDirError(f"{self.path.parent} is in use by another runner ({self._holder()}): wait for it "
                                  "to finish, or use another --out") from None
            raise RunDirError(f"{self.path.parent}: cannot lock {LOCK}: {exc.strerror or exc} (a file system "
                              "without POSIX locks?)") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        except OSError:  # the lock is held; who holds it is only for messages
            pass
        self.fd = fd
        _HELD[self.path] = self
        return self

    def release(self) -> None:
        """Give the lock back (closing the descriptor releases the POSIX lock); nothing when not held."""
        if self.fd is not None:
            _HELD.pop(self.path, None)
            os.close(self.fd)  # closing the descriptor releases the POSIX lock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def unwritable(where: Path, exc: OSError) -> str:
    """One line saying why ``where`` cannot be written."""
    reason = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}.get(exc.errno,
                                                                                              exc.strerror or str(exc))
    return f"cannot write to {where}: {reason}"


# -- appending -------------------------------------------------------------------------------

class ResultsFile:
    """results.jsonl opened for appending by the one runner that holds the lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None
        self.written = 0

    def open(self) -> "ResultsFile":
        """Open results.jsonl for appending (created when missing) and cut a torn last line; RunDirError when the
        file is unsafe or the directory unwritable."""
        try:
            self.fd = safefs.open_fd(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        except UnsafeFileError as exc:
            raise RunDirError(str(exc)) from None
        except OSError as exc:
            raise RunDirError(unwritable(self.path.parent, exc)) from None
        self._repair_tail()
        return self

    def _repair_tail(self) -> None:
        """Cut a torn last line (a runner killed mid-write) so the next row starts on a line of its own."""
        size = os.fstat(self.fd).st_size
        if size == 0:
            return
        start = max(0, size - 65536)
        tail = os.pread(self.fd, size - start, start)  # through the descriptor opened above: never a link
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= 65536 else None)
        try:
            if keep is None:  # a last line over 64 KiB without a newline: end it instead
                os.write(self.fd, b"\n")
            else:
                log.warning("%s: removed a torn last line (%d bytes)", self.path, size - keep)
                os.ftruncate(self.fd, keep)
        except OSError as exc:
            raise RunDirError(unwritable(self.path, exc)) from None

    def append(self, obj: dict) -> None:
        """Write one line and fsync it; on failure the file is cut back to its last whole line."""
        data = (dumps(obj) + "\n").encode("utf-8")
        before = os.fstat(self.fd).st_size
        try:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            os.fsync(self.fd)
        except OSError as exc:
            try:
                os.ftruncate(self.fd, before)
            except OSError:
                pass
            raise RunDirError(f"{unwritable(self.path, exc)} ({self.written} row(s) written by this run; the "
                              "rest can be run with --resume once there is room)") from None
        if "case_id" in obj:
            self.written += 1

    def close(self) -> None:
        """Close the file; nothing when not open."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
