"""VolumeDataModule (also importable as HDF5DataModule): strided patches from HDF5, Zarr and TIFF volumes for
training, validation, testing and prediction.

The datasets it builds are in :mod:`~unet3d_lightning.data.datasets`, its loader in
:mod:`~unet3d_lightning.data.loader`, the checks of the volumes in :mod:`~unet3d_lightning.data.volumes`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigurationError
from .datasets import Location, PatchDataset, PredictDataset, PredictionPlan, Shape3
from .io import MISSING_CHUNKS_POLICIES, MissingChunksPolicy, volume_format
from .loader import PatchLoader, default_num_workers
from .patches import padded_shape, patch_grid
from .regression_targets import TARGET_NORMALIZATIONS, TargetNormalization
from .sampling import ShardedSampler, keep_foreground_patches
from .targets import LABEL_TRANSFORMS, LabelTransform, LabelTransformName, TargetOptions
from .transforms import Augmentation
from .volumes import (
    Volume,
    check_consistent,
    check_instance_labels,
    load_arrays,
    mark_regression_target,
    open_volume,
    resolve_paths,
    scan_volume,
)

# Names that lived in this module before the datasets, the loader and the foreground filter had modules of their
# own, importable from here for code written against earlier versions.
from .datasets import index_seed, normalize  # noqa: F401
from .sampling import foreground_fractions  # noqa: F401

Normalization = Literal["standardize", "percentile", "none"]


class VolumeDataModule(pl.LightningDataModule):
    """Strided 3D patches from HDF5, Zarr and TIFF volumes, checked at ``setup()`` before any training or prediction
    starts. ``HDF5DataModule`` is the same class, by the name of earlier versions.

    ``setup()`` reads every volume once (z-slab by z-slab, read-only) to compute its intensity statistics and to
    check it; a problem raises a :class:`~unet3d_lightning.errors.ConfigurationError` naming the file, the dataset
    and the problem. Channel counts, label values and ``ignore_index`` are checked against the model the trainer
    holds (its ``in_channels``, ``out_channels``, ``ignore_index``); without a trainer those checks are skipped.

    Training batches are the same for any ``num_workers`` and across runs with the same ``seed``: the sampler
    (main process) draws each sample's augmentation seed. Under DDP each rank reads its own share of the patches
    (:class:`~unet3d_lightning.data.sampling.ShardedSampler`); when validation or prediction patches do not divide
    evenly, the last round is filled with duplicates flagged ``"padding"``, which metrics and the prediction writer
    skip, so every patch counts exactly once. Each reader process opens the files itself and keeps them open (chunk
    caches stay warm).

    Args:
        train_paths, val_paths, test_paths, predict_paths: volumes, as one path or a list of them: HDF5 files
            (``.h5``/``.hdf5``/``.hdf``), Zarr stores (``.zarr`` directories, OME-Zarr included), TIFF stacks
            (``.tif``/``.tiff``), directories of them, or glob patterns (``data/train/*.h5``, ``**`` allowed; a
            pattern, like a directory, selects only those kinds of files; a name that exists is taken as it is, even
            with ``[ ] * ?`` in it); see :mod:`~unet3d_lightning.data.io`. Default None.
        raw_internal_path: dataset holding the raw volume, ``(D, H, W)`` or ``(C, D, H, W)``: an HDF5 dataset, or
            an array of a Zarr store's group (``"0"``, the full resolution of an OME-Zarr image); ignored for TIFF.
            Default ``"raw"``.
        label_internal_path: dataset holding labels, ``(D, H, W)`` class ids or ``(C, D, H, W)`` binary masks, in
            the volume's file or in its ``label_paths`` file. Default ``"label"``.
        weight_internal_path: optional dataset of per-voxel loss weights, ``(D, H, W)`` or like the label. Default
            None.
        train_patch_shape: ``(z, y, x)`` patch size for training; required by ``fit``. Volumes smaller than the
            patch along an axis are rejected. Default None.
        train_stride_shape: distance between training patch starts; the last patch of each axis is moved back to end
            at the volume's border, so every voxel is covered. Default None: half the patch.
        val_patch_shape, val_stride_shape: the same for validation and test. Default None: the training ones; with
            a ``val_patch_shape`` but no ``val_stride_shape`` the stride is the patch (no overlap).
        predict_patch_shape: patch size for prediction; required by ``predict``. Volumes smaller than the patch are
            zero-padded (after normalisation) and the output cropped. Default None.
        predict_stride_shape: stride for prediction; patches overlap by ``patch - stride`` and the overlaps are
            blended. Default None: ``patch - patch // 4`` (a quarter overlap).
        batch_size: patches per batch (per device under DDP). Default 1.
        num_workers: DataLoader worker processes reading the volumes in parallel (per device under DDP). Default None:
            what the machine allows, ``min(4, cores // devices on this node - 1)`` counting the cores this process
            may run on (0 on a machine with 1 core per device).
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
        label_paths: labels kept in files of their own (needed for TIFF volumes, which hold one image), by role:
            ``{"train": [...], "val": [...], "test": [...]}``, each entry written like ``train_paths`` (one path or
            a list) and expanded the same way (directories and patterns sorted by name); the n-th label file belongs
            to the n-th volume of that role, so both must expand to the same count, and each volume needs a label
            file of its own. The labels (and weights) are read at
            ``label_internal_path`` (``weight_internal_path``) of the label file, which may be of another format
            than the volume. A role without an entry keeps its labels inside the volumes' files. Default None.
        label_transform: ``"none"`` (labels are the targets), or train on targets derived per patch, after the
            augmentations, from ``(D, H, W)`` instance labels (one integer id per object, 0 background, any integer
            dtype up to uint64; ``model.ignore_index`` then names an instance id to ignore): ``"boundaries"``
            (borders between objects) or ``"affinities"`` (same object as the neighbour at each offset); see
            :mod:`unet3d_lightning.data.targets`. ``model.out_channels`` must equal the number of target channels
            and the loss be ``bce``, ``dice`` or ``bce_dice``. Default ``"none"``.
        target_options: settings of those targets (boundary thickness, foreground channel, affinity offsets); see
            :class:`~unet3d_lightning.data.targets.TargetOptions`. Default ``TargetOptions()``.
        missing_chunks: chunks that a Zarr or HDF5 array does not store, which readers return as the array's fill
            value: ``"auto"`` reads them so, with a warning, where the format lets writers leave out chunks of only
            fill values (Zarr; zarr-python 3 does by default) and refuses them where they must have been lost (HDF5,
            whose writers store every chunk; a Zarr array without a fill value, or one that stores chunks of only
            fill values); ``"error"`` refuses every array that lacks chunks; ``"fill"`` reads them as the fill
            value, with a warning. Checked at setup from the stores' listings (no extra data read); see
            :class:`~unet3d_lightning.data.volumes.ChunkAudit`. Default ``"auto"``.
        target_normalization: for a regression model (``model.loss`` ``mse``, ``l1`` or ``smooth_l1``), whose
            ``label_internal_path`` holds a float target ``(D, H, W)`` or ``(C, D, H, W)`` of the raw's shape (checked
            finite at setup; ``C`` must equal ``model.out_channels``): ``"none"`` trains on the stored values;
            ``"like_raw"`` applies the raw volume's normalisation (its statistics, this ``normalization``) to the target
            too, without the percentile clipping (see
            :func:`~unet3d_lightning.data.regression_targets.normalize_target`), so that target and input share units;
            prediction then writes outputs in those units. Spatial augmentations move the target with the raw (the
            elastic warp interpolates it trilinearly, or reads the nearest voxel when ``model.ignore_index`` marks
            voxels without a target); intensity and noise augmentations change the raw only. Default ``"none"``.
    """

    def __init__(
        self,
        train_paths: list[str] | str | None = None,
        val_paths: list[str] | str | None = None,
        test_paths: list[str] | str | None = None,
        predict_paths: list[str] | str | None = None,
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
        num_workers: int | None = None,
        normalization: Normalization = "standardize",
        percentiles: tuple[float, float] = (1.0, 99.0),
        augmentation: Augmentation = Augmentation(),
        min_foreground_fraction: float | None = None,
        empty_patch_keep_share: float = 0.0,
        in_memory: bool = False,
        seed: int | None = None,
        label_paths: dict[str, list[str] | str] | None = None,
        label_transform: LabelTransformName = "none",
        target_options: TargetOptions = TargetOptions(),
        missing_chunks: MissingChunksPolicy = "auto",
        target_normalization: TargetNormalization = "none",
    ) -> None:
        super().__init__()
        if isinstance(augmentation, Mapping):  # as stored in a checkpoint's hyperparameters
            augmentation = Augmentation(**augmentation)
        if isinstance(target_options, Mapping):
            target_options = TargetOptions(**target_options)
        self.save_hyperparameters(ignore=["augmentation", "target_options"])
        self.hparams["target_options"] = dataclasses.asdict(target_options)
        # Stored as a plain dict: checkpoints must load with torch.load(weights_only=True), the default, which
        # refuses instances of arbitrary classes such as Augmentation.
        self.hparams["augmentation"] = dataclasses.asdict(augmentation)
        if batch_size < 1 or (num_workers is not None and num_workers < 0):
            raise ConfigurationError(f"batch_size ({batch_size}) must be >= 1 and num_workers ({num_workers}) >= 0")
        if normalization not in ("standardize", "percentile", "none"):
            raise ConfigurationError(f"normalization {normalization!r} is not one of standardize, percentile, none")
        if not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ConfigurationError(f"percentiles {tuple(percentiles)} must satisfy 0 <= low < high <= 100")
        if min_foreground_fraction is not None and not 0 <= min_foreground_fraction <= 1:
            raise ConfigurationError(f"min_foreground_fraction {min_foreground_fraction} must be in [0, 1]")
        if not 0 <= empty_patch_keep_share <= 1:
            raise ConfigurationError(f"empty_patch_keep_share {empty_patch_keep_share} must be in [0, 1]")
        if missing_chunks not in MISSING_CHUNKS_POLICIES:
            raise ConfigurationError(
                f"data.missing_chunks {missing_chunks!r} is not one of {', '.join(MISSING_CHUNKS_POLICIES)}"
            )
        self.missing_chunks = missing_chunks
        if target_normalization not in TARGET_NORMALIZATIONS:
            raise ConfigurationError(
                f"data.target_normalization {target_normalization!r} is not one of {', '.join(TARGET_NORMALIZATIONS)}"
            )
        self.target_normalization = target_normalization
        self.paths = {"train": train_paths, "val": val_paths, "test": test_paths, "predict": predict_paths}
        unknown = sorted(set(label_paths or {}) - {"train", "val", "test"})
        if unknown:
            raise ConfigurationError(
                f"data.label_paths has the role(s) {unknown}; its keys are train, val and test (prediction needs no "
                "labels)"
            )
        self.label_paths = dict(label_paths or {})
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
        if label_transform not in LABEL_TRANSFORMS:
            raise ConfigurationError(
                f"data.label_transform {label_transform!r} is not one of {', '.join(LABEL_TRANSFORMS)}"
            )
        self.label_transform = label_transform
        self.target_options = target_options
        self.targets = LabelTransform(label_transform, target_options) if label_transform != "none" else None
        self.datasets: dict[str, Dataset] = {}
        self.volumes: dict[str, list[Volume]] = {}
        self._scanned: dict[tuple[Any, ...], Volume] = {}

    # ------------------------------------------------------------------------------------------------ setup
    @property
    def label_kind(self) -> str | None:
        """``"class_ids"`` (3D labels), ``"binary"`` (4D masks), ``"instances"`` (3D instance ids with a
        ``label_transform``) or ``"regression"`` (float targets of a regression model) of the training (else
        validation/test) volumes."""
        for role in ("train", "val", "test"):
            if self.volumes.get(role):
                return self.volumes[role][0].label_kind
        return None

    def _model_spec(self, model: Any = None) -> dict[str, Any]:
        """in_channels / out_channels / ignore_index / spatial_dims of ``model`` (default: the trainer's), to check the
        data against."""
        if model is None and self.trainer is not None:
            model = self.trainer.lightning_module
        spec = {k: getattr(model, k, None) for k in ("in_channels", "out_channels", "ignore_index", "spatial_dims",
                                                    "task")}
        spec["patch_divisor"] = getattr(model, "patch_divisor", None)
        return spec

    def setup(self, stage: str) -> None:
        """Check the volumes of ``stage`` (see :meth:`check`) and build their datasets."""
        roles = self.check(stage)
        if self.seed is None:
            self.seed = torch.initial_seed() % 2**31
            if self.trainer is not None and self.trainer.world_size > 1:
                # Shards are disjoint only if every rank shuffles with the same seed.
                self.seed = int(self.trainer.strategy.broadcast(self.seed, src=0))
        for role in roles:
            previous = self.datasets.pop(role, None)
            if previous is not None:
                previous.close()  # type: ignore[attr-defined]
            self.datasets[role] = self._build_dataset(role)

    def check(self, stage: str, model: Any = None) -> tuple[str, ...]:
        """Find, open, scan and check every volume of ``stage`` (``"fit"``: train and val, ``"validate"``,
        ``"test"``, ``"predict"``) against ``model`` (default: the trainer's; its ``in_channels``, ``out_channels``,
        ``ignore_index``), raising a ConfigurationError on the first problem. Returns the roles checked.

        ``setup()`` calls it; the ``unet3d`` command calls it once more before training starts, so that a mistake
        stops the run before anything (logs, checkpoints) is written. Files already scanned with the same settings
        are not read again.
        """
        roles = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}[stage]
        if stage == "fit":
            if not self.paths["train"]:
                raise ConfigurationError("data.train_paths is empty: fit needs training volumes")
            if not self.paths["val"]:
                roles = ("train",)  # training without validation, e.g. on every annotated volume
        elif not self.paths[roles[0]]:
            raise ConfigurationError(f"data.{roles[0]}_paths is empty: {stage} needs at least one volume")
        self._check_offsets(roles)
        spec = self._model_spec(model)
        self._checked_spec = spec  # the datasets follow the model checked, also without a trainer
        self._check_regression_settings(spec)
        for role in roles:
            self.volumes[role] = self._load_volumes(role, spec)
        labelled = [v for role in roles if role != "predict" for v in self.volumes[role]]
        kinds = {"class_ids": "3D class ids", "binary": "4D binary masks", "instances": "3D instance ids",
                 "regression": "float regression targets"}
        check_consistent(labelled, "label_kind", "labels as", "label_internal_path", kinds.get)
        # Without a model to compare with, the volumes must at least agree among themselves.
        check_consistent(labelled, "label_channels", "mask channel count", "label_internal_path")
        check_consistent([v for role in roles for v in self.volumes[role]], "channels", "raw channel count")
        if self.targets is not None and labelled and spec["out_channels"] is not None:
            if spec["out_channels"] != self.targets.channels:
                raise ConfigurationError(
                    f"data.label_transform {self.label_transform!r} gives {self.targets.channels} target channel(s) "
                    f"but the model has out_channels={spec['out_channels']}; set model.out_channels to "
                    f"{self.targets.channels}"
                )
        for role in roles:
            patch, stride = self._shapes(role)  # a missing patch shape is a configuration error too
            if spec.get("spatial_dims") == 2 and patch[0] != 1:
                key = {"train": "train_patch_shape", "predict": "predict_patch_shape"}.get(
                    role, "val_patch_shape" if self.val_patch_shape else "train_patch_shape")
                raise ConfigurationError(
                    f"data.{key} {list(patch)} has z = {patch[0]}, but the model is 2D (model.spatial_dims=2) and "
                    f"works on single z-slices; use [1, {patch[1]}, {patch[2]}]"
                )
            if spec.get("patch_divisor") is not None:
                check_patch_divisor(patch, spec["patch_divisor"], self._patch_key(role))
            if role != "predict":
                for volume in self.volumes[role]:  # and so is a volume smaller than its patch
                    self._grid(volume, volume.spatial_shape, patch, stride, role)
        return roles

    def _patch_key(self, role: str) -> str:
        """The ``data.`` key the patch shape of ``role`` comes from."""
        if role in ("train", "predict"):
            return f"{role}_patch_shape"
        return "val_patch_shape" if self.val_patch_shape else "train_patch_shape"

    def _check_regression_settings(self, spec: dict[str, Any]) -> None:
        """Settings that only a regression model, or only a segmentation model, can use (skipped when no model is
        known)."""
        task = spec.get("task")
        if task == "segmentation" and self.target_normalization != "none":
            raise ConfigurationError(
                f"data.target_normalization {self.target_normalization!r} scales regression targets, but the model "
                "is a segmentation model (its labels are class ids or masks); drop it, or use model.loss mse, l1 or "
                "smooth_l1"
            )
        if task != "regression":
            return
        if self.label_transform != "none":
            raise ConfigurationError(
                f"data.label_transform {self.label_transform!r} derives segmentation targets, but the model is a "
                "regression model (model.loss mse, l1 or smooth_l1); use data.label_transform none with a float target"
            )
        if self.min_foreground_fraction is not None:
            raise ConfigurationError(
                "data.min_foreground_fraction needs labels with a background (class id 0 or empty masks); a regression "
                "target has none: drop it, or give the voxels to leave out model.ignore_index"
            )

    def _check_offsets(self, roles: Sequence[str]) -> None:
        """Every affinity offset must link voxels inside a patch: one as long as the patch links none (its channel
        would be masked everywhere), a longer one would not even fit the patch's slices."""
        if self.targets is None or self.targets.kind != "affinities":
            return
        for role in roles:
            if role == "predict" or not self.paths[role]:
                continue
            patch, _ = self._shapes(role)
            key = "train_patch_shape" if role == "train" or self.val_patch_shape is None else "val_patch_shape"
            for offset in self.target_options.offsets:
                for axis, o, n in zip("zyx", offset, patch):
                    if abs(o) >= n:
                        raise ConfigurationError(
                            f"data.target_options.offsets: the offset {list(offset)} reaches {abs(o)} voxels along "
                            f"{axis}, but data.{key} {list(patch)} has only {n} along {axis}, so no two voxels of a "
                            f"{role} patch are that far apart; use offsets shorter than the patch along every axis, "
                            f"or a larger data.{key}"
                        )

    def _load_volumes(self, role: str, spec: dict[str, Any]) -> list[Volume]:
        labelled = role != "predict"
        percentiles = self.percentiles if self.normalization == "percentile" else None
        volumes = []
        paths = resolve_paths(self.paths[role], role)
        for path, label_path in zip(paths, self._label_files(role, paths) if labelled else [None] * len(paths)):
            # A file is read in full once per setup settings, whichever roles use it (validation often reuses
            # training files) and however often setup runs (validate/test after fit).
            key = (str(path.resolve()), labelled, tuple(sorted(spec.items())), percentiles,
                   None if label_path is None else str(label_path.resolve()))
            volume = self._scanned.get(key)
            if volume is None:
                volume = open_volume(
                    path, role, self.raw_internal_path,
                    self.label_internal_path if labelled else None,
                    self.weight_internal_path if labelled else None,
                    label_path=label_path,
                )
                if spec["in_channels"] is not None and volume.channels != spec["in_channels"]:
                    raise ConfigurationError(
                        f"{volume.describe(volume.raw_internal_path)} has {volume.channels} channel(s) but the model "
                        f"has in_channels={spec['in_channels']}"
                    )
                if self.targets is not None and volume.label_internal_path is not None:
                    check_instance_labels(volume)
                if spec.get("task") == "regression" and volume.label_internal_path is not None:
                    mark_regression_target(volume, spec["out_channels"])
                    self._check_like_raw(volume)
                scan_volume(
                    volume, out_channels=spec["out_channels"] if volume.label_kind != "instances" else None,
                    ignore_index=spec["ignore_index"], percentiles=percentiles, missing_chunks=self.missing_chunks,
                )
                if self.in_memory:
                    load_arrays(volume)
                self._scanned[key] = volume
            if volume.role != role:
                volume = dataclasses.replace(volume, role=role)  # shares the in-memory arrays
            volumes.append(volume)
        return volumes

    def _check_like_raw(self, volume: Volume) -> None:
        """``target_normalization: like_raw`` scales target channel c by raw channel c, or every target channel by
        a single raw channel; other channel counts have no such pairing."""
        targets = volume.label_channels or 1
        if self.target_normalization == "like_raw" and volume.channels not in (1, targets):
            raise ConfigurationError(
                f"{volume.describe(volume.label_internal_path, 'label')} has {targets} target channel(s) but "
                f"'{volume.raw_internal_path}' has {volume.channels}; data.target_normalization like_raw scales each "
                "target channel by its raw channel (or all by one raw channel): use target_normalization none"
            )

    def _label_files(self, role: str, paths: list) -> list:
        """The label file of each volume of ``role`` (None: in the volume's own file), paired by position."""
        entries = self.label_paths.get(role)
        if entries is None:
            for path in paths:
                if volume_format(path) == "tiff":
                    raise ConfigurationError(
                        f"{role} volume {path}: a TIFF file holds one image, so its labels must be in a file of "
                        f"their own; list the label files in data.label_paths.{role}, in the order of the volumes"
                    )
            return [None] * len(paths)
        # Not made unique: a label file listed twice pairs with two volumes, which is the mistake to name.
        labels = resolve_paths(entries, f"label_paths.{role}", unique=False)
        if len(labels) != len(paths):
            raise ConfigurationError(
                f"data.label_paths.{role} expands to {len(labels)} file(s) ({_names(labels)}) but "
                f"data.{role}_paths to {len(paths)} volume(s) ({_names(paths)}){_twice(self.paths[role], role)}; "
                "give one label file per volume, in the same order"
            )
        owners: dict[Any, Any] = {}
        for path, label in zip(paths, labels):
            owner = owners.setdefault(label.resolve(), path)
            if owner is not path:
                raise ConfigurationError(
                    f"data.label_paths.{role} gives the label file {label} for two volumes, {owner} and {path}; "
                    f"each volume needs a label file of its own, listed in the order of data.{role}_paths"
                )
        if self.weight_internal_path is not None:
            for label in labels:
                if volume_format(label) == "tiff":
                    raise ConfigurationError(
                        f"{role} volume {label}: a TIFF label file holds only the labels; per-voxel weights "
                        f"(data.weight_internal_path) need an HDF5 or Zarr label file"
                    )
        return labels

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
            raise ConfigurationError(
                f"{volume.describe(volume.raw_internal_path)} has spatial shape {volume.spatial_shape} and {role} "
                f"patch {list(patch)}, stride {list(stride)}: {err}"
            ) from None

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
                f"no {role} patches left: data.min_foreground_fraction={self.min_foreground_fraction} rejected all "
                f"patches of {len(volumes)} volume(s); lower it or raise data.empty_patch_keep_share"
            )
        spec = self._model_spec() if self.trainer is not None else getattr(self, "_checked_spec", self._model_spec())
        regression = any(v.label_kind == "regression" for v in volumes)
        if role != "train":
            transforms = None
        elif regression:
            # A float target is resampled like the raw, unless exact ignore values must survive the warp.
            transforms = self.augmentation.build(interpolate_label=spec["ignore_index"] is None)
        else:
            transforms = self.augmentation.build()
        return PatchDataset(
            volumes, locations, self.normalization, transforms or None, label_transform=self.targets,
            ignore_label=spec["ignore_index"], target_normalization=self.target_normalization,
        )

    def _filter(self, volume: Volume, grid: list, patch: Shape3) -> list:
        """Keep patches with enough foreground, plus a random share of the others."""
        return keep_foreground_patches(
            volume, grid, patch, self.min_foreground_fraction, self.empty_patch_keep_share,  # type: ignore[arg-type]
            ignore_index=self._model_spec()["ignore_index"], seed=self.seed or 0,
        )

    # ------------------------------------------------------------------------------------------------ loaders
    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _dataset(self, role: str) -> Dataset:
        if role not in self.datasets:
            stage = {"train": "fit", "val": "fit or validate", "test": "test", "predict": "predict"}[role]
            raise ConfigurationError(f"no {role} data: call setup({stage!r}) first")
        return self.datasets[role]

    def _loader(
        self, role: str, sampler: ShardedSampler, progress: Callable[[], tuple[int, int]] | None = None
    ) -> DataLoader:
        workers = self.num_workers
        if workers is None:
            workers = default_num_workers(getattr(self.trainer, "num_devices", 1) if self.trainer is not None else 1)
        return PatchLoader(
            self._dataset(role),
            progress=progress,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            # Workers live across epochs: their open files and chunk caches, and the in-memory volumes copied to
            # them, are not rebuilt every epoch. The sampler runs in this process, so set_epoch still takes effect.
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        n = len(self._dataset("train"))
        if n < world:
            raise ConfigurationError(
                f"only {n} training patches for {world} devices; use smaller strides or fewer devices"
            )
        sampler = ShardedSampler(
            n, shuffle=True, seed=self.seed or 0, rank=rank, world_size=world, drop_uneven=True, with_seeds=True
        )
        return self._loader("train", sampler, self._training_progress)

    def _training_progress(self) -> tuple[int, int]:
        """Batches the trainer finished in the current epoch, and batches per epoch (for resumable loaders)."""
        trainer = self.trainer
        try:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # type: ignore[union-attr]
            return int(done), int(trainer.num_training_batches)  # type: ignore[union-attr]
        except (AttributeError, TypeError, ValueError, OverflowError):
            return 0, len(self.datasets["train"])  # no Lightning trainer: nothing to resume

    def _ordered(self, role: str) -> DataLoader:
        rank, world = self._rank_world()
        # Every rank runs the same number of batches (flagged duplicates fill the last round), as Lightning's
        # epoch-end metric syncs and the writer's band reductions need; the flags keep every patch counted once.
        sampler = ShardedSampler(len(self._dataset(role)), rank=rank, world_size=world, pad_uneven=world > 1)
        return self._loader(role, sampler)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move patches to the device; patch locations and flags stay on the CPU, where the prediction writer reads
        them every batch (reading them back from a GPU would synchronise the device each time). The raw patches are
        then laid out in the model's memory format (channels-last, see ``UNet3DModule(channels_last=...)``), once
        per batch, on the device."""
        if isinstance(batch, dict):
            keep = {k: batch[k] for k in ("volume", "start", "padding") if k in batch}
            rest = {k: v for k, v in batch.items() if k not in keep}
            moved = {**super().transfer_batch_to_device(rest, device, dataloader_idx), **keep}
            model = self.trainer.lightning_module if self.trainer is not None else None
            convert = getattr(model, "input_to_memory_format", None)
            if convert is not None and isinstance(moved.get("raw"), torch.Tensor):
                moved["raw"] = convert(moved["raw"])
            return moved
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def val_dataloader(self) -> DataLoader | list:
        if not self.paths["val"] and "val" not in self.datasets:
            return []  # no validation volumes: Lightning runs no validation
        return self._ordered("val")

    def test_dataloader(self) -> DataLoader:
        return self._ordered("test")

    def predict_dataloader(self) -> DataLoader:
        return self._ordered("predict")

    def teardown(self, stage: str) -> None:
        """Close the files this process opened (``num_workers=0``); workers close theirs when they exit."""
        for dataset in self.datasets.values():
            close = getattr(dataset, "close", None)
            if close is not None:
                close()


def _names(paths: Sequence[Any], shown: int = 4) -> str:
    """The first file names of a list, for a message."""
    names = [os.path.basename(str(p)) or str(p) for p in paths[:shown]]
    return ", ".join(names) + (f", ... ({len(paths) - shown} more)" if len(paths) > shown else "")


def _twice(entries: Any, role: str) -> str:
    """``"; data.train_paths lists a.h5 twice, used once"`` when the volumes of ``role`` name a file more than once
    (they are used once, so the count of volumes is below the count of entries), else ``""``."""
    seen: set[Any] = set()
    for path in resolve_paths(entries, role, unique=False):
        if path.resolve() in seen:
            return f"; data.{role}_paths lists {path} more than once, used once"
        seen.add(path.resolve())
    return ""


def _shape(value: Sequence[int] | None, name: str) -> Shape3 | None:
    if value is None:
        return None
    shape = tuple(int(v) for v in value)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigurationError(f"data.{name} {list(value)} must be three positive integers (z, y, x)")
    return shape  # type: ignore[return-value]


# The name of earlier versions, when only HDF5 was read: the same class, so settings, config files and checkpoints
# written with it keep working.
HDF5DataModule = VolumeDataModule


def check_patch_divisor(patch: Sequence[int], divisor: Sequence[int], key: str) -> None:
    """A patch must be at least the network's patch divisor along every axis (each axis' pooling factors multiplied,
    :func:`~unet3d_lightning.networks.kernels.patch_divisor`): shorter, its deepest levels would pool an axis that is
    down to one voxel already (and pytorch-3dunet's floor-mode pooling would fail). Raises a ConfigurationError
    naming ``data.<key>``, the smallest valid patch and the anisotropic alternative."""
    short = [axis for axis, p, d in zip("zyx", patch, divisor) if int(p) < int(d)]
    if not short:
        return
    smallest = [max(int(p), int(d)) for p, d in zip(patch, divisor)]
    alternative = ""
    if short == ["z"] and int(divisor[1]) > 1 and key != "predict_patch_shape":  # a trained model keeps its pooling
        alternative = (f", or pool z less (model.pool_kernel_size per level, e.g. [1, 2, 2] for the first levels; "
                       "README 'Anisotropic data')")
    raise ConfigurationError(
        f"data.{key} {list(patch)} is shorter along {', '.join(short)} than the network's patch divisor "
        f"{list(divisor)} (each axis' pooling factors multiplied, model.pool_kernel_size over model.num_levels); "
        f"the smallest valid patch is {smallest}{alternative}"
    )
