"""A dataset kernel's blocks' factors kept on disk beside it (``OUT/factors/``), so that a resumed run, a fresh
worker or a later band reads a block's factors back instead of recording them again.

A plugin that records a block's factors once and contracts them against other blocks' (``structured``) pays a
forward and an O-wide backward per sample for them; a worker killed mid-kernel loses the blocks it kept in memory,
and its successor would record them again. Here each block's factors, once recorded, are written to
``factors/{side}-{block}.pt`` (``side``: ``x1`` for X1's blocks, ``x2`` for X2's), atomically (a temporary name
renamed), with a key made of everything the kernel checks on resume (model, inputs, mode, dtype, plugin, code
version, tile edge, oneDNN choice): a file with another key is never read. They are kept in the dtype they were
recorded in (``torch.save`` keeps each tensor's storage, strides and views as they were), so a tile contracted
from read-back factors is the tile contracted from recorded ones, bit for bit.

What is written is bounded by a disk budget (bytes on disk under ``factors/``; 0: nothing is written); a block
whose tiles are all done is deleted (``prune``), and the whole folder once the kernel is complete unless kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..store.safefs import replacing

KEY_ATTRS = ("n", "m", "o", "mode", "dtype", "symmetric", "plugin", "model_fingerprint", "inputs_fingerprint",
             "inputs2_fingerprint", "code_version", "tile", "onednn")


def factors_key(attrs: dict) -> str:
    """The digest of the kernel attributes a block's factors depend on."""
    return hashlib.sha1(json.dumps([attrs.get(k) for k in KEY_ATTRS], default=str).encode()).hexdigest()[:20]


def default_disk_budget(path: str | os.PathLike) -> int:
    """A quarter of the free space of the file system ``path`` is on (its nearest existing folder)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free // 4


class FactorStore:
    """The ``factors/`` folder of the kernel at ``kernel_path``, for factors made under ``key``, within
    ``budget_bytes`` on disk."""

    def __init__(self, kernel_path: str | os.PathLike, key: str, budget_bytes: int, device="cpu"):
        """The store of the kernel at ``kernel_path``; files are read onto ``device``."""
        self.dir = Path(kernel_path) / "factors"
        self.key, self.budget, self.device = key, int(budget_bytes), device
        self.col_side = "x2"  # the side a band's column blocks come from ("x1" where X2 is X1)

    def _path(self, side: str, block: int) -> Path:
        return self.dir / f"{side}-{block}.pt"

    def used(self) -> int:
        """Bytes under ``factors/`` now (temporary files of writers in flight included)."""
        with contextlib.suppress(FileNotFoundError):
            return sum(e.stat().st_size for e in os.scandir(self.dir) if e.is_file())
        return 0

    def no_room_for(self, nbytes: int) -> bool:
        """Whether a block of ``nbytes`` is kept off the disk by the budget alone (not by the store being off)."""
        return self.budget > 0 and self.used() + nbytes > self.budget

    def load(self, side: str, block: int):
        """The state kept for this block under this key, or None (none kept, another key's, unreadable)."""
        path = self._path(side, block)
        try:
            # (the kernel's own folder, written by ``save`` below: the rules' sides are pickled objects)
            blob = torch.load(path, map_location=self.device, weights_only=False)
        except FileNotFoundError:
            return None
        except Exception:  # a torn or foreign file: record the block again (and make room for its new file)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        if not isinstance(blob, dict) or blob.get("key") != self.key or blob.get("block") != [side, block]:
            return None
        return blob["state"]

    def save(self, side: str, block: int, state: dict, nbytes: int) -> bool:
        """Write this block's state atomically if ``nbytes`` more fit the budget; whether it was written."""
        if self.budget <= 0 or self._path(side, block).exists() or self.used() + nbytes > self.budget:
            return False
        self.dir.mkdir(exist_ok=True)
        with replacing(self._path(side, block), "wb", durable=False) as f:
            # (the legacy format: no per-record checksum, which costs as much CPU as the write itself)
            torch.save({"key": self.key, "block": [side, block], "state": state}, f,
                       _use_new_zipfile_serialization=False)
        return True

    def prune(self, kernel) -> int:
        """Delete the kept blocks whose tiles are all done (no band needs them again); how many were deleted."""
        if not self.dir.is_dir():
            return 0
        rows, cols = kernel.grid
        gone = 0
        for e in os.scandir(self.dir):
            name = e.name
            if name.startswith(".") or not name.endswith(".pt"):
                continue
            side, _, b = name[:-3].partition("-")
            if not b.isdigit():
                continue
            b = int(b)
            if side == "x1":
                needed = [(b, j) for j in range(b if kernel.symmetric else 0, cols)]
                if kernel.symmetric:
                    needed += [(i, b) for i in range(0, b)]
            else:
                needed = [(i, b) for i in range(rows)]
            if all(kernel.done(i, j) for i, j in needed):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)
                    gone += 1
        return gone

    def remove_all(self) -> None:
        """Delete the folder (the kernel is complete)."""
        shutil.rmtree(self.dir, ignore_errors=True)
