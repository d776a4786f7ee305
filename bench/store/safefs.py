"""Files of a run directory opened without following links (no torch here).

A run directory may come from someone else (unpacked, or shared on a
cluster): any of its names can be a symbolic link to a file of the user's, a
directory, or a FIFO. Whatever ntk-bench writes there (the lock, results.jsonl,
worker logs, summary.md, results.csv, figures, references) is opened with
``O_NOFOLLOW`` and must be a regular file, or is written to a temporary file and
renamed over the name (a rename replaces a link, never writes through it). A
name that is a link or not a regular file is refused with one line
(:class:`UnsafeFileError`) instead of being followed.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO is opened without waiting for a reader, then refused


class UnsafeFileError(ValueError):
    """A file ntk-bench would write (or read as its own) is a symbolic link or not a regular file; one line."""


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def refusal(path: str | Path, kind: str) -> UnsafeFileError:
    """The one-line error for ``path`` being ``kind`` (``"a symbolic link"``, ``"a directory"``...)."""
    return UnsafeFileError(f"{path} is {kind}, not a regular file: ntk-bench does not follow links or write through "
                           "them in a run directory; remove it, or use another directory")


def check_regular(path: str | Path) -> bool:
    """True when ``path`` is a regular file, False when there is nothing there; UnsafeFileError otherwise (a
    symbolic link, dangling or not, a directory, a FIFO ...)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        raise refusal(path, _kind(mode))
    return True


def check_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory (not a link to one), False when absent; UnsafeFileError otherwise."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(mode):
        kind = _kind(mode) if not stat.S_ISREG(mode) else "a file"
        raise UnsafeFileError(f"{path} is {kind}, not a directory: ntk-bench does not follow links in a run "
                              "directory; remove it, or use another directory")
    return True


def open_fd(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags | O_NOFOLLOW)``, refusing anything but a regular file (UnsafeFileError); other
    failures (permissions, a full disk) are raised as the OSError they are."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | _CLOEXEC | _NONBLOCK, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a link (O_NOFOLLOW), a FIFO without a reader
            try:
                kind = _kind(os.lstat(path).st_mode)
            except OSError:
                kind = "a symbolic link"
            raise refusal(path, kind) from None
        if exc.errno == errno.EISDIR:
            raise refusal(path, "a directory") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refusal(path, _kind(st.st_mode))
        if _NONBLOCK:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_append(path: str | Path):
    """A binary file object appending to ``path`` (created when missing), never through a link."""
    return os.fdopen(open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "ab")


def read_bytes(path: str | Path, offset: int = 0, limit: int | None = None) -> bytes:
    """The bytes of ``path`` from ``offset`` (at most ``limit``), never through a link."""
    fd = open_fd(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        f.seek(offset)
        return f.read() if limit is None else f.read(limit)


def write_file(path: str | Path, data: bytes | str) -> None:
    """Write ``path`` whole: a temporary file beside it, fsync, then ``os.replace``. A symbolic link or anything
    but a regular file at ``path`` is refused (UnsafeFileError); a reader sees the old file or the new one."""
    check_regular(path)
    write_atomic(Path(path), data.encode() if isinstance(data, str) else data)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that a reader (on any host of a shared file system) sees the old file or the whole new one:
    a temporary file of a unique name beside it (created exclusively: never through a link), fsync, ``os.replace``
    (which replaces a link at ``path`` instead of following it), then fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name[:150]}.{socket.gethostname()}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some file systems cannot fsync a directory; the rename is done
        pass


class replacing:  # a context manager used like open(): lower case
    """``with replacing(path, "w") as f: ...``: ``f`` writes a temporary file beside ``path`` (created exclusively,
    never through a link), which replaces ``path`` when the block ends without an error and is removed when it
    does not. Anything but a regular file at ``path`` is refused first (UnsafeFileError). For output too large to
    hold in memory (a large run's results.csv). ``durable=False`` skips the fsync: the file survives a killed
    process (the rename is atomic) but not a crash of the machine, for files that can be made again (a dataset
    kernel's tile records and kept factors) where an fsync of each would cost more than remaking the few lost."""

    def __init__(self, path: str | Path, mode: str = "wb", durable: bool = True):
        self.path, self.mode, self.durable = Path(path), mode, durable

    def __enter__(self):
        check_regular(self.path)
        self.tmp = self.path.with_name(f".{self.path.name[:150]}.{socket.gethostname()}.{os.getpid()}."
                                       f"{time.monotonic_ns()}.tmp")
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644)
        self.file = os.fdopen(fd, self.mode, **({} if "b" in self.mode else {"encoding": "utf-8", "newline": ""}))
        return self.file

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.file.flush()
                if self.durable:
                    os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if exc_type is not None or self.tmp.exists():
                self.tmp.unlink(missing_ok=True)
        return False
