"""Filling an output dataset in z order by rows of whole chunks, compressed in a pool of threads where the store
lets the writer compress (HDF5 with gzip), through the store's own codec otherwise."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

# Output chunk shape (z, y, x), clipped to the volume; one channel per chunk. 16 x 256 x 256 float32 is 4 MiB: large
# enough for good compression, small enough that a row of chunks (buffered before it is written) stays modest.
CHUNK_ZYX = (16, 256, 256)
# Threads compressing chunks. Compression runs beside the model (and, on a CPU-only run, competes with it for cores).
COMPRESSION_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))
# Compressed chunks waiting to be stored before the writer thread blocks on the oldest: bounds the memory they hold.
MAX_PENDING_CHUNKS = 4 * COMPRESSION_THREADS


def compression_pool() -> ThreadPoolExecutor:
    """The threads that compress the chunks of a run's outputs; shut it down when the run ends."""
    return ThreadPoolExecutor(COMPRESSION_THREADS, thread_name_prefix="unet3d-deflate")


class ChunkRowDataset:
    """One output dataset, ``(D, H, W)`` or ``(C, D, H, W)``, filled in z order by rows of whole chunks.

    Rows ``[z0, z1)`` are buffered until they complete a row of chunks (``CHUNK_ZYX[0]`` z-rows, or up to ``D`` at the
    end). When the store encodes chunks itself (``store.encode``: HDF5 with gzip) and a ``pool`` is given, each chunk
    of a complete row is encoded in the pool and stored as is (``store.write_encoded``), so compression, the slowest
    step, runs on several cores; otherwise the row is written through the store's array, which compresses it.

    Args:
        store: the output store (:class:`~.base.Store`) the dataset is created in.
        name: the dataset's name at the store's root.
        shape: ``(D, H, W)`` or ``(C, D, H, W)``.
        dtype: the stored dtype; rows are cast to it.
        pool: threads for ``store.encode``, or None (then rows are written through the store's array).
        rows: ``(a, b)``, the rows this process fills (DDP: the rank's own, chunk-aligned). Default None: all.
        skip: first rows of the chunk rows not to write (finished by an interrupted run). Default none.
    """

    def __init__(
        self, store: Any, name: str, shape: tuple[int, ...], dtype: str, pool: ThreadPoolExecutor | None,
        rows: tuple[int, int] | None = None, skip: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        self.channel_axis = len(shape) == 4
        zyx = shape[-3:]
        self.chunks = ((1,) if self.channel_axis else ()) + tuple(min(n, c) for n, c in zip(zyx, CHUNK_ZYX))
        self.store = store
        self.dataset = store.create_dataset(name, shape=shape, dtype=dtype, chunks=self.chunks)
        self.shape = shape
        self.depth = zyx[0]
        self.pool = pool if store.encode is not None else None
        self._row: np.ndarray | None = None  # the chunk row being filled, (C, cz, H, W) or (cz, H, W)
        self._row_start = 0  # first z-row of _row
        self.rows = (0, self.depth) if rows is None else (int(rows[0]), int(rows[1]))
        self.skip = frozenset(skip)
        self._next = self.rows[0]  # first z-row not received yet
        self.flushed = self.rows[0]  # rows below it (from rows[0]) are in the store
        self._pending: deque = deque()  # (chunk offset, future of encoded bytes), in submission order

    def add(self, z0: int, z1: int, values: np.ndarray) -> None:
        """Take rows ``[z0, z1)`` (z is axis 0, or 1 with channels); write every row of chunks they complete."""
        if z0 != self._next:
            raise RuntimeError(f"{self.dataset.name}: rows {z0}-{z1} arrived, rows from {self._next} were expected")
        cz = self.chunks[-3]
        z = z0
        while z < z1:
            if self._row is None:
                # A fresh buffer per chunk row (not one reused): the chunks submitted for compression are views of
                # it, and it must live until they are compressed.
                self._row_start = z
                rows = min(cz, self.depth - z)
                shape = (self.shape[0], rows, *self.shape[2:]) if self.channel_axis else (rows, *self.shape[1:])
                self._row = np.empty(shape, self.dataset.dtype)
            row_z = self._row.shape[-3]
            take = min(z1, self._row_start + row_z) - z
            source = values[:, z - z0 : z - z0 + take] if self.channel_axis else values[z - z0 : z - z0 + take]
            target = (slice(None),) if self.channel_axis else ()
            self._row[(*target, slice(z - self._row_start, z - self._row_start + take))] = source
            z += take
            if z == self._row_start + row_z:
                if self._row_start not in self.skip:
                    self._write(self._row_start, self._row)
                self._row = None
                if self.pool is None:
                    self.flushed = z
        self._next = z1

    def _write(self, z0: int, rows: np.ndarray) -> None:
        """Write rows starting at ``z0``, a multiple of the chunk depth, covering whole chunk rows."""
        if self.pool is None:
            index = (slice(None), slice(z0, z0 + rows.shape[1])) if self.channel_axis else slice(z0, z0 + rows.shape[0])
            self.dataset[index] = rows
            return
        encode = self.store.encode
        chunk = self.chunks
        full = rows if self.channel_axis else rows[None]
        _, dz, height, width = full.shape
        _, cz, cy, cx = chunk if self.channel_axis else (1, *chunk)
        for c in range(full.shape[0]):
            for z in range(0, dz, cz):
                for y in range(0, height, cy):
                    for x in range(0, width, cx):
                        block = full[c, z : z + cz, y : y + cy, x : x + cx]
                        if block.shape != (cz, cy, cx):
                            # Edge chunks are stored full size; the part beyond the dataset is never read.
                            padded = np.zeros((cz, cy, cx), block.dtype)
                            padded[: block.shape[0], : block.shape[1], : block.shape[2]] = block
                            block = padded
                        offset = ((c,) if self.channel_axis else ()) + (z0 + z, y, x)
                        self._pending.append((offset, self.pool.submit(encode, block)))
        self._store(keep=MAX_PENDING_CHUNKS)

    def _store(self, keep: int) -> None:
        """Store finished chunks in submission order until at most ``keep`` are pending (bounds memory)."""
        while self._pending and (len(self._pending) > keep or self._pending[0][1].done()):
            offset, future = self._pending.popleft()
            self.store.write_encoded(self.dataset, offset, future.result())

    def close(self) -> None:
        if self._next != self.rows[1]:
            expected = f"{self.depth}" if self.rows == (0, self.depth) else f"rows {self.rows[0]}-{self.rows[1]}"
            raise RuntimeError(f"{self.dataset.name}: only rows {self.rows[0]}-{self._next} of {expected} were written")
        self._store(keep=0)
        self.flushed = self._next
