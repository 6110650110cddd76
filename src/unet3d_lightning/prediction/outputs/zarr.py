"""Zarr outputs: one Zarr (format 3) store per volume, chunked like the HDF5 outputs, compressed with Blosc-zstd
(needs the ``formats`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import replace_directory

# Blosc with zstd at a low level and byte shuffle, fast on float data (the Zarr community's default).
ZARR_CLEVEL = 3


class ZarrStore:
    """A new Zarr (format 3) group at ``path``; its arrays are Blosc-zstd compressed unless ``compression`` is None
    (``"gzip"`` stands for Blosc-zstd). Zarr compresses each chunk itself, in its own threads, as rows are written.

    ``attach=True`` opens the group another process created at ``path`` (every DDP rank writes its own chunk rows
    into the one store; chunk-aligned row ranges never share a chunk); ``create_dataset`` then returns the existing
    array, checked against the shape and dtype asked for, and writes no metadata."""

    shared_writes = True  # several processes may write disjoint chunks of one store

    encode = None
    # A directory cannot be renamed over a non-empty one: the earlier output is moved aside first.
    replace = staticmethod(replace_directory)

    def __init__(self, path: Path, compression: str | None, attach: bool = False) -> None:
        import zarr

        self._zarr = zarr
        self.attached = attach
        self.group = zarr.open_group(str(path), mode="r+" if attach else "w-", zarr_format=3)
        self.compression = compression

    @staticmethod
    def encoder(compression: str | None) -> None:
        return None  # Blosc runs inside zarr

    def create_dataset(self, name: str, *, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...]) -> Any:
        if self.attached:
            array = self.group[name]
            if tuple(array.shape) != tuple(shape) or str(array.dtype) != str(dtype) or tuple(array.chunks) != chunks:
                raise RuntimeError(f"{name} of {self.group.store} is {array.shape} {array.dtype} in chunks "
                                   f"{array.chunks}, not {shape} {dtype} in {chunks}")
            return array
        codecs = self._zarr.codecs
        compressors = None if self.compression is None else codecs.BloscCodec(
            cname="zstd", clevel=ZARR_CLEVEL, shuffle=codecs.BloscShuffle.shuffle
        )
        return self.group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, compressors=compressors,
                                       fill_value=0)

    @staticmethod
    def write_encoded(dataset: Any, offset: tuple[int, ...], data: bytes) -> None:
        raise NotImplementedError("Zarr stores compress their chunks themselves")

    def close(self) -> None:
        pass  # every chunk and metadata document is written when its write returns

    def discard(self) -> None:
        pass  # nothing is held open
