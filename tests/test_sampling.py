"""Tests of ShardedSampler: disjoint shards whose union is the dataset, per-epoch orders shared by all ranks,
per-sample seeds independent of the world size, and the datamodule's loaders sharding by the trainer's rank."""

from __future__ import annotations

import types
from collections import Counter

import pytest
from torch.utils.data.distributed import DistributedSampler

from unet3d_lightning.data.datamodule import VolumeDataModule
from unet3d_lightning.data.sampling import ShardedSampler

SIZES = (0, 1, 5, 12, 13, 31)


def shards(num_items: int, world: int, epoch: int = 0, **kwargs) -> list[list]:
    out = []
    for rank in range(world):
        sampler = ShardedSampler(num_items, rank=rank, world_size=world, **kwargs)
        sampler.set_epoch(epoch)
        items = list(sampler)
        assert len(items) == len(sampler)
        out.append(items)
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("num_items", SIZES)
def test_training_shards_are_disjoint_equal_and_drop_less_than_world(num_items, world):
    parts = shards(num_items, world, shuffle=True, seed=7, drop_uneven=True, with_seeds=True)
    indices = [[index for index, _ in part] for part in parts]
    flat = [i for part in indices for i in part]
    assert len(flat) == len(set(flat))  # disjoint, and no index twice within a rank
    assert set(flat) <= set(range(num_items))
    assert num_items - len(flat) == num_items % world <= world - 1
    assert len({len(part) for part in indices}) == 1  # every rank runs the same number of steps
    for part in parts:
        assert all(isinstance(seed, int) and 0 <= seed < 2**62 for _, seed in part)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("num_items", SIZES)
def test_ordered_shards_hold_everything_exactly_once(num_items, world):
    parts = shards(num_items, world)
    assert Counter(i for part in parts for i in part) == Counter(range(num_items))
    for rank, part in enumerate(parts):
        assert part == list(range(rank, num_items, world))  # rank r gets items r, r + W, ... (the writer relies on it)


def test_set_epoch_changes_the_order_and_the_seeds():
    epoch0 = shards(40, 1, epoch=0, shuffle=True, seed=3, with_seeds=True)[0]
    epoch1 = shards(40, 1, epoch=1, shuffle=True, seed=3, with_seeds=True)[0]
    assert sorted(i for i, _ in epoch0) == sorted(i for i, _ in epoch1) == list(range(40))
    assert [i for i, _ in epoch0] != [i for i, _ in epoch1]
    assert not {s for _, s in epoch0} & {s for _, s in epoch1}
    assert [i for i, _ in epoch0] != list(range(40))  # shuffled at all
    other_seed = shards(40, 1, epoch=0, shuffle=True, seed=4, with_seeds=True)[0]
    assert [i for i, _ in epoch0] != [i for i, _ in other_seed]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_rank_uses_the_same_order_and_a_sample_keeps_its_seed_across_world_sizes(world):
    n, epoch = 29, 5
    # The world-size-1 order, computed by a separate sampler: the reference every rank must slice.
    (reference,) = shards(n, 1, epoch=epoch, shuffle=True, seed=11, with_seeds=True)
    used = n - n % world
    parts = shards(n, world, epoch=epoch, shuffle=True, seed=11, drop_uneven=True, with_seeds=True)
    for rank, part in enumerate(parts):
        assert part == reference[rank:used:world]
    # Recreating a rank's sampler (another process) gives the same items again.
    assert shards(n, world, epoch=epoch, shuffle=True, seed=11, drop_uneven=True, with_seeds=True) == parts


def test_large_and_negative_seeds_are_accepted():
    for seed in (2**63 + 5, -1, 0):
        items = list(ShardedSampler(10, shuffle=True, seed=seed, with_seeds=True))
        assert sorted(i for i, _ in items) == list(range(10))


def test_invalid_rank_is_refused():
    with pytest.raises(ValueError, match="rank 2"):
        ShardedSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="rank -1"):
        ShardedSampler(10, rank=-1, world_size=2)


def test_lightning_treats_it_as_already_distributed():
    # Lightning replaces a loader's sampler under DDP unless it is a DistributedSampler; the replacement would shard
    # each rank's share again.
    assert isinstance(ShardedSampler(4, rank=1, world_size=2), DistributedSampler)


def test_datamodule_loaders_shard_by_the_trainers_rank(blob_files):
    paths = [str(blob_files["train_0"])]
    seen: dict[str, list] = {"train": [], "val": []}
    for rank in range(3):
        dm = VolumeDataModule(train_paths=paths, val_paths=paths, train_patch_shape=(8, 16, 16), num_workers=0, seed=2)
        dm.trainer = types.SimpleNamespace(
            lightning_module=types.SimpleNamespace(in_channels=1, out_channels=2, ignore_index=None),
            world_size=3, global_rank=rank,
        )
        dm.setup("fit")
        train, val = dm.train_dataloader().sampler, dm.val_dataloader().sampler
        assert (train.rank, train.world_size, train.shuffle, train.with_seeds) == (rank, 3, True, True)
        assert (val.rank, val.world_size, val.shuffle) == (rank, 3, False)
        seen["train"] += [i for i, _ in train]
        seen["val"] += list(val)
    n = len(dm.datasets["train"])  # 3 * 2 * 2 = 12 patches of (8, 16, 16) with stride (4, 8, 8) in (16, 24, 24)
    assert n == 12
    assert sorted(seen["train"]) == list(range(n)) and sorted(seen["val"]) == list(range(n))


@pytest.mark.parametrize("world", [1, 3])
def test_skip_next_resumes_inside_a_share_with_the_same_seeds_once(world):
    n, rank = 20, world - 1
    full = shards(n, world, epoch=2, shuffle=True, seed=9, drop_uneven=True, with_seeds=True)[rank]
    sampler = ShardedSampler(n, shuffle=True, seed=9, rank=rank, world_size=world, drop_uneven=True, with_seeds=True)
    sampler.set_epoch(2)
    sampler.skip_next(2)
    assert list(sampler) == full[2:]
    assert list(sampler) == full  # the skip applied to one iteration only
    assert len(sampler) == len(full)  # the epoch's length is unchanged (the trainer counts the skipped batches)
