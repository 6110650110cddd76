"""Adapted Rand error and average precision against hand-counted cases; instances from boundary/affinity maps."""

import numpy as np
import pytest

from unet3d_lightning.data.demo_cells import cells_volume
from unet3d_lightning.data.targets import affinities, boundaries, relabel
from unet3d_lightning.instances import (
    WatershedOptions,
    adapted_rand_error,
    average_precision,
    boundary_evidence,
    components_instances,
    instance_scores,
    watershed_instances,
)


def slabs(*widths: int, ids=None) -> np.ndarray:
    """(2, 4, sum(widths)) volume cut along x into slabs of the given widths, ids 1, 2, ... (or ``ids``)."""
    ids = ids or list(range(1, len(widths) + 1))
    dtype = np.uint64 if max(ids) >= 2**63 else np.int64
    return np.concatenate([np.full((2, 4, w), i, dtype) for w, i in zip(widths, ids)], axis=2)


def test_identical_segmentations_with_other_ids():
    truth = slabs(3, 3, ids=[5, 2**40])
    segmentation = slabs(3, 3, ids=[7, 1])
    assert adapted_rand_error(truth, segmentation) == 0.0
    assert average_precision(truth, segmentation) == 1.0


def test_one_merge_of_two_objects():
    # p = (1/2, 1/2) in one segment: sum p^2 = 1/2, sum a^2 = 1/2, sum b^2 = 1 -> P = 1/2, R = 1, F = 2/3.
    truth, merged = slabs(3, 3), slabs(6)
    assert adapted_rand_error(truth, merged) == pytest.approx(1 / 3)
    # The merged segment overlaps each object with IoU 24/48 = 0.5, not above 0.5: 0 TP, 1 FP, 2 FN.
    assert average_precision(truth, merged) == 0.0
    # Three objects, the last two merged: sum p^2 = 3/9, sum a^2 = 3/9, sum b^2 = 1/9 + 4/9 -> P = 3/5, R = 1.
    truth, merged = slabs(2, 2, 2), slabs(2, 4)
    assert adapted_rand_error(truth, merged) == pytest.approx(1 - 2 * 0.6 / 1.6)
    assert average_precision(truth, merged) == pytest.approx(1 / 4)  # 1 TP, 1 FP, 2 FN


def test_one_split_of_an_object():
    # Object 2 (3 of 6 columns) split 1 + 2: p = (1/2, 1/6, 1/3): sum p^2 = 14/36 = sum b^2, sum a^2 = 1/2.
    truth, split = slabs(3, 3), slabs(3, 1, 2)
    recall = (14 / 36) / 0.5
    assert adapted_rand_error(truth, split) == pytest.approx(1 - 2 * recall / (1 + recall))
    assert adapted_rand_error(split, truth) == pytest.approx(adapted_rand_error(truth, split))  # P and R swap
    # Object 2 matches the 2-column part (IoU 16/24), the 1-column part is a false positive: 2 TP, 1 FP.
    assert average_precision(truth, split) == pytest.approx(2 / 3)


def test_unassigned_voxels_are_singletons_and_background_or_ignored_truth_is_left_out():
    truth = np.array([[[1, 1, 1, 1, 0, 0, -1]]])
    segmentation = np.array([[[3, 3, 0, 0, 3, 4, 4]]])
    # Over the 4 object voxels: p = 1/2 (segment 3) + two singletons of 1/4: sum p^2 = 1/4 + 2/16 = sum b^2,
    # sum a^2 = 1 -> P = 1, R = 3/8, F = 6/11.
    assert adapted_rand_error(truth, segmentation) == pytest.approx(5 / 11)
    # AP: IoU(object, segment 3) over the non-ignored voxels = 2 / (4 + 3 - 2) = 0.4: 0 TP, 2 FP (3 and 4), 1 FN.
    assert average_precision(truth, segmentation) == 0.0
    assert average_precision(truth, np.array([[[3, 3, 3, 0, 0, 0, 4]]])) == 1.0  # 3/4 IoU; 4 only on ignored


def test_empty_cases():
    empty = np.zeros((2, 2, 2), np.int64)
    assert adapted_rand_error(empty, empty) == 0.0 and average_precision(empty, empty) == 1.0
    assert average_precision(empty, np.ones_like(empty)) == 0.0


def test_components_recover_touching_cubes_from_their_boundaries_and_affinities():
    truth = slabs(3, 3, ids=[2**63 + 1, 4])
    ids = relabel(truth.astype(np.uint64))
    # A model predicts affinities at the far faces too (only training masks them): derive them from the label
    # extended by one voxel, as if the volume went on.
    beyond = affinities(np.pad(ids, 1, mode="edge"))[:, 1:-1, 1:-1, 1:-1]
    for spec, maps in (({"kind": "boundaries"}, boundaries(ids)),
                       ({"kind": "affinities", "offsets": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}, beyond)):
        boundary, foreground = boundary_evidence(maps, spec)
        segmentation = components_instances(boundary, foreground)
        assert adapted_rand_error(ids, segmentation) == 0.0, spec
        assert instance_scores(maps, ids, spec) == (0.0, 1.0)


def test_watershed_recovers_clean_synthetic_cells():
    raw, label = cells_volume((24, 32, 32), np.random.default_rng(3), cell_size=12.0, noise=0.0)
    truth = relabel(label)
    # The clean raw is the blurred membrane map: a stand-in for a perfect boundary prediction.
    segmentation = watershed_instances(raw)
    assert segmentation.dtype == np.int64 and segmentation.min() >= 1
    assert average_precision(truth, segmentation) >= 0.9
    assert adapted_rand_error(truth, segmentation) < 0.1
    # A foreground mask keeps background out of every instance; min_size removes the small ones.
    foreground = np.ones(truth.shape, bool)
    foreground[:, :, :4] = False
    masked = watershed_instances(raw, foreground, WatershedOptions(min_size=50))
    assert (masked[:, :, :4] == 0).all() and (masked[:, :, 4:] > 0).all()
    assert np.bincount(masked.ravel())[1:].min() >= 50


def test_a_missing_instances_extra_is_one_line_naming_it(monkeypatch):
    import sys

    from unet3d_lightning.errors import ConfigurationError
    from unet3d_lightning.instances import require_instances_extra

    require_instances_extra("prediction.instances")  # installed here: nothing to say
    monkeypatch.setitem(sys.modules, "skimage", None)  # what an environment without scikit-image imports
    with pytest.raises(ConfigurationError, match=r"prediction.instances needs scikit-image, from the optional "
                       r"'instances' extra: pip install 'unet3d-lightning\[instances\]'"):
        require_instances_extra("prediction.instances")
