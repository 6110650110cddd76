"""Finding, opening and validating volumes (HDF5, Zarr, TIFF: see :mod:`~unet3d_lightning.data.readers`).

Every check here runs at ``setup()``, before training or prediction starts, and raises a
:class:`~unet3d_lightning.errors.ConfigurationError` whose one sentence names the file, the dataset and the problem.
Files are only ever opened read-only. Every format gets the same checks and the same messages.

Layout of a volume file (the original pytorch-3dunet's):

- ``/raw``: ``(D, H, W)`` or channel-first ``(C, D, H, W)``;
- ``/label``: ``(D, H, W)`` class ids ``0 .. out_channels-1`` (plus an optional ``ignore_index``), or
  ``(C, D, H, W)`` binary masks, one per output channel;
- optional ``/weight`` (any name): per-voxel loss weights, ``(D, H, W)`` or shaped like the label.

A 2D dataset ``(H, W)`` (HDF5 dataset, Zarr array, TIFF image) is read as the one-slice volume ``(1, H, W)``
(:class:`OneSlice`), for 2D images and the 2D networks that work on z-slices; a 2D ``(C, H, W)`` multi-channel image cannot be told from a volume and must
be stored as ``(C, 1, H, W)``.
"""

from __future__ import annotations

import glob
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from ..errors import ConfigurationError
from . import readers

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
# h5py's default chunk cache is 1 MiB: too small to hold the chunks that overlapping patches share, so neighbouring
# patches would read and decompress the same chunks again. The size applies to every open *dataset*, and HDF5 drops
# a dataset's cache when the dataset is closed, so readers must keep their datasets open (see the datamodule).
CHUNK_CACHE_BYTES = 64 * 1024**2
# Hash slots of the chunk cache: a prime well above the number of chunks that fit (HDF5's advice), so few collide.
CHUNK_CACHE_SLOTS = 10007
# Voxels read per block while scanning a volume: bounds the scan's memory whatever the volume's size (a block and
# its float64 working copies take about 20 bytes per voxel, so about 160 MiB).
SCAN_BLOCK_VOXELS = 8 * 1024**2
# Voxels sampled per channel to estimate percentiles (exact order statistics of a huge volume would need it all).
PERCENTILE_SAMPLES = 4 * 1024**2
# What h5py raises for damaged files: OSError for unreadable bytes or failed filters (gzip, ...), RuntimeError and
# KeyError for broken object headers or links.
READ_ERRORS = (OSError, RuntimeError, KeyError)


class OneSlice:
    """A 2D ``(H, W)`` array seen as the volume ``(1, H, W)``: indexed like the volume, read from the image."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset = dataset
        self.shape = (1, *dataset.shape)
        self.ndim = 3
        self.dtype = dataset.dtype
        self.chunks = (1, *dataset.chunks) if dataset.chunks else None

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        z, rest = (index[0], index[1:]) if index and index[0] is not Ellipsis else (slice(None), ())
        image = self.dataset[rest] if rest else self.dataset[()]
        return image[None][z]


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


def resolve_paths(
    entries: Sequence[str | os.PathLike] | str | os.PathLike | None, role: str, *, unique: bool = True
) -> list[Path]:
    """Expand files, directories and glob patterns, in a stable order.

    A directory is a volume when it is a Zarr store (``*.zarr``, or holding ``zarr.json``/``.zgroup``/``.zarray``);
    any other directory stands for the volumes inside it: its HDF5 (``.h5``/``.hdf5``/``.hdf``) and TIFF
    (``.tif``/``.tiff``) files and its Zarr stores. A glob pattern selects the same kinds of volumes among its
    matches (a ``README.txt`` beside the volumes is left out, as a directory scan leaves it out); a file named on
    its own is read whatever its suffix (as HDF5 unless it is TIFF or Zarr).

    Args:
        entries: one path or pattern (a string, as typed on the command line: ``vol.h5``, ``data/train/``,
            ``'data/*.h5'``), a list of them, or None (no volumes).
        role: ``"train"``, ``"val"``, ``"test"`` or ``"predict"`` (or ``"label_paths.train"``...), for the error
            messages.
        unique: keep a file listed twice once. Default True; False keeps every listing (to pair label files with
            volumes by position).

    A name that exists (a file or a directory) is taken as it is, even when it holds glob characters (``[``, ``]``,
    ``*``, ``?``): ``scan[1].h5`` is that file, not ``scan1.h5``. Only a name that does not exist is a pattern.

    Returns:
        The files, each pattern's and directory's matches sorted by name, in the order of ``entries``; a file listed
        twice (also through different spellings of its path) is kept once, at its first place.

    Raises:
        ConfigurationError: a path that does not exist, an empty path, a pattern that matches no volume, a directory
        holding no volume.
    """
    if entries is None:
        return []
    if isinstance(entries, (str, os.PathLike)):
        # One path is one entry (never its characters); an empty string is no path at all.
        entries = [entries] if str(entries) else []
    suffixes = ", ".join(HDF5_SUFFIXES + readers.ZARR_SUFFIXES + readers.TIFF_SUFFIXES)
    paths: list[Path] = []
    for entry in entries:
        text = os.path.expanduser(str(entry))
        if not text:
            raise ConfigurationError(f"{role}_paths holds an empty path")
        # A path that exists is taken as it is, even when its name holds [ ] * ? (a folder "scan [1]").
        if glob.has_magic(text) and not os.path.lexists(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True))
            matches = [p for p in found if readers.is_volume(p)]
            # With "**" a pattern also matches the arrays inside a Zarr store; the store is the volume.
            stores = {p for p in matches if p.is_dir()}
            matches = [p for p in matches if not any(parent in stores for parent in p.parents)]
            if not matches:
                if not found:
                    raise ConfigurationError(f"{role}_paths: the pattern {text!r} matched no file")
                names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
                raise ConfigurationError(
                    f"{role}_paths: the pattern {text!r} matched {len(found)} path(s) ({names}) but no volume: a "
                    f"pattern selects HDF5 files, Zarr stores and TIFF files ({suffixes}), as a directory scan "
                    "does; name a file of another suffix on its own to read it as HDF5"
                )
            paths.extend(matches)
        elif Path(text).is_dir() and readers.volume_format(text) != "zarr":
            matches = sorted(p for p in Path(text).iterdir() if readers.is_volume(p))
            if not matches:
                raise ConfigurationError(
                    f"{role}_paths: the directory {text} holds no HDF5 file, Zarr store or TIFF file ({suffixes})"
                )
            paths.extend(matches)
        elif Path(text).exists():
            paths.append(Path(text))
        else:
            raise ConfigurationError(f"{role} volume {text}: file does not exist")
    if not unique:
        return paths
    seen: set[Path] = set()
    kept = []
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept


@dataclass(frozen=True)
class IntensityStats:
    """Per-channel statistics of a raw volume, computed once at setup.

    ``mean`` and ``std`` are exact over every voxel (float64, blocks merged with Chan et al.'s pairwise update);
    ``low`` and ``high`` (only for percentile normalisation) are estimated from an evenly strided lattice of at most
    about ``PERCENTILE_SAMPLES`` voxels per channel, exact for volumes up to that size.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()


@dataclass
class Volume:
    """What setup learned about one volume; cheap to pickle into DataLoader workers (holds no file handle).

    ``label_path`` is the file holding the labels (and weights) when they are not in ``path``. ``arrays`` holds the
    volume's arrays by kind (``"raw"``, ``"label"``, ``"weight"``) when ``in_memory`` is on, and is empty otherwise.
    """

    path: Path
    role: str
    raw_internal_path: str
    spatial_shape: tuple[int, int, int]
    channels: int
    raw_is_4d: bool
    label_internal_path: str | None = None
    label_kind: str | None = None  # "class_ids" (3D) | "binary" (4D) | None
    label_channels: int | None = None
    weight_internal_path: str | None = None
    weight_is_4d: bool = False
    stats: IntensityStats | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    label_path: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.role} volume {self.path}"

    def describe(self, key: str | None, kind: str | None = None) -> str:
        """``"<role> volume <file>: dataset '<key>'"``, naming the file that holds ``key``: the label file for the
        labels and weights (``kind`` ``"label"`` or ``"weight"``; by default guessed from ``key``)."""
        if kind is None:
            kind = "raw" if key == self.raw_internal_path else "label"
        return f"{self.role} volume {self.file_of(kind)}: dataset '{key}'"

    def file_of(self, kind: str) -> Path:
        """The file holding the ``"raw"``, ``"label"`` or ``"weight"`` array."""
        return self.label_path if kind != "raw" and self.label_path is not None else self.path

    def key_of(self, kind: str) -> str | None:
        """The internal path of the ``"raw"``, ``"label"`` or ``"weight"`` array (None: the volume has none)."""
        return {"raw": self.raw_internal_path, "label": self.label_internal_path,
                "weight": self.weight_internal_path}[kind]


def error_summary(err: BaseException) -> str:
    """The first line of an exception's message (h5py's carry long HDF5 error stacks), or its type name."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


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


def open_volume(
    path: Path,
    role: str,
    raw_internal_path: str = "raw",
    label_internal_path: str | None = None,
    weight_internal_path: str | None = None,
    label_path: Path | None = None,
) -> Volume:
    """Read a volume's metadata (shapes, dtypes) and check its structure; reads no voxel data.

    Args:
        path: the volume's file (HDF5, Zarr store or TIFF; see :mod:`~unet3d_lightning.data.readers`).
        role: ``"train"``, ``"val"``, ``"test"`` or ``"predict"``, for error messages.
        raw_internal_path: dataset of the raw image, ``(D, H, W)`` or ``(C, D, H, W)``. Default ``"raw"``.
        label_internal_path: dataset of the labels, ``(D, H, W)`` class ids or ``(C, D, H, W)`` binary masks of the
            raw's spatial shape. Default None: no labels (prediction).
        weight_internal_path: dataset of per-voxel loss weights, ``(D, H, W)``, or ``(C, D, H, W)`` like 4D labels.
            Default None.
        label_path: the file holding the labels and weights, when not ``path`` (a TIFF raw's labels, for one).
            Default None: ``path``.

    Raises:
        ConfigurationError: a missing or non-numeric dataset, an empty raw, shapes that do not fit together.
    """
    with ExitStack() as files:
        f = files.enter_context(readers.open_file(path, role))
        labels = f if label_path is None else files.enter_context(readers.open_file(label_path, role))
        label_file = path if label_path is None else label_path
        raw = f.array(raw_internal_path)
        if raw.ndim not in (3, 4):
            raise ConfigurationError(
                f"{role} volume {path}: dataset '{raw_internal_path}' has shape {raw.shape}; expected (D, H, W), "
                "channel-first (C, D, H, W) or a 2D image (H, W)"
            )
        check_dtype(raw.dtype, f"{role} volume {path}: dataset '{raw_internal_path}'")
        spatial = tuple(int(s) for s in raw.shape[-3:])
        if min(raw.shape) < 1:
            raise ConfigurationError(
                f"{role} volume {path}: dataset '{raw_internal_path}' is empty (shape {raw.shape})"
            )
        volume = Volume(
            path=path, role=role, raw_internal_path=raw_internal_path, spatial_shape=spatial,  # type: ignore[arg-type]
            channels=int(raw.shape[0]) if raw.ndim == 4 else 1, raw_is_4d=raw.ndim == 4, label_path=label_path,
        )
        label = None
        if label_internal_path is not None:
            label = labels.array(label_internal_path)
            if label.ndim not in (3, 4) or tuple(label.shape[-3:]) != spatial or min(label.shape) < 1:
                raise ConfigurationError(
                    f"{role} volume {label_file}: dataset '{label_internal_path}' has shape {label.shape} but "
                    f"'{raw_internal_path}' has spatial shape {spatial}; labels must be (D, H, W) class ids or "
                    "(C, D, H, W) binary masks of the same spatial shape"
                )
            check_dtype(label.dtype, f"{role} volume {label_file}: dataset '{label_internal_path}'")
            volume.label_internal_path = label_internal_path
            volume.label_kind = "class_ids" if label.ndim == 3 else "binary"
            volume.label_channels = int(label.shape[0]) if label.ndim == 4 else None
        if weight_internal_path is not None:
            weight = labels.array(weight_internal_path)
            label_shape = label.shape if label is not None else None
            fits = weight.ndim == 3 or (weight.ndim == 4 and label_shape is not None and len(label_shape) == 4
                                        and weight.shape[0] == label_shape[0])
            if tuple(weight.shape[-3:]) != spatial or not fits:
                raise ConfigurationError(
                    f"{role} volume {label_file}: dataset '{weight_internal_path}' has shape {weight.shape}; per-voxel "
                    f"weights must have the spatial shape {spatial}, as (D, H, W) or like a 4D label (C, D, H, W)"
                )
            check_dtype(weight.dtype, f"{role} volume {label_file}: dataset '{weight_internal_path}'")
            volume.weight_internal_path = weight_internal_path
            volume.weight_is_4d = weight.ndim == 4
    return volume


# ----------------------------------------------------------------------------------- checks of any array source
# These take an array or a dtype and ``where`` (the "<role> volume <file>: dataset '<key>'" of the message), so
# every storage format applies the same rules.

FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_dtype(dtype: np.dtype, where: str) -> None:
    """Raise unless values of ``dtype`` can be cast to the float32 the network computes in without losing meaning.

    Args:
        dtype: the stored dtype.
        where: the file and dataset, as the message names them.

    Raises:
        ConfigurationError: a non-numeric dtype (strings, compounds), or a complex one, whose imaginary part the cast
        would drop with only a numpy warning.
    """
    if np.issubdtype(dtype, np.complexfloating):
        raise ConfigurationError(
            f"{where} has complex dtype {dtype}, but the network takes real values and the imaginary part would be "
            "dropped; store the magnitude (abs), the real part, or real and imaginary parts as two channels"
        )
    if not (np.issubdtype(dtype, np.number) or dtype == bool):
        raise ConfigurationError(f"{where} has non-numeric dtype {dtype}")


def check_float32_values(block: np.ndarray, where: str, rows: str, fix: str) -> None:
    """Raise if ``block`` holds values that are not finite as the network sees them, after the cast to float32.

    Args:
        block: values as stored (any numeric dtype).
        where: the file and dataset, as the message names them.
        rows: where in the dataset ``block`` lies, for the message ("z rows 0-63").
        fix: what the user should do about NaN or Inf.

    Raises:
        ConfigurationError: NaN or Inf, or finite float64 values beyond float32's range (about ±3.4e38), which the
        cast would turn into Inf (and training into NaN).
    """
    if not np.issubdtype(block.dtype, np.floating):
        return  # every integer type, up to uint64 (1.8e19), fits float32's range
    finite = np.isfinite(block)
    if not finite.all():
        raise ConfigurationError(f"{where} contains {_non_finite(block, finite)} in {rows}; {fix}")
    if block.dtype.itemsize > 4 and block.size:
        largest = float(np.abs(block).max())
        if largest > FLOAT32_MAX:
            raise ConfigurationError(
                f"{where} holds values up to {largest:.3g} in {rows}, beyond the float32 range (±3.4e38) the network "
                "computes in, where they would become Inf; rescale the data to a smaller range"
            )


def _blocks(shape: tuple[int, int, int], channels: int) -> Iterator[slice]:
    """z-slabs of at most SCAN_BLOCK_VOXELS voxels (at least one z-row)."""
    rows = max(1, SCAN_BLOCK_VOXELS // max(1, shape[1] * shape[2] * channels))
    for z in range(0, shape[0], rows):
        yield slice(z, min(z + rows, shape[0]))


def _read(dataset: Any, zs: slice, volume: Volume, key: str | None, kind: str = "raw") -> np.ndarray:
    """z-rows ``zs`` of a 3D or 4D dataset, or a one-sentence error naming file, dataset and rows when unreadable."""
    try:
        return np.asarray(dataset[:, zs] if dataset.ndim == 4 else dataset[zs])
    except READ_ERRORS as err:
        raise ConfigurationError(
            f"{volume.describe(key, kind)} cannot be read in z rows {zs.start}-{zs.stop - 1} ({error_summary(err)}); "
            "the file may be corrupt or truncated"
        ) from None


def _percentile_step(shape: tuple[int, int, int]) -> int:
    # One stride for all axes, so the sample is an even lattice over the volume.
    d, h, w = shape
    return max(1, math.ceil((d * h * w / PERCENTILE_SAMPLES) ** (1 / 3)))


MissingChunksPolicy = Literal["auto", "error", "fill"]
MISSING_CHUNKS_POLICIES = ("auto", "error", "fill")


class ChunkAudit:
    """What to do with the chunks an array's file does not store (``data.missing_chunks``), which every reader
    returns as the array's fill value without a word.

    ``"error"``: refuse the array. ``"fill"``: read them as the fill value, with one warning. ``"auto"``: refuse
    them unless they can be the writer's intent: Zarr lets writers leave out a chunk that holds only the fill value
    (zarr-python 3 does so by default, as does this package's Zarr output), so the chunks an array lacks are read as
    its fill value, with one warning, unless the array shows that its writer stores such chunks (it holds a stored
    chunk of only fill values: the missing ones were lost), or has no fill value (their content is undefined).
    HDF5 stores every chunk its writer writes, fill values or not, so a chunk it lacks was never written: refused.

    Created before the scan (refusals that need no data are raised there); :meth:`update` sees each slab the scan
    reads, :meth:`finish` decides at its end.

    Args:
        missing: from :meth:`~unet3d_lightning.data.readers.VolumeFile.missing_chunks`; None: nothing to audit.
        where: the file and dataset, as messages name them.
        policy: ``"auto"``, ``"error"`` or ``"fill"``.
    """

    def __init__(self, missing: readers.MissingChunks | None, where: str, policy: str) -> None:
        self.missing = missing
        self.where = where
        self.holds_data: np.ndarray | None = None  # per stored chunk: a value other than the fill value seen
        if missing is None:
            return
        m = missing
        # zarr reads the chunks of an array without a fill value as 0
        value = 0 if m.fill_value is None else getattr(m.fill_value, "item", lambda: m.fill_value)()
        self.fill = f"{value:g}" if isinstance(value, float) else str(value)
        self.head = f"{where} lacks {m.count} of {m.total} chunk(s) (the first {m.describe_first()})"
        self.fix = (f"restore them (an interrupted write or copy?), or set data.missing_chunks: fill to read them as "
                    f"{self.fill}")
        if policy == "fill":
            self._warn(f"{self.head}; they are read as the fill value {self.fill} (data.missing_chunks: fill)")
        elif policy == "error":
            raise ConfigurationError(f"{self.head}, which would be read as the fill value {self.fill}; {self.fix}")
        elif not m.may_be_omitted:
            why = ("HDF5 stores every chunk that is written, so these were never written"
                   if m.encode is None else "the array has no fill value, so their content is undefined")
            raise ConfigurationError(f"{self.head}: {why}; {self.fix}")
        else:
            self.holds_data = np.zeros(m.stored.shape, bool)

    @property
    def watching(self) -> bool:
        """Whether :meth:`update` needs the array's slabs."""
        return self.holds_data is not None

    def update(self, block: np.ndarray, zs: slice) -> None:
        """Note which chunks of the slab ``block`` (the array's z rows ``zs``) hold a value other than the fill
        value."""
        if self.holds_data is None:
            return
        fill = self.missing.fill_value  # type: ignore[union-attr]
        isnan = isinstance(fill, float) and math.isnan(fill)
        flags = ~np.isnan(block) if isnan else block != fill
        index = []
        for axis, size in enumerate(self.missing.view_chunks):  # type: ignore[union-attr]
            start = zs.start if axis == block.ndim - 3 else 0
            positions = start + np.arange(flags.shape[axis])
            cuts = np.flatnonzero((positions % size == 0) | (positions == start))
            flags = np.logical_or.reduceat(flags, cuts, axis=axis)
            index.append(slice(start // size, start // size + len(cuts)))
        self.holds_data[tuple(index)] |= flags

    def finish(self) -> None:
        """After the scan: refuse the array when a stored chunk held only fill values, else warn."""
        if self.holds_data is None:
            return
        empty = self.missing.stored & ~self.holds_data  # type: ignore[union-attr]
        if empty.any():
            raise ConfigurationError(
                f"{self.head}, but it stores chunks that hold only the fill value {self.fill} (the first "
                f"{self.missing.describe(np.argwhere(empty)[0])}): its writer keeps such chunks, so the missing ones "
                f"were lost; {self.fix}"
            )
        self._warn(
            f"{self.head}; they are read as the fill value {self.fill}, as Zarr defines for the chunks that writers "
            "(zarr-python 3 by default) leave out because they hold only that value; if they were lost instead, "
            "restore them (data.missing_chunks: error refuses such arrays)"
        )

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(message, MissingChunksWarning, stacklevel=4)


class MissingChunksWarning(UserWarning):
    """Chunks that an input array's file does not store are read as its fill value."""


def scan_volume(
    volume: Volume,
    *,
    out_channels: int | None = None,
    ignore_index: int | None = None,
    percentiles: tuple[float, float] | None = None,
    missing_chunks: MissingChunksPolicy = "auto",
) -> Volume:
    """Read a volume once, z-slab by z-slab: intensity statistics, and the checks that need voxel values.

    Args:
        volume: from :func:`open_volume`; its ``stats`` are filled in and it is returned.
        out_channels: the model's output channels. Default None: skip the label-value checks (no model known).
        ignore_index: label value allowed besides the classes / mask values. Default None.
        percentiles: ``(low, high)`` percentiles to estimate per channel. Default None: none.
        missing_chunks: what to do with chunks an array's file does not store (see :class:`ChunkAudit`):
            ``"auto"``, ``"error"`` or ``"fill"``. Default ``"auto"``.

    Checks: raw free of NaN and Inf; class-id labels whole numbers in ``[0, out_channels)`` besides ``ignore_index``;
    binary labels with ``out_channels`` channels and values in {0, 1} besides ``ignore_index``; weights finite and
    non-negative; every slab readable; every chunk stored, or its absence accepted by ``missing_chunks``.

    Statistics (per channel ``c``, ``n`` voxels): ``mean_c = Σ x / n`` and ``std_c = sqrt(Σ (x - mean_c)² / n)``
    (population standard deviation), accumulated per slab in float64 and merged with the pairwise update of Chan,
    Golub & LeVeque (1979), ``M2 = M2_a + M2_b + δ² n_a n_b / (n_a + n_b)``, which avoids the cancellation of
    ``E[x²] - E[x]²`` for data with a large offset.
    """
    path, role = volume.path, volume.role
    c = volume.channels
    count = 0
    mean = np.zeros(c, np.float64)
    m2 = np.zeros(c, np.float64)
    step = _percentile_step(volume.spatial_shape) if percentiles is not None else 0
    samples: list[np.ndarray] = []
    raw_key, label_key, weight_key = volume.raw_internal_path, volume.label_internal_path, volume.weight_internal_path
    with ExitStack() as files:
        f = files.enter_context(readers.open_file(path, role))
        labels = f if volume.label_path is None else files.enter_context(readers.open_file(volume.label_path, role))
        raw = f.array(raw_key)
        label = labels.array(label_key) if label_key else None
        weight = labels.array(weight_key) if weight_key else None
        # Before any voxel is read: a refused array costs only the listing of its chunks.
        audits = {kind: ChunkAudit(file.missing_chunks(key), volume.describe(key, kind), missing_chunks)
                  for kind, file, key in (("raw", f, raw_key), ("label", labels, label_key),
                                          ("weight", labels, weight_key)) if key}
        if label is not None and volume.label_kind == "binary" and out_channels is not None:
            if volume.label_channels != out_channels:
                raise ConfigurationError(
                    f"{volume.describe(label_key, 'label')} has {volume.label_channels} channels (binary masks) but the "
                    f"model has out_channels={out_channels}"
                )
        for zs in _blocks(volume.spatial_shape, c):
            block = _read(raw, zs, volume, raw_key)
            audits["raw"].update(block, zs)
            spatial = block if volume.raw_is_4d else block[None]
            rows = f"z rows {zs.start}-{zs.stop - 1}"
            check_float32_values(spatial, volume.describe(raw_key), rows, "clean or mask the raw data first")
            if step:
                first = (-zs.start) % step  # keeps the lattice z = 0, step, 2 step, ... across slabs
                samples.append(spatial[:, first::step, ::step, ::step].reshape(c, -1))
            values = spatial.reshape(c, -1).astype(np.float64)
            n = values.shape[1]
            block_mean = values.mean(axis=1)
            values -= block_mean[:, None]
            block_m2 = np.einsum("ij,ij->i", values, values)
            delta = block_mean - mean
            total = count + n
            mean += delta * (n / total)
            m2 += block_m2 + delta**2 * (count * n / total)
            count = total
            del values
            if label is not None and (out_channels is not None or audits["label"].watching):
                label_block = _read(label, zs, volume, label_key, "label")
                audits["label"].update(label_block, zs)
                if out_channels is not None:
                    _check_label_block(volume, label_block, out_channels, ignore_index)
            if weight is not None:
                weight_block = _read(weight, zs, volume, weight_key, "weight")
                audits["weight"].update(weight_block, zs)
                _check_weight_block(volume, weight_block, zs)
        for audit in audits.values():
            audit.finish()
    std = np.sqrt(m2 / count)
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()
    if percentiles is not None:
        sample = np.concatenate(samples, axis=1).astype(np.float64)
        lo, hi = np.percentile(sample, percentiles, axis=1)
        low, high = tuple(np.atleast_1d(lo).tolist()), tuple(np.atleast_1d(hi).tolist())
    volume.stats = IntensityStats(tuple(mean.tolist()), tuple(std.tolist()), low, high)
    return volume


def _non_finite(block: np.ndarray, finite: np.ndarray) -> str:
    nan = int(np.isnan(block).sum())
    inf = int((~finite).sum()) - nan
    parts = [f"{nan} NaN"] * bool(nan) + [f"{inf} Inf"] * bool(inf)
    return " and ".join(parts) + " value(s)"


def _check_label_block(volume: Volume, block: np.ndarray, out_channels: int, ignore_index: int | None) -> None:
    where = volume.describe(volume.label_internal_path, "label")
    values = block if ignore_index is None else block[block != ignore_index]
    if values.size == 0:
        return
    if volume.label_kind == "class_ids":
        if np.issubdtype(values.dtype, np.floating) and not np.array_equal(values, np.round(values)):
            bad = values[values != np.round(values)][0]
            raise ConfigurationError(
                f"{where} holds the non-integer value {float(bad):g}; class ids must be whole numbers"
            )
        lo, hi = values.min(), values.max()
        if lo < 0 or hi >= out_channels:
            bad = lo if lo < 0 else hi
            extra = "" if ignore_index is None else f" (besides ignore_index {ignore_index})"
            raise ConfigurationError(
                f"{where} holds class id {float(bad):g} outside [0, {out_channels}) for out_channels={out_channels}"
                f"{extra}; set model.out_channels to the number of classes or model.ignore_index for unlabelled voxels"
            )
    else:
        binary = (values == 0) | (values == 1)
        if not binary.all():
            bad = values[~binary][0]
            raise ConfigurationError(
                f"{where} holds the value {float(bad):g} but 4D labels must be binary masks (0 or 1"
                + ("" if ignore_index is None else f", or ignore_index {ignore_index}")
                + ")"
            )


def _check_weight_block(volume: Volume, block: np.ndarray, zs: slice) -> None:
    where = volume.describe(volume.weight_internal_path, "weight")
    rows = f"z rows {zs.start}-{zs.stop - 1}"
    check_float32_values(block, where, rows, "weights must be finite")
    negative = block < 0
    if negative.any():
        raise ConfigurationError(
            f"{where} holds {int(negative.sum())} negative weight(s) (smallest {float(block.min()):g}) in {rows}; "
            "weights must be >= 0"
        )


def load_arrays(volume: Volume) -> Volume:
    """Read a volume's arrays into ``volume.arrays`` by kind (the ``in_memory`` option, for data that fits in RAM)."""
    with ExitStack() as files:
        opened: dict[Path, readers.VolumeFile] = {}
        for kind in ("raw", "label", "weight"):
            key = volume.key_of(kind)
            if key is not None:
                file = volume.file_of(kind)
                if file not in opened:
                    opened[file] = files.enter_context(readers.open_file(file, volume.role))
                try:
                    volume.arrays[kind] = np.asarray(opened[file].array(key)[()])
                except READ_ERRORS as err:
                    raise ConfigurationError(
                        f"{volume.describe(key, kind)} cannot be read ({error_summary(err)}); the file may be corrupt"
                    ) from None
    return volume


def check_consistent(
    volumes: Iterable[Volume],
    attribute: str,
    what: str,
    dataset: str | None = None,
    show: Callable[[Any], str] = repr,
) -> Any:
    """Return the common value of ``attribute`` over volumes, or raise naming the first one that differs.

    Args:
        volumes: the volumes to compare.
        attribute: the :class:`Volume` attribute that must agree (``"channels"``, ``"label_kind"``, ...).
        what: how the message calls it ("has {what} {value}").
        dataset: the :class:`Volume` attribute holding the internal path of the dataset the value comes from
            (``"raw_internal_path"``, ``"label_internal_path"``), so the message names it. Default None: the raw.
        show: how the message writes a value. Default ``repr``.
    """
    first: Volume | None = None
    key = dataset or "raw_internal_path"
    for volume in volumes:
        if first is None:
            first = volume
        elif getattr(volume, attribute) != getattr(first, attribute):
            raise ConfigurationError(
                f"{volume.describe(getattr(volume, key))} has {what} {show(getattr(volume, attribute))} but "
                f"{first.describe(getattr(first, key))} has {show(getattr(first, attribute))}; all volumes must agree"
            )
    return None if first is None else getattr(first, attribute)
