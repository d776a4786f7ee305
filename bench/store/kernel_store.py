"""The on-disk kernel of a dataset: a zarr array cut into one chunk per tile, with a record of finished tiles.

Why zarr: each chunk is its own file (or object), so workers on several machines write different tiles at the same
time without a lock or a shared file handle, on local disks, NFS, Lustre or an object store alike; HDF5 needs one
writer (or MPI-IO) and file locking that network file systems often refuse. The array is plain zarr (v3): any
zarr reader opens it; :class:`KernelArray` adds the mirroring of a symmetric kernel and the tile records.

Layout of ``PATH`` (a directory):

- ``zarr.json`` and ``c/``: the zarr array, shape ``kernel_shape(N, M, O, mode)``, chunks ``(tile, tile, ...)``;
  its attributes hold the format, the model's and the inputs' fingerprints, the mode, dtype, plugin, code version,
  the tile edge, whether only the upper triangle is stored (``symmetric``), timings and the verification.
- ``tiles/I-J``: a file per finished tile, made after the tile's chunk is written (atomically: a temporary
  name renamed), so a tile killed mid-write has no record and is computed again on resume. Its content (JSON, or
  empty) is what the writer recorded with it: seconds and CPU seconds since the band's previous tile, the process.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .safefs import replacing

FORMAT = "ntk-bench-kernel"
FORMAT_VERSION = 1
_SWAP = {"full": (1, 0, 3, 2), "trace": (1, 0), "diagonal": (1, 0, 2)}


class KernelFileError(ValueError):
    """A path that is not an ntk-bench kernel, or one made from something else than what is asked now."""


def kernel_shape(n: int, m: int, o: int, mode: str) -> tuple[int, ...]:
    """The stored kernel's shape for N rows, M columns and O outputs in ``mode``: (N, M, O, O), (N, M) or (N, M, O)."""
    return {"full": (n, m, o, o), "trace": (n, m), "diagonal": (n, m, o)}[mode]


def _zarr():
    try:
        import zarr
    except ImportError as exc:  # pragma: no cover - the dependency is declared
        raise ImportError("kernels of datasets need zarr (a dependency of ntk-bench): pip install 'zarr>=3'") from exc
    return zarr


class KernelArray:
    """An N x M kernel on disk, read with numpy indexing (``K[:100, :100]``, ``np.asarray(K)``).

    A symmetric kernel (x2 = None) stores tiles I <= J only; a read of the lower triangle mirrors the upper one
    (Θ(x_j, x_i) is Θ(x_i, x_j) with the outputs swapped). ``missing()`` lists the tiles not yet computed; reading
    one of them gives NaN.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "r"):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise KernelFileError(f"{self.path}: not an ntk-bench kernel (no zarr.json); choose another --out or remove it")
        self._z = _zarr().open_array(str(self.path), mode=mode)
        attrs = self._z.attrs.asdict()
        if attrs.get("format") != FORMAT:
            raise KernelFileError(f"{self.path}: a zarr array, but not an ntk-bench kernel (format "
                                  f"{attrs.get('format')!r})")
        if int(attrs.get("format_version", 0)) > FORMAT_VERSION:
            raise KernelFileError(f"{self.path}: written in kernel format {attrs['format_version']}, newer than this "
                                  f"ntk-bench reads ({FORMAT_VERSION}); upgrade ntk-bench")
        self.attrs = attrs
        self.kernel_mode = attrs["mode"]
        self.tile = int(attrs["tile"])
        self.symmetric = bool(attrs["symmetric"])
        self.shape = tuple(self._z.shape)
        self.dtype = self._z.dtype

    # -- tiles ---------------------------------------------------------------------------------------------------

    @property
    def grid(self) -> tuple[int, int]:
        """The number of tile rows and tile columns."""
        return math.ceil(self.shape[0] / self.tile), math.ceil(self.shape[1] / self.tile)

    def tiles(self) -> list[tuple[int, int]]:
        """Every tile this kernel stores: (I, J) with I <= J when symmetric."""
        rows, cols = self.grid
        return [(i, j) for i in range(rows) for j in range(cols) if not self.symmetric or j >= i]

    def tile_slices(self, i: int, j: int) -> tuple[slice, slice]:
        """The row and column ranges of tile (I, J) (the last tiles are ragged)."""
        b = self.tile
        return slice(i * b, min((i + 1) * b, self.shape[0])), slice(j * b, min((j + 1) * b, self.shape[1]))

    def _record(self, i: int, j: int) -> Path:
        return self.path / "tiles" / f"{i}-{j}"

    def done(self, i: int, j: int) -> bool:
        """Whether tile (I, J) was written completely (its record exists)."""
        return self._record(i, j).is_file()

    def missing(self) -> list[tuple[int, int]]:
        """The tiles still to compute."""
        return [t for t in self.tiles() if not self.done(*t)]

    @property
    def complete(self) -> bool:
        """Whether every tile is written."""
        return not self.missing()

    def write_tile(self, i: int, j: int, block, info: dict | None = None) -> None:
        """Write tile (I, J) and then its record; a tile killed before the record is computed again.

        ``info`` (the tile's seconds, CPU seconds, the writing process) is kept as the record's JSON content, so the
        cost of the work done, and of work lost to a kill, can be read back (:meth:`tile_info`)."""
        si, sj = self.tile_slices(i, j)
        block = np.asarray(block, dtype=self.dtype)
        expected = (si.stop - si.start, sj.stop - sj.start) + self.shape[2:]
        if block.shape != expected:
            raise ValueError(f"tile ({i}, {j}) has shape {block.shape}, expected {expected}")
        self._z[si, sj] = block
        record = self._record(i, j)
        record.parent.mkdir(exist_ok=True)
        with replacing(record, "w", durable=False) as f:
            if info:
                f.write(json.dumps(_jsonable(info)))

    def tile_info(self, i: int, j: int) -> dict | None:
        """What was recorded with finished tile (I, J) (``{}`` for a record without it), None if not finished."""
        try:
            text = self._record(i, j).read_text()
        except FileNotFoundError:
            return None
        return json.loads(text) if text.strip() else {}

    def read_tile(self, i: int, j: int) -> np.ndarray:
        """Tile (I, J) as stored (a tile not written reads as NaN)."""
        si, sj = self.tile_slices(i, j)
        return self._z[si, sj]

    def update_attrs(self, **values) -> None:
        """Merge ``values`` (made JSON-able) into the kernel's attributes, on disk and in ``attrs``."""
        self._z.attrs.update(_jsonable(values))
        self.attrs = self._z.attrs.asdict()

    # -- numpy reads ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key) -> np.ndarray:
        plain = key if isinstance(key, tuple) else (key,)
        if not self.symmetric and all(isinstance(k, (int, np.integer, slice)) or k is Ellipsis for k in plain):
            return self._z[key]
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:at] + (slice(None),) * (len(self.shape) - len(key) + 1) + key[at + 1:]
        key = key + (slice(None),) * (len(self.shape) - len(key))
        rows = np.arange(self.shape[0])[key[0]]
        cols = np.arange(self.shape[1])[key[1]]
        r, c = np.atleast_1d(rows), np.atleast_1d(cols)
        out = np.empty((len(r), len(c)) + self.shape[2:], dtype=self.dtype)
        b = self.tile
        for ti in np.unique(r // b):
            rsel = np.nonzero(r // b == ti)[0]
            for tj in np.unique(c // b):
                csel = np.nonzero(c // b == tj)[0]
                mirrored = self.symmetric and tj < ti
                lo, hi = (tj, ti) if mirrored else (ti, tj)
                block = self.read_tile(int(lo), int(hi))
                if mirrored:
                    block = block.transpose(_SWAP[self.kernel_mode])
                out[np.ix_(rsel, csel)] = block[np.ix_(r[rsel] - ti * b, c[csel] - tj * b)]
        if np.ndim(rows) == 0 and np.ndim(cols) == 0:
            out = out[0, 0]
        elif np.ndim(rows) == 0:
            out = out[0]
        elif np.ndim(cols) == 0:
            out = out[:, 0]
        rest = key[2:]
        if any(k != slice(None) for k in rest):
            lead = tuple(slice(None) for _ in range(out.ndim - (len(self.shape) - 2)))
            out = out[lead + rest]
        return out

    def __repr__(self) -> str:
        left = len(self.missing())
        return (f"<ntk-bench kernel {self.path}: {self.kernel_mode} {self.shape} {self.dtype}, "
                f"plugin {self.attrs.get('plugin')}, {'complete' if not left else f'{left} tiles missing'}>")


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def create(path: str | os.PathLike, shape: tuple[int, ...], tile: int, dtype: str, attrs: dict) -> KernelArray:
    """A new kernel at ``path`` (which must not exist, or be an empty directory)."""
    path = Path(path)
    if path.is_symlink():
        raise KernelFileError(f"{path}: a symbolic link; give the kernel's own directory")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise KernelFileError(f"{path} exists and is not an ntk-bench kernel; choose another --out or remove it")
    chunks = (tile, tile) + tuple(shape[2:])
    z = _zarr().create_array(store=str(path), shape=shape, chunks=chunks, dtype=dtype, fill_value=np.nan)
    z.attrs.update(_jsonable({"format": FORMAT, "format_version": FORMAT_VERSION, "tile": tile, **attrs}))
    (path / "tiles").mkdir(exist_ok=True)
    return KernelArray(path, mode="r+")


def open_kernel(path: str | os.PathLike, writable: bool = False) -> KernelArray:
    """An ntk-bench kernel written by ``kernel_matrix`` (read with numpy indexing)."""
    return KernelArray(path, mode="r+" if writable else "r")
