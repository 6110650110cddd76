"""Random patch positions with foreground oversampling (``data.sampling: random``): the share of patches centred on
foreground, resumption mid-epoch, DDP disjointness, the class-location subsample and the settings' errors.

The foreground share is measured on the labels the dataset returns, compared with the label array written to the
file (independent of the sampler's own bookkeeping)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from unet3d_lightning.data.datamodule import VolumeDataModule
from unet3d_lightning.data.loader import PatchLoader
from unet3d_lightning.data.sampling import class_locations
from unet3d_lightning.data.volumes import open_volume
from unet3d_lightning.errors import ConfigurationError

from conftest import write_h5

PATCH = (8, 8, 8)


def _sparse_volume(path, shape=(40, 40, 40)):
    """Background everywhere but a 2-voxel cube of class 1 and one of class 2, far apart: a patch placed at random
    rarely holds either."""
    rng = np.random.default_rng(0)
    label = np.zeros(shape, np.uint8)
    label[5:7, 30:32, 4:6] = 1
    label[33:35, 3:5, 35:37] = 2
    raw = rng.normal(0, 1, shape).astype(np.float32) + label
    return write_h5(path, raw=raw, label=label), label


def _module(paths, **kwargs):
    settings = dict(train_patch_shape=PATCH, num_workers=0, seed=5, sampling="random", in_memory=True,
                    augmentation={"flip": False, "rotate90": False, "intensity": False, "noise_sigma": 0.0})
    settings.update(kwargs)
    dm = VolumeDataModule(train_paths=[str(p) for p in paths], **settings)
    return dm


def _fake_trainer(rank=0, world=1, out_channels=3):
    return types.SimpleNamespace(
        lightning_module=types.SimpleNamespace(in_channels=1, out_channels=out_channels, ignore_index=None),
        world_size=world, global_rank=rank,
    )


@pytest.mark.parametrize("share", [0.0, 0.33, 0.8])
def test_share_of_patches_with_foreground_is_the_setting(tmp_path, share):
    path, label = _sparse_volume(tmp_path / "v.h5")
    dm = _module([path], patches_per_epoch=1500, foreground_oversampling=share)
    dm.trainer = _fake_trainer()
    dm.setup("fit")
    loader = dm.train_dataloader()
    dataset = loader.dataset
    with_foreground, classes = 0, {1: 0, 2: 0}
    for index, seed in loader.sampler:
        v, slices = dataset._location(index, seed)
        assert (label[slices] != 0).any() == bool(dataset[(index, seed)]["label"].any())  # the data it reads
        present = set(np.unique(label[slices]).tolist()) - {0}
        with_foreground += bool(present)
        for c in present:
            classes[c] += 1
    measured = with_foreground / len(loader.sampler)
    assert len(loader.sampler) == 1500
    assert abs(measured - share) <= 0.05, measured
    if share > 0.5:  # a random class present: both classes are chosen about equally often
        assert abs(classes[1] - classes[2]) < 0.15 * with_foreground


def test_random_positions_cover_the_volume_and_change_every_epoch(tmp_path):
    path, _ = _sparse_volume(tmp_path / "v.h5")
    dm = _module([path], patches_per_epoch=400)
    dm.trainer = _fake_trainer()
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        epochs.append([loader.dataset._location(i, s)[1] for i, s in loader.sampler])
    assert epochs[0] != epochs[1]
    starts = np.array([[s.start for s in slices] for slices in epochs[0]])
    assert starts.min() == 0 and (starts.max(axis=0) == 40 - 8).all()  # every start where the patch fits
    assert abs(starts.mean() - 16) < 1.5  # uniform over 0..32


def test_default_epoch_length_is_the_grid_size(tmp_path):
    path, _ = _sparse_volume(tmp_path / "v.h5")
    dm = _module([path])
    dm.trainer = _fake_trainer()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 9 ** 3  # stride 4 over 40 - 8: 9 starts per axis


def test_resuming_mid_epoch_gives_the_remaining_patches(tmp_path):
    path, _ = _sparse_volume(tmp_path / "v.h5")
    batches = []
    dm = _module([path], patches_per_epoch=24, foreground_oversampling=0.5, batch_size=2)
    dm.trainer = _fake_trainer()
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(3)
    full = [b["raw"] for b in loader]
    loader.progress = lambda: (5, 12)
    state = loader.state_dict()

    fresh = _module([path], patches_per_epoch=24, foreground_oversampling=0.5, batch_size=2)
    fresh.trainer = _fake_trainer()
    fresh.setup("fit")
    resumed_loader = fresh.train_dataloader()
    assert isinstance(resumed_loader, PatchLoader)
    resumed_loader.load_state_dict(state)
    batches = [b["raw"] for b in resumed_loader]
    assert len(batches) == 7
    for a, b in zip(full[5:], batches):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddp_shards_are_disjoint_and_match_one_process(tmp_path):
    path, _ = _sparse_volume(tmp_path / "v.h5")
    single = _module([path], patches_per_epoch=31, foreground_oversampling=0.33)
    single.trainer = _fake_trainer()
    single.setup("fit")
    loader = single.train_dataloader()
    everything = {i: single.datasets["train"]._location(i, s) for i, s in loader.sampler}
    seen = {}
    for rank in range(3):
        dm = _module([path], patches_per_epoch=31, foreground_oversampling=0.33)
        dm.trainer = _fake_trainer(rank, 3)
        dm.setup("fit")
        shard = dm.train_dataloader()
        assert len(shard.sampler) == 10  # 31 // 3, the uneven rest dropped
        for i, s in shard.sampler:
            assert i not in seen
            seen[i] = dm.datasets["train"]._location(i, s)
    assert len(seen) == 30
    assert all(seen[i] == everything[i] for i in seen)  # a position keeps its patch whatever the world size


def test_volumes_without_foreground_fall_back_to_uniform_positions(tmp_path):
    empty = write_h5(tmp_path / "e.h5", raw=np.zeros((16, 16, 16), np.float32), label=np.zeros((16, 16, 16), np.uint8))
    path, _ = _sparse_volume(tmp_path / "v.h5")
    dm = _module([empty, path], patches_per_epoch=200, foreground_oversampling=1.0)
    dm.trainer = _fake_trainer()
    dm.setup("fit")
    dataset = dm.datasets["train"]
    located = [dataset.positions.locate(s) for _, s in dm.train_dataloader().sampler]
    assert {v for v, _, _ in located} == {0, 1}  # both volumes are drawn
    assert all(not forced for v, _, forced in located if v == 0)  # nothing to centre on: uniform
    assert all(forced for v, _, forced in located if v == 1)


def test_class_locations_keep_a_capped_uniform_subsample(tmp_path):
    shape = (30, 20, 20)
    label = np.zeros(shape, np.int32)
    label[:, :10] = 3  # 6000 voxels of class 3, spread over every z-slab
    label[2, 15, 15] = 7
    label[4, 15, 15] = 255  # ignored
    path = write_h5(tmp_path / "c.h5", raw=np.zeros(shape, np.float32), label=label)
    volume = open_volume(path, "train", "raw", "label", None)
    found = class_locations(volume, ignore_index=255, cap=500, seed=1, slab=4)
    assert sorted(found) == [3, 7]
    assert found[7].tolist() == [[2, 15, 15]]
    coords = found[3]
    assert coords.shape == (500, 3) and coords.dtype == np.int32
    assert len({tuple(c) for c in coords.tolist()}) == 500
    assert (label[tuple(coords.T)] == 3).all()
    assert abs(coords[:, 0].mean() - 14.5) < 1.5  # not biased towards the first slabs read
    again = class_locations(volume, ignore_index=255, cap=500, seed=1, slab=7)
    assert np.array_equal(again[3], coords)  # the same subsample whatever the slabs the labels are read in


def test_class_locations_of_binary_masks_are_per_channel(tmp_path):
    masks = np.zeros((2, 6, 6, 6), np.uint8)
    masks[0, 1, 1, 1] = 1
    masks[1, 4, 4, 4] = 1
    path = write_h5(tmp_path / "b.h5", raw=np.zeros((6, 6, 6), np.float32), label=masks)
    volume = open_volume(path, "train", "raw", "label", None)
    found = class_locations(volume)
    assert {c: v.tolist() for c, v in found.items()} == {1: [[1, 1, 1]], 2: [[4, 4, 4]]}


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"patches_per_epoch": 10}, "data.patches_per_epoch applies to random patch positions"),
        ({"foreground_oversampling": 0.3}, "data.foreground_oversampling applies to random"),
        ({"sampling": "random", "foreground_oversampling": 1.5}, r"must be in \[0, 1\]"),
        ({"sampling": "random", "patches_per_epoch": 0}, "must be an integer >= 1"),
        ({"sampling": "random", "min_foreground_fraction": 0.1}, "use data.foreground_oversampling"),
        ({"sampling": "poisson"}, "not one of grid, random"),
    ],
)
def test_contradicting_settings_are_configuration_errors(settings, message):
    with pytest.raises(ConfigurationError, match=message):
        VolumeDataModule(train_paths=["x.h5"], train_patch_shape=PATCH, **settings)
