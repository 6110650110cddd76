"""Samplers that shard patches over DDP ranks and give every training sample its own augmentation seed.

Why not Lightning's automatic ``DistributedSampler``: it pads validation and prediction with duplicated samples
that nothing can tell apart, which biases metrics and would stitch a patch twice; here padding duplicates are
flagged (:class:`PaddingIndex`) and skipped. :class:`ShardedSampler` knows the rank and world size itself.
It subclasses ``DistributedSampler`` only so that Lightning recognises it as already distributed and leaves it in
place even when ``Trainer(use_distributed_sampler=True)`` (the default outside the ``unet3d`` CLI): wrapping it in
another distributed sampler would shard every rank's share again and silently drop most of the data.

Why per-sample seeds: augmentation randomness drawn inside DataLoader workers depends on which worker handles which
sample, so results would change with ``num_workers``. Here the sampler, which runs in the main process, draws a seed
for each sample from a generator seeded by ``(seed, epoch)``; the dataset seeds a ``torch.Generator`` with it. The
batches are then identical for any number of workers, and identical across runs with the same seed.

Which training patches are sampled at all: :func:`keep_foreground_patches` keeps those with enough labelled
foreground (``data.min_foreground_fraction``), plus a share of the others, the same on every rank.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

from ..errors import ConfigurationError
from .io.handles import FileCache
from .volumes import Volume, read_region


class PaddingIndex(int):
    """An index yielded only to even out the ranks' shares: a duplicate whose sample must not be counted.

    It compares equal to the plain index it repeats; datasets flag the sample (``"padding": True``) so that
    validation metrics skip it and the prediction writer does not stitch it twice.
    """

    __slots__ = ()

    def __reduce__(self) -> tuple:  # DataLoader workers receive it pickled: keep the type
        return (PaddingIndex, (int(self),))


class ShardedSampler(DistributedSampler):
    """Indices ``0 .. num_items-1`` (optionally shuffled per epoch), rank ``r`` taking positions ``r, r+W, r+2W, …``.

    Every rank computes the same order from ``(seed, epoch)``, so the ranks' shares are disjoint without any
    communication.

    Args:
        num_items: dataset length, ``>= 0``.
        shuffle: new random order every epoch (training). Default False: ``0, 1, 2, …`` (validation, prediction; the
            stitcher needs each volume's patches in grid order).
        seed: seed of the order and of the per-sample seeds, an integer; must be the same on every rank. Default 0.
        rank, world_size: this process's DDP rank and the number of ranks, ``0 <= rank < world_size``. Default 0, 1.
        drop_uneven: drop the last ``num_items % world_size`` positions of the order so that every rank runs the
            same number of steps and no sample is duplicated (training; shuffling drops different items each epoch).
            Without it ranks may differ by one item and every item is yielded exactly once over all ranks (see
            ``pad_uneven`` for validation and prediction under DDP). Default False.
        with_seeds: yield ``(index, sample_seed)`` pairs, ``0 <= sample_seed < 2**62``, instead of plain indices.
            Default False.
        pad_uneven: give every rank ``ceil(num_items / world_size)`` items by appending, on the ranks that are one
            short, a :class:`PaddingIndex` repeating an item of the start of the order (validation, test and
            prediction under DDP: Lightning needs every rank to run the same number of batches, or at least one,
            for its epoch-end collectives; the padding is flagged so that nothing counts twice). Default False.
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
        pad_uneven: bool = False,
    ) -> None:
        if drop_uneven and pad_uneven:
            raise ValueError("drop_uneven and pad_uneven exclude each other")
        if pad_uneven and with_seeds:
            raise ValueError("pad_uneven is for unaugmented (ordered) shares; it does not combine with with_seeds")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size) for world_size {world_size}")
        if num_items < 0:
            raise ValueError(f"num_items {num_items} must be >= 0")
        # DistributedSampler's own state (num_samples, total_size) describes its padding scheme, which this class
        # does not use; __iter__ and __len__ below are the ones that count.
        super().__init__(
            range(num_items), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=int(seed),
            drop_last=drop_uneven,
        )
        self.num_items = num_items
        self.seed = int(seed)
        self.world_size = world_size
        self.drop_uneven = drop_uneven
        self.with_seeds = with_seeds
        self.pad_uneven = pad_uneven
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of epoch ``epoch``; Lightning calls it at the start of every epoch."""
        self.epoch = int(epoch)

    def skip_next(self, items: int) -> None:
        """Make the next iteration start ``items`` positions into this rank's share (resuming mid-epoch).

        The skipped items are not yielded (nor read); the ones after them come with the indices and seeds they have
        in a full iteration. Applies to the next iteration only.
        """
        if items < 0:
            raise ValueError(f"items {items} must be >= 0")
        self.skip = int(items)

    def _used(self) -> int:
        return self.num_items - self.num_items % self.world_size if self.drop_uneven else self.num_items

    def __len__(self) -> int:
        if self.pad_uneven and self.num_items:
            return -(-self.num_items // self.world_size)
        return len(range(self.rank, self._used(), self.world_size))

    def _generator(self) -> torch.Generator:
        # SeedSequence mixes (seed, epoch) into a well-spread 64-bit seed for any integer seed (no overflow, and
        # seed s at epoch e + 1 does not reuse the order of seed s + 1 at epoch e as an affine formula could).
        state = np.random.SeedSequence([self.seed % 2**64, self.epoch]).generate_state(1, np.uint64)[0]
        generator = torch.Generator()
        generator.manual_seed(int(state))
        return generator

    def __iter__(self) -> Iterator:
        generator = self._generator()
        order = torch.randperm(self.num_items, generator=generator) if self.shuffle else torch.arange(self.num_items)
        pick = slice(self.rank + self.skip * self.world_size, self._used(), self.world_size)
        self.skip = 0
        if not self.with_seeds:
            items = order[pick].tolist()
            if self.pad_uneven and self.num_items and self.rank >= self.num_items % self.world_size > 0:
                items.append(PaddingIndex(int(order[self.rank % self.num_items])))
            return iter(items)
        # Drawn for all positions (not only this rank's) so a sample's seed is the same whatever the world size.
        seeds = torch.randint(0, 2**62, (self.num_items,), generator=generator)
        return iter(zip(order[pick].tolist(), seeds[pick].tolist()))


def foreground_fractions(
    volume: Volume, grid: list, patch: tuple[int, int, int], ignore_index: int | None
) -> list[float]:
    """Foreground share of each patch of ``grid``: ``(foreground voxels in the patch) / (voxels in the patch)``.

    A voxel is foreground when its class id is not 0 (3D labels) or any of its mask channels is 1 (4D labels), and
    it is not ignored (its label, or for 4D labels any channel, equals ``ignore_index``); ignored voxels still count
    in the patch's size.

    Each distinct z-range of the grid is read once, summed along z into a ``(H, W)`` image and turned into an
    integral image ``S`` (``S[y, x]`` = sum over rows ``< y`` and columns ``< x``), so a patch's count is the four
    lookups ``S[y1, x1] - S[y0, x1] - S[y1, x0] + S[y0, x0]``.

    Args:
        volume: a labelled volume.
        grid: patch slices in z-major order (as :func:`~unet3d_lightning.data.patches.patch_grid` lists them).
        patch: the patch shape.
        ignore_index: label value that is never foreground. Default: none.
    """
    key = volume.label_internal_path
    if key is None:
        raise ConfigurationError(f"{volume.name}: min_foreground_fraction needs labels")
    cache = FileCache()
    try:
        fractions = []
        current: tuple[int, int] | None = None
        columns = np.zeros((1, 1), np.int64)
        for slices in grid:
            zs, ys, xs = slices
            if (zs.start, zs.stop) != current:  # z-major grid: each z-range is read once
                current = (zs.start, zs.stop)
                everything = (zs, slice(None), slice(None))
                label = read_region(volume, cache, "label", everything, volume.label_kind == "binary")
                if label.ndim == 4:
                    fg = (label == 1).any(axis=0)
                    if ignore_index is not None:
                        fg &= (label != ignore_index).all(axis=0)
                else:
                    fg = label != 0
                    if ignore_index is not None:
                        fg &= label != ignore_index
                columns = np.pad(fg.sum(axis=0, dtype=np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
            count = (
                columns[ys.stop, xs.stop] - columns[ys.start, xs.stop]
                - columns[ys.stop, xs.start] + columns[ys.start, xs.start]
            )
            fractions.append(float(count) / (patch[0] * patch[1] * patch[2]))
        return fractions
    finally:
        cache.close()


def keep_foreground_patches(
    volume: Volume,
    grid: list,
    patch: tuple[int, int, int],
    min_fraction: float,
    keep_share: float = 0.0,
    ignore_index: int | None = None,
    seed: int = 0,
) -> list:
    """The patches of ``grid`` whose foreground share (:func:`foreground_fractions`) is at least ``min_fraction``,
    plus a random ``keep_share`` of the others, in grid order (``data.min_foreground_fraction``,
    ``data.empty_patch_keep_share``).

    Args:
        volume: a labelled volume.
        grid: its patch slices in z-major order.
        patch: the patch shape.
        min_fraction: the foreground share a patch needs, in ``[0, 1]``.
        keep_share: the share of the other patches kept anyway, in ``[0, 1]``. Default 0.0.
        ignore_index: label value that is never foreground. Default None.
        seed: seed of the choice of kept patches, with the volume's path. Default 0.
    """
    fractions = foreground_fractions(volume, grid, patch, ignore_index)
    # crc32, not hash(): str hashes differ between processes, and every DDP rank must keep the same patches.
    rng = np.random.default_rng([seed, zlib.crc32(str(volume.path).encode())])
    keep_empty = rng.random(len(grid)) < keep_share
    return [s for s, f, k in zip(grid, fractions, keep_empty) if f >= min_fraction or k]


# ---------------------------------------------------------------------------------------------------------------
# Random patch positions with foreground oversampling (data.sampling: random)
# ---------------------------------------------------------------------------------------------------------------

#: foreground coordinates kept per class and volume (a uniform random subsample of the class's voxels)
CLASS_LOCATIONS_CAP = 10_000
_LOCATION_STREAM = 0x5A4D_9E37  # mixes the sample seed into a stream of its own, apart from the augmentations'


def class_locations(
    volume: Volume,
    ignore_index: int | None = None,
    cap: int = CLASS_LOCATIONS_CAP,
    seed: int = 0,
    slab: int = 16,
) -> dict[int, np.ndarray]:
    """Where each foreground class of ``volume`` lies: class → ``(n, 3)`` int32 ``(z, y, x)`` voxel coordinates.

    Classes are the label ids other than 0 and ``ignore_index`` (3D class-id or instance labels: instances count
    as one class, 1), or for 4D binary masks each channel ``c`` as class ``c + 1`` where it is 1 (and no channel
    equals ``ignore_index``). A class with more than ``cap`` voxels keeps a uniform random subsample of ``cap`` of
    them (each voxel gets a random key, the ``cap`` smallest keys are kept; the same whatever ``slab``), so the
    memory is ``O(cap)`` per class whatever the volume's size.
    The labels are read in z-slabs of ``slab`` slices (read-only).

    Args:
        volume: a labelled volume.
        ignore_index: label value that is never foreground. Default None.
        cap: the most coordinates kept per class, ``>= 1``. Default :data:`CLASS_LOCATIONS_CAP` (10 000).
        seed: seed of the subsample, with the volume's path. Default 0.
        slab: z-slices read at a time. Default 16.
    """
    if volume.label_internal_path is None:
        raise ConfigurationError(f"{volume.name}: data.foreground_oversampling needs labels")
    # One key stream per class, drawn in the voxels' z-major order: the subsample does not depend on ``slab``.
    path_key = zlib.crc32(str(volume.path).encode())
    streams: dict[int, np.random.Generator] = {}
    kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # class -> (coordinates, keys)
    binary = volume.label_kind == "binary"
    cache = FileCache()
    try:
        depth, height, width = volume.spatial_shape
        for z0 in range(0, depth, slab):
            zs = slice(z0, min(z0 + slab, depth))
            label = read_region(volume, cache, "label", (zs, slice(None), slice(None)), binary)
            if binary:
                usable = (label != ignore_index).all(axis=0) if ignore_index is not None else None
                masks = {c + 1: label[c] == 1 for c in range(label.shape[0])}
                if usable is not None:
                    masks = {c: m & usable for c, m in masks.items()}
            else:
                fg = label != 0
                if ignore_index is not None:
                    fg &= label != ignore_index
                if volume.label_kind == "instances":
                    masks = {1: fg}
                else:
                    masks = {int(c): label == c for c in np.unique(label[fg])}
            for c, mask in masks.items():
                coords = np.argwhere(mask).astype(np.int32)
                if not len(coords):
                    continue
                coords[:, 0] += z0
                rng = streams.setdefault(c, np.random.default_rng([seed, path_key, c]))
                keys = rng.random(len(coords))
                if c in kept:
                    coords = np.concatenate([kept[c][0], coords])
                    keys = np.concatenate([kept[c][1], keys])
                if len(coords) > cap:
                    smallest = np.argpartition(keys, cap - 1)[:cap]
                    coords, keys = coords[smallest], keys[smallest]
                kept[c] = (coords, keys)
    finally:
        cache.close()
    return {c: kept[c][0][np.lexsort(kept[c][0].T[::-1])] for c in sorted(kept)}


class RandomLocations:
    """Patch positions drawn from each sample's seed: ``data.sampling: random`` with ``data.foreground_oversampling``.

    For a sample seed ``s`` (drawn by :class:`ShardedSampler` per epoch and position, so positions are seeded,
    resumable mid-epoch and disjoint over DDP ranks exactly as the grid's patches are), a generator seeded by
    ``(s, stream)`` picks a volume uniformly, then with probability ``foreground_oversampling`` a foreground class
    present in that volume (uniformly among its classes) and one of its voxels (uniformly among the
    :func:`class_locations` kept), and centres the patch on it, shifted back inside the volume where the centre is
    closer than half a patch to a border (the voxel stays in the patch); otherwise, or when the volume has no
    foreground, a start uniform over every position where the patch fits. This follows nnU-Net's sampler (Isensee
    et al., Nature Methods 2021: one third of the patches forced to contain foreground of a random class present).

    Args:
        shapes: the spatial shape of each volume.
        patch: the patch shape; at most each volume's shape along every axis.
        locations: per volume, :func:`class_locations` (``{}`` without foreground); None when
            ``foreground_oversampling`` is 0.
        foreground_oversampling: the share of patches centred on foreground, in ``[0, 1]``. Default 0.0.
    """

    def __init__(
        self,
        shapes: list[tuple[int, int, int]],
        patch: tuple[int, int, int],
        locations: list[dict[int, np.ndarray]] | None = None,
        foreground_oversampling: float = 0.0,
    ) -> None:
        if not 0 <= foreground_oversampling <= 1:
            raise ValueError(f"foreground_oversampling {foreground_oversampling} must be in [0, 1]")
        if foreground_oversampling > 0 and (locations is None or len(locations) != len(shapes)):
            raise ValueError("foreground_oversampling needs the class locations of every volume")
        for shape in shapes:
            if any(p > n for p, n in zip(patch, shape)):
                raise ValueError(f"patch {list(patch)} does not fit a volume of shape {list(shape)}")
        self.shapes = [tuple(int(n) for n in s) for s in shapes]
        self.patch = tuple(int(p) for p in patch)
        self.locations = locations
        self.foreground_oversampling = float(foreground_oversampling)

    def locate(self, seed: int) -> tuple[int, tuple[slice, slice, slice], bool]:
        """The ``(volume index, patch slices, centred on foreground)`` of the sample with seed ``seed``."""
        rng = np.random.default_rng([int(seed) % 2**64, _LOCATION_STREAM])
        v = int(rng.integers(len(self.shapes)))
        shape = self.shapes[v]
        forced = bool(rng.random() < self.foreground_oversampling)
        classes = self.locations[v] if forced and self.locations is not None else {}
        if forced and classes:
            cls = list(classes)[int(rng.integers(len(classes)))]
            centre = classes[cls][int(rng.integers(len(classes[cls])))]
            start = [min(max(int(c) - p // 2, 0), n - p) for c, p, n in zip(centre, self.patch, shape)]
        else:
            forced = False
            start = [int(rng.integers(0, n - p + 1)) for p, n in zip(self.patch, shape)]
        return v, tuple(slice(s, s + p) for s, p in zip(start, self.patch)), forced  # type: ignore[return-value]
