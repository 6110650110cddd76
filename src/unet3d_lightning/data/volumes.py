"""Finding, opening and validating HDF5 volumes.

Every check here runs at ``setup()``, before training or prediction starts, and raises a
:class:`~unet3d_lightning.errors.ConfigurationError` whose one sentence names the file, the dataset and the problem.
Files are only ever opened read-only.

Layout of a volume file (the original pytorch-3dunet's):

- ``/raw``: ``(D, H, W)`` or channel-first ``(C, D, H, W)``;
- ``/label``: ``(D, H, W)`` class ids ``0 .. out_channels-1`` (plus an optional ``ignore_index``), or
  ``(C, D, H, W)`` binary masks, one per output channel;
- optional ``/weight`` (any name): per-voxel loss weights, ``(D, H, W)`` or shaped like the label.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import ConfigurationError

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
# h5py's default chunk cache is 1 MiB: too small to hold the chunks that overlapping patches share, so neighbouring
# patches would decompress the same chunks again. 64 MiB per open file keeps a band of chunks hot.
CHUNK_CACHE_BYTES = 64 * 1024**2
# Voxels read per block while scanning a volume: bounds the scan's memory whatever the volume's size.
SCAN_BLOCK_VOXELS = 32 * 1024**2
# Voxels sampled per channel to estimate percentiles (exact order statistics of a huge volume would need it all).
PERCENTILE_SAMPLES = 4 * 1024**2


def open_h5(path: str | os.PathLike, role: str = "input") -> h5py.File:
    """Open ``path`` read-only with a chunk cache sized for overlapping patches."""
    try:
        return h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=10007)
    except FileNotFoundError:
        raise ConfigurationError(f"{role} volume {path}: file does not exist") from None
    except OSError as err:
        raise ConfigurationError(f"{role} volume {path}: cannot be read as an HDF5 file ({_short(err)})") from None


def resolve_paths(entries: Sequence[str | os.PathLike] | str | os.PathLike | None, role: str) -> list[Path]:
    """Expand files, directories (their ``*.h5``/``*.hdf5``/``*.hdf`` files) and glob patterns, in a stable order.

    Raises for a path that does not exist, a pattern or directory matching no HDF5 file, and duplicates.
    """
    if entries is None:
        return []
    if isinstance(entries, (str, os.PathLike)):
        entries = [entries]
    paths: list[Path] = []
    for entry in entries:
        text = os.path.expanduser(str(entry))
        if glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise ConfigurationError(f"{role}_paths: the pattern {text!r} matched no file")
            paths.extend(matches)
        elif Path(text).is_dir():
            matches = sorted(p for p in Path(text).iterdir() if p.suffix.lower() in HDF5_SUFFIXES and p.is_file())
            if not matches:
                raise ConfigurationError(
                    f"{role}_paths: the directory {text} holds no HDF5 file ({', '.join(HDF5_SUFFIXES[:3])})"
                )
            paths.extend(matches)
        elif Path(text).is_file():
            paths.append(Path(text))
        else:
            raise ConfigurationError(f"{role} volume {text}: file does not exist")
    seen: set[Path] = set()
    unique = []
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


@dataclass(frozen=True)
class IntensityStats:
    """Per-channel statistics of a raw volume, computed once at setup (float64 sums over every voxel)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Percentiles are estimated from an evenly strided sample of at most PERCENTILE_SAMPLES voxels per channel.
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()


@dataclass
class Volume:
    """What setup learned about one HDF5 volume; cheap to pickle into DataLoader workers (holds no file handle)."""

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
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # filled when in_memory

    @property
    def name(self) -> str:
        return f"{self.role} volume {self.path}"

    def describe(self, key: str) -> str:
        return f"{self.name}: dataset '{key}'"


def _short(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _dataset(file: h5py.File, key: str, path: Path, role: str) -> h5py.Dataset:
    obj = file.get(key)
    if not isinstance(obj, h5py.Dataset):
        found = []
        file.visititems(lambda name, item: found.append(name) if isinstance(item, h5py.Dataset) else None)
        what = "is not a dataset" if obj is not None else "does not exist"
        raise ConfigurationError(
            f"{role} volume {path}: dataset '{key}' {what}; datasets in the file: {found or 'none'}"
        )
    return obj


def open_volume(
    path: Path,
    role: str,
    raw_internal_path: str = "raw",
    label_internal_path: str | None = None,
    weight_internal_path: str | None = None,
) -> Volume:
    """Read a volume's metadata (shapes, dtypes) and check its structure; reads no voxel data."""
    with open_h5(path, role) as f:
        raw = _dataset(f, raw_internal_path, path, role)
        if raw.ndim not in (3, 4):
            raise ConfigurationError(
                f"{role} volume {path}: dataset '{raw_internal_path}' has shape {raw.shape}; expected (D, H, W) or "
                "channel-first (C, D, H, W)"
            )
        if not (np.issubdtype(raw.dtype, np.number) or raw.dtype == bool):
            raise ConfigurationError(f"{role} volume {path}: dataset '{raw_internal_path}' has non-numeric dtype {raw.dtype}")
        spatial = tuple(int(s) for s in raw.shape[-3:])
        if min(spatial) < 1 or (raw.ndim == 4 and raw.shape[0] < 1):
            raise ConfigurationError(f"{role} volume {path}: dataset '{raw_internal_path}' is empty (shape {raw.shape})")
        volume = Volume(
            path=path, role=role, raw_internal_path=raw_internal_path, spatial_shape=spatial,  # type: ignore[arg-type]
            channels=int(raw.shape[0]) if raw.ndim == 4 else 1, raw_is_4d=raw.ndim == 4,
        )
        if label_internal_path is not None:
            label = _dataset(f, label_internal_path, path, role)
            if label.ndim not in (3, 4) or tuple(label.shape[-3:]) != spatial:
                raise ConfigurationError(
                    f"{role} volume {path}: dataset '{label_internal_path}' has shape {label.shape} but "
                    f"'{raw_internal_path}' has spatial shape {spatial}; labels must be (D, H, W) class ids or "
                    "(C, D, H, W) binary masks of the same spatial shape"
                )
            volume.label_internal_path = label_internal_path
            volume.label_kind = "class_ids" if label.ndim == 3 else "binary"
            volume.label_channels = int(label.shape[0]) if label.ndim == 4 else None
        if weight_internal_path is not None:
            weight = _dataset(f, weight_internal_path, path, role)
            if tuple(weight.shape[-3:]) != spatial or weight.ndim not in (3, 4):
                raise ConfigurationError(
                    f"{role} volume {path}: dataset '{weight_internal_path}' has shape {weight.shape}; per-voxel "
                    f"weights must have the spatial shape {spatial} (or the label's (C, D, H, W))"
                )
            volume.weight_internal_path = weight_internal_path
            volume.weight_is_4d = weight.ndim == 4
    return volume


def _blocks(shape: tuple[int, int, int], channels: int) -> Iterator[slice]:
    """z-slabs of at most SCAN_BLOCK_VOXELS voxels (at least one z-row)."""
    rows = max(1, SCAN_BLOCK_VOXELS // max(1, shape[1] * shape[2] * channels))
    for z in range(0, shape[0], rows):
        yield slice(z, min(z + rows, shape[0]))


def _read(dataset: h5py.Dataset, zs: slice) -> np.ndarray:
    return dataset[:, zs] if dataset.ndim == 4 else dataset[zs]


def scan_volume(
    volume: Volume,
    *,
    out_channels: int | None = None,
    ignore_index: int | None = None,
    percentiles: tuple[float, float] | None = None,
) -> Volume:
    """Read a volume once, block by block: intensity statistics, and the checks that need voxel values.

    Checks: no NaN/Inf in raw; class-id labels integral and in ``[0, out_channels)`` besides ``ignore_index``;
    binary labels with ``out_channels`` channels and values in {0, 1} besides ``ignore_index``; weights finite and
    non-negative. ``out_channels=None`` skips the label-range checks.
    """
    path, role = volume.path, volume.role
    c = volume.channels
    sums = np.zeros(c, np.float64)
    squares = np.zeros(c, np.float64)
    count = 0
    with open_h5(path, role) as f:
        raw = f[volume.raw_internal_path]
        label = f[volume.label_internal_path] if volume.label_internal_path else None
        weight = f[volume.weight_internal_path] if volume.weight_internal_path else None
        if label is not None and volume.label_kind == "binary" and out_channels is not None:
            if volume.label_channels != out_channels:
                raise ConfigurationError(
                    f"{volume.describe(volume.label_internal_path)} has {volume.label_channels} channels (binary "
                    f"masks) but the model has out_channels={out_channels}"
                )
        if label is not None and volume.label_kind == "class_ids" and not (
            np.issubdtype(label.dtype, np.integer) or np.issubdtype(label.dtype, np.floating) or label.dtype == bool
        ):
            raise ConfigurationError(f"{volume.describe(volume.label_internal_path)} has non-numeric dtype {label.dtype}")
        for zs in _blocks(volume.spatial_shape, c):
            try:
                block = _read(raw, zs)
            except OSError as err:
                raise ConfigurationError(
                    f"{volume.describe(volume.raw_internal_path)}: cannot read z rows {zs.start}-{zs.stop} "
                    f"({_short(err)}); the file may be corrupt"
                ) from None
            block = block.reshape(c, -1) if volume.raw_is_4d else block.reshape(1, -1)
            if np.issubdtype(block.dtype, np.floating) and not np.isfinite(block).all():
                bad = int((~np.isfinite(block)).sum())
                raise ConfigurationError(
                    f"{volume.describe(volume.raw_internal_path)} contains {bad} NaN/Inf values in z rows "
                    f"{zs.start}-{zs.stop}; clean or mask the raw data first"
                )
            block = block.astype(np.float64)
            sums += block.sum(axis=1)
            squares += np.square(block).sum(axis=1)
            count += block.shape[1]
            if label is not None and out_channels is not None:
                _check_label_block(volume, _read(label, zs), out_channels, ignore_index, zs)
            if weight is not None:
                w = _read(weight, zs)
                if not np.isfinite(w).all() or (w < 0).any():
                    raise ConfigurationError(
                        f"{volume.describe(volume.weight_internal_path)} has negative or non-finite weights in z rows "
                        f"{zs.start}-{zs.stop}"
                    )
        mean = sums / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
        low: tuple[float, ...] = ()
        high: tuple[float, ...] = ()
        if percentiles is not None:
            low, high = _percentiles(raw, volume, percentiles)
    volume.stats = IntensityStats(tuple(mean.tolist()), tuple(std.tolist()), low, high)
    return volume


def _check_label_block(
    volume: Volume, block: np.ndarray, out_channels: int, ignore_index: int | None, zs: slice
) -> None:
    where = f"{volume.describe(volume.label_internal_path)}"
    valid = np.ones(block.shape, bool) if ignore_index is None else block != ignore_index
    values = block[valid]
    if values.size == 0:
        return
    if volume.label_kind == "class_ids":
        if np.issubdtype(values.dtype, np.floating) and not np.array_equal(values, np.round(values)):
            raise ConfigurationError(f"{where} holds non-integer values; class ids must be whole numbers")
        lo, hi = values.min(), values.max()
        if lo < 0 or hi >= out_channels:
            bad = lo if lo < 0 else hi
            extra = "" if ignore_index is None else f" (besides ignore_index {ignore_index})"
            raise ConfigurationError(
                f"{where} holds class id {bad:g} outside [0, {out_channels}) for out_channels={out_channels}{extra}; "
                "set model.out_channels to the number of classes or model.ignore_index for unlabelled voxels"
            )
    else:
        if not np.isin(values, (0, 1)).all():
            bad = values[~np.isin(values, (0, 1))][0]
            raise ConfigurationError(
                f"{where} holds the value {bad:g} but 4D labels must be binary masks (0 or 1"
                + ("" if ignore_index is None else f", or ignore_index {ignore_index}")
                + ")"
            )


def _percentiles(raw: h5py.Dataset, volume: Volume, q: tuple[float, float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    d, h, w = volume.spatial_shape
    # One stride for all axes, so the sample is an even lattice over the volume.
    step = max(1, math.ceil((d * h * w / PERCENTILE_SAMPLES) ** (1 / 3)))
    sample = raw[:, ::step, ::step, ::step] if volume.raw_is_4d else raw[::step, ::step, ::step][None]
    sample = sample.reshape(sample.shape[0], -1).astype(np.float64)
    low, high = np.percentile(sample, q, axis=1)
    return tuple(np.atleast_1d(low).tolist()), tuple(np.atleast_1d(high).tolist())


def load_arrays(volume: Volume) -> Volume:
    """Read a volume's datasets into memory (the ``in_memory`` option, for data that fits in RAM)."""
    with open_h5(volume.path, volume.role) as f:
        for key in (volume.raw_internal_path, volume.label_internal_path, volume.weight_internal_path):
            if key is not None:
                volume.arrays[key] = f[key][()]
    return volume


def check_consistent(volumes: Iterable[Volume], attribute: str, what: str) -> Any:
    """Return the common value of ``attribute`` over volumes, or raise naming the first one that differs."""
    first: Volume | None = None
    for volume in volumes:
        if first is None:
            first = volume
        elif getattr(volume, attribute) != getattr(first, attribute):
            raise ConfigurationError(
                f"{volume.name} has {what} {getattr(volume, attribute)!r} but {first.name} has "
                f"{getattr(first, attribute)!r}; all volumes must agree"
            )
    return None if first is None else getattr(first, attribute)
