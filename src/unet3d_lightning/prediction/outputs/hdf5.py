"""HDF5 outputs: one file per volume, chunked, with HDF5's standard shuffle + gzip (or lzf) filters.

HDF5's own gzip filter is single-threaded and, at tens of MB/s, would be slower than a GPU produces output; with gzip
the writer therefore byte-shuffles and deflates chunks itself, in parallel threads (:func:`deflate`), and stores the
compressed bytes with ``write_direct_chunk``. The file is an ordinary gzip-filtered HDF5 file that any reader opens.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

GZIP_LEVEL = 1


def shuffle_bytes(array: np.ndarray) -> np.ndarray:
    """HDF5's shuffle filter: byte ``k`` of every element, for ``k = 0 .. itemsize - 1``, one group after another.

    Grouping the exponent bytes of float data together makes it compress better and faster.
    """
    flat = np.ascontiguousarray(array).reshape(-1)
    if array.itemsize == 1:
        return flat
    return np.ascontiguousarray(flat.view(np.uint8).reshape(-1, array.itemsize).T)


def deflate(chunk: np.ndarray) -> bytes:
    """One chunk as HDF5's shuffle + deflate filters at :data:`GZIP_LEVEL` store it."""
    # HDF5's deflate filter stores a zlib stream, what zlib.compress returns; zlib releases the GIL while it works,
    # so several chunks compress in parallel threads.
    return zlib.compress(shuffle_bytes(chunk), GZIP_LEVEL)


class Hdf5Store:
    """A new HDF5 file at ``path`` whose datasets are compressed with ``compression``: ``"gzip"`` (level
    :data:`GZIP_LEVEL`, chunks encoded by :func:`deflate` in the writer's threads), ``"lzf"`` (only HDF5 implements
    it: written through h5py) or None."""

    replace = staticmethod(os.replace)  # a file is renamed over an earlier one in one step
    shared_writes = False  # one writer per file (no MPI-HDF5): DDP ranks write part files that rank 0 joins

    def __init__(self, path: Path, compression: str | None) -> None:
        self.path = path
        self.compression = compression
        self.encode = self.encoder(compression)
        # No chunk cache: every chunk is written whole, once, so caching gains nothing, and chunks left dirty in a
        # cache when the disk fills could never be flushed (HDF5 then cannot close the file).
        self.file = h5py.File(path, "w", rdcc_nbytes=0)

    @staticmethod
    def encoder(compression: str | None) -> Callable[[np.ndarray], bytes] | None:
        """:func:`deflate` for gzip, which the writer runs in its threads; None for what HDF5 compresses itself."""
        return deflate if compression == "gzip" else None

    def create_dataset(self, name: str, *, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...]) -> Any:
        options: dict[str, Any] = {}
        if self.compression == "gzip":
            options = {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True}
        elif self.compression == "lzf":
            options = {"compression": "lzf", "shuffle": True}
        return self.file.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, **options)

    @staticmethod
    def write_encoded(dataset: Any, offset: tuple[int, ...], data: bytes) -> None:
        dataset.id.write_direct_chunk(offset, data)

    def join(self, part: Path) -> None:
        """Copy every stored chunk of the datasets of the part file ``part`` (written by another rank: the same
        datasets, shapes, chunks and filters, holding only that rank's rows) into this file's datasets as they are,
        compressed (``read_direct_chunk`` / ``write_direct_chunk``: no decompression, no recompression), then delete
        the part file. The cost is one read and one write of the part's compressed bytes, on this process."""
        with h5py.File(part, "r") as source:
            for name, dataset in source.items():
                target = self.file[name]
                if target.shape != dataset.shape or target.chunks != dataset.chunks or target.dtype != dataset.dtype:
                    raise RuntimeError(f"{part}: {name} is {dataset.shape} {dataset.dtype} in {dataset.chunks}, "
                                       f"unlike {target.shape} {target.dtype} in {target.chunks} of {self.path}")
                for index in range(dataset.id.get_num_chunks()):
                    offset = dataset.id.get_chunk_info(index).chunk_offset
                    mask, data = dataset.id.read_direct_chunk(offset)
                    target.id.write_direct_chunk(offset, data, mask)
        os.unlink(part)

    def close(self) -> None:
        self.file.close()

    def discard(self) -> None:
        """Close the file whose content is thrown away; never raises, since it runs while another error is handled."""
        # HDF5 flushes metadata and cached chunks when it closes a file. On a full disk that fails, the file stays
        # open inside the library, and its second attempt at exit can crash the process. Emptying the file first
        # gives back the space it held, so the close can succeed.
        with contextlib.suppress(OSError):
            os.truncate(self.path, 0)
        try:
            self.file.close()
        except Exception:  # noqa: BLE001 - flushing to a full disk fails again; the first error is the one to report
            pass
