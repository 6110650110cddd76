"""HDF5 volumes (``*.h5``, ``*.hdf5``, ``*.hdf``, and any file no other format claims): the internal path is a dataset,
e.g. ``raw``, ``volumes/raw``.

Files are opened read-only with a chunk cache large enough for the chunks that overlapping patches share. A dataset
is checked before it is read: links that lead nowhere and virtual datasets whose sources are missing (which HDF5
would read as fill values without a word) are named in the error.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ...errors import ConfigurationError
from ..spacing import VoxelSize
from .base import READ_ERRORS, OneSlice, VolumeFile, error_summary, voxel_size_from_attributes
from .chunks import CHUNK_CACHE_BYTES, MissingChunks

SUFFIXES = (".h5", ".hdf5", ".hdf")
# Hash slots of the chunk cache: a prime well above the number of chunks that fit (HDF5's advice), so few collide.
CHUNK_CACHE_SLOTS = 10007


def as_volume(dataset: Any) -> Any:
    """``dataset``, or a 2D one as :class:`OneSlice`."""
    return OneSlice(dataset) if isinstance(dataset, h5py.Dataset) and dataset.ndim == 2 else dataset


def open_h5(path: str | os.PathLike, role: str = "input") -> h5py.File:
    """Open ``path`` read-only, with a chunk cache of ``CHUNK_CACHE_BYTES`` per dataset for overlapping patches.

    Args:
        path: the HDF5 file.
        role: ``"train"``, ``"val"``, ``"test"`` or ``"predict"``; only used to name the file in error messages.
            Default ``"input"``.

    Raises:
        ConfigurationError: the file does not exist, or is not a readable HDF5 file (wrong format, truncated).
    """
    try:
        return h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=CHUNK_CACHE_SLOTS)
    except FileNotFoundError:
        raise ConfigurationError(f"{role} volume {path}: file does not exist") from None
    except READ_ERRORS as err:
        if is_lock_error(err):
            raise ConfigurationError(
                f"{role} volume {path}: the file is locked by another process (one still writing it?); wait until "
                "it has finished, or, on a read-only or network file system whose locks are unreliable, set "
                "HDF5_USE_FILE_LOCKING=FALSE"
            ) from None
        raise ConfigurationError(
            f"{role} volume {path}: cannot be read as an HDF5 file ({error_summary(err)}); it may be truncated or "
            "not HDF5"
        ) from None


def is_lock_error(err: BaseException) -> bool:
    """Whether an exception from opening an HDF5 file means another process holds the file's lock.

    HDF5 locks files (``flock``) while they are open; a writer's exclusive lock makes readers fail with EAGAIN
    ("unable to lock file"), which is not damage to the file.
    """
    return isinstance(err, BlockingIOError) or "unable to lock file" in str(err).lower()


def _dataset(file: h5py.File, key: str, path: Path, role: str) -> h5py.Dataset:
    """The dataset ``key`` of an open volume file, after checking that it and the data behind it are there.

    h5py answers None for a link whose target is missing, which would read as "does not exist"; a virtual dataset
    whose source is missing reads as its fill value without any error. Both are found here and named.
    """
    try:
        obj = file.get(key)
    except READ_ERRORS as err:
        raise ConfigurationError(
            f"{role} volume {path}: dataset '{key}' cannot be read ({error_summary(err)}); the file may be corrupt"
        ) from None
    if obj is None:
        _check_links(file, key, path, role)
    if not isinstance(obj, h5py.Dataset):
        found: list[str] = []
        try:
            file.visititems(lambda name, item: found.append(name) if isinstance(item, h5py.Dataset) else None)
        except READ_ERRORS:
            pass  # a damaged file may not list fully; the datasets found so far still help
        what = "is not a dataset" if obj is not None else "does not exist"
        raise ConfigurationError(
            f"{role} volume {path}: dataset '{key}' {what}; datasets in the file: {found or 'none'}"
        )
    if obj.is_virtual:
        _check_virtual_sources(obj, key, path, role)
    return as_volume(obj)


def _linked_file(name: str, holder: Path, env: str) -> Path | None:
    """Where HDF5 finds the file ``name`` that a link or virtual dataset in ``holder`` refers to, or None.

    The order HDF5 documents for external links and virtual dataset sources: an absolute name as it is; a relative
    one under the prefix in the environment variable ``env`` (``HDF5_EXT_PREFIX``, ``HDF5_VDS_PREFIX``; ``${ORIGIN}``
    is the holder's directory), then beside the holder, then in the working directory.
    """
    if os.path.isabs(name):
        return Path(name) if os.path.isfile(name) else None
    prefixes = [p.replace("${ORIGIN}", str(holder.parent)) for p in os.environ.get(env, "").split(os.pathsep) if p]
    for directory in (*prefixes, str(holder.parent), os.getcwd()):
        candidate = Path(directory) / name
        if candidate.is_file():
            return candidate
    return None


def _check_links(file: h5py.File, key: str, path: Path, role: str) -> None:
    """Raise naming the link target when ``key`` (or a group on its way) is a soft or external link that leads
    nowhere; return quietly when the name simply does not exist."""
    group: Any = file
    walked = ""
    for part in [p for p in key.split("/") if p]:
        walked = f"{walked}/{part}"
        try:
            link = group.get(part, getlink=True)
            target = group.get(part)
        except READ_ERRORS:
            return  # reported by the caller as unreadable or missing
        if link is None:
            return
        if target is None and isinstance(link, h5py.ExternalLink):
            name = walked.lstrip("/")
            where = f"{role} volume {path}: '{name}' is an external link to '{link.path}' in {link.filename}"
            found = _linked_file(link.filename, path, "HDF5_EXT_PREFIX")
            if found is None:
                raise ConfigurationError(
                    f"{where}, and that file does not exist (looked beside {path} and in the working directory); "
                    "restore it or store the data in the volume file itself"
                )
            raise ConfigurationError(
                f"{where}, and {found} has no object '{link.path}' (or cannot be read); fix the link or the file"
            )
        if target is None and isinstance(link, h5py.SoftLink):
            raise ConfigurationError(
                f"{role} volume {path}: '{walked.lstrip('/')}' is a soft link to '{link.path}', which does not exist "
                "in the file; fix the link"
            )
        if target is None:
            return
        group = target


def _check_virtual_sources(dataset: h5py.Dataset, key: str, path: Path, role: str) -> None:
    """Check that every source file and dataset of a virtual dataset exists; HDF5 would silently read fill values
    for the missing ones."""
    by_file: dict[str, set[str]] = {}
    for source in dataset.virtual_sources():
        by_file.setdefault(source.file_name, set()).add(source.dset_name)
    for name, keys in by_file.items():
        if "%" in name:
            continue  # a printf-style file pattern of an unlimited dataset: no fixed file to check
        where = f"{role} volume {path}: dataset '{key}' is a virtual dataset whose source"
        if name == ".":
            found, source_file = path, dataset.file
        else:
            found = _linked_file(name, path, "HDF5_VDS_PREFIX")
            if found is None:
                raise ConfigurationError(
                    f"{where} file {name} does not exist (looked beside {path} and in the working directory); "
                    "HDF5 would read fill values in its place: restore the file or rebuild the virtual dataset"
                )
            try:
                source_file = h5py.File(found, "r")
            except READ_ERRORS as err:
                raise ConfigurationError(
                    f"{where} file {found} cannot be read as an HDF5 file ({error_summary(err)})"
                ) from None
        try:
            for dset in sorted(keys):
                try:
                    ok = isinstance(source_file.get(dset), h5py.Dataset)
                except READ_ERRORS:
                    ok = False
                if not ok:
                    raise ConfigurationError(
                        f"{where} file {found} has no dataset '{dset}'; HDF5 would read fill values in its place: "
                        "fix the source or rebuild the virtual dataset"
                    )
        finally:
            if source_file is not dataset.file:
                source_file.close()


class HDF5File(VolumeFile):
    """An HDF5 file opened by :func:`open_h5` (read-only, large chunk cache)."""

    format = "hdf5"
    suffixes = SUFFIXES

    def __init__(self, path: Path, role: str) -> None:
        super().__init__(path, role)
        self.file = open_h5(path, role)

    def array(self, key: str) -> Any:
        return _dataset(self.file, key, self.path, self.role)

    def voxel_size(self, key: str) -> VoxelSize | None:
        """From the attribute ``element_size_um`` (micrometres) or ``resolution`` of the dataset, else of the
        groups above it up to the file's root (see :func:`~.base.voxel_size_from_attributes`)."""
        view = self.array(key)
        node: Any = view.dataset if isinstance(view, OneSlice) else view
        holders = []
        try:
            while True:
                holders.append(node.attrs)
                if node.name == "/":
                    break
                node = node.parent
        except READ_ERRORS:
            pass  # an unreadable group above: the attributes found so far still count
        return voxel_size_from_attributes(holders)

    def missing_chunks(self, key: str) -> MissingChunks | None:
        view = self.array(key)
        dataset = view.dataset if isinstance(view, OneSlice) else view
        if dataset.chunks is None or dataset.is_virtual or dataset.external:
            return None  # contiguous, virtual (sources checked on opening) or external storage: no chunk index
        grid = tuple(math.ceil(n / c) for n, c in zip(dataset.shape, dataset.chunks))
        try:
            count = dataset.id.get_num_chunks()
            if count == math.prod(grid):
                return None
            stored = np.zeros(grid, bool)

            def mark(info: Any) -> None:
                stored[tuple(o // c for o, c in zip(info.chunk_offset, dataset.chunks))] = True

            if hasattr(dataset.id, "chunk_iter"):  # HDF5 >= 1.12.3: one pass over the chunk index
                dataset.id.chunk_iter(mark)
            else:
                for i in range(count):
                    mark(dataset.id.get_chunk_info(i))
        except READ_ERRORS:
            return None  # an unreadable chunk index: the scan that reads the data reports the damage
        one_slice = isinstance(view, OneSlice)
        return MissingChunks(
            stored=stored[None] if one_slice else stored, shape=tuple(dataset.shape), chunks=tuple(dataset.chunks),
            view_axes=((None,) if one_slice else ()) + tuple(range(dataset.ndim)), fill_value=dataset.fillvalue,
            # HDF5 stores every chunk a writer writes, chunks of fill values too: one not stored was never written.
            may_be_omitted=False,
        )

    def __getattr__(self, name: str) -> Any:
        # The rest of h5py.File's interface (mode, id, filename), for code written against an open HDF5 file.
        if name == "file":
            raise AttributeError(name)
        return getattr(self.file, name)

    def close(self) -> None:
        self.file.close()
