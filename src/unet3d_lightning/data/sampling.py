"""Samplers that shard patches over DDP ranks and give every training sample its own augmentation seed.

Why not Lightning's automatic ``DistributedSampler``: it pads validation and prediction with duplicated samples,
which biases metrics and would stitch a patch twice. The datamodule turns Lightning's replacement off
(``use_distributed_sampler=False`` is set by the CLI) and builds these, which know the rank and world size.

Why per-sample seeds: augmentation randomness drawn inside DataLoader workers depends on which worker handles which
sample, so results would change with ``num_workers``. Here the sampler, which runs in the main process, draws a seed
for each sample from a generator seeded by ``(seed, epoch)``; the dataset seeds a ``torch.Generator`` with it. The
batches are then identical for any number of workers, and identical across runs with the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ShardedSampler(Sampler):
    """Indices ``0 .. num_items-1`` (optionally shuffled per epoch), rank ``r`` taking positions ``r, r+W, r+2W, …``.

    Args:
        num_items: dataset length.
        shuffle: new random order every epoch (training). Default False.
        seed: seed of the order and of the per-sample seeds; must be the same on every rank. Default 0.
        rank, world_size: this process's DDP rank and the number of ranks. Default 0, 1.
        drop_uneven: drop the last ``num_items % world_size`` positions so that every rank runs the same number of
            steps and no sample is duplicated (training; a different remainder is dropped each shuffled epoch).
            Without it ranks may differ by one item (validation, prediction). Default False.
        with_seeds: yield ``(index, sample_seed)`` pairs instead of plain indices. Default False.
    """

    def __init__(
        self,
        num_items: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_uneven: bool = False,
        with_seeds: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.num_items = num_items
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.drop_uneven = drop_uneven
        self.with_seeds = with_seeds
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def _used(self) -> int:
        return self.num_items - self.num_items % self.world_size if self.drop_uneven else self.num_items

    def __len__(self) -> int:
        used = self._used()
        return len(range(self.rank, used, self.world_size))

    def __iter__(self) -> Iterator:
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=generator) if self.shuffle else torch.arange(self.num_items)
        positions = range(self.rank, self._used(), self.world_size)
        if not self.with_seeds:
            return iter(order[positions.start : positions.stop : positions.step].tolist())
        seeds = torch.randint(0, 2**62, (self.num_items,), generator=generator)
        pick = slice(positions.start, positions.stop, positions.step)
        return iter(zip(order[pick].tolist(), seeds[pick].tolist()))
