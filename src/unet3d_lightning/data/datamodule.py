"""HDF5DataModule: strided patches from HDF5 volumes for training, validation, testing and prediction."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import h5py
import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigurationError
from .patches import padded_shape, patch_grid
from .sampling import ShardedSampler
from .transforms import Augmentation, Compose
from .volumes import (
    Volume,
    check_consistent,
    load_arrays,
    open_h5,
    open_volume,
    resolve_paths,
    scan_volume,
)

Shape3 = tuple[int, int, int]
Location = tuple[int, tuple[slice, slice, slice]]  # (volume index, patch slices)
Normalization = Literal["standardize", "percentile", "none"]


# --------------------------------------------------------------------------------------------------- reading
class _FileCache:
    """Per-process read-only h5py handles, opened on first use.

    h5py handles must not cross a fork: a DataLoader worker that inherited its parent's open file would share HDF5's
    internal state with it. The cache therefore belongs to one process id and starts empty in any other process,
    and it is dropped when the dataset is pickled for spawned workers.
    """

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._files: dict[str, h5py.File] = {}

    def get(self, volume: Volume) -> h5py.File:
        if self._pid != os.getpid():
            self._pid, self._files = os.getpid(), {}
        key = str(volume.path)
        if key not in self._files:
            self._files[key] = open_h5(volume.path, volume.role)
        return self._files[key]

    def __getstate__(self) -> dict[str, Any]:
        return {"_pid": -1, "_files": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _read_region(volume: Volume, cache: _FileCache, key: str, slices: tuple[slice, slice, slice], is_4d: bool) -> np.ndarray:
    source = volume.arrays.get(key)
    if source is None:
        source = cache.get(volume)[key]
    return source[(slice(None), *slices)] if is_4d else source[slices]


def normalize(raw: np.ndarray, volume: Volume, mode: str) -> np.ndarray:
    """Raw ``(C, ...)`` to float32 by the volume's statistics, the same rule in training and prediction.

    ``standardize``: ``(x - mean_c) / std_c`` with the volume's per-channel mean and standard deviation.
    ``percentile``: clip to the volume's ``[p_low, p_high]`` percentiles, then scale to ``[0, 1]``.
    ``none``: cast only.
    """
    x = raw.astype(np.float32, copy=False)
    stats = volume.stats
    if mode == "none" or stats is None:
        return x
    shape = (-1,) + (1,) * (x.ndim - 1)
    if mode == "standardize":
        mean = np.asarray(stats.mean, np.float32).reshape(shape)
        std = np.maximum(np.asarray(stats.std, np.float32), 1e-8).reshape(shape)
        return (x - mean) / std
    low = np.asarray(stats.low, np.float32).reshape(shape)
    high = np.asarray(stats.high, np.float32).reshape(shape)
    return (np.clip(x, low, high) - low) / np.maximum(high - low, 1e-8)


class PatchDataset(Dataset):
    """Patches of raw (and label, weight) at fixed locations; items are ``index`` or ``(index, augmentation_seed)``.

    Returns dicts with ``raw`` float32 ``(C, pz, py, px)``, ``label`` (int64 ``(pz, py, px)`` class ids or float32
    ``(C, pz, py, px)`` masks) and ``weight`` float32 when the volumes have one.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        locations: Sequence[Location],
        normalization: str = "standardize",
        transforms: Compose | None = None,
        with_labels: bool = True,
    ) -> None:
        self.volumes = list(volumes)
        self.locations = list(locations)
        self.normalization = normalization
        self.transforms = transforms
        self.with_labels = with_labels
        self._files = _FileCache()

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, index_seed(item))
        v, slices = self.locations[index]
        volume = self.volumes[v]
        raw = _read_region(volume, self._files, volume.raw_internal_path, slices, volume.raw_is_4d)
        raw = raw if volume.raw_is_4d else raw[None]
        sample = {"raw": torch.from_numpy(np.ascontiguousarray(normalize(raw, volume, self.normalization)))}
        if self.with_labels and volume.label_internal_path is not None:
            label = _read_region(volume, self._files, volume.label_internal_path, slices, volume.label_kind == "binary")
            dtype = np.int64 if volume.label_kind == "class_ids" else np.float32
            sample["label"] = torch.from_numpy(np.ascontiguousarray(label.astype(dtype)))
        if self.with_labels and volume.weight_internal_path is not None:
            weight = _read_region(volume, self._files, volume.weight_internal_path, slices, volume.weight_is_4d)
            sample["weight"] = torch.from_numpy(np.ascontiguousarray(weight.astype(np.float32)))
        if self.transforms is not None:
            generator = torch.Generator()
            generator.manual_seed(seed)
            sample = self.transforms(sample, generator)
        return sample


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
        self._files = _FileCache()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        v, slices = self.items[index]
        volume = self.plans[v].volume
        inside = tuple(slice(s.start, min(s.stop, n)) for s, n in zip(slices, volume.spatial_shape))
        raw = _read_region(volume, self._files, volume.raw_internal_path, inside, volume.raw_is_4d)
        raw = normalize(raw if volume.raw_is_4d else raw[None], volume, self.normalization)
        shape = tuple(s.stop - s.start for s in slices)
        if raw.shape[1:] != shape:
            padded = np.zeros((raw.shape[0], *shape), np.float32)
            padded[(slice(None), *(slice(0, n) for n in raw.shape[1:]))] = raw
            raw = padded
        start = torch.tensor([s.start for s in slices], dtype=torch.int64)
        return {"raw": torch.from_numpy(np.ascontiguousarray(raw)), "volume": v, "start": start}


# --------------------------------------------------------------------------------------------------- module
class HDF5DataModule(pl.LightningDataModule):
    """Strided 3D patches from HDF5 volumes, checked at ``setup()`` before any training or prediction starts.

    Args:
        train_paths, val_paths, test_paths, predict_paths: HDF5 files, directories (their ``.h5``/``.hdf5``/``.hdf``
            files) or glob patterns (``data/train/*.h5``, ``**`` allowed). Default None.
        raw_internal_path: dataset holding the raw volume, ``(D, H, W)`` or ``(C, D, H, W)``. Default ``"raw"``.
        label_internal_path: dataset holding labels, ``(D, H, W)`` class ids or ``(C, D, H, W)`` binary masks.
            Default ``"label"``.
        weight_internal_path: optional dataset of per-voxel loss weights, ``(D, H, W)`` or like the label. Default
            None.
        train_patch_shape: ``(z, y, x)`` patch size for training; required by ``fit``. Volumes smaller than the
            patch along an axis are rejected. Default None.
        train_stride_shape: distance between training patch starts; the last patch of each axis is moved back to end
            at the volume's border, so every voxel is covered. Default None: half the patch.
        val_patch_shape, val_stride_shape: the same for validation and test. Default None: the training ones.
        predict_patch_shape: patch size for prediction; required by ``predict``. Volumes smaller than the patch are
            zero-padded (after normalisation) and the output cropped. Default None.
        predict_stride_shape: stride for prediction; patches overlap by ``patch - stride`` and the overlaps are
            blended. Default None: ``patch - patch // 4`` (a quarter overlap).
        batch_size: patches per batch (per device under DDP). Default 1.
        num_workers: DataLoader worker processes reading HDF5 in parallel. Default 4.
        normalization: ``"standardize"`` (per-volume, per-channel mean and std), ``"percentile"`` (clip to the
            volume's ``percentiles`` and scale to [0, 1]) or ``"none"``. The same rule is applied at prediction,
            with each volume's own statistics. Default ``"standardize"``.
        percentiles: low and high percentile for ``"percentile"``. Default ``(1.0, 99.0)``.
        augmentation: training augmentations (flips, in-plane 90° rotations, intensity, noise, optional elastic);
            see :class:`~unet3d_lightning.data.transforms.Augmentation`. Never applied to validation, test or
            prediction. Default: ``Augmentation()``.
        min_foreground_fraction: drop training patches whose labelled foreground (class id != 0, or any mask
            channel == 1; ignored voxels excluded) is below this fraction. Default None: keep all patches.
        empty_patch_keep_share: with ``min_foreground_fraction``, the share of the dropped patches kept anyway
            (chosen at random with ``seed``), so the model still sees background. Default 0.0.
        in_memory: read whole volumes into RAM at setup instead of reading patches lazily. Default False.
        seed: seed of the patch order and the augmentations. Default None: the run's ``seed_everything`` seed.
    """

    def __init__(
        self,
        train_paths: list[str] | None = None,
        val_paths: list[str] | None = None,
        test_paths: list[str] | None = None,
        predict_paths: list[str] | None = None,
        raw_internal_path: str = "raw",
        label_internal_path: str = "label",
        weight_internal_path: str | None = None,
        train_patch_shape: tuple[int, int, int] | None = None,
        train_stride_shape: tuple[int, int, int] | None = None,
        val_patch_shape: tuple[int, int, int] | None = None,
        val_stride_shape: tuple[int, int, int] | None = None,
        predict_patch_shape: tuple[int, int, int] | None = None,
        predict_stride_shape: tuple[int, int, int] | None = None,
        batch_size: int = 1,
        num_workers: int = 4,
        normalization: Normalization = "standardize",
        percentiles: tuple[float, float] = (1.0, 99.0),
        augmentation: Augmentation = Augmentation(),
        min_foreground_fraction: float | None = None,
        empty_patch_keep_share: float = 0.0,
        in_memory: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or num_workers < 0:
            raise ConfigurationError(f"batch_size ({batch_size}) must be >= 1 and num_workers ({num_workers}) >= 0")
        if normalization not in ("standardize", "percentile", "none"):
            raise ConfigurationError(f"normalization {normalization!r} is not one of standardize, percentile, none")
        if not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ConfigurationError(f"percentiles {tuple(percentiles)} must satisfy 0 <= low < high <= 100")
        if min_foreground_fraction is not None and not 0 <= min_foreground_fraction <= 1:
            raise ConfigurationError(f"min_foreground_fraction {min_foreground_fraction} must be in [0, 1]")
        if not 0 <= empty_patch_keep_share <= 1:
            raise ConfigurationError(f"empty_patch_keep_share {empty_patch_keep_share} must be in [0, 1]")
        self.paths = {"train": train_paths, "val": val_paths, "test": test_paths, "predict": predict_paths}
        self.raw_internal_path = raw_internal_path
        self.label_internal_path = label_internal_path
        self.weight_internal_path = weight_internal_path
        self.train_patch_shape = _shape(train_patch_shape, "train_patch_shape")
        self.train_stride_shape = _shape(train_stride_shape, "train_stride_shape")
        self.val_patch_shape = _shape(val_patch_shape, "val_patch_shape")
        self.val_stride_shape = _shape(val_stride_shape, "val_stride_shape")
        self.predict_patch_shape = _shape(predict_patch_shape, "predict_patch_shape")
        self.predict_stride_shape = _shape(predict_stride_shape, "predict_stride_shape")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.normalization = normalization
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))
        self.augmentation = augmentation
        self.min_foreground_fraction = min_foreground_fraction
        self.empty_patch_keep_share = empty_patch_keep_share
        self.in_memory = in_memory
        self.seed = seed
        self.datasets: dict[str, Dataset] = {}
        self.volumes: dict[str, list[Volume]] = {}
        self._scanned: dict[tuple[str, str], Volume] = {}

    # ------------------------------------------------------------------------------------------------ setup
    @property
    def label_kind(self) -> str | None:
        """``"class_ids"`` (3D labels) or ``"binary"`` (4D masks) of the training (else validation/test) volumes."""
        for role in ("train", "val", "test"):
            if self.volumes.get(role):
                return self.volumes[role][0].label_kind
        return None

    def _model_spec(self) -> dict[str, Any]:
        """in_channels / out_channels / ignore_index of the attached model, to check the data against."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        return {k: getattr(model, k, None) for k in ("in_channels", "out_channels", "ignore_index")}

    def setup(self, stage: str) -> None:
        roles = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}[stage]
        if stage == "fit":
            for role in roles:
                if not self.paths[role]:
                    raise ConfigurationError(
                        f"data.{role}_paths is empty: fit needs {role} volumes (validation may reuse training files)"
                    )
        elif not self.paths[roles[0]]:
            raise ConfigurationError(f"data.{roles[0]}_paths is empty: {stage} needs at least one volume")
        spec = self._model_spec()
        for role in roles:
            self.volumes[role] = self._load_volumes(role, spec)
        labelled = [v for role in roles if role != "predict" for v in self.volumes[role]]
        check_consistent(labelled, "label_kind", "label type (class_ids = 3D, binary = 4D)")
        check_consistent([v for role in roles for v in self.volumes[role]], "channels", "raw channel count")
        if self.seed is None:
            self.seed = torch.initial_seed() % 2**31
            if self.trainer is not None and self.trainer.world_size > 1:
                # Shards are disjoint only if every rank shuffles with the same seed.
                self.seed = int(self.trainer.strategy.broadcast(self.seed, src=0))
        for role in roles:
            self.datasets[role] = self._build_dataset(role)

    def _load_volumes(self, role: str, spec: dict[str, Any]) -> list[Volume]:
        labelled = role != "predict"
        volumes = []
        for path in resolve_paths(self.paths[role], role):
            key = (role, str(path.resolve()))
            if key in self._scanned:  # validate/test after fit: the files were checked already
                volumes.append(self._scanned[key])
                continue
            volume = open_volume(
                path, role, self.raw_internal_path,
                self.label_internal_path if labelled else None,
                self.weight_internal_path if labelled else None,
            )
            if spec["in_channels"] is not None and volume.channels != spec["in_channels"]:
                raise ConfigurationError(
                    f"{volume.describe(volume.raw_internal_path)} has {volume.channels} channel(s) but the model has "
                    f"in_channels={spec['in_channels']}"
                )
            scan_volume(
                volume, out_channels=spec["out_channels"], ignore_index=spec["ignore_index"],
                percentiles=self.percentiles if self.normalization == "percentile" else None,
            )
            if self.in_memory:
                load_arrays(volume)
            self._scanned[key] = volume
            volumes.append(volume)
        return volumes

    def _shapes(self, role: str) -> tuple[Shape3, Shape3]:
        if role == "predict":
            patch = self.predict_patch_shape
            if patch is None:
                raise ConfigurationError("data.predict_patch_shape is required for predict, e.g. [64, 128, 128]")
            stride = self.predict_stride_shape or tuple(p - p // 4 for p in patch)
            return patch, stride  # type: ignore[return-value]
        patch = self.train_patch_shape if role == "train" else (self.val_patch_shape or self.train_patch_shape)
        if patch is None:
            key = "train_patch_shape" if role == "train" else "val_patch_shape (or train_patch_shape)"
            raise ConfigurationError(f"data.{key} is required, e.g. [32, 64, 64]")
        if role == "train":
            stride = self.train_stride_shape or tuple(max(1, p // 2) for p in patch)
        elif self.val_patch_shape is not None:
            stride = self.val_stride_shape or self.val_patch_shape
        else:
            stride = self.val_stride_shape or self.train_stride_shape or tuple(max(1, p // 2) for p in patch)
        return patch, stride  # type: ignore[return-value]

    def _grid(self, volume: Volume, shape: Shape3, patch: Shape3, stride: Shape3, role: str) -> list:
        try:
            return patch_grid(shape, patch, stride)
        except ValueError as err:
            raise ConfigurationError(f"{volume.name} (shape {volume.spatial_shape}), {role} patches: {err}") from None

    def _build_dataset(self, role: str) -> Dataset:
        patch, stride = self._shapes(role)
        volumes = self.volumes[role]
        if role == "predict":
            plans = []
            for volume in volumes:
                padded = padded_shape(volume.spatial_shape, patch)
                plans.append(PredictionPlan(volume, padded, self._grid(volume, padded, patch, stride, role)))
            return PredictDataset(plans, self.normalization)
        locations: list[Location] = []
        for v, volume in enumerate(volumes):
            grid = self._grid(volume, volume.spatial_shape, patch, stride, role)
            if role == "train" and self.min_foreground_fraction is not None:
                grid = self._filter(volume, grid, patch)
            locations.extend((v, s) for s in grid)
        if not locations:
            raise ConfigurationError(
                f"no {role} patches left: min_foreground_fraction={self.min_foreground_fraction} rejected them all"
            )
        transforms = self.augmentation.build() if role == "train" else None
        return PatchDataset(volumes, locations, self.normalization, transforms or None)

    def _filter(self, volume: Volume, grid: list, patch: Shape3) -> list:
        """Keep patches with enough foreground, plus a random share of the others."""
        fractions = foreground_fractions(volume, grid, patch, self._model_spec()["ignore_index"])
        # crc32, not hash(): str hashes differ between processes, and every DDP rank must keep the same patches.
        rng = np.random.default_rng([self.seed or 0, zlib.crc32(str(volume.path).encode())])
        keep_empty = rng.random(len(grid)) < self.empty_patch_keep_share
        return [s for s, f, k in zip(grid, fractions, keep_empty) if f >= self.min_foreground_fraction or k]

    # ------------------------------------------------------------------------------------------------ loaders
    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _loader(self, role: str, sampler: ShardedSampler) -> DataLoader:
        if role not in self.datasets:
            raise ConfigurationError(f"no {role} data: call setup() with the matching stage first")
        return DataLoader(
            self.datasets[role],
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        n = len(self.datasets["train"])
        if n < world:
            raise ConfigurationError(f"only {n} training patches for {world} devices; use smaller strides or fewer devices")
        sampler = ShardedSampler(
            n, shuffle=True, seed=self.seed or 0, rank=rank, world_size=world, drop_uneven=True, with_seeds=True
        )
        return self._loader("train", sampler)

    def _ordered(self, role: str) -> DataLoader:
        rank, world = self._rank_world()
        return self._loader(role, ShardedSampler(len(self.datasets[role]), rank=rank, world_size=world))

    def val_dataloader(self) -> DataLoader:
        return self._ordered("val")

    def test_dataloader(self) -> DataLoader:
        return self._ordered("test")

    def predict_dataloader(self) -> DataLoader:
        return self._ordered("predict")


def foreground_fractions(volume: Volume, grid: list, patch: Shape3, ignore_index: int | None) -> list[float]:
    """Foreground share of each patch, reading each z-range of the label once and summing columns with an
    integral image (a patch's foreground count is then four lookups)."""
    key = volume.label_internal_path
    if key is None:
        raise ConfigurationError(f"{volume.name}: min_foreground_fraction needs labels")
    cache = _FileCache()
    fractions = []
    by_z: dict[slice, np.ndarray] = {}
    for slices in grid:
        zs = slices[0]
        if zs not in by_z:
            by_z.clear()  # grid is z-major: one z-range is live at a time
            full = (zs, slice(None), slice(None))
            label = _read_region(volume, cache, key, full, volume.label_kind == "binary")
            if label.ndim == 4:
                fg = (label == 1).any(axis=0)
                valid = True if ignore_index is None else (label != ignore_index).all(axis=0)
            else:
                fg = label != 0
                valid = True if ignore_index is None else label != ignore_index
            fg &= valid
            columns = np.pad(fg.sum(axis=0).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
            by_z[zs] = columns
        columns = by_z[zs]
        ys, xs = slices[1], slices[2]
        count = columns[ys.stop, xs.stop] - columns[ys.start, xs.stop] - columns[ys.stop, xs.start] + columns[ys.start, xs.start]
        fractions.append(float(count) / (patch[0] * patch[1] * patch[2]))
    return fractions


def _shape(value: Sequence[int] | None, name: str) -> Shape3 | None:
    if value is None:
        return None
    shape = tuple(int(v) for v in value)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigurationError(f"data.{name} {list(value)} must be three positive integers (z, y, x)")
    return shape  # type: ignore[return-value]
