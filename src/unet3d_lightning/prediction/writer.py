"""PredictionWriter: a Lightning callback that stitches predicted patches and writes one HDF5 file per volume.

For each input volume ``<dir>/<stem>.h5`` it writes ``<output_dir>/<stem>_predictions.h5`` holding

- ``predictions``: ``(C, D, H, W)`` probabilities (the model's ``final_activation``: softmax for class-id
  labels, per-channel sigmoid for binary masks), float32 by default, in chunks of one channel and up to
  ``CHUNK_ZYX`` = 16 x 256 x 256 voxels, compressed with HDF5's standard shuffle + gzip (or lzf) filters;
- ``segmentation`` (``save_segmentation=True``): ``(D, H, W)`` argmax class ids (softmax models) or
  ``(C, D, H, W)`` masks thresholded at 0.5 (sigmoid models), uint8 (uint16 beyond 255 classes);
- ``instances`` (``instances=True``, models trained on boundary or affinity targets): ``(D, H, W)`` uint32 (uint64
  beyond 2**32 - 1 objects) instance ids, 0 background, from a seeded watershed of the whole stitched volume
  (:func:`unet3d_lightning.instances.watershed_instances`), computed when the volume's maps are complete, before the
  file is renamed.

With ``format="zarr"`` the output is instead a Zarr (format 3) store ``<output_dir>/<stem>_predictions.zarr``
holding the same arrays, with the same chunks, compressed with Blosc-zstd; it is written by the same streaming code.

Files (and Zarr store directories) are written under a temporary name in the same directory,
``.<name>.tmp-<host>-<pid>``, and renamed when complete, so an interrupted run never leaves a truncated output under
the final name. A path already at the final name is replaced only if it is recognisably an earlier output of this
writer (:func:`previous_output_problem`); anything else there — a user's folder, a text file, another tool's HDF5
file, a symbolic link — is refused before any work, as are names longer than the file system allows. Temporary
outputs left by processes of this machine that no longer run (``kill -9``, a node crash) are removed when the next
prediction into the directory starts (:func:`remove_stale_temporaries`).

Patches arrive from the predict dataloader in z-major order, volume after volume. The writer feeds them to a
:class:`~unet3d_lightning.prediction.stitcher.StreamingStitcher` on the model's device and writes each z-slab as
soon as it is final. Slabs leave the device through asynchronous copies to pinned memory; a background thread
gathers them into whole rows of chunks, which a small thread pool deflates in parallel (HDF5's own gzip filter is
single-threaded and, at tens of MB/s, would be slower than a GPU produces output) and stores with
``write_direct_chunk``; the file is an ordinary gzip-filtered HDF5 file that any reader opens. Under DDP each
rank stitches its own share of the patches and the ranks sum every band (``trainer.strategy.reduce``) before it is
normalised; rank 0 writes. The result equals the single-device file up to float32 summation order.

The predict dataloader's dataset must expose ``plans``: one entry per volume with ``volume.path``,
``volume.spatial_shape`` and ``grid`` (patch slices in z-major order, padded coordinates), as
:class:`~unet3d_lightning.data.datamodule.PredictDataset` does; batches are dicts with ``probabilities``,
``volume`` and ``start`` from ``UNet3DModule.predict_step``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import queue
import re
import shutil
import socket
import stat
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import h5py
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

from ..data.readers import require_formats_extra, volume_stem
from ..errors import ConfigurationError, nearest_existing, one_line
from ..instances import WatershedOptions
from .stitcher import StreamingStitcher

OUTPUT_SUFFIX = "_predictions.h5"
OUTPUT_SUFFIXES = {"hdf5": OUTPUT_SUFFIX, "zarr": "_predictions.zarr"}
# Zarr outputs: Blosc with zstd at a low level and byte shuffle, fast on float data (the Zarr community's default).
ZARR_CLEVEL = 3
# Output chunk shape (z, y, x), clipped to the volume; one channel per chunk. 16 x 256 x 256 float32 is 4 MiB: large
# enough for good compression, small enough that a row of chunks (buffered before it is written) stays modest.
CHUNK_ZYX = (16, 256, 256)
GZIP_LEVEL = 1
# Threads deflating chunks. Compression runs beside the model (and, on a CPU-only run, competes with it for cores).
COMPRESSION_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))
# Compressed chunks waiting to be stored before the writer thread blocks on the oldest: bounds the memory they hold.
MAX_PENDING_CHUNKS = 4 * COMPRESSION_THREADS


def output_path(output_dir: str | os.PathLike, volume_path: str | os.PathLike, format: str = "hdf5") -> Path:
    """``<output_dir>/<input stem>_predictions.h5`` (``format="zarr"``: ``.zarr``); the stem drops the input's
    format suffix, ``.ome.zarr`` and ``.ome.tif`` included."""
    return Path(output_dir) / f"{volume_stem(volume_path)}{OUTPUT_SUFFIXES[format]}"


class _ZarrOutput:
    """A new Zarr (format 3) store at ``path`` with the part of h5py.File's interface the writer uses:
    ``create_dataset`` (chunked, Blosc-zstd unless ``compression`` is None) and ``close``."""

    def __init__(self, path: Path, compression: str | None) -> None:
        import zarr

        self._zarr = zarr
        self.group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        self.compression = compression

    def create_dataset(self, name: str, *, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...]) -> Any:
        codecs = self._zarr.codecs
        compressors = None if self.compression is None else codecs.BloscCodec(
            cname="zstd", clevel=ZARR_CLEVEL, shuffle=codecs.BloscShuffle.shuffle
        )
        return self.group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, compressors=compressors,
                                       fill_value=0)

    def close(self) -> None:
        pass  # every chunk and metadata document is written when its write returns


# The datasets (HDF5) or arrays (Zarr) the writer puts into an output, at its root. An existing output holding
# anything else is not (only) ours, and is never replaced.
OUTPUT_ARRAYS = ("predictions", "segmentation", "instances")
# Entries of one array of a Zarr (format 3) output: its metadata and the tree of its chunks (absent while every chunk
# equals the fill value).
_ZARR_ARRAY_ENTRIES = {"zarr.json", "c"}
_SUFFIX_PATTERN = "|".join(re.escape(suffix) for suffix in OUTPUT_SUFFIXES.values())
# Hidden names of unfinished outputs: the temporary one while a volume is written, and the previous Zarr output while
# it is moved aside to make room for the new one. They carry the host: on a file system shared by several machines a
# pid says nothing about another machine's processes.
_TEMPORARY_NAME = re.compile(rf"^\.(?P<final>.+(?:{_SUFFIX_PATTERN}))\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)$")
# The same names as releases before the host was recorded wrote them: whose they are cannot be told.
_UNHOSTED_TEMPORARY_NAME = re.compile(rf"^\.(?P<final>.+(?:{_SUFFIX_PATTERN}))\.(?:tmp|old)-(?P<pid>\d+)$")


@functools.cache
def _host() -> str:
    """This machine's name as temporary names hold it: letters, digits, '.', '_' and '-' only, at most 64."""
    try:
        name = socket.gethostname()
    except OSError:
        name = ""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "localhost"


def temporary_path(final: Path) -> Path:
    """The hidden name a volume's output has while it is written: this process's own, by host and pid."""
    return final.with_name(f".{final.name}.tmp-{_host()}-{os.getpid()}")


def _aside_path(final: Path) -> Path:
    """The hidden name of the previous Zarr output while the new one is renamed into its place."""
    return final.with_name(f".{final.name}.old-{_host()}-{os.getpid()}")


def _name_max(directory: Path) -> int:
    """The longest file name, in bytes, that the file system of ``directory`` takes (NAME_MAX; 255 if unknown)."""
    try:
        limit = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255
    return limit if isinstance(limit, int) and limit > 0 else 255


def previous_output_problem(final: Path, format: str = "hdf5") -> str | None:
    """None if nothing is at ``final`` or it is recognisably an earlier output of this writer (which may be
    replaced), else what is there instead, for the error message.

    Ours are: an HDF5 file, or a Zarr (format 3) group directory, holding only the datasets of
    :data:`OUTPUT_ARRAYS` at its root, ``predictions`` among them with its ``scale`` attribute — what every release
    of the writer has written. A symbolic link is never ours: the writer writes none.
    """
    try:
        info = os.lstat(final)
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"it cannot be examined ({err.strerror or err})"
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link"
    if format == "zarr":
        if not stat.S_ISDIR(info.st_mode):
            return "it is a file, not a Zarr store"
        return _zarr_output_problem(final)
    if stat.S_ISDIR(info.st_mode):
        return "it is a directory, not an HDF5 file"
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    try:
        if not h5py.is_hdf5(final):
            return "it is not an HDF5 file"
        with h5py.File(final, "r") as file:
            others = []
            for name in file:
                link = file.get(name, getlink=True)
                if name not in OUTPUT_ARRAYS or not isinstance(link, h5py.HardLink) or \
                        not isinstance(file[name], h5py.Dataset):
                    others.append(name)
            if others:
                return f"it holds {sorted(others)[:3]}, which the writer never writes"
            if "predictions" not in file or "scale" not in file["predictions"].attrs:
                return "it has no 'predictions' dataset with the writer's 'scale' attribute"
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        return f"it cannot be read as HDF5 ({one_line(str(err)) or type(err).__name__})"
    return None


def _zarr_metadata(path: Path) -> dict[str, Any] | None:
    try:
        with open(path / "zarr.json", encoding="utf-8") as document:
            metadata = json.load(document)
    except (OSError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) and metadata.get("zarr_format") == 3 else None


def _zarr_output_problem(store: Path) -> str | None:
    group = _zarr_metadata(store)
    if group is None or group.get("node_type") != "group":
        return "it is a directory, not a Zarr (format 3) group with the writer's arrays"
    try:
        entries = set(os.listdir(store))
    except OSError as err:
        return f"it cannot be examined ({err.strerror or err})"
    others = entries - {"zarr.json", *OUTPUT_ARRAYS}
    for name in sorted(entries & set(OUTPUT_ARRAYS)):
        array = store / name
        metadata = _zarr_metadata(array)
        try:
            plain = array.is_dir() and not array.is_symlink() and set(os.listdir(array)) <= _ZARR_ARRAY_ENTRIES
        except OSError:
            plain = False
        if not plain or metadata is None or metadata.get("node_type") != "array":
            others.add(name)
    if others:
        return f"it holds {sorted(others)[:3]}, which the writer never writes"
    if "predictions" not in entries or "scale" not in (_zarr_metadata(store / "predictions") or {}).get(
            "attributes", {}):
        return "it has no 'predictions' array with the writer's 'scale' attribute"
    return None


def check_outputs(output_dir: str | os.PathLike, volumes: Sequence[str | os.PathLike], format: str = "hdf5") -> None:
    """Refuse, before any work, outputs the run could not write or may not replace.

    Each name the run creates — the directories of ``output_dir`` still missing, each volume's output and its
    temporary name — must fit the file system's limit on name length; a path already at an output's name must be an
    earlier output (:func:`previous_output_problem`).

    Raises:
        ConfigurationError: naming the directory or volume, what is wrong and what to do.
    """
    path = Path(output_dir).expanduser()
    existing = nearest_existing(path)
    limit = _name_max(existing)
    for part in [p for p in (path, *path.parents) if p.is_relative_to(existing) and p != existing]:
        size = len(os.fsencode(part.name))
        if size > limit:
            raise ConfigurationError(
                f"prediction.output_dir {path}: its directory name {part.name!r} is {size} bytes, over the file "
                f"system's limit of {limit} bytes per name; choose a shorter prediction.output_dir"
            )
    for volume in volumes:
        final = output_path(path, volume, format)
        size = max(len(os.fsencode(final.name)), len(os.fsencode(temporary_path(final).name)))
        if size > limit:
            raise ConfigurationError(
                f"predict volume {volume}: its output {final.name} needs a file name of {size} bytes (while it is "
                f"written, as {temporary_path(final).name}), over the file system's limit of {limit} bytes per name "
                f"in {existing}; give the volume a shorter name (a link with a shorter name will do)"
            )
    if not path.is_dir():
        return  # no output exists yet
    for volume in volumes:
        final = output_path(path, volume, format)
        problem = previous_output_problem(final, format)
        if problem is not None:
            raise ConfigurationError(_not_ours_message(final, problem, volume))


def _not_ours_message(final: Path, problem: str, volume: Any = None) -> str:
    of = f" (of predict volume {volume})" if volume is not None else ""
    return (
        f"prediction output {final}{of} already exists and is not an earlier output of unet3d ({problem}); it is "
        "never replaced: move or rename it, or choose another prediction.output_dir"
    )


def _process_exists(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine; True when that cannot be told (then nothing is removed)."""
    if os.name != "posix":
        return True  # os.kill would terminate it, not probe it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # EPERM: it exists, run by another user
    return True


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[str]:
    """Remove the unfinished outputs in ``output_dir`` that processes of this machine left when they were killed, and
    return one note per removal (and per unfinished output of an older release, which is left: its host is unknown).

    Only names of the writer's scheme (``.<stem>_predictions.h5.tmp-<host>-<pid>``, ``.zarr``, and the ``.old-``
    names of previous Zarr outputs being replaced) are considered, and only those of this host whose process no
    longer exists (or is this process: it writes nothing before this runs). A pid reused by an unrelated process
    keeps its file, which is the safe side.
    """
    path = Path(output_dir).expanduser()
    notes: list[str] = []
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return notes
    for name in names:
        found = _TEMPORARY_NAME.match(name)
        if found is not None and found["host"] == _host():
            pid = int(found["pid"])
            if pid != os.getpid() and _process_exists(pid):
                continue
            stale = path / name
            try:
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
            except OSError as err:
                notes.append(f"could not remove {stale}, left by process {pid} of this machine, which has ended "
                             f"({err.strerror or err})")
                continue
            notes.append(f"removed {stale}: the unfinished output of process {pid} of this machine, which has ended")
        elif found is None and (old := _UNHOSTED_TEMPORARY_NAME.match(name)) is not None:
            notes.append(f"{path / name} looks like the unfinished output of an interrupted earlier run (process "
                         f"{old['pid']}, machine unknown); remove it if no prediction is writing it")
    return notes


def check_output_dir(
    output_dir: str | os.PathLike,
    volumes: Sequence[str | os.PathLike] = (),
    create: bool = True,
    other_inputs: Sequence[str | os.PathLike] = (),
    format: str = "hdf5",
) -> list[Path]:
    """Check that prediction can write into ``output_dir`` without touching any input; create it if ``create``.

    Args:
        output_dir: the directory of the output files.
        volumes: the volumes to predict. No output file (``<output_dir>/<stem>_predictions.h5`` for each) may be
            an input (a volume or one of ``other_inputs``) under any spelling: the same resolved path, or the same
            file through a symbolic or hard link; nor may two volumes share one. Default: none.
        create: create the missing directories and probe that a file can be written there. Default True. With False
            (checks before the run, which must leave nothing behind) only the nearest existing ancestor is checked.
        other_inputs: further files the run reads (the checkpoint). Default: none.
        format: the output format, ``"hdf5"`` or ``"zarr"`` (see :func:`output_path`). Default ``"hdf5"``.

    Returns:
        The directories that were created, deepest first (empty with ``create=False``); remove them with
        :func:`remove_created_dirs` if the run fails.

    Raises:
        ConfigurationError: the directory is not writable or is a file, two volumes would be written to the same
        file, an output would overwrite an input or a path that is not an earlier output, or a name is too long
        (see :func:`check_outputs`).
    """
    path = Path(output_dir).expanduser()
    check_collisions(path, [Path(p) for p in volumes], [Path(p) for p in other_inputs], format)
    check_outputs(path, volumes, format)
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise ConfigurationError(
            f"prediction.output_dir {path}: not writable ({existing} is a file, not a directory); choose a directory"
        )
    if not create:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigurationError(f"prediction.output_dir {path}: not writable (permission denied in {existing})")
        return []
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".unet3d-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        remove_created_dirs(created)
        reason = err.strerror or type(err).__name__
        raise ConfigurationError(f"prediction.output_dir {path}: not writable ({reason})") from None
    return created


def remove_created_dirs(created: Sequence[Path]) -> None:
    """Remove the directories :func:`check_output_dir` created, deepest first, as far as they are empty."""
    for directory in created:
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (or already gone): it and its parents stay


def _file_key(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def check_collisions(
    output_dir: Path, volumes: Sequence[Path], other_inputs: Sequence[Path] = (), format: str = "hdf5"
) -> None:
    """Raise if two volumes share an output file, or an output file (or ``output_dir``) is an input: the same
    resolved path, or the same inode (a hard link, or a symbolic link that ``resolve`` follows too)."""
    inputs = [*volumes, *other_inputs]
    by_path = {p.resolve(): p for p in inputs}
    by_inode = {key: p for p in inputs if (key := _file_key(p)) is not None}
    target = output_dir.resolve()
    for resolved, given in by_path.items():
        # A directory input is a Zarr store: outputs written into it would change the input.
        if target == resolved or (given.is_dir() and target.is_relative_to(resolved)):
            raise ConfigurationError(
                f"prediction.output_dir {output_dir} is or lies inside the input {given}; inputs are never "
                "written to: choose another directory"
            )
    outputs: dict[Path, Path] = {}
    for volume in volumes:
        final = output_path(output_dir, volume, format)
        resolved = final.resolve()
        if resolved in outputs:
            raise ConfigurationError(
                f"predict volumes {outputs[resolved]} and {volume} would both be written to {final}; rename one or "
                "predict them in separate runs"
            )
        outputs[resolved] = volume
        clash = by_path.get(resolved)
        if clash is None and (key := _file_key(final)) is not None:
            clash = by_inode.get(key)
        if clash is not None:
            raise ConfigurationError(
                f"prediction.output_dir {output_dir}: the prediction of {volume} would be written to {final}, which "
                f"is the input {clash}; inputs are never overwritten: choose another prediction.output_dir"
            )


class _BackgroundWriter:
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


def _shuffle_bytes(array: np.ndarray) -> np.ndarray:
    """HDF5's shuffle filter: byte ``k`` of every element, for ``k = 0 .. itemsize - 1``, one group after another.

    Grouping the exponent bytes of float data together makes it compress better and faster.
    """
    flat = np.ascontiguousarray(array).reshape(-1)
    if array.itemsize == 1:
        return flat
    return np.ascontiguousarray(flat.view(np.uint8).reshape(-1, array.itemsize).T)


def _deflate(chunk: np.ndarray) -> bytes:
    # HDF5's deflate filter stores a zlib stream, what zlib.compress returns; zlib releases the GIL while it works,
    # so several chunks compress in parallel threads.
    return zlib.compress(_shuffle_bytes(chunk), GZIP_LEVEL)


class _ChunkRowDataset:
    """One output dataset, ``(D, H, W)`` or ``(C, D, H, W)``, filled in z order by rows of whole chunks.

    Rows ``[z0, z1)`` are buffered until they complete a row of chunks (``CHUNK_ZYX[0]`` z-rows, or up to ``D`` at the
    end). With gzip each chunk of a complete row is byte-shuffled and deflated in a thread pool and stored as is
    (``write_direct_chunk``), so compression, HDF5's slowest step, runs on several cores; without compression (or
    with lzf, which only HDF5 implements) the row is written through h5py.
    """

    def __init__(
        self, file: h5py.File | _ZarrOutput, name: str, shape: tuple[int, ...], dtype: str, compression: str | None,
        pool: ThreadPoolExecutor | None,
    ) -> None:
        self.channel_axis = len(shape) == 4
        zyx = shape[-3:]
        self.chunks = ((1,) if self.channel_axis else ()) + tuple(min(n, c) for n, c in zip(zyx, CHUNK_ZYX))
        opts: dict[str, Any] = {}
        if isinstance(file, _ZarrOutput):
            compression = None  # the store compresses (in zarr's own threads) as rows are written
        elif compression == "gzip":
            opts = {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True}
        elif compression == "lzf":
            opts = {"compression": "lzf", "shuffle": True}
        self.dataset = file.create_dataset(name, shape=shape, dtype=dtype, chunks=self.chunks, **opts)
        self.shape = shape
        self.depth = zyx[0]
        self.pool = pool if compression == "gzip" else None
        self._row: np.ndarray | None = None  # the chunk row being filled, (C, cz, H, W) or (cz, H, W)
        self._row_start = 0  # first z-row of _row
        self._next = 0  # first z-row not received yet
        self._pending: deque = deque()  # (chunk offset, future of compressed bytes), in submission order

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
                self._write(self._row_start, self._row)
                self._row = None
        self._next = z1

    def _write(self, z0: int, rows: np.ndarray) -> None:
        """Write rows starting at ``z0``, a multiple of the chunk depth, covering whole chunk rows."""
        if self.pool is None:
            index = (slice(None), slice(z0, z0 + rows.shape[1])) if self.channel_axis else slice(z0, z0 + rows.shape[0])
            self.dataset[index] = rows
            return
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
                        self._pending.append((offset, self.pool.submit(_deflate, block)))
        self._store(keep=MAX_PENDING_CHUNKS)

    def _store(self, keep: int) -> None:
        """Store finished chunks in submission order until at most ``keep`` are pending (bounds memory)."""
        while self._pending and (len(self._pending) > keep or self._pending[0][1].done()):
            offset, future = self._pending.popleft()
            self.dataset.id.write_direct_chunk(offset, future.result())

    def close(self) -> None:
        if self._next != self.depth:
            raise RuntimeError(f"{self.dataset.name}: only rows 0-{self._next} of {self.depth} were written")
        self._store(keep=0)


class _VolumeOutput:
    """The temporary HDF5 file (or Zarr store) of one volume while it is being written; renamed to its final name
    when complete."""

    def __init__(
        self, final: Path, shape: Sequence[int], channels: int, dtype: str, segmentation: str | None,
        compression: str | None, pool: ThreadPoolExecutor | None, format: str = "hdf5",
        instances: tuple[dict[str, Any], WatershedOptions] | None = None,
    ) -> None:
        self.final = final
        self.instances = instances  # (the model's target spec, watershed settings), or None
        self.compression = compression
        self.tmp = temporary_path(final)
        self.format = format
        try:
            if format == "zarr":
                shutil.rmtree(self.tmp, ignore_errors=True)  # left by a killed run of a process with our pid
                self.file: Any = _ZarrOutput(self.tmp, compression)
            else:
                # No chunk cache: every chunk is written whole, once, so caching gains nothing, and chunks left dirty
                # in a cache when the disk fills could never be flushed (HDF5 then cannot close the file).
                self.file = h5py.File(self.tmp, "w", rdcc_nbytes=0)
        except BaseException:
            self._remove_tmp()  # it may exist before the failure (HDF5 creates the file, then fails on a full disk)
            raise
        try:
            d, h, w = (int(n) for n in shape)
            self.scale = 255.0 if dtype == "uint8" else 1.0
            self.predictions = _ChunkRowDataset(self.file, "predictions", (channels, d, h, w), dtype, compression, pool)
            self.predictions.dataset.attrs["scale"] = self.scale  # probabilities = stored values / scale
            self.segmentation: _ChunkRowDataset | None = None
            self.segmentation_kind = segmentation
            if segmentation == "argmax":
                seg_dtype = "uint8" if channels <= 256 else "uint16"
                self.segmentation = _ChunkRowDataset(self.file, "segmentation", (d, h, w), seg_dtype, compression, pool)
            elif segmentation == "threshold":
                self.segmentation = _ChunkRowDataset(
                    self.file, "segmentation", (channels, d, h, w), "uint8", compression, pool
                )
        except BaseException:
            self.discard()
            raise

    def write(self, z0: int, z1: int, probabilities: np.ndarray, segmentation: np.ndarray | None) -> None:
        """Store rows ``[z0, z1)``: float32 ``(C, z1 - z0, H, W)`` probabilities and, if computed already (on the
        device), their segmentation; otherwise the segmentation is derived here."""
        if self.segmentation is not None and segmentation is None:
            if self.segmentation_kind == "argmax":
                segmentation = probabilities.argmax(0).astype(self.segmentation.dataset.dtype)
            else:
                segmentation = (probabilities > 0.5).astype(np.uint8)
        if self.scale != 1.0:
            probabilities = np.clip(np.rint(probabilities * self.scale), 0, self.scale)
        # The chunk-row buffers have the storage dtype: copying into them is the cast.
        self.predictions.add(z0, z1, probabilities)
        if self.segmentation is not None:
            self.segmentation.add(z0, z1, segmentation)

    def commit(self) -> None:
        self.predictions.close()
        if self.segmentation is not None:
            self.segmentation.close()
        if self.instances is not None:
            self._write_instances(*self.instances)
        self.file.close()
        # Checked at setup too; this catches what appeared at the final name while the volume was predicted.
        problem = previous_output_problem(self.final, self.format)
        if problem is not None:
            raise ConfigurationError(_not_ours_message(self.final, problem))
        if self.format == "zarr":
            _replace_directory(self.tmp, self.final)
        else:
            os.replace(self.tmp, self.final)

    def _write_instances(self, spec: dict[str, Any], options: WatershedOptions) -> None:
        """Read the complete maps back and write their watershed as ``instances``: the watershed needs the whole
        volume at once, which the streamed slabs never were."""
        from ..instances import boundary_evidence, instance_dtype, watershed_instances

        maps = np.asarray(self.predictions.dataset[...], np.float32)
        if self.scale != 1.0:
            maps /= self.scale
        boundary, foreground = boundary_evidence(maps, spec, options.threshold)
        del maps
        labels = watershed_instances(boundary, foreground, options)
        count = int(labels.max()) if labels.size else 0
        # Written like the other outputs (same chunks and compression, HDF5 or Zarr), in one go.
        output = _ChunkRowDataset(self.file, "instances", labels.shape, instance_dtype(count), self.compression, None)
        output.add(0, labels.shape[0], labels)
        output.close()
        output.dataset.attrs["count"] = count
        output.dataset.attrs["method"] = f"seeded watershed of {spec['kind']}: {options}"

    def discard(self) -> None:
        """Close and delete the temporary file; never raises, since it runs while another error is handled."""
        if self.format == "hdf5":
            # HDF5 flushes metadata and cached chunks when it closes a file. On a full disk that fails, the file stays
            # open inside the library, and its second attempt at exit can crash the process. Emptying the file
            # first gives back the space it held, so the close can succeed; its content is being thrown away anyway.
            with contextlib.suppress(OSError):
                os.truncate(self.tmp, 0)
        try:
            self.file.close()
        except Exception:  # noqa: BLE001 - flushing to a full disk fails again; the first error is the one to report
            pass
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        try:
            if self.format == "zarr":
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _replace_directory(source: Path, final: Path) -> None:
    """Rename the complete store ``source`` to ``final``, replacing an older output there.

    A directory cannot be renamed over a non-empty one, so the old output is first renamed aside (one rename: it
    stays complete under some name until the new one is in place) and deleted after.
    """
    old = None
    if final.exists() or final.is_symlink():
        old = _aside_path(final)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(source, final)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


class PredictionWriter(Callback):
    """Stitch predicted patches on the model's device and write ``<output_dir>/<stem>_predictions.h5`` per volume.

    Args:
        output_dir: directory for the output files, created if missing. A path already at an output's name is
            replaced only if it is an earlier output of this writer; anything else there is refused before any work.
            Default ``"predictions"``.
        blend: how overlapping patches are combined: ``"average"`` (every covering patch counts equally, as the
            original tool) or ``"gaussian"`` (importance weights peaking at the patch centre, ``sigma = patch / 8``
            per axis, as nnU-Net and MONAI). Default ``"average"``.
        halo: voxels discarded at each interior face of every patch before blending (one int, or one per axis
            ``[z, y, x]``); faces on the volume border are kept. Needs ``stride <= patch - 2 * halo``. Default 0.
        save_segmentation: also write a ``segmentation`` dataset (argmax for softmax models, probability > 0.5 per
            channel for sigmoid models). Default False.
        dtype: storage type of ``predictions``: ``"float32"``, ``"float16"`` or ``"uint8"`` (probability × 255,
            rounded; the dataset's ``scale`` attribute says 255). Default ``"float32"``.
        compression: HDF5 compression of the outputs: ``"gzip"`` (level 1), ``"lzf"`` (faster, larger) or
            ``"none"``; for Zarr outputs ``"gzip"`` stands for Blosc-zstd (level 3) and ``"lzf"`` is refused.
            Default ``"gzip"``.
        tta: flip test-time augmentation: average the predictions of the 8 flips of each patch (8× the compute).
            Default False.
        format: ``"hdf5"``: one HDF5 file ``<stem>_predictions.h5`` per volume; ``"zarr"``: one Zarr (format 3)
            store ``<stem>_predictions.zarr`` (needs the ``formats`` extra). Default ``"hdf5"``.
        instances: also write ``instances``, a ``(D, H, W)`` uint32/uint64 instance segmentation from a seeded
            watershed of the stitched maps; only for models trained with ``data.label_transform`` boundaries or
            affinities. MEMORY: unlike the rest of prediction, which streams, the watershed holds the WHOLE volume:
            about 80 bytes per voxel plus 4 per voxel and output channel (a 1024^3 volume needs about 90 GB).
            Volumes above ``watershed.memory_limit_gb`` are refused before prediction starts; segment such volumes
            blockwise from the written ``predictions`` (e.g. PlantSeg, elf, daisy/lsd). Default False.
        watershed: settings of that watershed (threshold, seed smoothing and spacing, minimum size, memory limit);
            see :class:`~unet3d_lightning.instances.WatershedOptions`. Default ``WatershedOptions()``.

    Example::

        trainer = Trainer(callbacks=[PredictionWriter("out/", blend="gaussian", save_segmentation=True)])
        trainer.predict(model, datamodule=HDF5DataModule(predict_paths=["vol.h5"], predict_patch_shape=[64, 128, 128]),
                        return_predictions=False)
    """

    def __init__(
        self,
        output_dir: str = "predictions",
        blend: Literal["average", "gaussian"] = "average",
        halo: int | tuple[int, int, int] = 0,
        save_segmentation: bool = False,
        dtype: Literal["float32", "float16", "uint8"] = "float32",
        compression: Literal["gzip", "lzf", "none"] = "gzip",
        tta: bool = False,
        format: Literal["hdf5", "zarr"] = "hdf5",
        instances: bool = False,
        watershed: WatershedOptions = WatershedOptions(),
    ) -> None:
        if blend not in ("average", "gaussian"):
            raise ConfigurationError(f"prediction.blend {blend!r} is not one of average, gaussian")
        if dtype not in ("float32", "float16", "uint8"):
            raise ConfigurationError(f"prediction.dtype {dtype!r} is not one of float32, float16, uint8")
        if compression not in ("gzip", "lzf", "none"):
            raise ConfigurationError(f"prediction.compression {compression!r} is not one of gzip, lzf, none")
        if format not in ("hdf5", "zarr"):
            raise ConfigurationError(f"prediction.format {format!r} is not one of hdf5, zarr")
        if format == "zarr":
            require_formats_extra("prediction.format zarr")
            if compression == "lzf":
                raise ConfigurationError(
                    "prediction.compression lzf is HDF5's own; Zarr outputs take gzip (stored as Blosc-zstd) or none"
                )
        halos = (halo,) * 3 if isinstance(halo, int) else tuple(halo)
        if len(halos) != 3 or min(halos) < 0:
            raise ConfigurationError(f"prediction.halo {halo!r} must be one int >= 0 or three, [z, y, x]")
        self.output_dir = output_dir
        self.blend = blend
        self.halo = halos
        self.save_segmentation = save_segmentation
        self.dtype = dtype
        self.compression = None if compression == "none" else compression
        self.tta = tta
        self.format = format
        self.instances = instances
        self.watershed = WatershedOptions(**watershed) if isinstance(watershed, dict) else watershed
        self.written: list[Path] = []
        self._created: list[Path] = []  # directories this run created, removed again if it fails
        self._reset()

    def _reset(self) -> None:
        self._plans: list[Any] = []
        self._next = 0  # the first volume never opened
        self._current: int | None = None
        self._stitcher: StreamingStitcher | None = None
        self._output: _VolumeOutput | None = None
        self._writer: _BackgroundWriter | None = None
        self._bar: Any = None
        self._voxels = 0
        self._start = 0.0
        self._pool: ThreadPoolExecutor | None = None
        self._targets: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict" and trainer.is_global_zero:
            self._created = check_output_dir(self.output_dir)
            notes = remove_stale_temporaries(self.output_dir)
            if notes and sys.stderr is not None:
                with contextlib.suppress(OSError, ValueError):  # a closed stderr: the removals stand without notes
                    print("\n".join(f"note: {note}" for note in notes), file=sys.stderr, flush=True)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        self.written = []
        loader = trainer.predict_dataloaders
        dataset = getattr(loader, "dataset", None)
        plans = getattr(dataset, "plans", None)
        if plans is None:
            raise ConfigurationError(
                "PredictionWriter needs the predict dataset of HDF5DataModule (one with 'plans' of volumes and grids)"
            )
        volumes = [Path(plan.volume.path) for plan in plans]
        check_collisions(Path(self.output_dir).expanduser(), volumes, format=self.format)
        check_outputs(self.output_dir, volumes, self.format)
        self._check_halo(plans, int(pl_module.hparams.out_channels))
        self._check_memory(plans, pl_module, int(getattr(loader, "batch_size", None) or 1))
        self._targets = self._check_instances(plans, pl_module) if self.instances else None
        self._plans = list(plans)
        pl_module.predict_tta = self.tta
        self._start = time.perf_counter()
        # Rank r receives dataset items r, r + W, ... (the datamodule's sampler); count this rank's share per volume
        # for the progress bars.
        rank, world = trainer.global_rank, trainer.world_size
        self._share = []
        offset = 0
        for plan in self._plans:
            n = len(plan.grid)
            self._share.append(len(range((rank - offset) % world, n, world)))
            offset += n

    def on_predict_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        probabilities: torch.Tensor = outputs["probabilities"]
        # One host copy for both: when the locations arrive on an accelerator, each copy is a synchronisation.
        where = torch.cat(
            [torch.as_tensor(outputs["volume"]).reshape(-1, 1), torch.as_tensor(outputs["start"]).reshape(-1, 3)], 1
        ).cpu()
        padding = outputs.get("padding")
        if padding is not None and bool(torch.as_tensor(padding).any()):
            # DDP padding duplicates (ShardedSampler pad_uneven): another rank stitches the real patch.
            real = ~torch.as_tensor(padding).cpu()
            where, probabilities = where[real], probabilities[real.to(probabilities.device)]
        volumes = where[:, 0].tolist()
        starts = where[:, 1:]
        i = 0
        while i < len(volumes):
            v = volumes[i]
            j = i
            while j < len(volumes) and volumes[j] == v:
                j += 1
            self._advance_to(trainer, pl_module, v)
            self._write_slabs(self._stitcher.add(probabilities[i:j], starts[i:j]))
            if self._bar is not None:
                self._bar.update(j - i)
            i = j

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Volumes this rank received no patch of still take part in the band reductions of the other ranks.
        self._advance_to(trainer, pl_module, len(self._plans))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.predict_tta = False
        self._created = []  # the run succeeded: its directories stay
        self._close_pool()
        if trainer.is_global_zero and self.written:
            seconds = time.perf_counter() - self._start
            lines = [f"predict finished: {len(self.written)} volume(s), {self._voxels / max(seconds, 1e-9):,.0f} "
                     f"voxels/s, {seconds:.1f} s"]
            lines += [f"  wrote {path}" for path in self.written]
            print("\n".join(lines), flush=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except BaseException:  # noqa: BLE001 - the original exception is the one to report
                pass
        if self._output is not None:
            self._output.discard()
        if trainer.is_global_zero:
            # A stop signal may arrive between creating a file and recording it: remove this process's temporary
            # files by name.
            for plan in self._plans:
                temporary = temporary_path(output_path(self.output_dir, plan.volume.path, self.format))
                if temporary.is_dir():
                    shutil.rmtree(temporary, ignore_errors=True)  # a Zarr store
                else:
                    temporary.unlink(missing_ok=True)
        if self._bar is not None:
            self._bar.close()
        pl_module.predict_tta = False
        self._close_pool()
        self._reset()
        remove_created_dirs(self._created)  # as far as they are empty: volumes finished before the failure stay
        self._created = []

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _check_halo(self, plans: Sequence[Any], channels: int) -> None:
        """Build (without allocating) each volume's stitcher now, so that a halo the grid cannot take fails before
        any patch is predicted rather than after the first batch."""
        for plan in plans:
            try:
                StreamingStitcher(plan.volume.spatial_shape, plan.grid, channels, blend=self.blend, halo=self.halo)
            except ValueError as err:
                raise ConfigurationError(
                    f"prediction.halo {list(self.halo)} does not fit the patch grid of {plan.volume.path}: {err}"
                ) from None

    def _check_memory(self, plans: Sequence[Any], pl_module: pl.LightningModule, batch_size: int) -> None:
        """Refuse, before any patch is predicted, a run whose patches, network and stitcher cannot fit in memory
        (see :func:`estimate_predict_memory`)."""
        hp = pl_module.hparams
        f_maps = hp.get("f_maps", 64)
        patch = tuple(s.stop - s.start for s in plans[0].grid[0])
        widest = max(plans, key=lambda plan: _plane(plan.padded_shape))
        estimate = estimate_predict_memory(
            patch, widest.padded_shape, batch_size, int(hp.get("in_channels", 1)), int(hp.out_channels),
            int(f_maps if isinstance(f_maps, int) else f_maps[0]), tta=self.tta,
            output_itemsize=np.dtype(self.dtype).itemsize,
        )
        device = pl_module.device
        # On an accelerator the writer's buffers are in host memory, everything else on the device.
        groups = [(device, [k for k in estimate if k != "writer"]), (torch.device("cpu"), ["writer"])]
        if device.type == "cpu":
            groups = [(device, list(estimate))]
        for memory, keys in groups:
            need = sum(estimate[k] for k in keys)
            have = available_memory(memory)
            if have is not None and need > have:
                parts = ", ".join(f"{k} {_gib(estimate[k])}" for k in keys)
                raise ConfigurationError(
                    f"predicting patches of data.predict_patch_shape {list(patch)} in batches of data.batch_size "
                    f"{batch_size} needs about {_gib(need)} of {memory} memory ({parts}; the stitcher holds "
                    f"patch-depth bands of {widest.volume.path}, {widest.padded_shape[1]} x {widest.padded_shape[2]} "
                    f"in y x) but {_gib(have)} is available; use a smaller data.predict_patch_shape or data.batch_size"
                )

    def _check_instances(self, plans: Sequence[Any], pl_module: pl.LightningModule) -> dict[str, Any]:
        """The model's target spec, after checking that it has one and that every volume's watershed fits in
        ``watershed.memory_limit_gb``: refused here, before any patch is predicted, rather than by the OOM killer."""
        from ..instances import watershed_bytes

        targets = getattr(pl_module, "hparams", {}).get("targets")
        if not targets:
            raise ConfigurationError(
                "prediction.instances needs a model trained on boundaries or affinities (data.label_transform); this "
                "model predicts class probabilities or masks: drop prediction.instances or use such a checkpoint"
            )
        channels = int(pl_module.hparams.out_channels)
        limit = float(self.watershed.memory_limit_gb) * 1024**3
        for plan in plans:
            shape = plan.volume.spatial_shape
            need = watershed_bytes(shape) + 4 * channels * int(np.prod(shape))
            if need > limit:
                raise ConfigurationError(
                    f"predict volume {plan.volume.path}: the watershed of prediction.instances holds the whole volume "
                    f"{tuple(shape)} in memory, about {need / 1024**3:.1f} GB, above prediction.watershed."
                    f"memory_limit_gb={self.watershed.memory_limit_gb:g}; raise the limit if the machine has the "
                    "memory, or predict without instances and segment the predictions blockwise (e.g. PlantSeg, "
                    "elf, daisy/lsd)"
                )
        return dict(targets)

    # ------------------------------------------------------------------------------------------------ volumes
    def _advance_to(self, trainer: pl.Trainer, pl_module: pl.LightningModule, volume: int) -> None:
        """Finish the open volume, open-and-finish the volumes this rank has no patch of, then open ``volume``.

        ``volume == len(plans)`` finishes everything. Skipped volumes must still be stitched: under DDP the other
        ranks' patches arrive through the band reductions, in which every rank takes part.
        """
        if self._current == volume:
            return
        if self._current is not None:
            if volume < self._current:
                raise RuntimeError(f"predict batches went back from volume {self._current} to {volume}")
            self._finish_volume()
        while self._next < min(volume, len(self._plans)):
            self._open_volume(trainer, pl_module, self._next)
            self._finish_volume()
        if volume < len(self._plans):
            self._open_volume(trainer, pl_module, volume)

    def _open_volume(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        plan = self._plans[index]
        channels = int(pl_module.hparams.out_channels)
        reduce = None
        if trainer.world_size > 1:
            def reduce(band: torch.Tensor) -> torch.Tensor:
                return trainer.strategy.reduce(band, reduce_op="sum")
        self._stitcher = StreamingStitcher(
            plan.volume.spatial_shape, plan.grid, channels, blend=self.blend, halo=self.halo,
            device=pl_module.device, reduce=reduce,
        )
        self._current = index
        self._next = index + 1
        self._activation = getattr(pl_module, "activation", "softmax")
        if trainer.is_global_zero:
            segmentation = None
            if self.save_segmentation:
                segmentation = "argmax" if self._activation == "softmax" else "threshold"
            if self._pool is None and self.compression == "gzip" and self.format == "hdf5":
                self._pool = ThreadPoolExecutor(COMPRESSION_THREADS, thread_name_prefix="unet3d-deflate")
            final = output_path(self.output_dir, plan.volume.path, self.format)
            with _writing(final, (channels, *plan.volume.spatial_shape), self.dtype):
                self._output = _VolumeOutput(
                    final, plan.volume.spatial_shape, channels, self.dtype, segmentation, self.compression, self._pool,
                    self.format, instances=(self._targets, self.watershed) if self._targets else None,
                )
            self._writer = _BackgroundWriter()
            if trainer.progress_bar_callback is not None:
                self._bar = tqdm(
                    total=self._share[index], desc=f"{Path(plan.volume.path).name} ({index + 1}/{len(self._plans)})",
                    unit="patch", leave=True, dynamic_ncols=True,
                )

    def _write_slabs(self, slabs: list) -> None:
        if self._output is None:
            return  # ranks other than 0 only take part in the reductions
        output = self._output
        for z0, z1, slab in slabs:
            self._voxels += slab[0].numel()
            segmentation = None
            if slab.device.type == "cuda":
                # The segmentation is cheaper on the device, and the copies to pinned memory run asynchronously:
                # the writer thread waits for the event, the next batches do not.
                if self.save_segmentation:
                    segmentation = _pinned_copy(self._segment(slab))
                values = _pinned_copy(slab)
                event = torch.cuda.Event()
                event.record()
            else:
                # A CPU slab is a fresh tensor nobody else holds; the writer thread derives the rest from it.
                values, event = slab.cpu(), None

            def job(z0: int = z0, z1: int = z1, values: torch.Tensor = values, segmentation: Any = segmentation,
                    event: Any = event) -> None:
                if event is not None:
                    event.synchronize()
                output.write(z0, z1, values.numpy(), None if segmentation is None else segmentation.numpy())

            with _writing(output.final, output.predictions.shape, self.dtype):
                self._writer.submit(job)

    def _segment(self, slab: torch.Tensor) -> torch.Tensor:
        if self._activation == "softmax":
            return slab.argmax(0).to(torch.uint8 if slab.shape[0] <= 256 else torch.int32)
        return (slab > 0.5).to(torch.uint8)

    def _finish_volume(self) -> None:
        self._write_slabs(self._stitcher.finish())
        if self._output is not None:
            with _writing(self._output.final, self._output.predictions.shape, self.dtype):
                self._writer.close()
                self._output.commit()
            self.written.append(self._output.final)
        if self._bar is not None:
            self._bar.close()
        self._stitcher = self._output = self._writer = self._bar = None
        self._current = None


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """Start an asynchronous copy of a device tensor into page-locked host memory and return the host tensor."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


# ------------------------------------------------------------------------------------------------ failures
# errno values that mean the output's disk has no room: a full file system, or the user's quota spent.
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@contextlib.contextmanager
def _writing(final: Path, shape: Sequence[int], dtype: str) -> Iterator[None]:
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
            f"prediction.output_dir on a disk with room (this volume's predictions take up to {_gib(size)} "
            "before compression)"
        ) from None


# ------------------------------------------------------------------------------------------------ memory
# float32 values the network holds per voxel of a patch and per feature map of its first level, at the peak of an
# inference forward pass: the full-resolution encoder output kept for the skip connection, the decoder's
# concatenation of it with the upsampled features, each convolution's input, output and workspace, normalisation
# temporaries; the coarser levels add about a third (f_maps doubles while voxels shrink eightfold). Measured (peak
# resident memory of one forward on CPU, GroupNorm, 3 levels, the plain, residual and residual-SE U-Nets, batches of 1
# and 2, contiguous and channels-last, with the decoders' inputs released layer by layer and oneDNN convolutions also
# for batches of one): 3.6-6.0 values per voxel and feature map, the feature maps counted as at least FEATURE_BLOCK,
# since oneDNN's CPU convolutions pad channels to blocks of 16. Twice that leaves room for other kernels' workspaces.
ACTIVATION_VALUES_PER_FEATURE = 12
FEATURE_BLOCK = 16


def estimate_predict_memory(
    patch_shape: Sequence[int],
    padded_shape: Sequence[int],
    batch_size: int,
    in_channels: int,
    out_channels: int,
    f_maps: int,
    tta: bool = False,
    output_itemsize: int = 4,
) -> dict[str, int]:
    """A rough but conservative estimate, in bytes, of the memory prediction needs beyond the model's weights.

    With ``P = pz * py * px`` voxels per patch, ``B`` the batch size, ``C`` the output and ``C_in`` the input channels,
    ``H x W`` the padded volume's plane and float32 (4 bytes) everywhere:

    - ``stitcher`` (on the model's device): the accumulation band ``pz x (C + 1) x H x W``, the staging of one batch
      ``B x (C + 1) x P`` and one finished slab ``C x pz x H x W``;
    - ``patches`` (device): the batch ``B x C_in x P``, its logits and probabilities ``2 x B x C x P``, doubled with
      flip test-time augmentation (a flipped copy and the running sum);
    - ``network`` (device): ``B x P x max(f_maps, FEATURE_BLOCK) x ACTIVATION_VALUES_PER_FEATURE`` activations
      (measured, see there);
    - ``writer`` (host): the output's chunk row ``C x 16 x H x W`` in the stored dtype, and up to three slabs
      ``C x pz x H x W`` queued for writing or in transfer.

    Args:
        patch_shape: ``(pz, py, px)``.
        padded_shape: ``(D, H, W)`` of the padded volume (the widest plane of the run).
        batch_size: patches per batch.
        in_channels, out_channels: the model's channels.
        f_maps: feature maps of the network's first level.
        tta: flip test-time augmentation. Default False.
        output_itemsize: bytes per stored prediction value. Default 4 (float32).

    Returns:
        ``{"stitcher", "patches", "network", "writer"}`` → bytes.
    """
    pz = int(patch_shape[0])
    voxels = math.prod(int(n) for n in patch_shape)
    plane = int(padded_shape[1]) * int(padded_shape[2])
    c, b = int(out_channels), int(batch_size)
    patches = 4 * b * voxels * (in_channels + 2 * c)
    return {
        "stitcher": 4 * (pz * (c + 1) * plane + b * (c + 1) * voxels + c * pz * plane),
        "patches": patches * (2 if tta else 1),
        "network": 4 * b * voxels * max(int(f_maps), FEATURE_BLOCK) * ACTIVATION_VALUES_PER_FEATURE,
        "writer": c * plane * (16 * output_itemsize + 3 * 4 * pz),
    }


def available_memory(device: torch.device) -> int | None:
    """Bytes that ``device`` can still allocate: free CUDA memory plus what PyTorch's cache holds unused, or the
    host's available memory (the tighter of ``/proc/meminfo``'s MemAvailable and a cgroup memory limit); None when
    unknown (other devices and systems: then nothing is refused)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as meminfo:
            found.append(1024 * int(next(line for line in meminfo if line.startswith("MemAvailable:")).split()[1]))
    if not found:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    # A container's limit is invisible in /proc/meminfo (cgroup v2 first, then v1).
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        with contextlib.suppress(OSError, ValueError):
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:
                found.append(int(limit) - int(Path(usage_file).read_text()))
                break
    return min(found) if found else None


def _plane(shape: Sequence[int]) -> int:
    return int(shape[1]) * int(shape[2])


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
