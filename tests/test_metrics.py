"""The whole-volume metric core against MONAI (Dice, IoU, HD95, ASSD, surface Dice), scikit-image (adapted Rand) and a
hand-counted instance case (AP, precision, recall)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from unet3d_lightning.metrics import (
    BoundingBoxes,
    ConfusionCounts,
    InstanceCounts,
    distance_scores,
    instance_scores,
    mean_scores,
    overlap_scores,
)

from monai import metrics as monai_metrics  # noqa: E402 - the oracle (dev extra)


def random_classes(shape, seed, classes=3):
    """Class ids 0..classes-1 from a smoothed random field: blobs of several sizes, some touching the border."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    edges = np.quantile(field, np.linspace(0, 1, classes + 1)[1:-1] + rng.uniform(-0.1, 0.1, classes - 1))
    return np.digitize(field, np.sort(edges)).astype(np.int64)


def one_hot(ids, classes):
    return torch.as_tensor(np.stack([ids == c for c in range(classes)])[None]).float()


def scores_by_slabs(label, prediction, voxel_size, tolerance, slab=5):
    """Our metrics as evaluate computes them: counts by z-slabs, distances on each class's bounding box."""
    counts, boxes = ConfusionCounts(), BoundingBoxes()
    for z0 in range(0, label.shape[0], slab):
        lab, pred = label[z0:z0 + slab], prediction[z0:z0 + slab]
        counts.update(lab, pred)
        for c in np.unique(np.concatenate([lab.ravel(), pred.ravel()])):
            boxes.add(int(c), (lab == c) | (pred == c), z0)
    out = {}
    for c in counts.classes():
        dice, iou = overlap_scores(*counts.tp_fp_fn(c))
        box = boxes.slices(c)
        out[c] = {"dice": dice, "iou": iou,
                  **distance_scores(prediction[box] == c, label[box] == c, voxel_size, tolerance)}
    return out


@pytest.mark.parametrize("voxel_size", [(1.0, 1.0, 1.0), (2.5, 0.7, 1.3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_dice_iou_hd95_assd_surface_dice_equal_monai(seed, voxel_size):
    shape = (18, 22, 25)
    label = random_classes(shape, seed)
    prediction = random_classes(shape, seed + 100)  # an independent field: poor, irregular overlaps
    prediction[label == 2] = np.where(np.random.default_rng(seed).random((label == 2).sum()) < 0.8, 2, 1)
    tolerance = 1.5
    ours = scores_by_slabs(label, prediction, voxel_size, tolerance)
    P, G = one_hot(prediction, 3), one_hot(label, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = {
            "dice": monai_metrics.compute_dice(P, G, include_background=True)[0],
            "iou": monai_metrics.compute_iou(P, G, include_background=True)[0],
            "hd95": monai_metrics.compute_hausdorff_distance(P, G, include_background=True, percentile=95,
                                                             spacing=list(voxel_size))[0],
            "assd": monai_metrics.compute_average_surface_distance(P, G, include_background=True, symmetric=True,
                                                                    spacing=list(voxel_size))[0],
            "surface_dice": monai_metrics.compute_surface_dice(P, G, [tolerance] * 3, include_background=True,
                                                               spacing=list(voxel_size))[0],
        }
    assert sorted(ours) == [0, 1, 2]
    for name, values in expected.items():
        for c in range(3):
            assert ours[c][name] == pytest.approx(float(values[c]), rel=1e-5, abs=1e-6), (name, c)
    # Not trivially equal: the classes differ in score, and anisotropy changes the distances.
    assert len({round(ours[c]["hd95"], 3) for c in range(3)}) > 1


def test_one_slice_volumes_are_scored_as_2d_images_as_monai_scores_them():
    label = random_classes((1, 30, 34), 11)
    prediction = random_classes((1, 30, 34), 12)
    spacing = [0.5, 1.5]
    P, G = one_hot(prediction[0], 3), one_hot(label[0], 3)  # (1, C, H, W): MONAI's 2D images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd95 = monai_metrics.compute_hausdorff_distance(P, G, include_background=True, percentile=95, spacing=spacing)
        nsd = monai_metrics.compute_surface_dice(P, G, [1.0] * 3, include_background=True, spacing=spacing)
    for c in range(3):
        ours = distance_scores(prediction == c, label == c, (1.0, *spacing), tolerance=1.0)
        assert ours["hd95"] == pytest.approx(float(hd95[0, c]), rel=1e-5)
        assert ours["surface_dice"] == pytest.approx(float(nsd[0, c]), rel=1e-5)


def test_distances_are_the_same_on_the_bounding_box_as_on_the_whole_volume():
    label = np.zeros((30, 30, 30), bool)
    prediction = np.zeros_like(label)
    label[10:16, 8:14, 5:12] = True
    prediction[11:18, 9:15, 6:12] = True
    box = (slice(10, 18), slice(8, 15), slice(5, 12))
    assert distance_scores(prediction[box], label[box], (2, 1, 1)) == pytest.approx(
        distance_scores(prediction, label, (2, 1, 1)))


def test_empty_masks_follow_the_stated_conventions():
    empty = np.zeros((6, 6, 6), bool)
    cube = empty.copy()
    cube[1:4, 1:4, 1:4] = True
    both_empty = distance_scores(empty, empty)
    assert all(math.isnan(v) for v in both_empty.values())
    assert all(math.isnan(v) for v in overlap_scores(0, 0, 0))
    for prediction, label in ((cube, empty), (empty, cube)):  # false positive, missed
        assert distance_scores(prediction, label) == {"hd95": math.inf, "assd": math.inf, "surface_dice": 0.0}
    assert overlap_scores(0, 27, 0) == (0.0, 0.0)
    assert overlap_scores(0, 0, 27) == (0.0, 0.0)
    # MONAI agrees where it defines the case: a missed class scores 0, a false positive 0 with ignore_empty=False.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P, G = one_hot(cube.astype(int), 2), one_hot(empty.astype(int), 2)
        assert float(monai_metrics.compute_dice(P, G, ignore_empty=False)[0, 1]) == 0.0
        assert float(monai_metrics.compute_average_surface_distance(G, P, symmetric=True)[0, 0]) == math.inf
        assert float(monai_metrics.compute_surface_dice(G, P, [1.0])[0, 0]) == 0.0
        assert math.isnan(float(monai_metrics.compute_surface_dice(G, G, [1.0])[0, 0]))


def test_ignored_label_voxels_count_nowhere():
    label = np.array([[[0, 1, 1, 5, 5]]])
    prediction = np.array([[[1, 1, 0, 1, 0]]])
    counts = ConfusionCounts(ignore_index=5)
    counts.update(label, prediction)
    assert counts.tp_fp_fn(1) == (1, 1, 1)
    assert counts.classes() == [0, 1]


def test_mean_leaves_nan_out_and_keeps_inf():
    assert mean_scores([{"dice": 0.5}, {"dice": math.nan}, {"dice": 1.0}], ["dice"]) == {"dice": 0.75}
    assert mean_scores([{"hd95": 1.0}, {"hd95": math.inf}], ["hd95"]) == {"hd95": math.inf}
    assert math.isnan(mean_scores([{"dice": math.nan}], ["dice"])["dice"])


def instances_of(truth, prediction, slab=2):
    counts = InstanceCounts()
    for z0 in range(0, truth.shape[0], slab):
        counts.update(truth[z0:z0 + slab], prediction[z0:z0 + slab])
    return instance_scores(counts)


def test_arand_equals_scikit_image_adapted_rand_error():
    from skimage.metrics import adapted_rand_error

    rng = np.random.default_rng(3)
    truth = random_classes((12, 16, 16), 4, classes=5).astype(np.int64)  # 0 background, 1..4 objects
    prediction = random_classes((12, 16, 16), 5, classes=6).astype(np.int64)
    prediction[rng.random(truth.shape) < 0.1] = 0  # unassigned voxels, some inside objects
    ours = instances_of(truth, prediction)["arand"]
    # CREMI counts each unassigned voxel as a segment of its own; scikit-image does when each carries its own id.
    singletons = prediction.copy()
    zeros = singletons == 0
    singletons[zeros] = prediction.max() + 1 + np.arange(zeros.sum())
    expected, _, _ = adapted_rand_error(truth, singletons)
    assert ours == pytest.approx(expected, rel=1e-9)
    # Without unassigned voxels inside objects the two rules coincide directly.
    assigned = np.where(zeros, 1, prediction)
    assert instances_of(truth, assigned)["arand"] == pytest.approx(adapted_rand_error(truth, assigned)[0], rel=1e-9)
    assert 0.05 < ours < 1


def test_ap_precision_recall_on_a_hand_made_merge_split_missed_case():
    """Truth: five objects A..E of 8 voxels each (1x1x8 rows), ignored voxels on a sixth row.

    - A: predicted exactly (IoU 1) -> TP at every threshold;
    - B: predicted 6 of 8 voxels, nothing else (IoU 6/8 = 0.75) -> TP for t <= 0.75;
    - C and D: merged into one instance covering both (IoU 8/16 = 0.5 with each) -> at t = 0.5 one match (one-to-one),
      the other object unmatched; no match above 0.5;
    - E: split into two halves of 4 (IoU 0.5 each) -> one match at t = 0.5, none above;
    - a missed object: none (E's halves cover it); a false instance F of 3 voxels in the background;
    - the ignored row (truth -1) is covered by B's instance too: those voxels count nowhere.

    t = 0.5: matches A, B, C|D, one half of E: TP 4; predictions A, B, CD, E1, E2, F = 6 -> FP 2; truth 5 -> FN 1.
    ap50 = 4 / (4 + 2 + 1) = 4/7; precision 4/6; recall 4/5.
    t in 0.55 .. 0.75 (5 thresholds): TP 2 (A, B): 2 / (2 + 4 + 3) = 2/9; t in 0.8 .. 0.95 (4): TP 1: 1 / 10.
    map = (4/7 + 5 * 2/9 + 4 * 1/10) / 10.
    """
    truth = np.zeros((1, 8, 8), np.int64)
    prediction = np.zeros_like(truth)
    for i in range(5):
        truth[0, i] = i + 1  # rows: A=1, B=2, C=3, D=4, E=5
    truth[0, 5] = -1
    prediction[0, 0] = 10  # A
    prediction[0, 1, :6] = 20  # B, 6 of 8
    prediction[0, 5] = 20  # B's instance also over the ignored row: left out
    prediction[0, 2:4] = 30  # C and D merged
    prediction[0, 4, :4], prediction[0, 4, 4:] = 40, 41  # E split
    prediction[0, 7, :3] = 50  # F, false positive in the background
    scores = instances_of(truth, prediction, slab=1)
    assert scores["ap50"] == pytest.approx(4 / 7)
    assert scores["precision"] == pytest.approx(4 / 6)
    assert scores["recall"] == pytest.approx(4 / 5)
    assert scores["map"] == pytest.approx((4 / 7 + 5 * 2 / 9 + 4 / 10) / 10)


def test_instance_metrics_of_a_perfect_and_an_empty_prediction():
    truth = np.zeros((2, 6, 6), np.int64)
    truth[:, :3] = 1
    truth[:, 3:5] = 2
    perfect = instances_of(truth, truth * 7)
    assert perfect == pytest.approx({"arand": 0.0, "ap50": 1.0, "map": 1.0, "precision": 1.0, "recall": 1.0})
    none = instances_of(truth, np.zeros_like(truth))
    assert none["ap50"] == 0.0 and none["recall"] == 0.0 and math.isnan(none["precision"])
    nothing = instances_of(np.zeros_like(truth), np.zeros_like(truth))
    assert all(math.isnan(v) for v in nothing.values())


def test_instance_ids_beyond_32_bits_score_as_their_relabelled_copies():
    truth = random_classes((6, 10, 10), 7, classes=4).astype(np.uint64)
    prediction = random_classes((6, 10, 10), 8, classes=5).astype(np.uint64)
    big_truth = np.where(truth > 0, truth * np.uint64(2**61) + np.uint64(12345), 0).astype(np.uint64)
    big_prediction = np.where(prediction > 0, prediction + np.uint64(2**63), 0).astype(np.uint64)
    small, big = instances_of(truth, prediction), instances_of(big_truth, big_prediction)
    assert big == pytest.approx(small, nan_ok=True)
    assert 0 < small["arand"] < 1
