"""The files a reading process keeps open: :class:`FileCache`."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from . import open_file
from .base import VolumeFile

# Files a reader keeps open at once (least recently used closed first). Each open dataset may hold up to
# CHUNK_CACHE_BYTES of cached chunks, so this bounds a reader process's cache memory at
# MAX_OPEN_FILES * (datasets per file) * CHUNK_CACHE_BYTES.
MAX_OPEN_FILES = 8
# Handles a forked worker inherited from its parent: kept referenced and never touched in the worker, because
# closing them there would run HDF5's close (and unlock the file: flock locks are shared across fork) on state the
# parent still uses.
_INHERITED: list[Any] = []


class FileCache:
    """Per-process read-only arrays (h5py datasets, Zarr arrays, TIFF views), opened on first use and kept open.

    Datasets stay open, not just files: HDF5 frees a dataset's chunk cache when the dataset is closed, so opening
    ``file[key]`` for every patch would read (and decompress) the chunks that overlapping patches share again.

    h5py handles must not cross a fork: a DataLoader worker that used its parent's open file would share HDF5's
    internal state with it. The cache therefore belongs to one process id; in any other process it sets the
    inherited handles aside and opens its own. Pickling (spawned workers) drops the handles. TIFF files are opened
    per process for the same reason (a file position shared across a fork); Zarr arrays would survive one, but are
    opened the same way. Files are opened by the format registry, :func:`~unet3d_lightning.data.io.open_file`.
    """

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._files: OrderedDict[str, VolumeFile] = OrderedDict()
        self._datasets: dict[tuple[str, str], Any] = {}

    def array(self, path: Path, key: str, role: str) -> Any:
        """The open array ``key`` of the file ``path``, in this process; ``role`` names the file in errors."""
        if self._pid != os.getpid():
            _INHERITED.append((self._files, self._datasets))
            self._pid, self._files, self._datasets = os.getpid(), OrderedDict(), {}
        name = str(path)
        found = self._datasets.get((name, key))
        if found is None:
            file = self._files.get(name)
            if file is None:
                while len(self._files) >= MAX_OPEN_FILES:
                    self._close(next(iter(self._files)))
                file = self._files[name] = open_file(path, role)
            found = self._datasets[(name, key)] = file.array(key)
        self._files.move_to_end(name)
        return found

    def dataset(self, volume: Any, kind: str) -> Any:
        """The open ``"raw"``, ``"label"`` or ``"weight"`` array of ``volume`` (a
        :class:`~unet3d_lightning.data.volumes.Volume`), in this process."""
        return self.array(volume.file_of(kind), volume.key_of(kind), volume.role)

    def open_paths(self) -> list[str]:
        """Paths of the files this process has open through the cache (none in a process that did not open them)."""
        return list(self._files) if self._pid == os.getpid() else []

    def _close(self, name: str) -> None:
        for k in [k for k in self._datasets if k[0] == name]:
            del self._datasets[k]
        self._files.pop(name).close()

    def close(self) -> None:
        """Close the files this process opened; the cache stays usable and reopens them on demand."""
        if self._pid == os.getpid():
            for name in list(self._files):
                self._close(name)

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
