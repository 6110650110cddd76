"""Streaming stitching of overlapping patch predictions into a volume larger than memory.

A volume of shape ``(D, H, W)`` is predicted patch by patch on a regular grid: along each axis the patch starts are
``0, s, 2s, ...`` with the last start snapped to ``size - patch``, and the grid is the product of the three start
lists. Overlapping predictions are blended into one output volume. This module does the blending in pure torch on the
device that holds the predictions (CUDA when they are there), in float32, and hands back finished z-slabs as soon as
they are final, so that the caller can write them (to HDF5, say) and forget them.

Streaming argument
------------------
The patches arrive in z-major order: every patch with z-start ``z_k`` before any patch with a larger z-start. Let
``lo(z)`` be the first output row that a patch starting at ``z`` writes (``z`` itself, or ``z + halo`` when the halo
is cropped, see below). ``lo`` increases with ``z``, so once the first patch with z-start ``z_{k+1}`` arrives, no
later patch can write a row below ``lo(z_{k+1})``: rows ``[lo(z_k), lo(z_{k+1}))`` are final. They are normalised,
returned, and their buffer rows are reused. The only rows alive at any time are those of the current z-start,
``[lo(z_k), hi(z_k))``, at most ``patch_z`` rows, so the accumulation buffer holds
``patch_z x (C + 1) x H_pad x W_pad`` float32 values whatever ``D`` is: memory is independent of the volume's depth.

Blending
--------
Each voxel ``v`` of the output is a weighted mean of the predictions ``p_i(v)`` of the patches ``i`` that keep it
(after halo cropping)::

    out(v) = sum_i w_i(v) * p_i(v) / sum_i w_i(v)

* ``blend="average"`` — ``w_i = 1``: ``out = sum_i p_i / count``, the plain mean over covering patches, as in the
  original pytorch-3dunet.
* ``blend="gaussian"`` — ``w_i = g`` translated to patch ``i``, with ``g`` the importance map of
  :func:`gaussian_importance_map`: a separable Gaussian centred on the patch, ``sigma = patch / 8`` per axis,
  normalised to a maximum of 1, as in nnU-Net (Isensee et al. 2021) and MONAI's ``sliding_window_inference``. It
  down-weights patch borders, where the network sees the least context.

Halo
----
``halo`` voxels are discarded from each *interior* face of every patch (where a neighbouring patch exists): border
voxels are predicted with the least context and are the least reliable. Faces lying on the padded volume boundary (start
``0`` for the low face, stop equal to the padded size for the high face) keep their voxels, since no other patch
covers them. Along each axis the kept intervals must still cover the whole padded axis, which on a regular grid means
``stride <= patch - 2 * halo``; this is checked when the stitcher is built.

Padding and cropping
--------------------
A volume smaller than the patch along an axis is predicted by the caller on a padded input (the grid then has a
single start, 0, along that axis, and the padded size is the patch size). The stitcher accumulates over the padded
extent (``padded_shape``, the per-axis maximum of the grid's stops) and crops every returned slab to the real
``volume_shape``: rows at or beyond ``D`` are never returned, and y/x are cropped to ``H`` and ``W``. How the input
was padded (zeros, reflection) is the caller's choice and does not matter here.

Distributed prediction (DDP)
----------------------------
Each rank receives a share of the patches (Lightning's predict sampler hands rank ``r`` the items ``r, r + W, ...``)
and runs its own :class:`StreamingStitcher` on the *same* grid. Before each finished band is normalised, the stitcher
calls ``reduce`` on one float32 tensor holding that band's weighted sums and weight sums (layout in
:class:`StreamingStitcher`); ``reduce`` must return the tensor summed over ranks (``all_reduce(SUM)``). The bands,
hence the number, order, z-ranges and shapes of the ``reduce`` calls, depend only on the grid, the halo and the
volume shape — never on which patches the rank received — so the collectives line up on every rank, including a rank
that received no patch at all (it reduces zeros). The division happens after the reduction, so the result is the
exact single-process result up to float32 summation order.

Rank-owned rows
---------------
With ``rows=(a, b)`` the stitcher produces only output rows ``[a, b)`` and expects only the patches whose kept z-range
(after halo cropping) meets them: the z-starts ``z_j0 .. z_j1``, ``j0`` the first whose kept range ends after ``a``,
``j1`` the last whose kept range starts before ``b``. A row ``r`` in ``[a, b)`` receives contributions only from
patches whose kept range holds ``r``, all among those z-starts, so its value is the single-process value; rows of
the first band below ``a`` (incomplete: their earlier patches are elsewhere) are never returned. This is how each DDP
rank stitches the contiguous rows it owns (:mod:`~unet3d_lightning.prediction.distributed`) with no communication.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["BLEND_MODES", "Slab", "StreamingStitcher", "gaussian_importance_map"]

Slab = tuple[int, int, Tensor]
"""``(z_start, z_stop, tensor)``: output rows ``[z_start, z_stop)`` of the real volume, the tensor of shape
``(C, z_stop - z_start, H, W)``, float32, on the accumulation device."""

BLEND_MODES = ("average", "gaussian")

_AXES = ("z", "y", "x")


@functools.lru_cache(maxsize=64)
def _cached_gaussian(patch_shape: tuple[int, ...], sigma_scale: float, device: torch.device) -> Tensor:
    # Computed in float64 so that the normalisation to max 1 is exact before the cast to float32.
    importance = torch.ones((), dtype=torch.float64)
    for size in patch_shape:
        offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        sigma = sigma_scale * size
        profile = torch.exp(-0.5 * (offsets / sigma) ** 2)
        importance = importance.unsqueeze(-1) * profile
    importance = (importance / importance.max()).to(torch.float32)
    # A narrow Gaussian underflows to 0 in the patch corners; a zero weight there would make voxels covered only by
    # such corners 0/0. Clamping to the smallest positive value keeps every weight > 0 without changing the rest.
    smallest_positive = importance[importance > 0].min()
    return importance.clamp_min(smallest_positive).to(device)


def gaussian_importance_map(
    patch_shape: Sequence[int], sigma_scale: float = 1 / 8, device: torch.device | str | None = None
) -> Tensor:
    """Gaussian importance map used by ``blend="gaussian"``.

    ``g(i) = prod_a exp(-(i_a - c_a)^2 / (2 sigma_a^2)) / max(...)`` with ``c_a = (patch_a - 1) / 2`` the patch centre
    (so the map is symmetric under flips) and ``sigma_a = sigma_scale * patch_a`` (nnU-Net, Isensee et al. 2021;
    MONAI ``compute_importance_map``). The map is normalised to a maximum of 1 and clamped below to its smallest
    positive value, so every voxel has weight > 0.

    Args:
        patch_shape: the patch shape, one positive int per axis (usually ``(pz, py, px)``).
        sigma_scale: ``sigma`` as a fraction of the patch size along each axis. Default ``1/8``.
        device: where the map lives. Default ``None``: the CPU.

    Returns:
        A float32 tensor of shape ``patch_shape``. It is computed once per ``(patch_shape, sigma_scale, device)`` and
        shared between callers: do not modify it in place.
    """
    shape = tuple(int(size) for size in patch_shape)
    if not shape or any(size < 1 for size in shape):
        raise ValueError(f"patch_shape must be a non-empty sequence of positive ints, got {tuple(patch_shape)!r}.")
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale!r}.")
    return _cached_gaussian(shape, float(sigma_scale), torch.device(device if device is not None else "cpu"))


class StreamingStitcher:
    """Blend a z-major stream of overlapping patch predictions into finished, normalised z-slabs.

    Args:
        volume_shape: ``(D, H, W)``, the real volume; returned slabs are cropped to it.
        grid: the patch locations, ``(slice_z, slice_y, slice_x)`` in *padded* coordinates, the product of per-axis
            start lists (z-major). All patches must have the same shape, and along each axis the first start must be
            0. The per-axis starts and ``padded_shape`` are derived from it.
        channels: ``C``, the number of prediction channels.
        blend: ``"average"`` (default; every covering patch weighs 1, as in pytorch-3dunet) or ``"gaussian"``
            (weights from :func:`gaussian_importance_map`, ``sigma = patch / 8`` per axis, as in nnU-Net and MONAI).
        halo: voxels discarded at each interior patch face, one int for all axes or one per axis ``(z, y, x)``.
            Default 0. Must satisfy ``0 <= halo < patch / 2`` and keep the grid covering: ``stride <= patch -
            2 * halo`` along each axis.
        device: where the accumulation buffers live. Default ``None``: the device of the first prediction added
            (predictions on another device are moved there). Pass it explicitly under DDP, since a rank may receive
            no prediction at all.
        reduce: default ``None``. When given, called once per finished band, before normalisation, with one
            contiguous float32 tensor of shape ``(dz, C + 1, H_pad, W_pad)``: ``[:, :C]`` the weighted sums
            ``sum_i w_i p_i`` and ``[:, C]`` the weight sums ``sum_i w_i`` of output rows ``[z_start, z_start +
            dz)``. It must return a tensor of the same shape holding the sum over ranks (an in-place
            ``all_reduce`` that returns its argument is fine). The tensor is a view of the accumulation buffer.
        rows: default ``None`` (every row). ``(a, b)`` with ``0 <= a < b <= D``: return only output rows
            ``[a, b)`` and expect exactly the patches whose kept z-range meets them (see "Rank-owned rows" in the
            module notes; :meth:`needed_z_starts` lists their z-starts); :meth:`finish` raises if one is missing.
            Excludes ``reduce``.

    DDP contract:
        The sequence of ``reduce`` calls (how many, which z-ranges, which shapes, in which order) depends only on
        ``grid``, ``halo`` and ``volume_shape``: one call per band ``[lo(z_k), lo(z_{k+1}))`` (``lo(z_k)`` the first
        row kept from patches starting at ``z_k``, the last band ending at ``padded_shape[0]``) cropped to ``D``,
        bands lying wholly at or beyond ``D`` being skipped. A rank that received no patch of some z-start, or none
        at all, still makes every call, with zeros, when a later patch arrives or in :meth:`finish`. Every rank must
        therefore call :meth:`finish`. Without ``reduce`` the stitcher expects every patch of the grid and
        :meth:`finish` raises if some are missing.

    The stitcher checks that each start belongs to the grid, that no patch is added twice, and that z-starts never
    decrease (patches out of z-major order would land in rows already returned); violations raise before any state
    changes.

    Example::

        stitcher = StreamingStitcher((D, H, W), grid, channels=2, blend="gaussian", halo=4)
        for patches, starts in loader:                    # starts: (N, 3) int tensor, z-major order
            with torch.autocast("cuda", dtype=torch.bfloat16):
                predictions = model(patches.cuda())       # (N, 2, pz, py, px)
            for z_start, z_stop, slab in stitcher.add(predictions, starts):
                out[:, z_start:z_stop] = slab.cpu().numpy()
        for z_start, z_stop, slab in stitcher.finish():
            out[:, z_start:z_stop] = slab.cpu().numpy()
    """

    def __init__(
        self,
        volume_shape: Sequence[int],
        grid: Sequence[tuple[slice, slice, slice]],
        channels: int,
        *,
        blend: str = "average",
        halo: int | Sequence[int] = 0,
        device: torch.device | str | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        rows: tuple[int, int] | None = None,
    ) -> None:
        self.volume_shape = _positive_triple(volume_shape, "volume_shape")
        if int(channels) != channels or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}.")
        self.channels = int(channels)
        if blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}.")
        self.blend = blend
        self.reduce = reduce
        self.device = torch.device(device) if device is not None else None

        locations = [_start_stop(location) for location in grid]
        if not locations:
            raise ValueError("grid is empty; it must hold at least one patch location.")
        patch_shape = tuple(stop - start for start, stop in locations[0])
        for location in locations:
            shape = tuple(stop - start for start, stop in location)
            if shape != patch_shape:
                raise ValueError(
                    f"All patches of the grid must have the same shape; found {shape} at "
                    f"{tuple(start for start, _ in location)} and {patch_shape} at the first location."
                )
        self.patch_shape: tuple[int, int, int] = patch_shape  # type: ignore[assignment]
        self.padded_shape: tuple[int, int, int] = tuple(  # type: ignore[assignment]
            max(location[axis][1] for location in locations) for axis in range(3)
        )
        for axis in range(3):
            if self.padded_shape[axis] < self.volume_shape[axis]:
                raise ValueError(
                    f"The grid stops at {self.padded_shape[axis]} along axis {_AXES[axis]} but the volume is "
                    f"{self.volume_shape[axis]} long there; the grid must cover the whole (padded) volume."
                )

        starts = [sorted({location[axis][0] for location in locations}) for axis in range(3)]
        start_triples = {tuple(start for start, _ in location) for location in locations}
        if len(start_triples) != len(locations):
            raise ValueError("The grid holds the same patch location more than once.")
        if len(locations) != len(starts[0]) * len(starts[1]) * len(starts[2]):
            raise ValueError(
                f"The grid must be the product of per-axis start lists; it has {len(locations)} patches but "
                f"{len(starts[0])} x {len(starts[1])} x {len(starts[2])} distinct starts along z, y, x."
            )
        self.grid_size = len(locations)

        halos = (halo,) * 3 if isinstance(halo, int) else tuple(halo)
        if len(halos) != 3 or any(int(h) != h for h in halos):
            raise ValueError(f"halo must be an int or three ints (z, y, x), got {halo!r}.")
        self.halo: tuple[int, int, int] = tuple(int(h) for h in halos)  # type: ignore[assignment]
        for axis in range(3):
            h, p = self.halo[axis], self.patch_shape[axis]
            if h < 0 or 2 * h >= p:
                raise ValueError(
                    f"halo {h} along axis {_AXES[axis]} must satisfy 0 <= halo < patch / 2 for patch {p}."
                )

        # Per axis: start -> (first kept padded index, end of kept range, same two in patch-local coordinates).
        self._crops: list[dict[int, tuple[int, int, int, int]]] = []
        for axis in range(3):
            table = {}
            for start in starts[axis]:
                lo, hi = self._kept(axis, start)
                table[start] = (lo, hi, lo - start, hi - start)
            _check_coverage(axis, starts[axis], table, self.patch_shape[axis], self.halo[axis],
                            self.padded_shape[axis])
            self._crops.append(table)

        z_starts = starts[0]
        self._z_index = {start: k for k, start in enumerate(z_starts)}
        # Band k is [bounds[k], bounds[k + 1]): it becomes final when the first patch of z-start k + 1 arrives.
        self._bounds = [self._crops[0][start][0] for start in z_starts] + [self.padded_shape[0]]
        # Rows alive while z-start k is current: [lo(z_k), hi(z_k)); the buffer is as deep as the deepest of these.
        self._depth = max(hi - lo for lo, hi, _, _ in self._crops[0].values())

        # Rows returned, and the z-start indices whose patches are expected (all of them without `rows`).
        self._first, self._last = 0, len(z_starts) - 1
        self._rows = (0, self.volume_shape[0])
        if rows is not None:
            a, b = (int(r) for r in rows)
            if not 0 <= a < b <= self.volume_shape[0]:
                raise ValueError(f"rows {tuple(rows)} must satisfy 0 <= start < stop <= D = {self.volume_shape[0]}.")
            if reduce is not None:
                raise ValueError("rows and reduce exclude each other: a rank owning rows needs no reduction.")
            kept = [self._crops[0][start][:2] for start in z_starts]
            self._first = next(k for k, (_, hi) in enumerate(kept) if hi > a)
            self._last = max(k for k, (lo, _) in enumerate(kept) if lo < b)
            self._rows = (a, b)
        self._expected = (self._last - self._first + 1) * (self.grid_size // len(z_starts))

        self._band = self._first  # index of the current z-start; buffer row 0 is padded row self._bounds[self._band]
        self._buffer: Tensor | None = None
        self._filled = 0  # buffer rows [0, _filled) may hold non-zero values; rows beyond are zero
        self._staging: Tensor | None = None
        self._weight: Tensor | None = None
        self._seen_in_band: set[tuple[int, int]] = set()
        self._count = 0
        self._max_band_depth = 0
        self._finished = False

    def needed_z_starts(self) -> list[int]:
        """The z-starts (padded coordinates) whose patches this stitcher takes: all of them, or with ``rows`` those
        whose kept z-range meets the rows."""
        starts = sorted(self._z_index)
        return starts[self._first : self._last + 1]

    @property
    def max_band_depth(self) -> int:
        """The largest z-depth (rows) of accumulation buffer this stitcher has held; at most ``patch_z``."""
        return self._max_band_depth

    @torch.no_grad()
    def add(self, predictions: Tensor, starts: Tensor | Sequence[Sequence[int]]) -> list[Slab]:
        """Accumulate a batch of patch predictions and return the slabs that became final.

        Args:
            predictions: ``(N, C, pz, py, px)``, any floating dtype (bf16 from autocast is cast to float32 before
                accumulation).
            starts: ``(N, 3)`` integer patch starts ``(z, y, x)`` in padded coordinates, each a start of the grid,
                in z-major order across and within calls. A CPU tensor or a list avoids a device-to-host copy.

        Returns:
            The slabs finished by this call (possibly none), in increasing z, cropped to the real volume.
        """
        if self._finished:
            raise RuntimeError("add() was called after finish(); build a new StreamingStitcher for another volume.")
        locations = self._validate(predictions, starts)
        if not locations:
            return []
        if self.device is None:
            self.device = predictions.device
        self._allocate()
        staging = self._stage(predictions)
        assert self._buffer is not None
        slabs: list[Slab] = []
        crop_z, crop_y, crop_x = self._crops
        for n, (band, z, y, x) in enumerate(locations):
            if band > self._band:
                slabs.extend(self._advance(band))
            z_lo, z_hi, pz_lo, pz_hi = crop_z[z]
            y_lo, y_hi, py_lo, py_hi = crop_y[y]
            x_lo, x_hi, px_lo, px_hi = crop_x[x]
            row_lo = z_lo - self._bounds[self._band]
            row_hi = z_hi - self._bounds[self._band]
            # staging[n] is (C + 1, pz, py, px); the buffer is z-first, (rows, C + 1, H_pad, W_pad).
            self._buffer[row_lo:row_hi, :, y_lo:y_hi, x_lo:x_hi].add_(
                staging[n, :, pz_lo:pz_hi, py_lo:py_hi, px_lo:px_hi].transpose(0, 1)
            )
            self._filled = max(self._filled, row_hi)
            self._seen_in_band.add((y, x))
            self._count += 1
        return slabs

    @torch.no_grad()
    def finish(self) -> list[Slab]:
        """Flush every remaining band and return its slabs; afterwards :meth:`add` raises.

        Every rank must call it under DDP: it makes the ``reduce`` calls of bands this rank never reached.
        """
        if self._finished:
            raise RuntimeError("finish() was already called on this StreamingStitcher.")
        if self.reduce is None and self._count != self._expected:
            raise RuntimeError(
                f"Only {self._count} of the grid's {self._expected} patches were added; without `reduce` every patch "
                "must be added before finish()."
            )
        if self.device is None:
            self.device = torch.device("cpu")
        self._allocate()
        last = self._last
        slabs = self._advance(last)
        slabs.extend(self._flush(last))
        self._finished = True
        self._buffer = None
        self._staging = None
        return slabs

    def _kept(self, axis: int, start: int) -> tuple[int, int]:
        stop = start + self.patch_shape[axis]
        h = self.halo[axis]
        lo = start if start == 0 else start + h
        hi = stop if stop == self.padded_shape[axis] else stop - h
        return lo, hi

    def _validate(self, predictions: Tensor, starts: Tensor | Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
        expected = (self.channels, *self.patch_shape)
        if not isinstance(predictions, Tensor) or predictions.dim() != 5 or tuple(predictions.shape[1:]) != expected:
            shape = tuple(predictions.shape) if isinstance(predictions, Tensor) else type(predictions).__name__
            raise ValueError(f"predictions must have shape (N, {', '.join(map(str, expected))}), got {shape}.")
        if not predictions.is_floating_point():
            raise TypeError(f"predictions must be a floating-point tensor, got {predictions.dtype}.")
        if isinstance(starts, Tensor):
            if starts.is_floating_point() or starts.dim() != 2 or starts.shape[1] != 3:
                raise ValueError(f"starts must be an integer tensor of shape (N, 3), got {starts.dtype} "
                                 f"{tuple(starts.shape)}.")
            rows = starts.tolist()  # the one host copy per batch; free when starts is on the CPU
        else:
            rows = [[int(v) for v in row] for row in starts]
        if len(rows) != predictions.shape[0] or any(len(row) != 3 for row in rows):
            raise ValueError(
                f"starts must hold one (z, y, x) triple per prediction: {predictions.shape[0]} predictions, "
                f"{len(rows)} starts."
            )
        # Checked before any accumulation so that a rejected batch leaves the stitcher unchanged.
        locations = []
        band, seen = self._band, set(self._seen_in_band)
        for z, y, x in rows:
            index = self._z_index.get(z)
            if index is None or y not in self._crops[1] or x not in self._crops[2]:
                raise ValueError(f"Patch start {(z, y, x)} is not a start of the grid.")
            if not self._first <= index <= self._last:
                raise ValueError(
                    f"Patch start {(z, y, x)} does not touch the rows {self._rows} this stitcher returns."
                )
            if index < band:
                raise RuntimeError(
                    f"Patch start {(z, y, x)} arrived after patches with a larger z-start; patches must come in "
                    "z-major order (all patches of a z-start before any with a larger one)."
                )
            if index > band:
                band, seen = index, set()
            if (y, x) in seen:
                raise RuntimeError(f"Patch start {(z, y, x)} was added twice; each grid patch must be added once.")
            seen.add((y, x))
            locations.append((index, z, y, x))
        return locations

    def _allocate(self) -> None:
        if self._buffer is None:
            _, h_pad, w_pad = self.padded_shape
            self._buffer = torch.zeros(
                (self._depth, self.channels + 1, h_pad, w_pad), dtype=torch.float32, device=self.device
            )
            self._max_band_depth = max(self._max_band_depth, self._depth)

    def _stage(self, predictions: Tensor) -> Tensor:
        """Return ``(N, C + 1, pz, py, px)`` float32: ``w * p`` in channels ``[:C]`` and ``w`` in channel ``C``.

        One add per patch then updates sums and weights together. The buffer is reused across batches and its weight
        channel, constant, is written only when the buffer is (re)allocated.
        """
        n = predictions.shape[0]
        if self._staging is None or self._staging.shape[0] < n:
            self._staging = torch.empty(
                (n, self.channels + 1, *self.patch_shape), dtype=torch.float32, device=self.device
            )
            if self.blend == "gaussian":
                self._weight = gaussian_importance_map(self.patch_shape, device=self.device)
                self._staging[:, self.channels].copy_(self._weight)
            else:
                self._staging[:, self.channels].fill_(1.0)
        staging = self._staging[:n]
        predictions = predictions.to(self.device)
        if self.blend == "gaussian":
            torch.mul(predictions, self._weight, out=staging[:, : self.channels])
        else:
            staging[:, : self.channels].copy_(predictions)
        return staging

    def _advance(self, band: int) -> list[Slab]:
        """Finish bands ``self._band .. band - 1`` one at a time (a rank may skip z-starts, it still reduces each)."""
        slabs: list[Slab] = []
        while self._band < band:
            slabs.extend(self._flush(self._band))
            self._shift(self._bounds[self._band + 1] - self._bounds[self._band])
            self._band += 1
            self._seen_in_band = set()
        return slabs

    def _flush(self, band: int) -> list[Slab]:
        assert self._buffer is not None
        origin = self._bounds[band]  # padded row of buffer row 0
        z_start = max(origin, self._rows[0])
        z_stop = min(self._bounds[band + 1], self.volume_shape[0], self._rows[1])
        if z_stop <= z_start:
            return []
        totals = self._buffer[z_start - origin : z_stop - origin]
        if self.reduce is not None:
            # An in-place all_reduce writes the other ranks' sums into rows this rank may never have touched; they
            # must be zeroed by the shift like any other used row.
            self._filled = max(self._filled, z_stop - z_start)
            reduced = self.reduce(totals)
            if not isinstance(reduced, Tensor) or reduced.shape != totals.shape:
                raise RuntimeError(
                    f"reduce must return a tensor of the shape it was given, {tuple(totals.shape)}; got "
                    f"{tuple(reduced.shape) if isinstance(reduced, Tensor) else type(reduced).__name__}."
                )
            totals = reduced.to(device=self.device, dtype=torch.float32)
        _, height, width = self.volume_shape
        c = self.channels
        slab = torch.empty((c, z_stop - z_start, height, width), dtype=torch.float32, device=self.device)
        torch.div(
            totals[:, :c, :height, :width].transpose(0, 1),
            totals[:, c:, :height, :width].transpose(0, 1),
            out=slab,
        )
        return [(z_start, z_stop, slab)]

    def _shift(self, rows: int) -> None:
        """Drop the first ``rows`` buffer rows, move the rest to the front and zero the freed tail."""
        assert self._buffer is not None
        keep = self._filled - rows
        if keep > 0:
            # copy_ rejects partially overlapping source and destination; chunks of `rows` rows never overlap.
            for lo in range(0, keep, rows):
                hi = min(lo + rows, keep)
                self._buffer[lo:hi].copy_(self._buffer[lo + rows : hi + rows])
            self._buffer[keep : self._filled].zero_()
        else:
            self._buffer[: self._filled].zero_()
        self._filled = max(keep, 0)


def _positive_triple(values: Sequence[int], name: str) -> tuple[int, int, int]:
    triple = tuple(values)
    if len(triple) != 3 or any(int(v) != v or v < 1 for v in triple):
        raise ValueError(f"{name} must be three positive ints (D, H, W), got {triple!r}.")
    return tuple(int(v) for v in triple)  # type: ignore[return-value]


def _start_stop(location: Sequence[slice]) -> tuple[tuple[int, int], ...]:
    if len(location) != 3 or not all(isinstance(s, slice) for s in location):
        raise ValueError(f"Each grid location must be three slices (z, y, x), got {location!r}.")
    pairs = []
    for s in location:
        if s.start is None or s.stop is None or s.step not in (None, 1) or not 0 <= s.start < s.stop:
            raise ValueError(f"Grid slices need explicit 0 <= start < stop and step 1, got {s!r}.")
        pairs.append((int(s.start), int(s.stop)))
    return tuple(pairs)


def _check_coverage(axis: int, starts: list[int], table: dict, patch: int, halo: int, padded: int) -> None:
    name = _AXES[axis]
    if starts[0] != 0:
        raise ValueError(
            f"The first patch along axis {name} starts at {starts[0]}; it must start at 0 so that the grid covers "
            "the volume."
        )
    covered = 0
    previous = starts[0]
    for start in starts:
        lo, hi = table[start][0], table[start][1]
        if lo > covered:
            raise ValueError(
                f"Along axis {name}, patch {patch} with stride {start - previous} and halo {halo} leaves voxels "
                f"[{covered}, {lo}) uncovered after halo cropping; need stride <= patch - 2*halo."
            )
        covered, previous = max(covered, hi), start
    assert covered == padded
