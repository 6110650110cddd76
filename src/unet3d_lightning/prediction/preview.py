"""``<stem>_preview.png``: a first look at a prediction, what a user opens to see whether the run worked.

Three central orthogonal planes of the raw volume laid out as orthogonal views (as Fiji's Orthogonal Views): the
``(y, x)`` plane at ``z = D // 2`` top left, the ``(z, x)`` plane at ``y = H // 2`` below it (sharing its x axis) and
the ``(z, y)`` plane at ``x = W // 2`` to its right, transposed to ``(y, z)`` (sharing its y axis), with
:data:`GAP` black pixels between them and the corner bottom right black; in grey (first channel, scaled between its
1st and 99th percentiles over the three planes), with the segmentation overlaid in colour (one colour per class or
channel, background left grey, half transparent) or, without a segmentation, the foreground probability in red
(opacity = half the probability; the foreground of a softmax model is 1 - p(class 0), of a sigmoid model the largest
channel).

Physical aspect ratio: every plane is resized (nearest neighbour) so that one pixel stands for the smallest voxel
size on each axis, at most :data:`MAX_SIDE` pixels along its longest side: an anisotropic volume of voxel size
``(4, 1, 1)`` shows its z axis four times stretched.

The planes of the prediction are gathered while its rows stream past (:class:`PlaneCollector`, O(D (H + W)) memory);
only the three planes of the raw are read, after the volume is complete. Written with Pillow (in the ``formats``
extra) to a temporary name and renamed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .paths import SOFTWARE, remove_path, temporary_path

# Longest side of one plane in the preview, in pixels.
MAX_SIDE = 512
GAP = 4  # pixels of black between the planes
# Colours of classes 1, 2, ... (class 0 is the background, not overlaid); repeated beyond.
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                    (70, 240, 240), (240, 50, 230)], np.float32)
ALPHA = 0.5


class PlaneCollector:
    """Keeps the three central planes of a ``(D, H, W)`` map as its z-rows arrive (the overlay of the preview).

    Args:
        shape: the volume's ``(D, H, W)``.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(int(n) for n in shape)
        d, h, w = self.shape
        self.centre = (d // 2, h // 2, w // 2)
        self.planes: list[np.ndarray | None] = [None, None, None]

    def add(self, z0: int, z1: int, values: np.ndarray) -> None:
        """Take the rows ``[z0, z1)`` of the map, ``(z1 - z0, H, W)``."""
        cz, cy, cx = self.centre
        if self.planes[1] is None:
            self.planes[1] = np.zeros((self.shape[0], self.shape[2]), values.dtype)
            self.planes[2] = np.zeros((self.shape[0], self.shape[1]), values.dtype)
        if z0 <= cz < z1:
            self.planes[0] = np.array(values[cz - z0])
        self.planes[1][z0:z1] = values[:, cy, :]
        self.planes[2][z0:z1] = values[:, :, cx]


def overlay_map(probabilities: np.ndarray, segmentation: np.ndarray | None, activation: str) -> tuple[np.ndarray, str]:
    """What the preview overlays for rows of a volume: ``("labels", (z, H, W) ids, 0 = none)`` from the segmentation
    (argmax ids; per-channel masks as 1 + the first channel set), else ``("probability", foreground)``."""
    if segmentation is not None:
        if segmentation.ndim == 4:
            ids = np.where(segmentation.any(0), segmentation.argmax(0) + 1, 0).astype(np.int32)
            return ids, "labels"
        return segmentation.astype(np.int32), "labels"
    if activation == "softmax" and probabilities.shape[0] > 1:
        return (1.0 - probabilities[0]).astype(np.float32), "probability"
    return probabilities.max(0).astype(np.float32), "probability"


def _grey(planes: Sequence[np.ndarray]) -> list[np.ndarray]:
    values = np.concatenate([p.reshape(-1) for p in planes]).astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    if high <= low:
        high = low + 1.0
    return [np.clip((np.nan_to_num(p.astype(np.float64)) - low) / (high - low), 0, 1) * 255 for p in planes]


def compose(raw_planes: Sequence[np.ndarray], overlay_planes: Sequence[np.ndarray], kind: str,
            voxel_size: Sequence[float] | None) -> np.ndarray:
    """The preview as an ``(rows, columns, 3)`` uint8 image.

    Args:
        raw_planes: the raw's ``(H, W)``, ``(D, W)`` and ``(D, H)`` central planes.
        overlay_planes: the overlay's planes of the same shapes (see :func:`overlay_map`).
        kind: ``"labels"`` or ``"probability"``.
        voxel_size: ``(z, y, x)``, or None (unit voxels).
    """
    sz, sy, sx = (float(s) for s in voxel_size) if voxel_size is not None else (1.0, 1.0, 1.0)
    base = min(sz, sy, sx)
    spacings = [(sy, sx), (sz, sx), (sz, sy)]
    images = []
    for grey, overlay, (s0, s1) in zip(_grey(raw_planes), overlay_planes, spacings):
        rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
        if kind == "labels":
            ids = np.asarray(overlay, np.int64)
            colour = PALETTE[(ids - 1) % len(PALETTE)]
            mask = (ids > 0)[..., None]
            rgb = np.where(mask, (1 - ALPHA) * rgb + ALPHA * colour, rgb)
        else:
            alpha = ALPHA * np.clip(np.nan_to_num(np.asarray(overlay, np.float32)), 0, 1)[..., None]
            rgb = (1 - alpha) * rgb + alpha * np.array([255.0, 0.0, 0.0], np.float32)
        images.append((np.rint(rgb).astype(np.uint8), (s0 / base, s1 / base)))
    # One scale for all planes, so that they share a physical pixel size.
    longest = max(max(img.shape[0] * a, img.shape[1] * b) for img, (a, b) in images)
    zoom = min(1.0, MAX_SIDE / longest) if longest > MAX_SIDE else 1.0
    resized = []
    for img, (a, b) in images:
        rows = max(1, round(img.shape[0] * a * zoom))
        cols = max(1, round(img.shape[1] * b * zoom))
        # Nearest neighbour by index: every output pixel shows the voxel under its centre.
        r = np.minimum(((np.arange(rows) + 0.5) * img.shape[0] / rows).astype(int), img.shape[0] - 1)
        c = np.minimum(((np.arange(cols) + 0.5) * img.shape[1] / cols).astype(int), img.shape[1] - 1)
        resized.append(img[r][:, c])
    top, below, right = resized[0], resized[1], resized[2].transpose(1, 0, 2)
    canvas = np.zeros((top.shape[0] + GAP + below.shape[0], top.shape[1] + GAP + right.shape[1], 3), np.uint8)
    canvas[: top.shape[0], : top.shape[1]] = top
    canvas[top.shape[0] + GAP :, : below.shape[1]] = below
    canvas[: right.shape[0], top.shape[1] + GAP :] = right
    return canvas


def raw_planes(volume: object) -> list[np.ndarray]:
    """The three central planes of the volume's raw (first channel), read from its file (three reads)."""
    from ..data.io.handles import FileCache
    from ..data.volumes import read_region

    d, h, w = volume.spatial_shape  # type: ignore[attr-defined]
    cz, cy, cx = d // 2, h // 2, w // 2
    files = FileCache()
    try:
        planes = []
        for index, take in (((slice(cz, cz + 1), slice(0, h), slice(0, w)), (0, slice(None), slice(None))),
                            ((slice(0, d), slice(cy, cy + 1), slice(0, w)), (slice(None), 0, slice(None))),
                            ((slice(0, d), slice(0, h), slice(cx, cx + 1)), (slice(None), slice(None), 0))):
            is_4d = volume.raw_is_4d  # type: ignore[attr-defined]
            region = np.asarray(read_region(volume, files, "raw", index, is_4d))  # type: ignore[arg-type]
            planes.append(region[(0, *take)] if is_4d else region[take])
        return planes
    finally:
        files.close()


def write_preview(path: Path, image: np.ndarray) -> Path:
    """Write ``image`` as the PNG ``path`` (temporary name, then renamed), tagged with the writer's Software."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE)
    tmp = temporary_path(path)
    try:
        Image.fromarray(image, "RGB").save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise
    return path
