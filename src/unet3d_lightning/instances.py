"""From boundary / affinity maps to instances, and the instance metrics (adapted Rand error, average precision).

Segmentation (scikit-image and scipy do the work):

- :func:`boundary_evidence` turns a model's output into one boundary map (1 on borders) and, where the model can
  tell, a foreground mask: for boundaries, channel 0 and (with a foreground channel) channel 1 > threshold; for
  affinities, ``1 - min`` over every affinity of a voxel, to its neighbours at ``+o`` and at ``-o`` (a voxel is inside
  an object only when it is linked to all of them), and foreground where any affinity > threshold (background voxels have every affinity 0,
  object voxels at least one neighbour of their own object);
- :func:`components_instances` (validation): connected components (6-connectivity) of the interior
  ``boundary < threshold`` are the seeds, grown over the foreground by a watershed on the boundary map, so that the
  boundary voxels join an object as they do in the labels;
- :func:`watershed_instances` (prediction): seeds at the maxima of the (smoothed) distance transform of the
  interior, which still separates objects whose boundary has a gap, then the same seeded watershed.

Metrics, on a ground truth whose id 0 is background and whose negative ids (see
:func:`unet3d_lightning.data.targets.relabel`) are ignored; both leave those voxels out:

- :func:`adapted_rand_error`: the adapted Rand error of the CREMI challenge (Arganda-Carreras et al. 2015,
  "Crowdsourcing the creation of image segmentation algorithms for connectomics", Front. Neuroanat.), 0 for a
  perfect segmentation, up to 1;
- :func:`average_precision`: ``TP / (TP + FP + FN)`` at an IoU threshold (0.5 by default), the "average precision"
  of the Data Science Bowl 2018 and of the StarDist evaluations (Schmidt et al. 2018), 1 for a perfect
  segmentation.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigurationError

__all__ = [
    "WatershedOptions",
    "adapted_rand_error",
    "average_precision",
    "boundary_evidence",
    "components_instances",
    "watershed_instances",
]

# Peak memory of :func:`watershed_instances` per voxel: 71 bytes measured with tracemalloc on a 64^3 volume (float32
# boundary map, bool masks, float64 distance transform and its smoothed copy, int64 seeds and labels, and the
# watershed's own flattened working arrays), rounded up.
WATERSHED_BYTES_PER_VOXEL = 80


@dataclass
class WatershedOptions:
    """Settings of the seeded watershed that turns predicted maps into instances (``prediction.watershed``).

    Args:
        threshold: a voxel is interior (seed region) where the boundary map is below it, foreground where the
            foreground channel (or, for affinities, the largest affinity) is above it; in (0, 1). Default 0.5.
        seed_sigma: Gaussian smoothing (in voxels) of the distance transform before its maxima are taken; larger
            values give fewer seeds (less over-segmentation); >= 0, 0 for none. Default 2.0.
        min_distance: smallest distance in voxels between two seeds; >= 1. Default 5.
        min_size: instances smaller than this many voxels are merged into a neighbour (or dropped); >= 0. Default 0.
        memory_limit_gb: memory the watershed may use, about ``WATERSHED_BYTES_PER_VOXEL`` = 80 bytes per voxel
            plus 4 per voxel and channel; a volume above it is segmented blockwise within it
            (:mod:`~unet3d_lightning.blockwise`), one too wide for even a 16-row block is refused at the start; > 0.
            Default 16.

    Raises:
        ConfigurationError: a setting outside its range, named ``prediction.watershed.<key>``.
    """

    threshold: float = 0.5
    seed_sigma: float = 2.0
    min_distance: int = 5
    min_size: int = 0
    memory_limit_gb: float = 16.0

    def __post_init__(self) -> None:
        # Maps are probabilities: at 0 no voxel is interior (no seeds), at 1 every one is (a single object).
        checks = (
            ("threshold", _is_number(self.threshold) and 0 < self.threshold < 1, "a number in (0, 1), e.g. 0.5"),
            ("seed_sigma", _is_number(self.seed_sigma) and 0 <= self.seed_sigma < math.inf,
             "a number >= 0 (0: no smoothing)"),
            ("min_distance", _is_integer(self.min_distance) and self.min_distance >= 1, "an integer >= 1"),
            ("min_size", _is_integer(self.min_size) and self.min_size >= 0, "an integer >= 0 (0: keep every object)"),
            ("memory_limit_gb", _is_number(self.memory_limit_gb) and self.memory_limit_gb > 0, "a number > 0"),
        )
        for key, valid, what in checks:
            if not valid:
                raise ConfigurationError(
                    f"prediction.watershed.{key} {getattr(self, key)!r} must be {what}"
                )


def require_instances_extra(what: str) -> None:
    """Raise a one-line error naming the ``instances`` extra when scikit-image or SciPy is not installed (they are
    imported only where objects are cut out, so that prediction without instances never loads them).

    Args:
        what: what needs the extra, as the message starts (``"prediction.instances"``).
    """
    missing = []
    for module, package in (("skimage", "scikit-image"), ("scipy", "scipy")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ConfigurationError(
            f"{what} needs {' and '.join(missing)}, from the optional 'instances' extra: "
            "pip install 'unet3d-lightning[instances]'"
        )


def _is_number(value: Any) -> bool:
    """A real number that is not NaN (bools are not numbers here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def boundary_evidence(
    maps: np.ndarray, spec: dict[str, Any], threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(boundary, foreground)`` of a model's output ``maps`` ``(C, D, H, W)`` for its target ``spec``.

    Args:
        maps: probabilities, boundaries ``(1 or 2, ...)`` or affinities ``(len(offsets), ...)``.
        spec: the target description (``{"kind": "boundaries", "foreground_channel": ...}`` or
            ``{"kind": "affinities", "offsets": ...}``), as the model stores it.
        threshold: see :class:`WatershedOptions`. Default 0.5.

    Returns:
        float32 boundary map ``(D, H, W)`` (1 on borders) and a bool foreground mask, or None when the targets carry
        no foreground (boundaries without a foreground channel: every voxel is then foreground).
    """
    if spec["kind"] == "boundaries":
        boundary = np.asarray(maps[0], np.float32)
        foreground = maps[1] > threshold if maps.shape[0] > 1 else None
        return boundary, foreground
    # Channel k at v is the affinity of the pair (v, v + o_k); the pair (v - o_k, v) sits at v - o_k. Taking both
    # makes the boundary two-sided, as the labels' borders are: a one-sided boundary voxel lies as close to the seed
    # of the neighbouring object as to its own, and the watershed could give it to either.
    lowest = np.asarray(maps, np.float32).min(axis=0)
    for k, offset in enumerate(spec["offsets"]):
        if any(abs(o) >= n for o, n in zip(offset, lowest.shape)):
            continue  # an offset longer than the volume pairs no voxel: no pair at v - o to take
        a = tuple(slice(max(0, -o), n - max(0, o)) for n, o in zip(lowest.shape, offset))
        b = tuple(slice(max(0, o), n + min(0, o)) for n, o in zip(lowest.shape, offset))
        np.minimum(lowest[b], maps[k][a], out=lowest[b])
    return 1.0 - lowest, maps.max(axis=0) > threshold


def _grow(boundary: np.ndarray, seeds: np.ndarray, foreground: np.ndarray | None, min_size: int) -> np.ndarray:
    from skimage.segmentation import watershed  # scikit-image (the instances extra) only where instances are made

    labels = watershed(boundary, markers=seeds, mask=foreground)
    if min_size > 0:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        if small.any():
            labels[small[labels]] = 0
            # Let the kept objects flood the removed ones' voxels (still inside the foreground).
            labels = watershed(boundary, markers=labels, mask=foreground)
    return labels


def components_instances(
    boundary: np.ndarray, foreground: np.ndarray | None = None, threshold: float = 0.5
) -> np.ndarray:
    """Instances ``(D, H, W)`` int32: connected components (6-connectivity) of ``boundary < threshold`` (inside the
    foreground) grown over the foreground by a watershed on ``boundary``; 0 outside the foreground."""
    from scipy import ndimage

    interior = boundary < threshold
    if foreground is not None:
        interior &= foreground
    seeds, _ = ndimage.label(interior)
    return _grow(boundary, seeds, foreground, 0)


def watershed_instances(
    boundary: np.ndarray, foreground: np.ndarray | None = None, options: WatershedOptions | None = None
) -> np.ndarray:
    """Instances ``(D, H, W)`` int64 by a watershed on ``boundary`` seeded at the distance-transform maxima.

    The interior ``boundary < threshold`` (inside the foreground) is distance-transformed
    (``scipy.ndimage.distance_transform_edt``), smoothed with a Gaussian of ``seed_sigma``; its local maxima at least
    ``min_distance`` apart within each connected interior region (``skimage.feature.peak_local_max``) are the seeds,
    every interior region gets at least one; ``skimage.segmentation.watershed`` floods ``boundary`` from them over the
    foreground. Instances below ``min_size`` voxels are flooded by their neighbours. 0 is background.

    Args:
        boundary: float boundary map ``(D, H, W)``, 1 on borders.
        foreground: bool mask of object voxels. Default None: every voxel.
        options: see :class:`WatershedOptions`. Default ``WatershedOptions()``.
    """
    from scipy import ndimage
    from skimage.feature import peak_local_max

    o = options or WatershedOptions()
    interior = boundary < o.threshold
    if foreground is not None:
        interior &= foreground
    regions, count = ndimage.label(interior)
    distance = ndimage.distance_transform_edt(interior)
    if o.seed_sigma > 0:
        distance = ndimage.gaussian_filter(distance, o.seed_sigma)
    seeds = np.zeros(boundary.shape, np.int64)
    if count:
        peaks = peak_local_max(
            distance, min_distance=max(1, int(o.min_distance)), labels=regions, exclude_border=False,
        )
        seeds[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        # A thin region may have no maximum left after smoothing; its own component is then its seed.
        seeded = np.zeros(count + 1, bool)
        seeded[regions[tuple(peaks.T)]] = True
        missing = ~seeded[regions] & (regions > 0)
        seeds[missing] = regions[missing] + len(peaks)
    labels = _grow(boundary, seeds, foreground, int(o.min_size))
    # Consecutive ids 1..n (the seeds above are not).
    ids, inverse = np.unique(labels, return_inverse=True)
    return (inverse.reshape(labels.shape) - (0 if ids[0] == 0 else -1)).astype(np.int64)


def _contingency(truth: np.ndarray, segmentation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(truth id, segmentation id)`` over the voxels with ``truth > 0`` and their voxel counts."""
    keep = truth > 0
    t, s = truth[keep].astype(np.int64), segmentation[keep].astype(np.int64)
    pairs, counts = np.unique(np.stack([t, s]), axis=1, return_counts=True)
    return pairs[0], pairs[1], counts


def adapted_rand_error(truth: np.ndarray, segmentation: np.ndarray) -> float:
    """Adapted Rand error (CREMI) of ``segmentation`` against ``truth``.

    Over the ``n`` voxels with ``truth > 0`` (background 0 and ignored negative ids are left out), with
    ``p_ij`` the fraction of them in truth object ``i`` and segment ``j``, ``a_i = Σ_j p_ij``, ``b_j = Σ_i p_ij``:

    .. math::

        P = \\frac{\\sum_{ij} p_{ij}^2}{\\sum_j b_j^2}, \\quad R = \\frac{\\sum_{ij} p_{ij}^2}{\\sum_i a_i^2},
        \\quad \\mathrm{ARand} = 1 - \\frac{2 P R}{P + R}

    Voxels the segmentation labels 0 count as singletons (each its own segment), as in CREMI: leaving an object's
    voxels unassigned lowers the recall. 0 when there is no truth object at all.

    Args:
        truth: ground-truth ids ``(D, H, W)``.
        segmentation: predicted ids of the same shape, 0 = unassigned.
    """
    t, s, counts = _contingency(truth, segmentation)
    n = counts.sum()
    if n == 0:
        return 0.0
    p = counts / n
    singleton = s == 0
    a = np.bincount(np.unique(t, return_inverse=True)[1], weights=p)
    b_ids, b_inverse = np.unique(s[~singleton], return_inverse=True)
    b = np.bincount(b_inverse, weights=p[~singleton], minlength=b_ids.size)
    # Each of the c unassigned voxels is a segment of size 1/n: c / n^2 in both the joint and the segment sums.
    sum_b = (b**2).sum() + counts[singleton].sum() / n**2
    joint = (p[~singleton] ** 2).sum() + counts[singleton].sum() / n**2
    precision, recall = joint / sum_b, joint / (a**2).sum()
    return float(1.0 - 2.0 * precision * recall / (precision + recall))


def average_precision(truth: np.ndarray, segmentation: np.ndarray, iou_threshold: float = 0.5) -> float:
    """``TP / (TP + FP + FN)`` of the instances of ``segmentation`` against those of ``truth``.

    A predicted instance and a truth object match when their IoU exceeds ``iou_threshold``; for thresholds >= 0.5
    such a match is unique. TP = matched pairs, FP = unmatched predictions, FN = unmatched truth objects. Truth ids
    > 0 are objects; voxels with negative (ignored) truth ids are left out of both segmentations first; predicted id
    0 is background. 1 when neither has an instance.

    Args:
        truth: ground-truth ids ``(D, H, W)``.
        segmentation: predicted ids of the same shape.
        iou_threshold: IoU above which two instances match; at least 0.5. Default 0.5.
    """
    if iou_threshold < 0.5:
        raise ValueError(f"iou_threshold must be >= 0.5 for unique matches, got {iou_threshold}")
    known = truth >= 0
    t_all, s_all = truth[known].astype(np.int64), segmentation[known].astype(np.int64)
    t_ids, t_sizes = np.unique(t_all[t_all > 0], return_counts=True)
    s_ids, s_sizes = np.unique(s_all[s_all > 0], return_counts=True)
    if t_ids.size == 0 and s_ids.size == 0:
        return 1.0
    both = (t_all > 0) & (s_all > 0)
    pairs, overlap = np.unique(np.stack([t_all[both], s_all[both]]), axis=1, return_counts=True)
    t_size = t_sizes[np.searchsorted(t_ids, pairs[0])] if pairs.size else np.zeros(0)
    s_size = s_sizes[np.searchsorted(s_ids, pairs[1])] if pairs.size else np.zeros(0)
    iou = overlap / (t_size + s_size - overlap) if pairs.size else np.zeros(0)
    tp = int((iou > iou_threshold).sum())
    fp, fn = s_ids.size - tp, t_ids.size - tp
    return tp / (tp + fp + fn)


def instance_scores(
    maps: np.ndarray, truth: np.ndarray, spec: dict[str, Any], threshold: float = 0.5
) -> tuple[float, float]:
    """``(adapted Rand error, AP at IoU 0.5)`` of :func:`components_instances` of ``maps`` against ``truth``."""
    boundary, foreground = boundary_evidence(maps, spec, threshold)
    segmentation = components_instances(boundary, foreground, threshold)
    segmentation[truth < 0] = 0
    return adapted_rand_error(truth, segmentation), average_precision(truth, segmentation)


def instance_dtype(count: int) -> str:
    """uint32 for up to 2**32 - 1 instances, else uint64."""
    return "uint32" if count < 2**32 else "uint64"


def watershed_bytes(shape: Sequence[int]) -> int:
    """Memory the watershed of a volume of ``shape`` ``(D, H, W)`` needs, about."""
    return int(np.prod([int(s) for s in shape])) * WATERSHED_BYTES_PER_VOXEL
