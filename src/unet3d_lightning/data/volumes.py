"""Finding, opening and validating volumes (HDF5, Zarr, TIFF: read through :mod:`~unet3d_lightning.data.io`).

Every check here runs at ``setup()``, before training or prediction starts, and raises a
:class:`~unet3d_lightning.errors.ConfigurationError` whose one sentence names the file, the dataset and the problem.
Files are only ever opened read-only. Every format gets the same checks and the same messages.

Layout of a volume file (the original pytorch-3dunet's):

- ``/raw``: ``(D, H, W)`` or channel-first ``(C, D, H, W)``;
- ``/label``: ``(D, H, W)`` class ids ``0 .. out_channels-1`` (plus an optional ``ignore_index``), or
  ``(C, D, H, W)`` binary masks, one per output channel;
- optional ``/weight`` (any name): per-voxel loss weights, ``(D, H, W)`` or shaped like the label.

A 2D dataset ``(H, W)`` (HDF5 dataset, Zarr array, TIFF image) is read as the one-slice volume ``(1, H, W)``
(:class:`~unet3d_lightning.data.io.base.OneSlice`), for 2D images and the 2D networks that work on z-slices; a 2D
``(C, H, W)`` multi-channel image cannot be told from a volume and must be stored as ``(C, 1, H, W)``.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from .io import (
    HDF5_SUFFIXES,
    READ_ERRORS,
    TIFF_SUFFIXES,
    ZARR_SUFFIXES,
    ChunkAudit,
    MissingChunksPolicy,
    VolumeFile,
    error_summary,
    is_volume,
    open_file,
    volume_format,
)
from .io.handles import FileCache

# Names that lived in this module before the readers moved to the io package, importable from here for code written
# against earlier versions.
from .io import CHUNK_CACHE_BYTES, MISSING_CHUNKS_POLICIES, MissingChunksWarning, OneSlice  # noqa: F401
from .io.hdf5 import CHUNK_CACHE_SLOTS, as_volume, is_lock_error, open_h5  # noqa: F401

# Voxels read per block while scanning a volume: bounds the scan's memory whatever the volume's size (a block and
# its float64 working copies take about 20 bytes per voxel, so about 160 MiB).
SCAN_BLOCK_VOXELS = 8 * 1024**2
# Voxels sampled per channel to estimate percentiles (exact order statistics of a huge volume would need it all).
PERCENTILE_SAMPLES = 4 * 1024**2


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
    suffixes = ", ".join(HDF5_SUFFIXES + ZARR_SUFFIXES + TIFF_SUFFIXES)
    paths: list[Path] = []
    for entry in entries:
        text = os.path.expanduser(str(entry))
        if not text:
            raise ConfigurationError(f"{role}_paths holds an empty path")
        # A path that exists is taken as it is, even when its name holds [ ] * ? (a folder "scan [1]").
        if glob.has_magic(text) and not os.path.lexists(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True))
            matches = [p for p in found if is_volume(p)]
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
        elif Path(text).is_dir() and volume_format(text) != "zarr":
            matches = sorted(p for p in Path(text).iterdir() if is_volume(p))
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
    label_kind: str | None = None  # "class_ids" (3D) | "binary" (4D) | "regression" (float targets) | None
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
        path: the volume's file (HDF5, Zarr store or TIFF; see :mod:`~unet3d_lightning.data.io`).
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
        f = files.enter_context(open_file(path, role))
        labels = f if label_path is None else files.enter_context(open_file(label_path, role))
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
                    "(C, D, H, W) binary masks of the same spatial shape (a regression target: (D, H, W) or "
                    "(C, D, H, W) of the raw's spatial shape)"
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
        f = files.enter_context(open_file(path, role))
        labels = f if volume.label_path is None else files.enter_context(open_file(volume.label_path, role))
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
            regression = volume.label_kind == "regression"  # float targets: checked finite whatever the model
            if label is not None and (out_channels is not None or audits["label"].watching or regression):
                label_block = _read(label, zs, volume, label_key, "label")
                audits["label"].update(label_block, zs)
                if regression:
                    check_regression_block(volume, label_block, zs, ignore_index)
                elif out_channels is not None:
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


def mark_regression_target(volume: Volume, out_channels: int | None) -> Volume:
    """Take the volume's labels as the float target of a regression model: ``(D, H, W)`` (one channel) or ``(C, D, H,
    W)`` (C channels) of the raw's spatial shape (checked by :func:`open_volume`), with as many channels as the model
    has outputs (``out_channels``; None: not checked). Integer and bool targets are taken as their values (a clean
    image stored as uint16 is a target like any other). ``label_channels`` stays None for a 3D target, as for class
    ids, so that readers know it has no channel axis.

    Raises:
        ConfigurationError: a channel count other than ``out_channels``.
    """
    if volume.label_internal_path is None:
        return volume
    volume.label_kind = "regression"
    channels = volume.label_channels or 1
    if out_channels is not None and channels != out_channels:
        layout = f"(C, D, H, W) with C = {channels}" if volume.label_channels else "(D, H, W), one channel"
        raise ConfigurationError(
            f"{volume.describe(volume.label_internal_path, 'label')} is a regression target {layout}, but the model "
            f"has out_channels={out_channels}; set model.out_channels to {channels}, one output per target channel"
        )
    return volume


def check_regression_block(volume: Volume, block: np.ndarray, zs: slice, ignore_index: float | None = None) -> None:
    """Raise if a slab of a regression target holds a value that is not finite (after the cast to float32), naming
    the first such voxel: ``(z, y, x)`` for a 3D target, ``(c, z, y, x)`` for a 4D one, in the dataset's coordinates.

    Args:
        volume: the volume whose target ``block`` is.
        block: z-rows ``zs`` of the target, ``(z, H, W)`` or ``(C, z, H, W)``, as stored.
        zs: the rows ``block`` holds.
        ignore_index: the target value of voxels without a target; finite by type, so it needs no exception here.

    Raises:
        ConfigurationError: NaN or Inf, or a float64 value beyond float32's range (it would become Inf).
    """
    if not np.issubdtype(block.dtype, np.floating):
        return  # integer targets are finite, and every integer type fits float32's range
    with np.errstate(over="ignore"):  # float64 beyond float32's range turns Inf here, as it would in the network
        finite = np.isfinite(block.astype(np.float32)) if block.dtype.itemsize > 4 else np.isfinite(block)
    if finite.all():
        return
    bad = np.argwhere(~finite)
    first = [int(i) for i in bad[0]]
    value = block[tuple(first)]
    axis = 1 if block.ndim == 4 else 0
    first[axis] += zs.start
    names = "(c, z, y, x)" if block.ndim == 4 else "(z, y, x)"
    more = f" (and {len(bad) - 1} more non-finite value(s) in z rows {zs.start}-{zs.stop - 1})" if len(bad) > 1 else ""
    shown = f"{float(value):g}" if np.isfinite(value) else str(float(value))
    what = shown if np.isfinite(value) else shown.replace("nan", "NaN").replace("inf", "Inf")
    beyond = ", beyond the float32 range the network computes in," if np.isfinite(value) else ""
    raise ConfigurationError(
        f"{volume.describe(volume.label_internal_path, 'label')} holds {what}{beyond} at {names} = {tuple(first)}"
        f"{more}; regression targets must be finite: fill those voxels, or set them to a value named by "
        "model.ignore_index (e.g. -1) to leave them out of the loss"
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
        opened: dict[Path, VolumeFile] = {}
        for kind in ("raw", "label", "weight"):
            key = volume.key_of(kind)
            if key is not None:
                file = volume.file_of(kind)
                if file not in opened:
                    opened[file] = files.enter_context(open_file(file, volume.role))
                try:
                    volume.arrays[kind] = np.asarray(opened[file].array(key)[()])
                except READ_ERRORS as err:
                    raise ConfigurationError(
                        f"{volume.describe(key, kind)} cannot be read ({error_summary(err)}); the file may be corrupt"
                    ) from None
    return volume


def read_region(
    volume: Volume, files: FileCache, kind: str, slices: tuple[slice, slice, slice], is_4d: bool
) -> np.ndarray:
    """The region ``slices`` of the volume's ``"raw"``, ``"label"`` or ``"weight"`` array: from memory with
    ``in_memory`` (a view), else read from its file through ``files`` (this process's open files).

    Args:
        volume: the volume.
        files: the reading process's open files.
        kind: ``"raw"``, ``"label"`` or ``"weight"``.
        slices: ``(z, y, x)`` slices of the region.
        is_4d: the array has a leading channel axis, read whole.

    Raises:
        ConfigurationError: the region cannot be read (the file changed or is damaged since setup).
    """
    index = (slice(None), *slices) if is_4d else slices
    source = volume.arrays.get(kind)
    if source is not None:
        return source[index]
    try:
        return np.asarray(files.dataset(volume, kind)[index])
    except READ_ERRORS as err:
        where = ", ".join(f"{a} {s.start}-{s.stop - 1}" for a, s in zip("zyx", slices))
        raise ConfigurationError(
            f"{volume.describe(volume.key_of(kind), kind)} cannot be read at {where} ({error_summary(err)}); the file "
            "changed or is damaged"
        ) from None


def check_instance_labels(volume: Volume) -> None:
    """With a label transform, labels must be ``(D, H, W)`` integer instance ids; marks the volume as such."""
    key = volume.label_internal_path
    if volume.label_kind != "class_ids":
        raise ConfigurationError(
            f"{volume.describe(key, 'label')} is 4D, but data.label_transform needs (D, H, W) instance labels (one id "
            "per object)"
        )
    with open_file(volume.file_of("label"), volume.role) as f:
        dtype = np.dtype(f.array(key).dtype)
    if not (np.issubdtype(dtype, np.integer) or dtype == bool):
        raise ConfigurationError(
            f"{volume.describe(key, 'label')} has dtype {dtype}, but instance labels must be integer ids (e.g. "
            "uint32, uint64); convert them, or set data.label_transform: none for class ids"
        )
    volume.label_kind = "instances"


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

