"""Prediction at the model's voxel size (``--prediction.rescale true``): the input resampled to the model's grid
region by region, the output resampled back to the input's grid slab by slab. Pure numpy/torch, no files.

Both directions are linear interpolation with the ``align_corners=False`` convention of
``torch.nn.functional.interpolate(..., size=out, mode="trilinear")`` (and of scikit-image's and SciPy's zoom with
``grid_mode=True``): voxel ``d`` of a grid of ``n_out`` voxels over an axis of ``n_in`` voxels samples the input at

    ``s(d) = max(0, (d + 1/2) · n_in / n_out − 1/2)``,

voxel *centres* aligned, the outer faces of the two grids coinciding; the value is
``(1 − w) · x[i0] + w · x[i1]`` with ``i0 = floor(s)``, ``i1 = min(i0 + 1, n_in − 1)``, ``w = s − i0`` (beyond the
last centre the edge value repeats). It is separable, so it is applied axis by axis; a region of the output needs only
the input rows ``i0 .. i1`` of its first and last voxel, so reads stay patch-sized and the back-resampling holds only
one stitched slab and a row: memory stays flat in depth.

The model's grid has ``round(n · size_in / size_model)`` voxels along an axis of ``n`` voxels (at least 1). Raw
regions are normalised (with the volume's own statistics) before they are interpolated. Class ids and instances are
not interpolated: they are derived on the input's grid from the back-resampled probabilities, so they agree with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .io.spacing import VoxelSize, scale_factors

Shape3 = tuple[int, int, int]


def model_grid_shape(shape: Sequence[int], size: VoxelSize, model: VoxelSize) -> Shape3:
    """The ``(z, y, x)`` shape of a volume of ``shape`` voxels of ``size`` on a grid of voxels of ``model``."""
    return tuple(max(1, int(round(n * f))) for n, f in zip(shape, scale_factors(size, model)))  # type: ignore[return-value]


def linear_weights(n_in: int, n_out: int, start: int = 0, stop: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i0, i1, w)`` of output voxels ``start .. stop - 1`` of ``n_out`` sampling ``n_in`` (see the module)."""
    d = np.arange(start, n_out if stop is None else stop, dtype=np.float64)
    s = np.maximum((d + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(s).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (s - i0).astype(np.float32)


def interpolate_axis(array: np.ndarray, axis: int, i0: np.ndarray, i1: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``(1 − w) · array[i0] + w · array[i1]`` along ``axis`` (float32)."""
    shape = [1] * array.ndim
    shape[axis] = -1
    weight = w.reshape(shape)
    low = np.take(array, i0, axis=axis).astype(np.float32, copy=False)
    high = np.take(array, i1, axis=axis).astype(np.float32, copy=False)
    return low * (1 - weight) + high * weight


@dataclass(frozen=True)
class Resampling:
    """How one prediction volume maps to the model's grid.

    Args:
        source_shape: the volume's ``(z, y, x)``.
        shape: its shape on the model's grid (:func:`model_grid_shape`).
        source_size: the volume's voxel size.
        model_size: the model's voxel size.
    """

    source_shape: Shape3
    shape: Shape3
    source_size: VoxelSize
    model_size: VoxelSize

    def source_window(self, region: Sequence[slice]) -> tuple[tuple[slice, ...], list[tuple[np.ndarray, ...]]]:
        """The input rows a region of the model's grid needs, and per axis the ``(i0, i1, w)`` relative to them."""
        slices, local = [], []
        for s, n_in, n_out in zip(region, self.source_shape, self.shape):
            i0, i1, w = linear_weights(n_in, n_out, s.start, s.stop)
            lo, hi = int(i0.min()), int(i1.max()) + 1
            slices.append(slice(lo, hi))
            local.append((i0 - lo, i1 - lo, w))
        return tuple(slices), local

    @staticmethod
    def interpolate(array: np.ndarray, local: list[tuple[np.ndarray, ...]]) -> np.ndarray:
        """A ``(C, z, y, x)`` input window to the region of the model's grid (:meth:`source_window`)."""
        for axis, (i0, i1, w) in enumerate(local, start=1):
            array = interpolate_axis(array, axis, i0, i1, w)
        return np.ascontiguousarray(array, dtype=np.float32)


@dataclass
class BackResampler:
    """Takes the stitched ``(C, rows, H', W')`` slabs of the model's grid in z order and returns the rows of the
    input's grid that they complete, as ``(z0, z1, tensor)`` like the stitcher's slabs (CPU float32).

    Holds the slab rows that later input rows still need (at most one slab and a row).
    """

    resampling: Resampling
    _buffer: np.ndarray | None = field(default=None, repr=False)
    _start: int = 0  # first model-grid row in the buffer
    _next: int = 0  # first input-grid row not returned yet

    def __post_init__(self) -> None:
        (dz, dy, dx), (tz, ty, tx) = self.resampling.source_shape, self.resampling.shape
        self._z = linear_weights(tz, dz)
        self._y = linear_weights(ty, dy)
        self._x = linear_weights(tx, dx)

    def push(self, slabs: Sequence[tuple[int, int, torch.Tensor]]) -> list[tuple[int, int, torch.Tensor]]:
        out = []
        for z0, z1, slab in slabs:
            rows = slab.detach().to("cpu", torch.float32).numpy()
            if self._buffer is None:
                self._buffer, self._start = rows, z0
            else:
                if z0 != self._start + self._buffer.shape[1]:
                    raise RuntimeError(f"slab rows {z0}-{z1} arrived out of order")
                self._buffer = np.concatenate([self._buffer, rows], axis=1)
            end = self._start + self._buffer.shape[1]
            i0, i1, w = self._z
            stop = self._next
            while stop < len(i1) and i1[stop] < end:
                stop += 1
            if stop > self._next:
                sel = slice(self._next, stop)
                values = interpolate_axis(self._buffer, 1, i0[sel] - self._start, i1[sel] - self._start, w[sel])
                values = interpolate_axis(values, 2, *self._y)
                values = interpolate_axis(values, 3, *self._x)
                out.append((self._next, stop, torch.from_numpy(np.ascontiguousarray(values))))
                self._next = stop
            if self._next < len(i0):  # drop the rows no later input row needs
                keep = int(i0[self._next]) - self._start
                if keep > 0:
                    self._buffer, self._start = self._buffer[:, keep:].copy(), self._start + keep
        return out


def plan_shape(plan: object) -> Shape3:
    """The shape of the grid a prediction plan's patches cover: the model's grid with rescaling, else the volume's."""
    resampling = getattr(plan, "resampling", None)
    return resampling.shape if resampling is not None else plan.volume.spatial_shape  # type: ignore[attr-defined]
