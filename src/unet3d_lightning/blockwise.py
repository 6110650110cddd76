"""Blockwise seeded watershed: instances of a volume whose whole-volume watershed would not fit in
``prediction.watershed.memory_limit_gb``.

The volume is cut into z-blocks: cores of ``B`` rows (a multiple of the output chunk depth, so each block's ids are
written as whole chunk rows), each read with ``O`` rows of context on both sides. For each block, in z order:

1. the maps of the extended block (core plus context) are read from the written ``predictions`` and turned into a
   boundary map and foreground (:func:`~unet3d_lightning.instances.boundary_evidence`; the context also holds the
   affinity neighbours of the core's faces);
2. :func:`~unet3d_lightning.instances.watershed_instances` runs on the extended block — seeds are found with the
   context, so objects near a face are seeded as in the whole volume;
3. only the core is kept, its ids shifted by the number of ids of the blocks before it (globally unique), and
   written;
4. objects crossing the face to the previous block are merged: in the ``O`` rows below the face both blocks
   segmented the same voxels (the previous block as its context, this block as its core); an object ``a`` of the
   previous block and ``b`` of this one are the same object when ``b`` holds more than half of ``a``'s voxels
   there and ``a`` more than half of ``b``'s (a mutual majority, so one object is never merged with two that
   stay apart). Merges are kept in a union-find over the ids.

A second pass reads the ids back block by block and replaces each by its union-find representative, numbered
``1..n`` in order of first appearance (as :func:`~unet3d_lightning.instances.watershed_instances` numbers them
consecutively). Memory: one extended block's watershed (``WATERSHED_BYTES_PER_VOXEL`` per voxel) and maps
(``4 * C`` bytes per voxel), plus the ``O``-row context labels kept for the merge — bounded by the limit, not by the
volume. The result equals the whole-volume watershed away from block faces; near them seeds and basins may differ
slightly (the context is finite), and a min_size merge sees only the block. Nothing here schedules work: blocks
run one after another in this process (an ordinary loop; each block's watershed is the costly step, and scikit-image
runs it single-threaded).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .instances import WATERSHED_BYTES_PER_VOXEL, WatershedOptions

__all__ = ["blockwise_plan", "blockwise_instances", "fits_whole"]


def fits_whole(shape: tuple[int, ...], channels: int, options: WatershedOptions) -> bool:
    """Whether the whole-volume watershed of a ``(D, H, W)`` volume with ``channels`` maps fits the limit."""
    voxels = math.prod(int(s) for s in shape)
    return voxels * (WATERSHED_BYTES_PER_VOXEL + 4 * channels) <= options.memory_limit_gb * 1024**3


def overlap_rows(options: WatershedOptions, offsets: Any = None) -> int:
    """Context rows on each side of a block: enough for the seed smoothing (4 sigma), two seed spacings, and the
    affinity offsets along z; at least 8."""
    longest = max((abs(int(o[0])) for o in offsets), default=0) if offsets else 0
    return int(max(8, 2 * int(options.min_distance), math.ceil(4 * float(options.seed_sigma)), 2 * longest))


def blockwise_plan(
    shape: tuple[int, ...], channels: int, options: WatershedOptions, chunk_depth: int = 16, offsets: Any = None,
) -> tuple[int, int] | None:
    """``(core rows B, context rows O)`` of the largest blocks whose watershed fits ``memory_limit_gb``, or None
    when not even a block of one chunk row fits (its rows are too wide for the limit)."""
    d, h, w = (int(s) for s in shape)
    overlap = overlap_rows(options, offsets)
    per_row = h * w * (WATERSHED_BYTES_PER_VOXEL + 4 * channels)
    # The merge keeps the previous block's context labels too (8 bytes per voxel, O rows).
    budget = options.memory_limit_gb * 1024**3 - overlap * h * w * 8
    rows = int(budget // per_row) - 2 * overlap
    core = (rows // chunk_depth) * chunk_depth
    if core < chunk_depth:
        return None
    return min(core, max(chunk_depth, -(-d // chunk_depth) * chunk_depth)), overlap


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        root = a
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(a, a) != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _mutual_majority(previous: np.ndarray, current: np.ndarray) -> list[tuple[int, int]]:
    """Pairs ``(a, b)`` of ids (both > 0) where ``b`` holds more than half of ``a``'s voxels of these rows and
    ``a`` more than half of ``b``'s."""
    both = (previous > 0) & (current > 0)
    if not both.any():
        return []
    a_ids, a_sizes = np.unique(previous[previous > 0], return_counts=True)
    b_ids, b_sizes = np.unique(current[current > 0], return_counts=True)
    pairs, counts = np.unique(np.stack([previous[both], current[both]]).astype(np.int64), axis=1,
                              return_counts=True)
    size_a = a_sizes[np.searchsorted(a_ids, pairs[0])]
    size_b = b_sizes[np.searchsorted(b_ids, pairs[1])]
    keep = (2 * counts > size_a) & (2 * counts > size_b)
    return list(zip(pairs[0][keep].tolist(), pairs[1][keep].tolist()))


def blockwise_instances(
    read_maps: Callable[[int, int], np.ndarray], shape: tuple[int, ...], spec: dict[str, Any],
    options: WatershedOptions, write: Callable[[int, int, np.ndarray], None],
    read_back: Callable[[int, int], np.ndarray], plan: tuple[int, int],
) -> int:
    """Instances of a ``(D, H, W)`` volume, block by block (see the module notes); returns the number of objects.

    Args:
        read_maps: ``read_maps(z0, z1)`` -> float32 maps ``(C, z1 - z0, H, W)`` (probabilities) of rows
            ``[z0, z1)``.
        shape: ``(D, H, W)``.
        spec: the model's target spec (``boundaries`` or ``affinities``).
        options: the watershed settings.
        write: ``write(z0, z1, ids)`` stores ids of rows ``[z0, z1)`` (called in z order, twice per block: the
            block ids, then the final ids).
        read_back: ``read_back(z0, z1)`` -> the ids ``write`` stored there.
        plan: ``(B, O)`` from :func:`blockwise_plan`.
    """
    from .instances import boundary_evidence, watershed_instances

    depth = int(shape[0])
    core, overlap = plan
    merges = _UnionFind()
    shift = 0
    previous_context: np.ndarray | None = None  # ids of the previous block in rows [c0, c0 + O) of this one
    for c0 in range(0, depth, core):
        c1 = min(depth, c0 + core)
        e0, e1 = max(0, c0 - overlap), min(depth, c1 + overlap)
        maps = read_maps(e0, e1)
        boundary, foreground = boundary_evidence(maps, spec, options.threshold)
        del maps
        labels = watershed_instances(boundary, foreground, options)
        del boundary, foreground
        count = int(labels.max()) if labels.size else 0
        ids = np.where(labels > 0, labels + shift, 0).astype(np.uint64)
        del labels
        kept = ids[c0 - e0 : c1 - e0]
        if previous_context is not None:
            rows = min(previous_context.shape[0], kept.shape[0])
            for a, b in _mutual_majority(previous_context[:rows], kept[:rows]):
                merges.union(a, b)
        previous_context = ids[c1 - e0 :].copy() if c1 < depth else None
        write(c0, c1, kept)
        del ids, kept
        shift += count
    # Representatives, numbered 1..n in order of first appearance in z.
    final = np.zeros(shift + 1, np.uint64)
    number = 0
    for c0 in range(0, depth, core):
        c1 = min(depth, c0 + core)
        ids = np.asarray(read_back(c0, c1)).astype(np.uint64)
        present = np.unique(ids[ids > 0])
        for i in present.tolist():
            root = merges.find(i)
            if final[root] == 0:
                number += 1
                final[root] = number
            final[i] = final[root]
        write(c0, c1, final[ids])
    return number
