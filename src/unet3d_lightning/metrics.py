"""Whole-volume segmentation metrics: the pure functional core of ``unet3d evaluate`` (numpy and scipy; no Lightning,
no files).

Everything is computed from pieces a large volume can be read in, so that memory stays bounded:

- :class:`ConfusionCounts` accumulates, z-slab by z-slab, the voxel counts of every (label id, predicted id) pair;
  Dice and IoU of each class come from them (:func:`overlap_scores`), as do the bounding boxes of each class
  (:class:`BoundingBoxes`);
- the surface metrics of a class (:func:`distance_scores`: HD95, ASSD, surface Dice) need only the class's bounding
  box (the union of its label and predicted voxels), where its surfaces lie, read slab by slab
  (:func:`surface_points` with one row of halo); the distances between the two surfaces are found in k-d trees of
  their voxels, so memory grows with the surfaces, not with the box or the volume;
- :class:`InstanceCounts` accumulates the overlaps of truth objects and predicted instances slab by slab; ARand, AP,
  precision and recall (:func:`instance_scores`) need nothing else, so memory grows with the number of overlapping
  pairs, not with the volume.

Definitions (``P``: predicted voxels of a class, ``G``: its label voxels; ``∂P``, ``∂G``: their surface voxels, the
voxels of the mask with a 6-neighbour outside it, as MONAI's ``get_mask_edges`` takes them, or, in a one-slice
volume (a 2D image), a 4-neighbour within the slice; distances in the voxel size's units, Euclidean, between voxel
centres):

- ``dice = 2|P∩G| / (|P| + |G|)`` (Dice 1945; Sørensen 1948), ``iou = |P∩G| / |P∪G|`` (Jaccard 1912), as MONAI's
  ``compute_dice`` / ``compute_iou``;
- ``hd95``: the 95th percentile (linear interpolation) of the distances from ``∂P`` to ``∂G``, and of those from
  ``∂G`` to ``∂P``, the larger of the two (Huttenlocher et al. 1993 for the Hausdorff distance; the 95th-percentile
  form as in MONAI's ``compute_hausdorff_distance(percentile=95)`` and the Medical Segmentation Decathlon);
- ``assd``: the mean of both sets of distances together (average symmetric surface distance, Heimann et al. 2009;
  MONAI's ``compute_average_surface_distance(symmetric=True)``);
- ``surface_dice`` at tolerance ``τ``: ``(|{p∈∂P: d(p,∂G) ≤ τ}| + |{g∈∂G: d(g,∂P) ≤ τ}|) / (|∂P| + |∂G|)``
  (normalised surface Dice, Nikolov et al. 2021, "Clinically applicable segmentation of head and neck anatomy for
  radiotherapy", J Med Internet Res; counted over surface voxels as MONAI's ``compute_surface_dice`` without
  sub-voxel areas).

Empty masks (a class in neither, or in only one of label and prediction):

=================  ===========================  ==================================  ================================
metric             absent from both             in the label only (missed)          in the prediction only (false)
=================  ===========================  ==================================  ================================
dice, iou          nan (nothing to score)       0                                   0
hd95, assd         nan                          inf                                 inf
surface_dice       nan                          0                                   0
=================  ===========================  ==================================  ================================

This is MONAI's convention where it has one: ``compute_dice``/``compute_iou`` give nan for an empty label by default
(``ignore_empty=True``) and 0 for a false positive with ``ignore_empty=False``; nan is kept only where there is
nothing to score (as nnU-Net's evaluation), so a false positive on a volume without the class counts against it.
MONAI's ``compute_average_surface_distance`` gives inf for one empty mask, and so does its
``compute_hausdorff_distance`` without a percentile (with one, its ``torch.quantile`` of infinities gives nan; here it
is inf, the distance to a surface that is not there). ``compute_surface_dice`` gives nan and 0 as in the table.
Means over volumes (:func:`mean_scores`) leave nan out and keep inf (one missed object makes the mean distance inf).

Instance metrics (truth ids > 0 are objects, 0 is background, negative ids are ignored voxels, left out of both;
predicted id 0 is background):

- ``arand``: the adapted Rand error (Arganda-Carreras et al. 2015, "Crowdsourcing the creation of image segmentation
  algorithms for connectomics", Front. Neuroanat.; the CREMI challenge's metric), ``1 - F`` with ``F`` the harmonic
  mean of the Rand precision ``Σ n_ij(n_ij-1) / Σ b_j(b_j-1)`` and recall ``Σ n_ij(n_ij-1) / Σ a_i(a_i-1)`` (``n_ij``
  voxels of truth object ``i`` in predicted instance ``j``, ``a_i``, ``b_j`` their sums), over the truth's object
  voxels, in pairs of distinct voxels exactly as scikit-image's ``adapted_rand_error``. Predicted background voxels
  inside objects count as singletons, as CREMI counts unassigned voxels (scikit-image gives the same number once
  each of them carries an id of its own; it would otherwise count them as one merged segment). CREMI's script also
  pairs each voxel with itself, a difference that vanishes with the objects' sizes. 0 is perfect, 1 the worst; nan
  without truth objects;
- matching at an IoU threshold ``t``: a one-to-one matching of truth objects and predicted instances with
  ``IoU >= t`` that has the most pairs (``scipy.sparse.csgraph.maximum_bipartite_matching``, Hopcroft–Karp, on the
  sparse graph of overlapping pairs: no dense matrix of all objects). For ``t > 0.5`` an object has at most one
  partner above ``t``, so this is the matching Hungarian (StarDist's) and greedy matching find too; at ``t = 0.5``
  it also resolves exact ties (an object half covered by each of two others) to the most matches;
- ``ap50 = TP / (TP + FP + FN)`` at ``t = 0.5`` ("average precision" as the Data Science Bowl 2018, StarDist
  (Schmidt et al. 2018) and Cellpose (Stringer et al. 2021) define it); ``map``: its mean over ``t = 0.50, 0.55, ...,
  0.95`` (the COCO range); ``precision = TP / (TP + FP)`` and ``recall = TP / (TP + FN)`` at ``t = 0.5``. nan where
  the denominator is 0 (no objects in either: ap50 and map; no predicted instance: precision; no truth object: recall).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CLASS_METRICS",
    "INSTANCE_METRICS",
    "MAP_THRESHOLDS",
    "BoundingBoxes",
    "ConfusionCounts",
    "InstanceCounts",
    "distance_scores",
    "instance_scores",
    "matched_pairs",
    "mean_scores",
    "overlap_scores",
    "point_distances",
    "surface_distances",
    "surface_points",
    "surface_scores",
]

CLASS_METRICS = ("dice", "iou", "hd95", "assd", "surface_dice")
INSTANCE_METRICS = ("arand", "ap50", "map", "precision", "recall")
# IoU thresholds of ``map``: 0.50, 0.55, ..., 0.95 (rounded, so that 0.7 is 0.7 and not 0.7000000000000001).
MAP_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
# Ids are packed in pairs into one 64-bit key: (label id << 32) | predicted id.
_SHIFT = np.uint64(32)
_LOW = np.uint64(2**32 - 1)


def _pack(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return (first.astype(np.uint64) << _SHIFT) | second.astype(np.uint64)


def _merge(keys: np.ndarray, counts: np.ndarray, new_keys: np.ndarray, new_counts: np.ndarray) -> tuple:
    all_keys = np.concatenate([keys, new_keys])
    merged, inverse = np.unique(all_keys, return_inverse=True)
    return merged, np.bincount(inverse.ravel(), weights=np.concatenate([counts, new_counts]),
                               minlength=merged.size).astype(np.int64)


def _check_ids(ids: np.ndarray, what: str) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= 2**32):
        raise ValueError(f"{what} ids must lie in [0, 2**32), got {int(ids.min())} .. {int(ids.max())}")


class ConfusionCounts:
    """Voxel counts of every (label class id, predicted class id) pair, accumulated over pieces of a volume.

    Example::

        counts = ConfusionCounts()
        for zs in slabs:
            counts.update(label[zs], prediction[zs])
        dice, iou = overlap_scores(*counts.tp_fp_fn(1))

    Args:
        ignore_index: label id whose voxels count nowhere (neither as label nor as prediction). Default None.
    """

    def __init__(self, ignore_index: int | None = None) -> None:
        self.ignore_index = ignore_index
        self.keys = np.zeros(0, np.uint64)
        self.counts = np.zeros(0, np.int64)

    def known(self, label: np.ndarray) -> np.ndarray | None:
        """The mask of voxels that count (label >= 0 and not ``ignore_index``), or None when all of them do."""
        mask = None
        if np.issubdtype(label.dtype, np.signedinteger) or np.issubdtype(label.dtype, np.floating):
            mask = label >= 0
        if self.ignore_index is not None:
            keep = label != self.ignore_index
            mask = keep if mask is None else mask & keep
        return mask

    def update(self, label: np.ndarray, prediction: np.ndarray) -> None:
        """Add the pairs of one piece: ``label`` and ``prediction`` integer class ids of the same shape; label voxels
        < 0 or equal to ``ignore_index`` are left out."""
        label, prediction = np.asarray(label), np.asarray(prediction)
        if label.shape != prediction.shape:
            raise ValueError(f"label shape {label.shape} differs from the prediction's {prediction.shape}")
        keep = self.known(label)
        if keep is not None:
            label, prediction = label[keep], prediction[keep]
        label, prediction = label.ravel(), prediction.ravel()
        _check_ids(label, "label")
        _check_ids(prediction, "predicted")
        if label.size and int(label.max()) < 1024 and int(prediction.max()) < 1024:
            # Few class ids (the usual case): a histogram of the pairs is far cheaper than sorting the voxels.
            width = int(prediction.max()) + 1
            histogram = np.bincount(label.astype(np.int64) * width + prediction, minlength=width)
            pairs = np.flatnonzero(histogram)
            keys = _pack(pairs // width, pairs % width)
            counts = histogram[pairs]
        else:
            keys, counts = np.unique(_pack(label, prediction), return_counts=True)
        self.keys, self.counts = _merge(self.keys, self.counts, keys, counts)

    @property
    def label_ids(self) -> np.ndarray:
        return (self.keys >> _SHIFT).astype(np.int64)

    @property
    def predicted_ids(self) -> np.ndarray:
        return (self.keys & _LOW).astype(np.int64)

    def classes(self) -> list[int]:
        """Every class id found in the label or in the prediction, ascending."""
        return sorted(set(self.label_ids.tolist()) | set(self.predicted_ids.tolist()))

    def tp_fp_fn(self, class_id: int) -> tuple[int, int, int]:
        """(true positives, false positives, false negatives) of ``class_id``, in voxels."""
        labels, predicted = self.label_ids, self.predicted_ids
        tp = int(self.counts[(labels == class_id) & (predicted == class_id)].sum())
        fp = int(self.counts[predicted == class_id].sum()) - tp
        fn = int(self.counts[labels == class_id].sum()) - tp
        return tp, fp, fn


def overlap_scores(tp: int, fp: int, fn: int) -> tuple[float, float]:
    """``(dice, iou)`` from voxel counts: ``2tp / (2tp + fp + fn)`` and ``tp / (tp + fp + fn)``; nan when all three
    are 0 (the class is in neither mask), 0 when the class is in only one (see the module's table)."""
    if tp + fp + fn == 0:
        return math.nan, math.nan
    return 2.0 * tp / (2.0 * tp + fp + fn), tp / (tp + fp + fn)


class BoundingBoxes:
    """The smallest box ``(z0, z1, y0, y1, x0, x1)`` (ends exclusive) holding a class's voxels in the label or the
    prediction, per class id, accumulated over z-slabs."""

    def __init__(self) -> None:
        self.boxes: dict[int, list[int]] = {}

    def add(self, class_id: int, mask: np.ndarray, z_offset: int = 0) -> None:
        """Widen ``class_id``'s box by the voxels of ``mask`` (a ``(d, H, W)`` bool slab starting at ``z_offset``)."""
        if not mask.any():
            return
        z = np.flatnonzero(mask.any(axis=(1, 2)))
        y = np.flatnonzero(mask.any(axis=(0, 2)))
        x = np.flatnonzero(mask.any(axis=(0, 1)))
        found = [z[0] + z_offset, z[-1] + 1 + z_offset, y[0], y[-1] + 1, x[0], x[-1] + 1]
        box = self.boxes.get(class_id)
        if box is None:
            self.boxes[class_id] = [int(v) for v in found]
        else:
            self.boxes[class_id] = [int(min(box[i], found[i])) if i % 2 == 0 else int(max(box[i], found[i]))
                                    for i in range(6)]

    def slices(self, class_id: int) -> tuple[slice, slice, slice] | None:
        box = self.boxes.get(class_id)
        return None if box is None else (slice(box[0], box[1]), slice(box[2], box[3]), slice(box[4], box[5]))


def _surface(mask: np.ndarray, planar: bool = False) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour (``planar``: a 4-neighbour in its z-slice) outside it (outside the
    array counts as outside the mask)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, 1)
    if planar:
        structure[0], structure[2] = False, False
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_points(mask: np.ndarray, rows: slice | None = None, planar: bool | None = None) -> np.ndarray:
    """The ``(z, y, x)`` indices (int64, ``(n, 3)``) of the surface voxels of ``mask``: its voxels with a 6-neighbour
    outside it, outside the array counting as outside the mask.

    Args:
        mask: a bool ``(d, h, w)`` mask.
        rows: only the surface voxels in these z-rows of ``mask`` (the others serve as their neighbours: a slab read
            with one row of halo on each side, whose indices are then relative to ``rows.start``). Default None: all.
        planar: take the surface within each z-slice (4-neighbours), as for 2D images: a one-slice volume ``(1, H,
            W)`` would otherwise be all surface. Default None: when ``mask`` has one z-slice and ``rows`` is None.
    """
    if planar is None:
        planar = rows is None and mask.shape[0] == 1
    padded = np.pad(np.asarray(mask, bool), 1)
    inner = (slice(1, -1),) * 3
    surface = _surface(padded, planar)[inner]
    if rows is not None:
        surface = surface[rows]
    return np.argwhere(surface)


def surface_distances(
    prediction: np.ndarray, label: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """``(distances from ∂P to ∂G, distances from ∂G to ∂P)``, one per surface voxel (in C order of the voxels), in
    ``voxel_size`` units, of two non-empty bool masks of one shape (outside them both are taken as empty)."""
    return point_distances(surface_points(prediction), surface_points(label), voxel_size)


def point_distances(
    points_p: np.ndarray, points_g: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """For two non-empty sets of surface voxel indices ``(n, 3)``: the distance of each voxel of ``points_p`` to the
    nearest of ``points_g``, and of each of ``points_g`` to the nearest of ``points_p``, in ``voxel_size`` units.

    Exact Euclidean distances between the voxel centres scaled by ``voxel_size``, found in k-d trees
    (``scipy.spatial.cKDTree``): what a Euclidean distance transform would give, and MONAI's CPU path. Memory: about
    100 bytes per surface voxel, nothing per voxel of the volume.
    """
    from scipy.spatial import cKDTree

    scale = np.asarray([float(v) for v in voxel_size], np.float64)
    scaled_p, scaled_g = points_p * scale, points_g * scale
    return cKDTree(scaled_g).query(scaled_p, k=1)[0], cKDTree(scaled_p).query(scaled_g, k=1)[0]


def distance_scores(
    prediction: np.ndarray, label: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0), tolerance: float = 1.0,
    planar: bool | None = None,
) -> dict[str, float]:
    """``{"hd95", "assd", "surface_dice"}`` of one class's masks (definitions and empty cases: module docstring).

    Args:
        prediction, label: bool masks of the class (the whole volume or a crop holding every voxel of both).
        voxel_size: voxel size per axis; distances are in its units. Default 1 on every axis.
        tolerance: the surface Dice's tolerance, in the same units. Default 1.0.
        planar: surfaces within z-slices (2D images stored as ``(1, H, W)``); see :func:`surface_points`. Default
            None: when the masks have one z-slice (give False for a one-slice crop of a 3D volume).
    """
    return surface_scores(surface_points(prediction, planar=planar), surface_points(label, planar=planar),
                          voxel_size, tolerance)


def surface_scores(
    points_p: np.ndarray, points_g: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0), tolerance: float = 1.0
) -> dict[str, float]:
    """:func:`distance_scores` from the surface voxels ``(n, 3)`` of the prediction and of the label (as
    :func:`surface_points` finds them, e.g. slab by slab); a mask is empty exactly when its surface is."""
    has_p, has_g = len(points_p) > 0, len(points_g) > 0
    if not has_p and not has_g:
        return {"hd95": math.nan, "assd": math.nan, "surface_dice": math.nan}
    if not has_p or not has_g:
        return {"hd95": math.inf, "assd": math.inf, "surface_dice": 0.0}
    to_label, to_prediction = point_distances(points_p, points_g, voxel_size)
    hd95 = max(float(np.percentile(to_label, 95)), float(np.percentile(to_prediction, 95)))
    both = np.concatenate([to_label, to_prediction])
    within = int((to_label <= tolerance).sum() + (to_prediction <= tolerance).sum())
    return {"hd95": hd95, "assd": float(both.mean()), "surface_dice": within / both.size}


def _reduce_pairs(first: np.ndarray, second: np.ndarray, weights: np.ndarray | None = None) -> tuple:
    """The distinct pairs ``(first[i], second[i])`` (uint64 ids of any size) and their summed ``weights`` (default:
    counts), by one lexicographic sort."""
    if first.size == 0:
        return first.astype(np.uint64), second.astype(np.uint64), np.zeros(0, np.int64)
    order = np.lexsort((second, first))
    first, second = first[order], second[order]
    starts = np.flatnonzero(np.r_[True, (first[1:] != first[:-1]) | (second[1:] != second[:-1])])
    if weights is None:
        sums = np.diff(np.r_[starts, first.size])
    else:
        sums = np.add.reduceat(weights[order], starts)
    return first[starts], second[starts], sums.astype(np.int64)


class InstanceCounts:
    """Overlap counts of truth objects and predicted instances, accumulated over pieces of a volume.

    Pairs ``(truth id, predicted id)`` with their voxel counts, over the voxels whose truth id is >= 0 (negative truth
    ids are ignored voxels: they count neither for the truth nor for the prediction). Ids are any non-negative
    integers up to 2**64 - 1. Memory: 24 bytes per distinct pair.
    """

    def __init__(self) -> None:
        self.truth = np.zeros(0, np.uint64)
        self.predicted = np.zeros(0, np.uint64)
        self.counts = np.zeros(0, np.int64)

    def update(self, truth: np.ndarray, prediction: np.ndarray) -> None:
        truth, prediction = np.asarray(truth), np.asarray(prediction)
        if truth.shape != prediction.shape:
            raise ValueError(f"truth shape {truth.shape} differs from the prediction's {prediction.shape}")
        if np.issubdtype(truth.dtype, np.signedinteger):
            keep = truth >= 0
            truth, prediction = truth[keep], prediction[keep]
        if prediction.size and np.issubdtype(prediction.dtype, np.signedinteger) and int(prediction.min()) < 0:
            raise ValueError(f"predicted instance ids must be >= 0, got {int(prediction.min())}")
        truth, prediction = truth.ravel().astype(np.uint64), prediction.ravel().astype(np.uint64)
        if truth.size and max(int(truth.max()), int(prediction.max())) < 2**32:
            # Ids that fit in 32 bits: one 64-bit key per voxel, counted by np.unique.
            keys, counts = np.unique(_pack(truth, prediction), return_counts=True)
            t, p = keys >> _SHIFT, keys & _LOW
        else:
            t, p, counts = _reduce_pairs(truth, prediction)
        self.truth, self.predicted, self.counts = _reduce_pairs(
            np.concatenate([self.truth, t]), np.concatenate([self.predicted, p]),
            np.concatenate([self.counts, counts.astype(np.int64)]),
        )

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(truth ids, predicted ids, voxel counts)`` of every pair found (ids as uint64)."""
        return self.truth, self.predicted, self.counts


def _sizes(ids: np.ndarray, counts: np.ndarray) -> dict[int, int]:
    unique, inverse = np.unique(ids, return_inverse=True)
    return dict(zip(unique.tolist(), np.bincount(inverse, weights=counts).astype(np.int64).tolist()))


def matched_pairs(truth: np.ndarray, predicted: np.ndarray, iou: np.ndarray, threshold: float) -> int:
    """The number of pairs of the largest one-to-one matching among the pairs with ``iou >= threshold``.

    Args:
        truth, predicted: ids of the candidate pairs (each pair once).
        iou: their IoU.
        threshold: the IoU a pair needs to be matched.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    keep = iou >= threshold
    if not keep.any():
        return 0
    t_ids, rows = np.unique(truth[keep], return_inverse=True)
    s_ids, cols = np.unique(predicted[keep], return_inverse=True)
    graph = csr_matrix((np.ones(rows.size, np.int8), (rows.ravel(), cols.ravel())), shape=(t_ids.size, s_ids.size))
    match = maximum_bipartite_matching(graph, perm_type="column")
    return int((match >= 0).sum())


def instance_scores(counts: InstanceCounts, thresholds: Sequence[float] = MAP_THRESHOLDS) -> dict[str, float]:
    """``{"arand", "ap50", "map", "precision", "recall"}`` of accumulated overlaps (definitions: module docstring).

    Args:
        counts: the overlaps of the whole volume.
        thresholds: IoU thresholds averaged by ``map``; the first must be 0.5 (``ap50``, ``precision``, ``recall``).
            Default 0.50, 0.55, ..., 0.95.
    """
    t, s, n = counts.pairs()
    # Adapted Rand error over the truth's object voxels, in pairs of distinct voxels (scikit-image's form); predicted
    # background inside objects as singletons (CREMI's rule), which are in no pair of the prediction.
    objects = t > 0
    n_obj, assigned = n[objects].astype(np.float64), s[objects] > 0
    a = np.bincount(np.unique(t[objects], return_inverse=True)[1].ravel(), weights=n_obj) if n_obj.size else n_obj
    b = np.bincount(np.unique(s[objects][assigned], return_inverse=True)[1].ravel(), weights=n_obj[assigned]) \
        if assigned.any() else np.zeros(0)
    joint = float((n_obj[assigned] * (n_obj[assigned] - 1)).sum())
    sum_a, sum_b = float((a * (a - 1)).sum()), float((b * (b - 1)).sum())
    # 1 - F with F = 2PR / (P + R), P = joint / sum_b, R = joint / sum_a, which is 2 joint / (sum_a + sum_b).
    arand = 1.0 - 2.0 * joint / (sum_a + sum_b) if sum_a + sum_b > 0 else math.nan
    truth_sizes = _sizes(t[objects], n[objects])
    predicted = s > 0
    predicted_sizes = _sizes(s[predicted], n[predicted])
    overlap = objects & predicted
    pt, ps, pn = t[overlap], s[overlap], n[overlap]
    union = np.array([truth_sizes[a] + predicted_sizes[b] for a, b in zip(pt.tolist(), ps.tolist())], float) - pn
    iou = pn / union if pn.size else np.zeros(0)
    n_truth, n_predicted = len(truth_sizes), len(predicted_sizes)
    aps = []
    tp50 = 0
    for k, threshold in enumerate(thresholds):
        tp = matched_pairs(pt, ps, iou, threshold)
        if k == 0:
            tp50 = tp
        denominator = n_truth + n_predicted - tp  # TP + FP + FN
        aps.append(tp / denominator if denominator else math.nan)
    return {
        "arand": arand,
        "ap50": aps[0],
        "map": float(np.mean(aps)) if n_truth + n_predicted else math.nan,
        "precision": tp50 / n_predicted if n_predicted else math.nan,
        "recall": tp50 / n_truth if n_truth else math.nan,
    }


def mean_scores(scores: Iterable[Mapping[str, float]], names: Sequence[str]) -> dict[str, float]:
    """The mean of each metric in ``names`` over ``scores`` (one mapping per volume), nan left out (a volume without
    the class), inf kept; nan when no volume has a number for it."""
    scores = list(scores)
    means: dict[str, float] = {}
    for name in names:
        values = [float(s[name]) for s in scores if name in s and not math.isnan(float(s[name]))]
        means[name] = float(np.mean(values)) if values else math.nan
    return means


def plain_number(value: Any) -> Any:
    """A metric for JSON, which has no nan or inf: nan -> None (null), ±inf -> ``"inf"`` / ``"-inf"``."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value
