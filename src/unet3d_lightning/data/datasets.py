"""The datasets the DataModule builds: training / validation / test patches (:class:`PatchDataset`) and prediction
patches (:class:`PredictDataset`), and the normalisation both apply (:func:`normalize`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .regression_targets import normalize_target
from .io.handles import FileCache
from .sampling import PaddingIndex
from .targets import LabelTransform, relabel
from .transforms import Compose
from .volumes import Volume, read_region

Shape3 = tuple[int, int, int]
Location = tuple[int, tuple[slice, slice, slice]]  # (volume index, patch slices)


def normalize(raw: np.ndarray, volume: Volume, mode: str, *, overwrite: bool = False) -> np.ndarray:
    """Raw ``(C, ...)`` to float32 by the volume's statistics, the same rule in training and prediction.

    ``standardize``: ``(x - mean_c) / std_c`` with the volume's per-channel mean and (population) standard
    deviation, ``std_c`` floored at 1e-8 so a constant channel maps to 0.
    ``percentile``: ``(clip(x, low_c, high_c) - low_c) / (high_c - low_c)``, in ``[0, 1]``, with the volume's
    ``percentiles`` ``low_c``, ``high_c``.
    ``none``: cast only.

    Args:
        raw: ``(C, ...)`` array of any numeric dtype.
        volume: the volume ``raw`` comes from; its ``stats`` are used (None: cast only).
        mode: ``"standardize"``, ``"percentile"`` or ``"none"``.
        overwrite: allow computing in ``raw``'s own memory when it already is float32 (a freshly read buffer
            nobody else holds), saving a copy. Default False: ``raw`` is never modified.
    """
    x = raw.astype(np.float32, copy=not overwrite)
    stats = volume.stats
    if mode == "none" or stats is None:
        return x
    shape = (-1,) + (1,) * (x.ndim - 1)
    if mode == "standardize":
        # The mean is subtracted as float32 high part plus the remainder: rounding the mean itself to float32 would
        # shift every output by up to ulp(mean) / (2 std), a visible bias for data with a large offset (raw around
        # 30000 with a spread of 50 is common in microscopy); x - high is exact for x near the mean (Sterbenz).
        mean = np.asarray(stats.mean, np.float64)
        high = mean.astype(np.float32)
        x -= high.reshape(shape)
        x -= (mean - high).astype(np.float32).reshape(shape)
        x /= np.maximum(np.asarray(stats.std, np.float32), 1e-8).reshape(shape)
        return x
    low = np.asarray(stats.low, np.float32).reshape(shape)
    high = np.asarray(stats.high, np.float32).reshape(shape)
    np.clip(x, low, high, out=x)
    x -= low
    x /= np.maximum(high - low, 1e-8)
    return x


class PatchDataset(Dataset):
    """Patches of raw (and label, weight) at fixed locations; items are ``index`` or ``(index, augmentation_seed)``.

    Returns dicts with ``raw`` float32 ``(C, pz, py, px)``, ``label`` (int64 ``(pz, py, px)`` class ids, float32
    ``(C, pz, py, px)`` masks, or for a regression target float32 ``(C, pz, py, px)``, a 3D target as one channel,
    scaled by ``target_normalization``, see :func:`~unet3d_lightning.data.regression_targets.normalize_target`)
    and ``weight`` float32 when the volumes have one.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        locations: Sequence[Location],
        normalization: str = "standardize",
        transforms: Compose | None = None,
        with_labels: bool = True,
        label_transform: LabelTransform | None = None,
        ignore_label: int | None = None,
        target_normalization: str = "none",
    ) -> None:
        self.volumes = list(volumes)
        self.target_normalization = target_normalization
        # Instance labels: relabelled to small int64 ids before the augmentations, turned into targets after them.
        self.label_transform = label_transform
        self.ignore_label = ignore_label
        self.locations = list(locations)
        self.normalization = normalization
        self.transforms = transforms
        self.with_labels = with_labels
        self._files = FileCache()

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, index_seed(item))
        padding = isinstance(item, PaddingIndex)
        v, slices = self.locations[index]
        volume = self.volumes[v]
        raw = read_region(volume, self._files, "raw", slices, volume.raw_is_4d)
        # A region read from the file is a new buffer this call owns and may overwrite; an in-memory region is a
        # view of the volume and must be copied.
        fresh = not volume.arrays
        raw = normalize(raw if volume.raw_is_4d else raw[None], volume, self.normalization, overwrite=fresh)
        sample = {"raw": torch.from_numpy(np.ascontiguousarray(raw))}
        if self.with_labels and volume.label_internal_path is not None and volume.label_kind == "regression":
            target = read_region(volume, self._files, "label", slices, volume.label_channels is not None)
            target = target if volume.label_channels is not None else target[None]
            sample["label"] = torch.from_numpy(np.ascontiguousarray(normalize_target(
                target, volume.stats, self.normalization, self.target_normalization, self.ignore_label)))
        elif self.with_labels and volume.label_internal_path is not None:
            label = read_region(volume, self._files, "label", slices, volume.label_kind == "binary")
            if volume.label_kind == "instances":
                label = relabel(label, ignore_label=self.ignore_label)
            dtype = np.int64 if volume.label_kind in ("class_ids", "instances") else np.float32
            sample["label"] = torch.from_numpy(np.ascontiguousarray(label.astype(dtype, copy=not fresh)))
        if self.with_labels and volume.weight_internal_path is not None:
            weight = read_region(volume, self._files, "weight", slices, volume.weight_is_4d)
            sample["weight"] = torch.from_numpy(np.ascontiguousarray(weight.astype(np.float32, copy=not fresh)))
        if self.transforms is not None:
            generator = torch.Generator()
            generator.manual_seed(seed)
            sample = self.transforms(sample, generator)
        if self.label_transform is not None and "label" in sample:
            sample = self.label_transform(sample)
        sample["padding"] = padding  # a DDP padding duplicate (see ShardedSampler): not to be counted
        return sample

    def close(self) -> None:
        """Close the files this process opened for reading (they are reopened on the next read)."""
        self._files.close()


def index_seed(index: int) -> int:
    """Augmentation seed for a dataset used with plain integer indices (outside our sampler)."""
    return (index * 2_654_435_761 + 97) % 2**62


@dataclass
class PredictionPlan:
    """Where one prediction volume's patches lie: its real shape, the padded shape the grid covers, and the grid."""

    volume: Volume
    padded_shape: Shape3
    grid: list[tuple[slice, slice, slice]]


class PredictDataset(Dataset):
    """Every patch of every prediction volume, volume by volume, each volume's patches in z-major order.

    Items are dicts ``{"raw": (C, pz, py, px), "volume": index into plans, "start": (z, y, x) in padded coordinates}``.
    Parts of a patch beyond a volume smaller than the patch are zero after normalisation (the stitcher crops them).
    """

    def __init__(self, plans: Sequence[PredictionPlan], normalization: str = "standardize") -> None:
        self.plans = list(plans)
        self.normalization = normalization
        self.items = [(v, s) for v, plan in enumerate(self.plans) for s in plan.grid]
        self._files = FileCache()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        v, slices = self.items[index]
        volume = self.plans[v].volume
        inside = tuple(slice(s.start, min(s.stop, n)) for s, n in zip(slices, volume.spatial_shape))
        raw = read_region(volume, self._files, "raw", inside, volume.raw_is_4d)  # type: ignore[arg-type]
        raw = normalize(
            raw if volume.raw_is_4d else raw[None], volume, self.normalization, overwrite=not volume.arrays
        )
        shape = tuple(s.stop - s.start for s in slices)
        if raw.shape[1:] != shape:
            padded = np.zeros((raw.shape[0], *shape), np.float32)
            padded[(slice(None), *(slice(0, n) for n in raw.shape[1:]))] = raw
            raw = padded
        start = torch.tensor([s.start for s in slices], dtype=torch.int64)
        return {
            "raw": torch.from_numpy(np.ascontiguousarray(raw)), "volume": v, "start": start,
            "padding": isinstance(index, PaddingIndex),  # a DDP padding duplicate: the writer skips it
        }

    def close(self) -> None:
        """Close the files this process opened for reading (they are reopened on the next read)."""
        self._files.close()
