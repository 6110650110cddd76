"""The regular patch grid used by training, validation and prediction.

Rule
----
Along one axis of size ``size``, patches of length ``patch`` start at ``0, s, 2s, ...`` (``s`` the stride) for as
long as ``start + patch <= size``. If the last of these patches stops short of the end (``start + patch < size``),
one more start, ``size - patch``, is appended: the last patch is snapped to the end of the axis so that every voxel is
covered, and it overlaps its neighbour by more than the others do. The starts are strictly increasing, the first is
``0``, the last is ``size - patch``, and consecutive starts differ by exactly ``s`` except before the snapped one.
Requiring ``stride <= patch`` guarantees there is no gap between consecutive patches.

The 3D grid is the cartesian product of the per-axis start lists.

Order
-----
Patches are listed in z-major order: z-start slowest, then y, x-start fastest (like C-order indexing of the start
lists). The streaming stitcher relies on it: once the first patch of a new z-start arrives, no later patch can touch
the rows above it, so those output slabs are final and can be written and freed. Any other order would keep the whole
output volume alive.

Dimensions smaller than the patch
---------------------------------
:func:`patch_starts` and :func:`patch_grid` reject a volume smaller than the patch along any axis (there is no valid
start); training and validation surface this as an error naming the file and axis. Prediction instead pads such a
volume up to :func:`padded_shape` (the per-axis maximum of volume and patch size), predicts on the padded volume
(whose grid then has the single start ``0`` along that axis), and crops the prediction back to the volume's shape.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence

from ..errors import ConfigurationError

AXES = ("z", "y", "x")


def patch_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start offsets of the patches along one axis.

    Args:
        size: length of the volume along the axis.
        patch: length of a patch along the axis; at least 1 and at most ``size``.
        stride: step between consecutive starts; at least 1 and at most ``patch`` (a larger stride would leave
            voxels between patches uncovered).

    Returns:
        ``[0, stride, 2 * stride, ...]`` while ``start + patch <= size``, followed by ``size - patch`` when the last
        of those patches does not reach the end of the axis. Strictly increasing, no duplicates.

    Raises:
        ConfigurationError (a ``ValueError``): for ``patch < 1``, ``stride < 1``, ``stride > patch`` or
        ``size < patch``; the message names the values (callers add the axis and file).

    Example:
        ``patch_starts(10, 4, 3) == [0, 3, 6]``; ``patch_starts(10, 4, 4) == [0, 4, 6]``.
    """
    return _starts(size, patch, stride, "this axis")


def patch_grid(
    shape: Sequence[int], patch_shape: Sequence[int], stride_shape: Sequence[int]
) -> list[tuple[slice, slice, slice]]:
    """All patches of a ``(D, H, W)`` volume, as ``(z, y, x)`` slice triples in z-major order.

    Args:
        shape: spatial shape ``(D, H, W)`` of the volume.
        patch_shape: patch size ``(pz, py, px)``.
        stride_shape: stride ``(sz, sy, sx)`` between patch starts, each at most the patch size along its axis.

    Returns:
        The cartesian product of :func:`patch_starts` along z, y and x, z-start slowest and x-start fastest; each
        entry is ``(slice(z, z + pz), slice(y, y + py), slice(x, x + px))``.

    Raises:
        ConfigurationError (a ``ValueError``): when any argument does not have 3 entries, or when an axis fails the
        checks of :func:`patch_starts`; the message names the axis (``z``, ``y`` or ``x``).
    """
    shape = _three(shape, "shape")
    patch_shape = _three(patch_shape, "patch_shape")
    stride_shape = _three(stride_shape, "stride_shape")
    per_axis = [
        [slice(start, start + patch) for start in _starts(size, patch, stride, f"axis {name}")]
        for name, size, patch, stride in zip(AXES, shape, patch_shape, stride_shape)
    ]
    return list(itertools.product(*per_axis))  # product varies the last axis fastest: z-major


def padded_shape(shape: Sequence[int], patch_shape: Sequence[int]) -> tuple[int, int, int]:
    """Shape a volume must be padded to before prediction: per axis ``max(size, patch)``.

    Args:
        shape: spatial shape ``(D, H, W)`` of the volume.
        patch_shape: patch size ``(pz, py, px)``, each at least 1.

    Returns:
        ``(max(D, pz), max(H, py), max(W, px))``; equal to ``shape`` when the volume is at least one patch large
        along every axis.

    Raises:
        ConfigurationError (a ``ValueError``): when an argument does not have 3 entries, or a size or patch size
        is below 1.
    """
    shape = _three(shape, "shape")
    patch_shape = _three(patch_shape, "patch_shape")
    for name, size, patch in zip(AXES, shape, patch_shape):
        if size < 1:
            raise ConfigurationError(f"volume size {size} along axis {name} must be at least 1")
        if patch < 1:
            raise ConfigurationError(f"patch size {patch} along axis {name} must be at least 1")
    return tuple(max(size, patch) for size, patch in zip(shape, patch_shape))  # type: ignore[return-value]


def _starts(size: int, patch: int, stride: int, where: str) -> list[int]:
    size = _integer(size, "volume size", where)
    patch = _integer(patch, "patch size", where)
    stride = _integer(stride, "stride", where)
    if patch < 1:
        raise ConfigurationError(f"patch size {patch} along {where} must be at least 1")
    if stride < 1:
        raise ConfigurationError(f"stride {stride} along {where} must be at least 1")
    if stride > patch:
        raise ConfigurationError(
            f"stride {stride} > patch {patch} along {where} would leave voxels between patches uncovered; "
            f"use a stride of at most {patch}"
        )
    if size < patch:
        raise ConfigurationError(
            f"volume size {size} is smaller than the patch {patch} along {where}; "
            f"use a patch of at most {size} along it"
        )
    starts = list(range(0, size - patch + 1, stride))
    # range() always yields 0 here (size >= patch), so starts[-1] exists; snapping only when short of the end keeps
    # the starts free of duplicates.
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


def _integer(value: int, what: str, where: str) -> int:
    # operator.index accepts Python, NumPy and 0-d integer tensor values but refuses floats such as 32.0 or 0.5,
    # which would otherwise produce fractional slices far from where the mistake was made.
    if isinstance(value, bool):
        raise ConfigurationError(f"{what} {value!r} along {where} must be an integer")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigurationError(f"{what} {value!r} along {where} must be an integer") from None


def _three(values: Sequence[int], name: str) -> tuple[int, int, int]:
    try:
        values = tuple(values)
    except TypeError:
        raise ConfigurationError(f"{name} {values!r} must be a sequence of 3 integers (z, y, x)") from None
    if len(values) != 3:
        raise ConfigurationError(f"{name} {values!r} must have 3 entries (z, y, x), not {len(values)}")
    return tuple(_integer(v, name, f"axis {axis}") for v, axis in zip(values, AXES))  # type: ignore[return-value]
