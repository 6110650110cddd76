"""Tests of VolumeDataModule: inputs of every layout, normalisation, foreground filtering, the prediction dataset,
determinism (seeds, worker counts, in-memory), and safe file handling (read-only, no handle shared across fork)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import pickle
import types
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from conftest import blob_volume, write_h5
from unet3d_lightning import UNet3DModule
from unet3d_lightning.data import datamodule as datamodule_module
from unet3d_lightning.data.datamodule import VolumeDataModule
from unet3d_lightning.data.datasets import PredictDataset
from unet3d_lightning.data.transforms import Augmentation
from unet3d_lightning.errors import ConfigurationError

NO_AUGMENTATION = Augmentation(flip=False, rotate90=False, intensity=False, noise_sigma=0.0)


def attach_model(dm: VolumeDataModule, in_channels: int = 1, out_channels: int = 2, ignore_index=None) -> None:
    """What setup reads from a trainer: the attached model's channel counts and ignore_index."""
    model = types.SimpleNamespace(in_channels=in_channels, out_channels=out_channels, ignore_index=ignore_index)
    dm.trainer = types.SimpleNamespace(lightning_module=model, world_size=1, global_rank=0)


def region(array: np.ndarray, slices) -> np.ndarray:
    """``slices`` (z, y, x) of a (D, H, W) or (C, D, H, W) array."""
    return array[(Ellipsis, *slices)]


def standardized(raw: np.ndarray) -> np.ndarray:
    """(x - mean_c) / std_c per channel of a (C, D, H, W) array, in float64 with numpy."""
    x = raw.astype(np.float64)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = x.std(axis=(1, 2, 3), keepdims=True)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------- inputs
def test_files_directories_globs_and_custom_internal_paths(tmp_path, h5_writer):
    shapes = {"d/one.h5": (8, 12, 12), "d/two.hdf5": (9, 12, 10), "g/three.h5": (8, 10, 12)}
    arrays = []
    for i, (name, shape) in enumerate(shapes.items()):
        raw, label = blob_volume(shape, seed=i)
        arrays.append((raw, label))
        h5_writer(tmp_path / name, **{"volumes/raw": raw, "volumes/labels": label})
    (tmp_path / "d" / "notes.txt").write_text("not a volume")
    dm = VolumeDataModule(
        train_paths=[str(tmp_path / "d"), str(tmp_path / "g" / "*.h5")], val_paths=[str(tmp_path / "g" / "three.h5")],
        raw_internal_path="volumes/raw", label_internal_path="volumes/labels", train_patch_shape=(4, 8, 8),
        train_stride_shape=(3, 4, 4), normalization="none", augmentation=NO_AUGMENTATION, num_workers=0,
    )
    attach_model(dm)
    dm.setup("fit")
    assert [v.path.name for v in dm.volumes["train"]] == ["one.h5", "two.hdf5", "three.h5"]
    assert [v.path.name for v in dm.volumes["val"]] == ["three.h5"]

    dataset = dm.datasets["train"]
    covered = [np.zeros(shape, bool) for shape in shapes.values()]
    for i, (v, slices) in enumerate(dataset.locations):
        sample = dataset[i]
        raw, label = arrays[v]
        np.testing.assert_array_equal(sample["raw"].numpy(), region(raw, slices)[None])
        np.testing.assert_array_equal(sample["label"].numpy(), region(label, slices))
        assert sample["raw"].dtype == torch.float32 and sample["label"].dtype == torch.int64
        covered[v][slices] = True
    assert all(c.all() for c in covered)  # every voxel of every file is in some training patch


def test_4d_raw_with_matching_in_channels(tmp_path, h5_writer):
    raw, label = blob_volume((8, 12, 12), seed=3, channels=3)
    raw[2] += 100.0  # channels with different offsets and spreads: statistics must be per channel
    path = h5_writer(tmp_path / "a.h5", raw=raw, label=label)
    dm = VolumeDataModule(
        train_paths=[str(path)], val_paths=[str(path)], train_patch_shape=(4, 8, 8), augmentation=NO_AUGMENTATION,
        num_workers=0,
    )
    attach_model(dm, in_channels=3)
    dm.setup("fit")
    expected = standardized(raw)
    dataset = dm.datasets["train"]
    for i in (0, len(dataset) - 1):
        v, slices = dataset.locations[i]
        sample = dataset[i]
        assert sample["raw"].shape == (3, 4, 8, 8)
        np.testing.assert_allclose(sample["raw"].numpy(), region(expected, slices), atol=2e-5)


@pytest.mark.parametrize("four_d", [False, True])
def test_per_voxel_weights_are_read_as_float32(tmp_path, h5_writer, four_d):
    raw, label = blob_volume((8, 12, 12), seed=4)
    rng = np.random.default_rng(4)
    if four_d:
        label = np.stack([label, 1 - label]).astype(np.uint8)
        weight = rng.integers(0, 5, (2, 8, 12, 12)).astype(np.uint8)
    else:
        weight = rng.uniform(0, 3, (8, 12, 12))  # float64 in the file
    path = h5_writer(tmp_path / "a.h5", raw=raw, label=label, pixel_weight=weight)
    dm = VolumeDataModule(
        train_paths=[str(path)], val_paths=[str(path)], weight_internal_path="pixel_weight",
        train_patch_shape=(4, 8, 8), augmentation=NO_AUGMENTATION, num_workers=0,
    )
    attach_model(dm)
    dm.setup("fit")
    for role in ("train", "val"):
        dataset = dm.datasets[role]
        v, slices = dataset.locations[1]
        sample = dataset[1]
        assert sample["weight"].dtype == torch.float32
        np.testing.assert_array_equal(sample["weight"].numpy(), region(weight, slices).astype(np.float32))
        assert sample["label"].dtype == (torch.float32 if four_d else torch.int64)
    assert dm.label_kind == ("binary" if four_d else "class_ids")


# --------------------------------------------------------------------------------------------- normalisation
def whole_volume(tmp_path, h5_writer, raw: np.ndarray, **kwargs) -> np.ndarray:
    """The predict dataset's single patch when the patch is the whole volume: the volume as the model sees it."""
    path = h5_writer(tmp_path / "v.h5", raw=raw)
    dm = VolumeDataModule(predict_paths=[str(path)], predict_patch_shape=raw.shape[-3:], num_workers=0, **kwargs)
    dm.setup("predict")
    dataset = dm.datasets["predict"]
    assert len(dataset) == 1
    return dataset[0]["raw"].numpy()


def test_standardize_gives_zero_mean_unit_std_per_channel(tmp_path, h5_writer):
    rng = np.random.default_rng(7)
    raw = np.stack([rng.normal(5000, 3, (9, 11, 13)), rng.gamma(2, 2, (9, 11, 13))]).astype(np.float32)
    out = whole_volume(tmp_path, h5_writer, raw, normalization="standardize")
    assert out.dtype == np.float32 and out.shape == raw.shape
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3), dtype=np.float64), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3), dtype=np.float64), 1.0, atol=1e-5)
    np.testing.assert_allclose(out, standardized(raw), atol=1e-4)


def test_percentile_clips_to_numpy_percentiles_and_maps_to_unit_range(tmp_path, h5_writer):
    rng = np.random.default_rng(8)
    raw = np.stack([rng.gamma(2, 3, (9, 11, 13)), rng.normal(0, 1, (9, 11, 13))]).astype(np.float32)
    out = whole_volume(tmp_path, h5_writer, raw, normalization="percentile", percentiles=(2.0, 97.0))
    for c in range(2):
        low, high = np.percentile(raw[c].astype(np.float64), [2.0, 97.0])
        expected = (np.clip(raw[c], low, high) - low) / (high - low)
        np.testing.assert_allclose(out[c], expected, atol=1e-6)
        assert out[c].min() == 0.0 and out[c].max() == pytest.approx(1.0, abs=1e-6)


def test_none_normalization_only_casts(tmp_path, h5_writer):
    raw = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    out = whole_volume(tmp_path, h5_writer, raw, normalization="none")
    np.testing.assert_array_equal(out, raw[None].astype(np.float32))


# --------------------------------------------------------------------------------------------- filtering
def grid_starts(shape, patch, stride):
    """Patch starts of a grid whose strides divide (size - patch) exactly, written out independently."""
    return list(itertools.product(*(range(0, s - p + 1, t) for s, p, t in zip(shape, patch, stride))))


def kept_starts(dm: VolumeDataModule) -> set:
    return {tuple(s.start for s in slices) for _, slices in dm.datasets["train"].locations}


def filtered(path, threshold, share=0.0, seed=0, ignore_index=None, patch=(4, 8, 8), stride=(2, 4, 4)):
    dm = VolumeDataModule(
        train_paths=[str(path)], val_paths=[str(path)], train_patch_shape=patch, train_stride_shape=stride,
        min_foreground_fraction=threshold, empty_patch_keep_share=share, seed=seed, num_workers=0,
    )
    attach_model(dm, out_channels=2, ignore_index=ignore_index)
    dm.setup("fit")
    return dm


def test_min_foreground_fraction_keeps_exactly_the_patches_above_it(tmp_path, h5_writer):
    shape, patch, stride = (8, 16, 16), (4, 8, 8), (2, 4, 4)
    rng = np.random.default_rng(9)
    density = np.linspace(0.0, 0.6, shape[2])[None, None, :] * np.linspace(0.2, 1.0, shape[0])[:, None, None]
    label = (rng.random(shape) < density).astype(np.uint8)
    path = h5_writer(tmp_path / "a.h5", raw=rng.normal(size=shape).astype(np.float32), label=label)
    starts = grid_starts(shape, patch, stride)
    fractions = {s: label[s[0]:s[0] + 4, s[1]:s[1] + 8, s[2]:s[2] + 8].mean() for s in starts}
    threshold = float(np.median(list(fractions.values())))
    dm = filtered(path, threshold)
    expected = {s for s, f in fractions.items() if f >= threshold}
    assert 0 < len(expected) < len(starts)
    assert kept_starts(dm) == expected
    # Validation is never filtered.
    assert len(dm.datasets["val"]) == len(starts)


def test_ignored_voxels_are_not_foreground(tmp_path, h5_writer):
    shape, patch, stride = (8, 16, 16), (4, 8, 8), (2, 4, 4)
    rng = np.random.default_rng(10)
    label = rng.choice(np.array([0, 1, 255], np.uint8), size=shape, p=[0.6, 0.2, 0.2])
    label[:, :, 8:] = np.where(label[:, :, 8:] == 1, 255, label[:, :, 8:])  # right half: no class 1, much 255
    path = h5_writer(tmp_path / "a.h5", raw=rng.normal(size=shape).astype(np.float32), label=label)
    starts = grid_starts(shape, patch, stride)
    threshold = 0.1

    def fraction(s, counted):
        box = label[s[0]:s[0] + 4, s[1]:s[1] + 8, s[2]:s[2] + 8]
        return np.isin(box, counted).mean()

    expected = {s for s in starts if fraction(s, [1]) >= threshold}
    counting_ignored = {s for s in starts if fraction(s, [1, 255]) >= threshold}
    assert expected != counting_ignored  # the test distinguishes the two rules
    assert kept_starts(filtered(path, threshold, ignore_index=255)) == expected


def test_empty_patch_keep_share_keeps_about_that_share_deterministically(tmp_path, h5_writer):
    shape, patch = (8, 64, 64), (4, 8, 8)
    label = np.zeros(shape, np.uint8)
    label[0:4, 0:8, 0:8] = 1  # one full patch of foreground, 127 empty patches
    path = h5_writer(tmp_path / "a.h5", raw=np.random.default_rng(0).normal(size=shape).astype(np.float32),
                     label=label)
    first = kept_starts(filtered(path, 0.5, share=0.5, seed=1, patch=patch, stride=patch))
    again = kept_starts(filtered(path, 0.5, share=0.5, seed=1, patch=patch, stride=patch))
    other = kept_starts(filtered(path, 0.5, share=0.5, seed=2, patch=patch, stride=patch))
    assert (0, 0, 0) in first and (0, 0, 0) in other
    # 127 empty patches kept with probability 1/2 each: mean 63.5, standard deviation 5.6.
    assert 40 <= len(first) - 1 <= 87
    assert first == again and first != other
    assert kept_starts(filtered(path, 0.5, share=0.0, patch=patch, stride=patch)) == {(0, 0, 0)}
    assert len(kept_starts(filtered(path, 0.5, share=1.0, patch=patch, stride=patch))) == 128


def test_filtering_everything_away_is_an_error(tmp_path, h5_writer):
    shape = (8, 16, 16)
    path = h5_writer(tmp_path / "a.h5", raw=np.zeros(shape, np.float32), label=np.zeros(shape, np.uint8))
    with pytest.raises(ConfigurationError, match="min_foreground_fraction"):
        filtered(path, 0.01)


# --------------------------------------------------------------------------------------------- prediction
def test_predict_dataset_covers_pads_orders_and_locates_patches(tmp_path, h5_writer):
    patch, stride = (4, 8, 8), (3, 6, 6)
    rng = np.random.default_rng(11)
    shapes = [(10, 20, 17), (3, 20, 5)]  # the second is smaller than the patch along z and x
    raws = [rng.normal(3, 2, shape).astype(np.float32) for shape in shapes]
    paths = [h5_writer(tmp_path / f"p{i}.h5", raw=raw) for i, raw in enumerate(raws)]
    dm = VolumeDataModule(predict_paths=[str(p) for p in paths], predict_patch_shape=patch,
                          predict_stride_shape=stride, num_workers=0)
    dm.setup("predict")
    dataset = dm.datasets["predict"]
    assert isinstance(dataset, PredictDataset)

    padded_shapes = [tuple(max(s, p) for s, p in zip(shape, patch)) for shape in shapes]
    assert [plan.volume.path for plan in dataset.plans] == paths
    assert [plan.padded_shape for plan in dataset.plans] == padded_shapes

    items = [dataset[i] for i in range(len(dataset))]
    keys = [(item["volume"], tuple(item["start"].tolist())) for item in items]
    assert keys == sorted(keys)  # volumes in order, each volume's patches z-major
    assert len(set(keys)) == len(keys)
    for v, (raw, shape, padded_shape) in enumerate(zip(raws, shapes, padded_shapes)):
        plan = dataset.plans[v]
        starts = [start for w, start in keys if w == v]
        assert starts == [tuple(s.start for s in slices) for slices in plan.grid]
        expected = np.zeros((1, *padded_shape), np.float64)  # zero padding after normalisation
        expected[(slice(None), *(slice(0, n) for n in shape))] = standardized(raw[None])
        covered = np.zeros(shape, bool)
        for item, start in zip((it for it in items if it["volume"] == v), starts):
            box = tuple(slice(a, a + p) for a, p in zip(start, patch))
            assert item["raw"].shape == (1, *patch)
            np.testing.assert_allclose(item["raw"].numpy(), expected[(slice(None), *box)], atol=1e-5)
            covered[box] = True  # numpy clips the box to the volume
        assert covered.all()

    batch = next(iter(dm.predict_dataloader()))
    assert batch["start"].shape == (1, 3) and batch["volume"].tolist() == [0]


def test_predict_without_patch_shape_is_an_error(tmp_path, h5_writer):
    path = h5_writer(tmp_path / "a.h5", raw=np.zeros((4, 4, 4), np.float32))
    dm = VolumeDataModule(predict_paths=[str(path)], num_workers=0)
    with pytest.raises(ConfigurationError, match="predict_patch_shape"):
        dm.setup("predict")


# --------------------------------------------------------------------------------------------- determinism
def make_training(files, seed=0, workers=0, in_memory=False, augmentation=None) -> VolumeDataModule:
    dm = VolumeDataModule(
        train_paths=[str(files["train_0"]), str(files["train_1"])], val_paths=[str(files["val_0"])],
        train_patch_shape=(4, 8, 8), train_stride_shape=(4, 8, 8), batch_size=3, num_workers=workers, seed=seed,
        augmentation=augmentation or Augmentation(elastic=True, elastic_spacing=4), in_memory=in_memory,
    )
    attach_model(dm)
    dm.setup("fit")
    return dm


def epochs_of_batches(dm: VolumeDataModule, epochs: int = 2) -> list[list[dict]]:
    loader = dm.train_dataloader()
    assert loader.persistent_workers == (dm.num_workers > 0)
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out.append(list(loader))
    return out


def same_batches(a: list[list[dict]], b: list[list[dict]]) -> bool:
    return all(
        len(ea) == len(eb) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                   for x, y in zip(ea, eb))
        for ea, eb in zip(a, b)
    )


def test_same_seed_same_batches_and_different_seed_different_batches(blob_files):
    first = epochs_of_batches(make_training(blob_files, seed=5))
    again = epochs_of_batches(make_training(blob_files, seed=5))
    other = epochs_of_batches(make_training(blob_files, seed=6))
    assert len(first[0]) == 24  # 2 volumes x 36 patches, batches of 3
    assert same_batches(first, again)
    assert not same_batches(first, other)
    assert not same_batches([first[0]], [first[1]])  # each epoch has its own order and augmentations


def test_two_workers_give_exactly_the_batches_of_none(blob_files):
    serial = epochs_of_batches(make_training(blob_files, seed=3, workers=0))
    parallel = epochs_of_batches(make_training(blob_files, seed=3, workers=2))
    assert same_batches(serial, parallel)


def test_in_memory_gives_the_samples_of_lazy_reading(blob_files):
    lazy = epochs_of_batches(make_training(blob_files, seed=4), epochs=1)
    dm = make_training(blob_files, seed=4, in_memory=True)
    assert dm.volumes["train"][0].arrays  # really held in memory
    assert same_batches(lazy, epochs_of_batches(dm, epochs=1))
    # Normalising and augmenting never wrote into the in-memory volume.
    raw, _ = blob_volume(seed=0)
    np.testing.assert_array_equal(dm.volumes["train"][0].arrays["raw"], raw)


# --------------------------------------------------------------------------------------------- file handling
class _ProbeInWorker(Dataset):
    """Reads through the wrapped dataset inside a worker and reports which file handles it used."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        open_before = self.inner._files.open_paths()
        self.inner[0]
        handles = list(self.inner._files._files.values())
        return {"pid": os.getpid(), "open_before": open_before, "ids": [id(h) for h in handles],
                "modes": [h.mode for h in handles]}


def test_file_handles_are_not_inherited_across_fork(blob_files):
    dm = make_training(blob_files, augmentation=NO_AUGMENTATION)
    dataset = dm.datasets["train"]
    dataset[0]  # the parent now holds an open file
    parent_handles = list(dataset._files._files.values())
    assert dataset._files.open_paths() == [str(blob_files["train_0"])]
    loader = DataLoader(_ProbeInWorker(dataset), batch_size=None, num_workers=1, multiprocessing_context="fork")
    report = next(iter(loader))
    assert report["pid"] != os.getpid()
    assert report["open_before"] == []  # the inherited cache counts as empty in the worker
    assert report["ids"] and not set(report["ids"]) & {id(h) for h in parent_handles}  # its own handles
    assert report["modes"] == ["r"]
    # The parent's handle still works after the worker used its own.
    np.testing.assert_array_equal(dataset[0]["raw"], dataset[0]["raw"])
    assert all(h.id.valid for h in parent_handles)
    # Pickling (spawned workers) carries no handle either.
    assert pickle.loads(pickle.dumps(dataset))._files.open_paths() == []


def digest(path) -> tuple[str, int]:
    return hashlib.sha256(open(path, "rb").read()).hexdigest(), os.stat(path).st_mtime_ns


def test_input_files_are_opened_read_only_and_left_unchanged(blob_files):
    before = {name: digest(path) for name, path in blob_files.items()}
    dm = make_training(blob_files, workers=1)
    for batches in epochs_of_batches(dm, epochs=1):
        assert batches
    list(dm.val_dataloader())
    dataset = dm.datasets["val"]
    dataset[0]
    volume = dm.volumes["val"][0]
    assert dataset._files.dataset(volume, "raw").file.mode == "r"
    dm.paths["predict"] = [str(blob_files["val_0"])]
    dm.predict_patch_shape = (8, 16, 16)
    dm.setup("predict")
    list(dm.predict_dataloader())
    for stage in ("fit", "predict"):
        dm.teardown(stage)
    assert dataset._files.open_paths() == []
    assert {name: digest(path) for name, path in blob_files.items()} == before


def test_files_are_scanned_once_whatever_roles_and_stages_use_them(blob_files, monkeypatch):
    calls = []
    real = datamodule_module.scan_volume
    monkeypatch.setattr(datamodule_module, "scan_volume",
                        lambda volume, **kw: calls.append(volume.path) or real(volume, **kw))
    path = str(blob_files["train_0"])
    dm = VolumeDataModule(train_paths=[path], val_paths=[path], test_paths=[path], train_patch_shape=(4, 8, 8),
                          num_workers=0)
    attach_model(dm)
    dm.setup("fit")
    dm.setup("validate")
    dm.setup("test")
    assert len(calls) == 1
    assert [v.role for v in dm.volumes["val"]] == ["val"]  # messages still name the role that uses the file


# --------------------------------------------------------------------------------------------- with Lightning
def tiny_model(out_channels: int = 2) -> UNet3DModule:
    return UNet3DModule(in_channels=1, out_channels=out_channels, f_maps=4, num_levels=2, num_groups=2)


def quiet_trainer() -> pl.Trainer:
    return pl.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)


def test_fit_with_a_real_module(blob_files):
    dm = VolumeDataModule(
        train_paths=[str(blob_files["train_0"]), str(blob_files["train_1"])], val_paths=[str(blob_files["val_0"])],
        train_patch_shape=(8, 16, 16), batch_size=2, num_workers=0, seed=1,
    )
    model = tiny_model()
    trainer = quiet_trainer()
    trainer.fit(model, dm)
    assert trainer.global_step == 2


def test_data_errors_stop_fit_before_training(tmp_path, h5_writer):
    raw, label = blob_volume(seed=0)
    label[0, 0, 0] = 2
    path = h5_writer(tmp_path / "bad.h5", raw=raw, label=label)
    dm = VolumeDataModule(train_paths=[str(path)], val_paths=[str(path)], train_patch_shape=(8, 16, 16), num_workers=0)
    trainer = quiet_trainer()
    with pytest.raises(ConfigurationError, match=r"bad\.h5: dataset 'label' holds class id 2"):
        trainer.fit(tiny_model(out_channels=2), dm)
    assert trainer.global_step == 0


class _BatchLog(Callback):
    """What each optimizer step trained on: (epoch, batch index, a fingerprint of the batch)."""

    def __init__(self) -> None:
        self.steps: dict[int, tuple] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        fingerprint = (float(batch["raw"].double().sum()), int(batch["label"].sum()))
        self.steps[trainer.global_step] = (trainer.current_epoch, batch_idx, fingerprint)


def logged_fit(files, root, max_steps, ckpt_path=None, save_every=None, workers=0) -> dict[int, tuple]:
    log = _BatchLog()
    callbacks = [log]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=str(root), every_n_train_steps=save_every, filename="{step}"))
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=str(root), callbacks=callbacks)
    dm = VolumeDataModule(
        train_paths=[str(files["train_0"]), str(files["train_1"])], val_paths=[str(files["val_0"])],
        train_patch_shape=(8, 16, 16), train_stride_shape=(8, 8, 8), batch_size=2, num_workers=workers, seed=5,
    )  # 2 x 8 patches in batches of 2: 8 steps per epoch
    trainer.fit(tiny_model(), dm, ckpt_path=ckpt_path)
    return log.steps


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    files = {}
    for name, seed in (("train_0", 0), ("train_1", 1), ("val_0", 2)):
        raw, label = blob_volume(seed=seed)
        files[name] = write_h5(root / f"{name}.h5", raw=raw, label=label)
    return files, logged_fit(files, root / "full", 12)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("saved_at", [5, 8], ids=["mid-epoch", "end-of-epoch"])
def test_resumed_fit_trains_on_the_batches_of_an_uninterrupted_one(uninterrupted, tmp_path, saved_at):
    files, full = uninterrupted
    assert sorted(full) == list(range(12)) and full[8][:2] == (1, 0)
    logged_fit(files, tmp_path, saved_at, save_every=saved_at, workers=2)
    checkpoint = tmp_path / f"step={saved_at}.ckpt"
    # Hyperparameters hold plain values only, so the checkpoint loads with torch's safe default.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["datamodule_hyper_parameters"]["augmentation"] == dataclasses.asdict(Augmentation())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = logged_fit(files, tmp_path / "resumed", 12, ckpt_path=str(checkpoint), workers=2)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert sorted(resumed) == list(range(saved_at, 12))
    assert all(resumed[step] == full[step] for step in resumed)


def test_augmentation_hyperparameter_round_trips_as_a_dict(blob_files):
    augmentation = Augmentation(elastic=True, noise_sigma=0.2)
    dm = VolumeDataModule(train_paths=[str(blob_files["train_0"])], augmentation=augmentation)
    stored = dict(dm.hparams)
    assert stored["augmentation"] == dataclasses.asdict(augmentation)
    assert VolumeDataModule(**stored).augmentation == augmentation


# --------------------------------------------------------------------------------------------- earlier names
TESTS = Path(__file__).resolve().parent
EARLIER_CHECKPOINTS = [TESTS / "data" / "unet_checkpoint_v0" / "model.ckpt",
                       *sorted((TESTS / "fixtures" / "checkpoints").glob("*/model.ckpt"))]


def test_hdf5_datamodule_is_the_volume_datamodule():
    """The name of earlier versions is the same class object, so LightningCLI, isinstance checks and pickles that
    name it keep working."""
    import unet3d_lightning

    assert unet3d_lightning.HDF5DataModule is unet3d_lightning.VolumeDataModule is VolumeDataModule
    assert datamodule_module.HDF5DataModule is VolumeDataModule
    assert pickle.loads(pickle.dumps(datamodule_module.HDF5DataModule)) is VolumeDataModule


@pytest.mark.parametrize("checkpoint", EARLIER_CHECKPOINTS, ids=lambda p: p.parent.name)
def test_checkpoints_of_earlier_versions_rebuild_their_datamodule(checkpoint):
    """Checkpoints record the DataModule's settings (``datamodule_hyper_parameters``), not its class name: those
    written by earlier versions, with HDF5DataModule, rebuild the same settings under either name."""
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)["datamodule_hyper_parameters"]
    assert not [v for v in stored.values() if isinstance(v, str) and "DataModule" in v]
    for cls in (VolumeDataModule, datamodule_module.HDF5DataModule):
        dm = cls.load_from_checkpoint(checkpoint)
        assert type(dm) is VolumeDataModule
        assert dm.paths["train"] == stored["train_paths"] and dm.paths["val"] == stored["val_paths"]
        assert dm.train_patch_shape == tuple(stored["train_patch_shape"])
        assert dm.normalization == stored["normalization"] and list(dm.percentiles) == list(stored["percentiles"])
        rebuilt = dataclasses.asdict(dm.augmentation)
        assert {k: rebuilt[k] for k in stored["augmentation"]} == stored["augmentation"]
        # Keys added since (the nnU-Net augmentations) take their defaults, which leave them off.
        assert all(rebuilt[k] == 0.0 for k in rebuilt if k not in stored["augmentation"] and k.endswith("_p"))


def test_reader_workers_drop_only_the_lost_receiver_of_a_stopped_main_process(capsys):
    """The traceback of resource_sharer's hand-over thread after the main process stopped is dropped in reader
    workers; any other thread error still reaches the default hook."""
    import threading

    from unet3d_lightning.data import loader

    def raising(exc: BaseException, filename: str) -> threading.ExceptHookArgs:
        code = compile("raise exc", filename, "exec")
        try:
            exec(code, {"exc": exc})
        except BaseException as err:  # noqa: BLE001
            return threading.ExceptHookArgs((type(err), err, err.__traceback__, None))
        raise AssertionError("not raised")

    seen = []
    default, loader._default_thread_excepthook = loader._default_thread_excepthook, seen.append
    try:
        loader._quiet_lost_receiver(raising(BrokenPipeError(32, "Broken pipe"), "/x/multiprocessing/resource_sharer.py"))
        assert seen == []
        loader._quiet_lost_receiver(raising(BrokenPipeError(32, "Broken pipe"), "/x/mine.py"))
        loader._quiet_lost_receiver(raising(ValueError("bad"), "/x/multiprocessing/resource_sharer.py"))
        assert [type(a.exc_value) for a in seen] == [BrokenPipeError, ValueError]
    finally:
        loader._default_thread_excepthook = default


def test_reader_workers_drop_the_reset_that_resource_sharer_reports_through_sys_excepthook():
    """resource_sharer's server loop catches a connection reset while it greets a stopped main process and reports
    it with sys.excepthook (not threading.excepthook): that report is dropped too, and nothing else."""
    from unet3d_lightning.data import loader

    def raised(exc: BaseException, filename: str) -> tuple:
        try:
            exec(compile("raise exc", filename, "exec"), {"exc": exc})
        except BaseException as err:  # noqa: BLE001
            return type(err), err, err.__traceback__
        raise AssertionError("not raised")

    seen = []
    default, loader._default_excepthook = loader._default_excepthook, lambda *info: seen.append(info[0])
    try:
        loader._quiet_lost_receiver_sys(*raised(ConnectionResetError(104, "reset"),
                                                "/x/multiprocessing/resource_sharer.py"))
        assert seen == []
        loader._quiet_lost_receiver_sys(*raised(ConnectionResetError(104, "reset"), "/x/mine.py"))
        loader._quiet_lost_receiver_sys(*raised(KeyError("k"), "/x/multiprocessing/resource_sharer.py"))
        assert seen == [ConnectionResetError, KeyError]
    finally:
        loader._default_excepthook = default
