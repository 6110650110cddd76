"""Rank-owned output regions for DDP prediction: which rows each rank writes, and which patches it predicts.

The output rows of all predict volumes, volume after volume, are cut into *units*: rows of whole output chunks
(``CHUNK_ZYX[0]`` = 16 z-rows, the last one of a volume shorter; chunks are one channel deep and span every y and
x chunk of those rows in the store's layout, see :class:`~.outputs.chunks.ChunkRowDataset`). A unit's cost is the
number of patches whose kept z-range (after halo cropping, as the stitcher keeps it) meets it. The units, in order,
are split into ``world_size`` contiguous groups of about equal cost (unit ``i`` goes to rank
``floor(W * (c_i + w_i / 2) / total)``, ``c_i`` the cost before it, ``w_i`` its own): rank ``r`` owns a contiguous,
chunk-aligned range of rows of each volume it has units of. It predicts every patch meeting its rows, stitches them
with a :class:`~.stitcher.StreamingStitcher` restricted to those rows (``rows=``), and writes them itself. The patches
whose kept range meets the rows of two ranks are predicted by both (the *redundant* patches, reported at the end);
nothing else is shared, so no band is ever reduced and no rank waits for another until the end.

Chunk-aligned ranges never share a chunk, so every rank writes its own chunks into one Zarr store; HDF5 files have
one writer each (see :mod:`~.callback`). A resumed run leaves out the units that an interrupted run finished
(:mod:`~.resume`); a rank's range then runs from its first to its last unfinished unit, and only its unfinished
units are written.

The patch-to-rank assignment reaches the DataLoader as the sampler :class:`OwnedRowsSampler`, which the
DataModule's ``predict_dataloader`` returns for an assignment the writer computed in its ``setup`` (Lightning's own
distributed sampler is off: ``use_distributed_sampler=False``). No torch.distributed call happens here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data.distributed import DistributedSampler

from ..data.sampling import PaddingIndex
from .outputs.chunks import CHUNK_ZYX

__all__ = [
    "OwnedRowsSampler", "RowAssignment", "assign_rows", "chunk_rows", "gather_objects", "kept_z_ranges", "peak_rss",
    "rank_report",
]


def chunk_rows(depth: int, chunk_depth: int = CHUNK_ZYX[0]) -> list[tuple[int, int]]:
    """The rows ``[z0, z1)`` of whole output chunks of a volume ``depth`` deep: chunks are ``min(depth,
    chunk_depth)`` rows deep, as :class:`~.outputs.chunks.ChunkRowDataset` makes them."""
    cz = min(int(depth), int(chunk_depth))
    return [(z, min(z + cz, depth)) for z in range(0, depth, cz)]


def kept_z_ranges(grid: Sequence[tuple[slice, slice, slice]], halo_z: int) -> dict[int, tuple[int, int]]:
    """Per z-start of ``grid``, the padded rows ``[lo, hi)`` its patches keep after cropping ``halo_z`` at interior
    faces (faces at 0 and at the padded depth are kept), as the stitcher crops them."""
    padded = max(s[0].stop for s in grid)
    ranges = {}
    for s in grid:
        start, stop = s[0].start, s[0].stop
        if start not in ranges:
            ranges[start] = (start if start == 0 else start + halo_z, stop if stop == padded else stop - halo_z)
    return ranges


@dataclass
class RowAssignment:
    """Who writes what: per rank and volume the rows ``[a, b)`` it stitches (``a == b``: none) and the chunk rows it
    writes; per rank the dataset items it predicts, in dataset order.

    Attributes:
        world_size: the number of ranks.
        rows: ``rows[rank][volume] = (a, b)``.
        units: ``units[rank][volume]`` = the chunk rows ``(z0, z1)`` the rank writes (unfinished ones only).
        items: ``items[rank]`` = indices into the predict dataset, in increasing order.
        unique: the number of distinct patches predicted over all ranks.
        finished: the chunk rows left out because an interrupted run finished them, per volume.
    """

    world_size: int
    rows: list[list[tuple[int, int]]]
    units: list[list[list[tuple[int, int]]]]
    items: list[list[int]]
    unique: int
    finished: list[set[tuple[int, int]]] = field(default_factory=list)

    @property
    def redundant(self) -> int:
        """Patches predicted by more than one rank, counted once per extra rank."""
        return sum(len(items) for items in self.items) - self.unique

    def patches_of(self, rank: int, volume: int, plans: Sequence[Any]) -> int:
        """How many of ``rank``'s items belong to ``volume`` (for its progress bar)."""
        offset = sum(len(plan.grid) for plan in plans[:volume])
        return sum(offset <= i < offset + len(plans[volume].grid) for i in self.items[rank])


def assign_rows(
    plans: Sequence[Any], world_size: int, halo_z: int = 0, chunk_depth: int = CHUNK_ZYX[0],
    finished: Sequence[set[tuple[int, int]]] | None = None,
) -> RowAssignment:
    """Split the output rows of ``plans`` over ``world_size`` ranks (see the module notes).

    Args:
        plans: the predict dataset's plans (``volume.spatial_shape`` and ``grid``, patch slices in z-major order).
        world_size: the number of ranks, >= 1.
        halo_z: the writer's halo along z (patches keep fewer rows, so fewer meet a range). Default 0.
        chunk_depth: the output chunks' depth in z. Default ``CHUNK_ZYX[0]`` = 16.
        finished: per volume, chunk rows an interrupted run finished, left out. Default none.

    Returns:
        The :class:`RowAssignment`.
    """
    world = int(world_size)
    if world < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    finished = [set(f) for f in finished] if finished is not None else [set() for _ in plans]
    # Units: (volume, z0, z1, cost, z-starts meeting it), unfinished only, in output order.
    units = []
    for v, plan in enumerate(plans):
        kept = kept_z_ranges(plan.grid, halo_z)
        per_start = len(plan.grid) // len(kept)
        for z0, z1 in chunk_rows(plan.volume.spatial_shape[0], chunk_depth):
            if (z0, z1) in finished[v]:
                continue
            starts = [z for z, (lo, hi) in kept.items() if lo < z1 and hi > z0]
            units.append((v, z0, z1, len(starts) * per_start))
    total = sum(u[3] for u in units)
    rows: list[list[tuple[int, int]]] = [[(0, 0)] * len(plans) for _ in range(world)]
    owned: list[list[list[tuple[int, int]]]] = [[[] for _ in plans] for _ in range(world)]
    before = 0
    for v, z0, z1, cost in units:
        rank = min(world - 1, math.floor(world * (before + cost / 2) / total)) if total else 0
        before += cost
        owned[rank][v].append((z0, z1))
        a, b = rows[rank][v]
        rows[rank][v] = (z0, z1) if a == b else (a, z1)
    items: list[list[int]] = []
    seen: set[int] = set()
    for rank in range(world):
        mine = []
        offset = 0
        for v, plan in enumerate(plans):
            a, b = rows[rank][v]
            if a < b:
                kept = kept_z_ranges(plan.grid, halo_z)
                needed = {z for z, (lo, hi) in kept.items() if lo < b and hi > a}
                mine.extend(offset + i for i, s in enumerate(plan.grid) if s[0].start in needed)
            offset += len(plan.grid)
        items.append(mine)
        seen.update(mine)
    return RowAssignment(world, rows, owned, items, len(seen), finished)


class OwnedRowsSampler(DistributedSampler):
    """The predict items of one rank under a :class:`RowAssignment`, in dataset order (z-major per volume).

    A rank that owns nothing yields one flagged duplicate (:class:`~unet3d_lightning.data.sampling.PaddingIndex` of
    item 0), which the writer skips: Lightning skips the predict loop, and with it the writer's hooks (and the final
    gathering every rank takes part in), on a rank whose loader is empty. It subclasses ``DistributedSampler``
    (without using its state), as :class:`~unet3d_lightning.data.sampling.ShardedSampler` does, so that a Trainer
    with ``use_distributed_sampler=True`` leaves it in place instead of sharding the rank's items again.

    Args:
        assignment: the split of rows and patches.
        rank: this process's global rank.
    """

    def __init__(self, assignment: RowAssignment, rank: int) -> None:
        super().__init__(range(1), num_replicas=assignment.world_size, rank=int(rank), shuffle=False)
        self.assignment = assignment
        self.rank = int(rank)
        self._items = list(assignment.items[self.rank])

    def __iter__(self) -> Iterator[int]:
        if not self._items:
            return iter([PaddingIndex(0)])
        return iter(self._items)

    def __len__(self) -> int:
        return max(1, len(self._items))


def gather_objects(obj: Any, world_size: int) -> tuple[list[Any], int]:
    """Every rank's ``obj`` (``torch.distributed.all_gather_object``; ``[obj]`` without a process group), and the
    bytes this rank sent for it (its pickle, to each other rank)."""
    import pickle

    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj], 0
    sent = len(pickle.dumps(obj)) * (world_size - 1)
    if isinstance(obj, dict):
        obj = {**obj, "report_bytes": sent}
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered, sent


def rank_report(reports: Sequence[dict[str, Any]], assignment: RowAssignment) -> list[str]:
    """The lines printed at the end of a rank-owned prediction: ``rank R: P patches, V output voxels written``
    (V counts every channel's value), the time, then the redundant patches."""
    lines = []
    for r in sorted(reports, key=lambda r: r["rank"]):
        line = f"rank {r['rank']}: {r['patches']} patches, {r['values']} output voxels written in {r['seconds']:.1f} s"
        if r.get("peak_rss"):
            line += f", peak RSS {r['peak_rss'] / 2**20:.0f} MiB"
        # What this rank passed to torch.distributed collectives (the start's broadcast, this report's gathering).
        line += f", {r.get('sent', 0) + r.get('report_bytes', 0)} bytes sent to other ranks"
        lines.append(line)
    total = sum(len(items) for items in assignment.items)
    share = assignment.redundant / assignment.unique if assignment.unique else 0.0
    lines.append(f"predicted {total} patches for {assignment.unique} distinct ones: {assignment.redundant} redundant "
                 f"({share:.1%}) across {assignment.world_size} rank(s)")
    return lines


def peak_rss() -> int:
    """This process's peak resident memory in bytes (``getrusage``; 0 where it is not available)."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * (1 if sys.platform == "darwin" else 1024)
    except (ImportError, OSError, ValueError):
        return 0
