"""What every output format shares: the interface of a store, the background thread that writes a volume's rows in
order, the atomic replacement of a finished store, and the sentence for a full disk."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ...errors import ConfigurationError
from ..memory import format_size
from ..paths import aside_path, remove_path


class Store(Protocol):
    """A new output (an HDF5 file, a Zarr store) at a temporary path, as :class:`~.volume.VolumeOutput` writes it;
    built as ``Store(path, compression)``, ``compression`` one of ``"gzip"``, ``"lzf"`` or None.

    ``encode`` (also ``encoder(compression)``, known before the store exists) is None, or a function turning one
    chunk (a numpy array of the chunk's full shape) into the bytes the store keeps, for the stores whose compression
    may run in the writer's thread pool; ``write_encoded`` then stores such bytes as the chunk at ``offset``.
    ``discard()`` closes a store whose content is thrown away, never raising; ``replace(source, final)`` renames a
    complete store over an earlier output.

    For DDP prediction with rank-owned rows (:mod:`~unet3d_lightning.prediction.distributed`) a store says how
    several ranks write it: ``shared_writes = True`` (Zarr) — every rank opens the store rank 0 created, as
    ``Store(path, compression, attach=True)``, whose ``create_dataset`` then returns the existing dataset (checked,
    no metadata written), and writes its own chunk rows; otherwise each rank writes a store of its own and rank 0
    calls ``join(part_path)`` on its store for each other rank's (HDF5: the compressed chunks copied as they are).
    A store with neither falls back to summing bands over the ranks with rank 0 writing. ``prediction.resume``
    needs ``shared_writes``.
    """

    encode: Callable[[np.ndarray], bytes] | None

    def create_dataset(self, name: str, *, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...]) -> Any: ...

    def write_encoded(self, dataset: Any, offset: tuple[int, ...], data: bytes) -> None: ...

    def close(self) -> None: ...

    def discard(self) -> None: ...

    @staticmethod
    def encoder(compression: str | None) -> Callable[[np.ndarray], bytes] | None: ...

    @staticmethod
    def replace(source: Path, final: Path) -> None: ...


class BackgroundWriter:
    """One thread running the jobs of one output file in order; the first error resurfaces in the caller."""

    def __init__(self, max_pending: int = 2) -> None:
        # Each queued job holds one slab (C x stride_z x H x W float32, tens of MB for wide volumes). When the writes
        # are the bottleneck a deeper queue adds memory, not speed; two keeps the device busy across one slow write.
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="unet3d-hdf5-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:
                try:
                    job()
                except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = err

    def submit(self, job: Any) -> None:
        self._raise()
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def replace_directory(source: Path, final: Path) -> None:
    """Rename the complete store ``source`` to ``final``, replacing an older output there.

    A directory cannot be renamed over a non-empty one, so the old output is first renamed aside (one rename: it
    stays complete under some name until the new one is in place) and deleted after.
    """
    old = None
    if final.exists() or final.is_symlink():
        old = aside_path(final)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(source, final)
    if old is not None:
        remove_path(old)


# errno values that mean the output's disk has no room: a full file system, or the user's quota spent.
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@contextlib.contextmanager
def writing(final: Path, shape: Sequence[int], dtype: str) -> Iterator[None]:
    """Turn a full disk while writing ``final`` into one sentence; other write errors keep their traceback.

    HDF5 reports the full disk as an OSError whose errno is ENOSPC (and whose message holds HDF5's error stack).
    """
    try:
        yield
    except OSError as err:
        if err.errno not in _DISK_FULL and "No space left on device" not in str(err):
            raise
        size = math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize
        raise ConfigurationError(
            f"prediction output {final}: the disk is full (No space left on device); free space there or choose a "
            f"prediction.output_dir on a disk with room (this volume's predictions take up to {format_size(size)} "
            "before compression)"
        ) from None
