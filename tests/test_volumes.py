"""Tests of finding, validating and scanning HDF5 volumes: one test per kind of bad input, each checking that
``setup()`` stops with one sentence naming the file, the dataset and the problem; path expansion; statistics."""

from __future__ import annotations

import types
from pathlib import Path

import h5py
import numpy as np
import pytest

from unet3d_lightning.data import volumes as volumes_module
from unet3d_lightning.data.datamodule import VolumeDataModule
from unet3d_lightning.data.volumes import open_volume, resolve_paths, scan_volume
from unet3d_lightning.errors import ConfigurationError

SHAPE = (8, 12, 12)
PATCH = (4, 8, 8)


def attach_model(dm: VolumeDataModule, in_channels: int = 1, out_channels: int = 2, ignore_index=None) -> None:
    """What setup reads from a trainer: the attached model's channel counts and ignore_index."""
    model = types.SimpleNamespace(in_channels=in_channels, out_channels=out_channels, ignore_index=ignore_index)
    dm.trainer = types.SimpleNamespace(lightning_module=model, world_size=1, global_rank=0)


def good(seed: int = 0, shape=SHAPE) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"raw": rng.normal(size=shape).astype(np.float32), "label": rng.integers(0, 2, shape).astype(np.uint8)}


def setup_error(train, val=None, model: dict | None = None, **kwargs) -> str:
    """The message of the ConfigurationError that ``setup("fit")`` raises; checks it is a single line."""
    dm = VolumeDataModule(
        train_paths=[str(p) for p in train], val_paths=[str(p) for p in (val or train)],
        train_patch_shape=PATCH, num_workers=0, **kwargs,
    )
    attach_model(dm, **(model or {}))
    with pytest.raises(ConfigurationError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# --------------------------------------------------------------------------------------------- bad inputs
def test_missing_file(tmp_path):
    missing = tmp_path / "absent.h5"
    message = setup_error([missing])
    assert str(missing) in message and "does not exist" in message


def test_missing_dataset_lists_the_existing_ones(tmp_path, h5_writer):
    data = good()
    path = h5_writer(tmp_path / "a.h5", raw=data["raw"], **{"seg/classes": data["label"]})
    message = setup_error([path])
    assert str(path) in message and "'label'" in message and "does not exist" in message
    assert "'raw'" in message and "'seg/classes'" in message  # the datasets that do exist


def test_raw_label_spatial_shape_mismatch(tmp_path, h5_writer):
    data = good()
    path = h5_writer(tmp_path / "a.h5", raw=data["raw"], label=data["label"][:, :, :11])
    message = setup_error([path])
    assert str(path) in message and "'label'" in message
    assert "(8, 12, 11)" in message and "(8, 12, 12)" in message


def test_raw_channels_differ_from_model_in_channels(tmp_path, h5_writer):
    data = good()
    path = h5_writer(tmp_path / "a.h5", raw=np.stack([data["raw"]] * 2), label=data["label"])
    message = setup_error([path], model={"in_channels": 3})
    assert str(path) in message and "'raw'" in message and "2 channel" in message and "in_channels=3" in message


def test_class_ids_outside_out_channels(tmp_path, h5_writer):
    data = good()
    data["label"][3, 4, 5] = 3
    path = h5_writer(tmp_path / "a.h5", **data)
    message = setup_error([path], model={"out_channels": 3})
    assert str(path) in message and "'label'" in message and "class id 3" in message and "[0, 3)" in message


def test_negative_class_ids_rejected(tmp_path, h5_writer):
    data = good()
    label = data["label"].astype(np.int16)
    label[0, 0, 0] = -1
    path = h5_writer(tmp_path / "a.h5", raw=data["raw"], label=label)
    message = setup_error([path])
    assert str(path) in message and "'label'" in message and "class id -1" in message


def test_ignore_index_values_are_allowed_but_nothing_else(tmp_path, h5_writer):
    data = good()
    data["label"][:2] = 255
    path = h5_writer(tmp_path / "a.h5", **data)
    dm = VolumeDataModule(train_paths=[str(path)], val_paths=[str(path)], train_patch_shape=PATCH, num_workers=0)
    attach_model(dm, out_channels=2, ignore_index=255)
    dm.setup("fit")  # 255 is the ignore_index: accepted

    data["label"][5, 5, 5] = 7
    other = h5_writer(tmp_path / "b.h5", **data)
    message = setup_error([other], model={"out_channels": 2, "ignore_index": 255})
    assert str(other) in message and "'label'" in message and "class id 7" in message and "ignore_index 255" in message


def test_without_a_model_the_label_range_is_not_checked(tmp_path, h5_writer):
    data = good()
    data["label"][0, 0, 0] = 9
    path = h5_writer(tmp_path / "a.h5", **data)
    dm = VolumeDataModule(train_paths=[str(path)], val_paths=[str(path)], train_patch_shape=PATCH, num_workers=0)
    dm.setup("fit")  # no trainer attached: nothing to compare the labels with
    assert len(dm.datasets["train"]) > 0


def test_4d_label_channels_differ_from_out_channels(tmp_path, h5_writer):
    data = good()
    masks = np.stack([data["label"], 1 - data["label"], data["label"]])
    path = h5_writer(tmp_path / "a.h5", raw=data["raw"], label=masks)
    message = setup_error([path], model={"out_channels": 2})
    assert str(path) in message and "'label'" in message and "3 channels" in message and "out_channels=2" in message


def test_4d_label_must_be_binary(tmp_path, h5_writer):
    data = good()
    masks = np.stack([data["label"], 1 - data["label"]]).astype(np.float32)
    masks[1, 2, 3, 4] = 0.5
    path = h5_writer(tmp_path / "a.h5", raw=data["raw"], label=masks)
    message = setup_error([path], model={"out_channels": 2})
    assert str(path) in message and "'label'" in message and "0.5" in message and "binary" in message


def test_nan_in_raw(tmp_path, h5_writer):
    data = good()
    data["raw"][6, 1, 2] = np.nan
    data["raw"][6, 2, 2] = np.nan
    path = h5_writer(tmp_path / "a.h5", **data)
    message = setup_error([path])
    assert str(path) in message and "'raw'" in message and "2 NaN" in message and "Inf" not in message


def test_inf_in_raw(tmp_path, h5_writer):
    data = good()
    data["raw"][1, 1, 2] = -np.inf
    path = h5_writer(tmp_path / "a.h5", **data)
    message = setup_error([path])
    assert str(path) in message and "'raw'" in message and "1 Inf" in message and "NaN" not in message


def test_file_that_is_not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_bytes(b"this is a text file, not HDF5\n" * 20)
    message = setup_error([path])
    assert str(path) in message and "cannot be read as an HDF5 file" in message


def test_truncated_hdf5_file(tmp_path, h5_writer):
    path = h5_writer(tmp_path / "a.h5", **good(shape=(16, 32, 32)))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    message = setup_error([path])
    assert str(path) in message and "cannot be read" in message


def test_damaged_chunk_names_the_dataset(tmp_path):
    # A gzip chunk overwritten with garbage: the file opens, the damage shows only when the voxels are read.
    path = tmp_path / "a.h5"
    data = good()
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=data["raw"], chunks=(4, 12, 12), compression="gzip")
        f.create_dataset("label", data=data["label"])
        offset = f["raw"].id.get_chunk_info(1).byte_offset
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * 64)
    message = setup_error([path])
    assert str(path) in message and "'raw'" in message and "cannot be read" in message and "corrupt" in message


def test_glob_matching_nothing(tmp_path):
    pattern = str(tmp_path / "train" / "*.h5")
    message = setup_error([pattern])
    assert pattern in message and "matched no file" in message


def test_directory_without_hdf5_files(tmp_path):
    folder = tmp_path / "volumes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no volumes here")
    message = setup_error([folder])
    assert str(folder) in message and "no HDF5 file" in message


def test_training_volume_smaller_than_the_patch(tmp_path, h5_writer):
    path = h5_writer(tmp_path / "a.h5", **good(shape=(8, 12, 6)))
    message = setup_error([path])
    assert str(path) in message and "'raw'" in message and "axis x" in message and "smaller than the patch" in message


def test_mixed_3d_and_4d_labels_across_files(tmp_path, h5_writer):
    data = good()
    first = h5_writer(tmp_path / "a.h5", **data)
    second = h5_writer(tmp_path / "b.h5", raw=data["raw"], label=np.stack([data["label"], 1 - data["label"]]))
    message = setup_error([first, second], model={"out_channels": 2})
    assert str(first) in message and str(second) in message and "'label'" in message
    assert "4D binary masks" in message and "3D class ids" in message


def test_negative_weights(tmp_path, h5_writer):
    data = good()
    weight = np.ones(SHAPE, np.float32)
    weight[7, 11, 11] = -0.25
    path = h5_writer(tmp_path / "a.h5", weight=weight, **data)
    message = setup_error([path], weight_internal_path="weight")
    assert str(path) in message and "'weight'" in message and "1 negative" in message and "-0.25" in message


def test_weight_of_the_wrong_shape(tmp_path, h5_writer):
    data = good()
    path = h5_writer(tmp_path / "a.h5", weight=np.ones((2, *SHAPE), np.float32), **data)  # 4D, but 3D labels
    message = setup_error([path], weight_internal_path="weight")
    assert str(path) in message and "'weight'" in message and "(2, 8, 12, 12)" in message


def test_validation_files_are_checked_too(tmp_path, h5_writer):
    train = h5_writer(tmp_path / "train.h5", **good())
    data = good(1)
    data["raw"][0, 0, 0] = np.nan
    val = h5_writer(tmp_path / "val.h5", **data)
    message = setup_error([train], [val])
    assert str(val) in message and "val volume" in message and "NaN" in message


# --------------------------------------------------------------------------------------------- paths
def test_resolve_paths_expands_directories_and_globs_in_order_without_duplicates(tmp_path, h5_writer):
    data = good()
    b = h5_writer(tmp_path / "d" / "b.hdf5", **data)
    a = h5_writer(tmp_path / "d" / "a.h5", **data)
    (tmp_path / "d" / "c.txt").write_text("ignored by directory expansion")
    z = h5_writer(tmp_path / "e" / "sub" / "z.h5", **data)
    found = resolve_paths([tmp_path / "d", str(tmp_path / "e" / "**" / "*.h5"), a], "train")
    assert found == [a, b, z]  # the directory's files sorted, then the glob's; 'a' given again is kept once
    assert resolve_paths(None, "train") == []
    assert resolve_paths(str(a), "train") == [a]


# --------------------------------------------------------------------------------------------- statistics
def test_stats_are_exact_over_many_blocks_even_with_a_large_offset(tmp_path, h5_writer, monkeypatch):
    rng = np.random.default_rng(5)
    raw = np.stack([1e4 + rng.normal(0, 0.5, SHAPE), rng.uniform(-3, 7, SHAPE)]).astype(np.float32)
    path = h5_writer(tmp_path / "a.h5", raw=raw)
    monkeypatch.setattr(volumes_module, "SCAN_BLOCK_VOXELS", 300)  # about one z-row per block: 8 merged blocks
    volume = scan_volume(open_volume(Path(path), "train"))
    data = raw.astype(np.float64).reshape(2, -1)
    np.testing.assert_allclose(volume.stats.mean, data.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(volume.stats.std, data.std(axis=1), rtol=1e-9)


def test_percentiles_exact_for_small_volumes_and_close_when_sampled(tmp_path, h5_writer, monkeypatch):
    rng = np.random.default_rng(6)
    raw = rng.gamma(2.0, 3.0, (20, 30, 30)).astype(np.float32)
    path = Path(h5_writer(tmp_path / "a.h5", raw=raw))
    exact = scan_volume(open_volume(path, "train"), percentiles=(1.0, 99.0))
    np.testing.assert_allclose(exact.stats.low + exact.stats.high, np.percentile(raw, [1, 99]), rtol=1e-6)

    monkeypatch.setattr(volumes_module, "PERCENTILE_SAMPLES", 2000)  # a lattice of every 3rd voxel: 7*10*10
    monkeypatch.setattr(volumes_module, "SCAN_BLOCK_VOXELS", 2000)  # slabs of 2 rows: the lattice spans slabs
    sampled = scan_volume(open_volume(path, "train"), percentiles=(1.0, 99.0))
    lattice = raw[::3, ::3, ::3]
    np.testing.assert_allclose(sampled.stats.low + sampled.stats.high, np.percentile(lattice, [1, 99]), rtol=1e-6)
    # The lattice's percentiles are close to the volume's: within a few percentile ranks.
    assert np.percentile(raw, 0.2) <= sampled.stats.low[0] <= np.percentile(raw, 3)
    assert np.percentile(raw, 97) <= sampled.stats.high[0] <= np.percentile(raw, 99.8)
