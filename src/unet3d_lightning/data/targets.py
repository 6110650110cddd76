"""Training targets derived from instance labels: boundaries and affinities, per patch, after augmentation.

An *instance label* volume gives every object (a cell, a neurite) its own integer id, ``0`` for background, and
optionally one id whose voxels are unknown (the ignore label). A network does not learn the ids themselves (they are
arbitrary), but maps derived from them, from which instances are recovered afterwards (see
:mod:`unet3d_lightning.instances`):

- ``boundaries``: 1 on the voxels where two different ids touch (face neighbours, 6-connectivity; both voxels of
  the pair are marked, as ``skimage.segmentation.find_boundaries(mode="thick", connectivity=1)`` does), optionally
  thickened, with an optional second channel that is 1 on every object voxel (foreground);
- ``affinities``: for each offset ``o = (dz, dy, dx)`` one channel, 1 at voxel ``v`` when ``v`` and ``v + o`` carry
  the same non-background id, else 0.

Targets are derived after the joint augmentation of raw and label (see :mod:`unet3d_lightning.data.transforms`), so
they are aligned with the augmented raw by construction. Elements that must not be learned — voxels of the ignore
label, and affinities whose neighbour ``v + o`` lies outside the patch or is ignored — get the value
:data:`MASKED`; the model's losses and metrics leave those elements out (they are not counted as 0).

Label ids of any integer dtype are accepted, uint64 included: :func:`relabel` maps a patch's ids to small
consecutive int64 numbers (torch has no uint64 tensors, and int64 cannot hold ids >= 2**63) before anything else
touches them; only equality between ids matters for every target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage

from ..errors import ConfigurationError

#: target value of elements left out of the loss and the metrics
MASKED = -1
#: id :func:`relabel` gives ignored voxels (background is 0, objects 1, 2, ...)
IGNORED_ID = -1
LabelTransformName = Literal["none", "boundaries", "affinities"]
LABEL_TRANSFORMS = ("none", "boundaries", "affinities")
NEAREST_NEIGHBOURS = ((1, 0, 0), (0, 1, 0), (0, 0, 1))


@dataclass
class TargetOptions:
    """Settings of the targets derived from instance labels (``data.target_options``).

    Args:
        background_boundaries: with ``boundaries``, also mark the border between an object and the background (not
            only between two objects). Default True.
        thicken: with ``boundaries``, grow the boundary by this many voxels on each side (binary dilation with
            6-connectivity, repeated). The unthickened boundary is 2 voxels wide across a border (one on each side).
            Default 0.
        foreground_channel: with ``boundaries``, add a second channel that is 1 on every object voxel (id not 0),
            so that prediction can tell background from the inside of an object. Default False.
        offsets: with ``affinities``, the ``(z, y, x)`` offsets, one output channel each. Default the nearest
            neighbours ``[[1, 0, 0], [0, 1, 0], [0, 0, 1]]``; longer-range offsets (e.g. ``[4, 0, 0]``) are added
            as further entries.
    """

    background_boundaries: bool = True
    thicken: int = 0
    foreground_channel: bool = False
    offsets: list[list[int]] = field(default_factory=lambda: [list(o) for o in NEAREST_NEIGHBOURS])

    def __post_init__(self) -> None:
        if isinstance(self.thicken, bool) or not isinstance(self.thicken, int) or self.thicken < 0:
            raise ConfigurationError(f"data.target_options.thicken {self.thicken!r} must be an integer >= 0")
        offsets = [tuple(int(v) for v in o) for o in self.offsets]
        if not offsets or any(len(o) != 3 for o in offsets) or any(o == (0, 0, 0) for o in offsets):
            raise ConfigurationError(
                f"data.target_options.offsets {self.offsets!r} must be a non-empty list of non-zero [z, y, x] offsets"
            )
        self.offsets = [list(o) for o in offsets]


def target_channels(kind: str, options: TargetOptions) -> int:
    """Output channels the model needs for the targets ``kind`` (``"boundaries"`` or ``"affinities"``)."""
    if kind == "boundaries":
        return 2 if options.foreground_channel else 1
    return len(options.offsets)


def relabel(label: np.ndarray, background: int = 0, ignore_label: int | None = None) -> np.ndarray:
    """``label``'s ids as small int64 numbers: background → 0, ``ignore_label`` → :data:`IGNORED_ID`, every other
    id → 1, 2, ... in increasing order of the original ids. Equal ids stay equal, different ids different.

    Args:
        label: integer (any width, uint64 included) or bool array.
        background: the background id. Default 0.
        ignore_label: id of unknown voxels. Default None: none.
    """
    ids, inverse = np.unique(label, return_inverse=True)
    lookup = np.zeros(ids.size, np.int64)
    ignored = _equal(ids, ignore_label) if ignore_label is not None else np.zeros(ids.size, bool)
    objects = ~_equal(ids, background) & ~ignored
    lookup[objects] = np.arange(1, int(objects.sum()) + 1)
    lookup[ignored] = IGNORED_ID
    return lookup[inverse.reshape(label.shape)]


def _equal(ids: np.ndarray, value: int) -> np.ndarray:
    """``ids == value``, False (not an OverflowError) for a value the dtype cannot hold, e.g. -1 with uint64 ids."""
    if np.issubdtype(ids.dtype, np.integer):
        info = np.iinfo(ids.dtype)
        if not info.min <= int(value) <= info.max:
            return np.zeros(ids.shape, bool)
    return ids == value


def _pairs(shape: Sequence[int], offset: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices ``a``, ``b`` with ``b``'s voxel = ``a``'s voxel + ``offset``, over every pair inside ``shape``."""
    a, b = [], []
    for n, o in zip(shape, offset):
        a.append(slice(max(0, -o), n - max(0, o)))
        b.append(slice(max(0, o), n + min(0, o)))
    return tuple(a), tuple(b)


def boundaries(
    label: np.ndarray,
    *,
    background: int = 0,
    ignore_label: int | None = None,
    background_boundaries: bool = True,
    thicken: int = 0,
    foreground_channel: bool = False,
) -> np.ndarray:
    """Boundary target ``(1 or 2, D, H, W)`` float32 of an instance label ``(D, H, W)``.

    Channel 0 is 1 on both voxels of every face-neighbour pair ``(u, v)`` with ``label[u] != label[v]``, where
    neither is ignored and, without ``background_boundaries``, neither is background; it is then dilated ``thicken``
    times (6-connectivity). Channel 1 (``foreground_channel``) is 1 where ``label != background``. Ignored voxels are
    :data:`MASKED` in every channel.

    Args:
        label: instance ids ``(D, H, W)``, any integer dtype.
        background: background id. Default 0.
        ignore_label: id of unknown voxels. Default None.
        background_boundaries, thicken, foreground_channel: see :class:`TargetOptions`.
    """
    boundary = np.zeros(label.shape, bool)
    ignored = _equal(label, ignore_label) if ignore_label is not None else None
    counted = ~ignored if ignored is not None else None
    if not background_boundaries:
        counted = ~_equal(label, background) if counted is None else counted & ~_equal(label, background)
    for axis in range(3):
        offset = [0, 0, 0]
        offset[axis] = 1
        a, b = _pairs(label.shape, offset)
        differ = label[a] != label[b]
        if counted is not None:
            differ &= counted[a] & counted[b]
        boundary[a] |= differ
        boundary[b] |= differ
    if thicken:
        boundary = ndimage.binary_dilation(boundary, iterations=thicken)
    channels = [boundary.astype(np.float32)]
    if foreground_channel:
        channels.append((~_equal(label, background)).astype(np.float32))
    target = np.stack(channels)
    if ignored is not None:
        target[:, ignored] = MASKED
    return target


def affinities(
    label: np.ndarray,
    offsets: Sequence[Sequence[int]] = NEAREST_NEIGHBOURS,
    *,
    background: int = 0,
    ignore_label: int | None = None,
) -> np.ndarray:
    """Affinity target ``(len(offsets), D, H, W)`` float32 of an instance label ``(D, H, W)``.

    Channel ``k`` at voxel ``v`` is 1 when ``label[v] == label[v + offsets[k]] != background``, else 0; it is
    :data:`MASKED` where ``v + offsets[k]`` lies outside the array, or ``v`` or ``v + offsets[k]`` is ignored.

    Args:
        label: instance ids ``(D, H, W)``, any integer dtype.
        offsets: ``(z, y, x)`` offsets. Default the nearest neighbours ``(1, 0, 0), (0, 1, 0), (0, 0, 1)``.
        background: background id. Default 0.
        ignore_label: id of unknown voxels. Default None.
    """
    target = np.full((len(offsets), *label.shape), MASKED, np.float32)
    ignored = _equal(label, ignore_label) if ignore_label is not None else None
    foreground = ~_equal(label, background)
    for k, offset in enumerate(offsets):
        a, b = _pairs(label.shape, offset)
        values = ((label[a] == label[b]) & foreground[a]).astype(np.float32)
        if ignored is not None:
            values[ignored[a] | ignored[b]] = MASKED
        target[(k, *a)] = values
    return target


class LabelTransform:
    """Turns a sample's instance label into the training target, after the augmentations.

    Called on a sample dict whose ``"label"`` is an int64 tensor ``(D, H, W)`` of :func:`relabel`-ed ids; returns a
    new dict whose ``"label"`` is the float32 target ``(C, D, H, W)`` (with :data:`MASKED` elements) and whose
    ``"instances"`` holds the relabelled ids (for the instance metrics of validation).

    Args:
        kind: ``"boundaries"`` or ``"affinities"``.
        options: see :class:`TargetOptions`. Default ``TargetOptions()``.
    """

    def __init__(self, kind: str, options: TargetOptions | None = None) -> None:
        if kind not in ("boundaries", "affinities"):
            raise ConfigurationError(f"data.label_transform {kind!r} is not one of {', '.join(LABEL_TRANSFORMS)}")
        self.kind = kind
        self.options = options or TargetOptions()

    @property
    def channels(self) -> int:
        return target_channels(self.kind, self.options)

    def spec(self) -> dict[str, Any]:
        """The transform as plain data (stored with the model, read by prediction)."""
        o = self.options
        if self.kind == "boundaries":
            return {"kind": "boundaries", "foreground_channel": o.foreground_channel,
                    "background_boundaries": o.background_boundaries, "thicken": o.thicken}
        return {"kind": "affinities", "offsets": [list(x) for x in o.offsets]}

    def derive(self, ids: np.ndarray) -> np.ndarray:
        """The target of relabelled ids ``(D, H, W)`` (background 0, ignored :data:`IGNORED_ID`)."""
        o = self.options
        if self.kind == "boundaries":
            return boundaries(
                ids, ignore_label=IGNORED_ID, background_boundaries=o.background_boundaries, thicken=o.thicken,
                foreground_channel=o.foreground_channel,
            )
        return affinities(ids, o.offsets, ignore_label=IGNORED_ID)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        ids = sample["label"]
        target = self.derive(ids.numpy())
        return {**sample, "label": torch.from_numpy(target), "instances": ids}

    def __repr__(self) -> str:
        return f"LabelTransform({self.kind!r}, {self.options})"
