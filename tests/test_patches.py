"""Tests of the patch grid: coverage and start rules on random cases, hand-worked examples, order, errors."""

from __future__ import annotations

import random

import numpy as np
import pytest

from unet3d_lightning.data.patches import padded_shape, patch_grid, patch_starts
from unet3d_lightning.errors import ConfigurationError


def test_patch_starts_properties_on_random_cases():
    rng = random.Random(1234)
    for _ in range(500):
        patch = rng.randint(1, 40)
        stride = rng.randint(1, patch)
        size = rng.randint(patch, 200)
        starts = patch_starts(size, patch, stride)
        context = f"size={size} patch={patch} stride={stride} starts={starts}"

        covered = np.zeros(size, dtype=bool)
        for start in starts:
            assert 0 <= start and start + patch <= size, context
            covered[start : start + patch] = True
        assert covered.all(), context
        assert starts[0] == 0, context
        assert starts[-1] == size - patch, context
        assert len(set(starts)) == len(starts), context
        assert all(b > a for a, b in zip(starts, starts[1:])), context
        # Every step is the stride except possibly the last one (the snapped start), which is shorter.
        steps = [b - a for a, b in zip(starts, starts[1:])]
        assert all(step == stride for step in steps[:-1]), context
        if steps:
            assert 0 < steps[-1] <= stride, context
        # Nothing is wasted: the number of starts is the minimum the rule allows.
        expected_count = (size - patch) // stride + 1 + (1 if (size - patch) % stride else 0)
        assert len(starts) == expected_count, context


def test_patch_grid_covers_every_voxel_on_random_cases():
    rng = random.Random(99)
    for _ in range(60):
        patch_shape = [rng.randint(1, 9) for _ in range(3)]
        stride_shape = [rng.randint(1, p) for p in patch_shape]
        shape = [rng.randint(p, 20) for p in patch_shape]
        grid = patch_grid(shape, patch_shape, stride_shape)
        coverage = np.zeros(shape, dtype=np.int32)
        for zs, ys, xs in grid:
            assert (zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start) == tuple(patch_shape)
            coverage[zs, ys, xs] += 1
        context = f"shape={shape} patch={patch_shape} stride={stride_shape}"
        assert (coverage > 0).all(), context
        assert len(set((zs.start, ys.start, xs.start) for zs, ys, xs in grid)) == len(grid), context


@pytest.mark.parametrize(
    "size, patch, stride, expected",
    [
        (10, 4, 3, [0, 3, 6]),  # 6 + 4 == 10 exactly: no snap
        (10, 4, 4, [0, 4, 6]),  # 4 + 4 == 8 < 10: snap to 6
        (10, 4, 2, [0, 2, 4, 6]),
        (10, 4, 1, [0, 1, 2, 3, 4, 5, 6]),
        (10, 10, 5, [0]),  # a single patch spanning the axis
        (11, 5, 5, [0, 5, 6]),
        (7, 1, 1, [0, 1, 2, 3, 4, 5, 6]),
        (64, 32, 16, [0, 16, 32]),
        (70, 32, 16, [0, 16, 32, 38]),
    ],
)
def test_patch_starts_examples(size, patch, stride, expected):
    assert patch_starts(size, patch, stride) == expected


def test_patch_grid_is_z_major_with_expected_slices():
    grid = patch_grid((6, 4, 5), (4, 4, 3), (2, 4, 2))
    # z starts [0, 2], y starts [0], x starts [0, 2]: z slowest, x fastest.
    expected = [
        (slice(0, 4), slice(0, 4), slice(0, 3)),
        (slice(0, 4), slice(0, 4), slice(2, 5)),
        (slice(2, 6), slice(0, 4), slice(0, 3)),
        (slice(2, 6), slice(0, 4), slice(2, 5)),
    ]
    assert grid == expected


def test_patch_grid_order_matches_c_order_of_start_lists():
    shape, patch, stride = (9, 7, 8), (4, 3, 5), (3, 2, 2)
    grid = patch_grid(shape, patch, stride)
    z_starts, y_starts, x_starts = [0, 3, 5], [0, 2, 4], [0, 2, 3]
    expected = [(z, y, x) for z in z_starts for y in y_starts for x in x_starts]
    assert [(zs.start, ys.start, xs.start) for zs, ys, xs in grid] == expected
    z_sequence = [zs.start for zs, _, _ in grid]
    assert z_sequence == sorted(z_sequence)


def test_patch_grid_accepts_numpy_integers():
    grid = patch_grid(np.array([4, 4, 4]), (np.int64(2), 2, 2), [2, 2, 2])
    assert len(grid) == 8
    assert all(isinstance(s.start, int) for triple in grid for s in triple)


def test_stride_larger_than_patch_is_rejected():
    with pytest.raises(ValueError, match=r"stride 40 > patch 32 .*uncovered"):
        patch_starts(100, 32, 40)


def test_volume_smaller_than_patch_is_rejected():
    with pytest.raises(ValueError, match=r"volume size 20 is smaller than the patch 32"):
        patch_starts(20, 32, 16)


@pytest.mark.parametrize(
    "patch, stride, needle", [(0, 1, "patch size 0"), (4, 0, "stride 0"), (-3, 1, "patch size -3")]
)
def test_non_positive_patch_or_stride_is_rejected(patch, stride, needle):
    with pytest.raises(ValueError, match=needle):
        patch_starts(10, patch, stride)


def test_non_integer_values_are_rejected():
    with pytest.raises(ValueError, match="integer"):
        patch_starts(10, 4.0, 2)
    with pytest.raises(ValueError, match="integer"):
        patch_grid((10, 10, 10.5), (4, 4, 4), (2, 2, 2))


@pytest.mark.parametrize("axis, shape", [("z", (20, 64, 64)), ("y", (64, 20, 64)), ("x", (64, 64, 20))])
def test_patch_grid_names_the_axis_too_small(axis, shape):
    with pytest.raises(ValueError, match=rf"volume size 20 is smaller than the patch 32 along axis {axis}"):
        patch_grid(shape, (32, 32, 32), (16, 16, 16))


def test_patch_grid_names_the_axis_of_a_bad_stride():
    with pytest.raises(ValueError, match=r"stride 40 > patch 32 along axis y"):
        patch_grid((64, 64, 64), (32, 32, 32), (16, 40, 16))


@pytest.mark.parametrize(
    "shape, patch, stride, name",
    [
        ((64, 64), (32, 32, 32), (16, 16, 16), "shape"),
        ((64, 64, 64), (32, 32, 32, 32), (16, 16, 16), "patch_shape"),
        ((64, 64, 64), (32, 32, 32), (16,), "stride_shape"),
    ],
)
def test_patch_grid_rejects_wrong_lengths(shape, patch, stride, name):
    with pytest.raises(ValueError, match=rf"^{name} .*3 entries"):
        patch_grid(shape, patch, stride)


def test_errors_are_configuration_errors():
    with pytest.raises(ConfigurationError):
        patch_grid((8, 8, 8), (4, 4, 4), (5, 4, 4))


def test_padded_shape():
    assert padded_shape((20, 64, 10), (32, 32, 32)) == (32, 64, 32)
    assert padded_shape((40, 50, 60), (32, 32, 32)) == (40, 50, 60)
    assert padded_shape((1, 1, 1), (4, 5, 6)) == (4, 5, 6)
    assert isinstance(padded_shape([5, 5, 5], [4, 4, 4]), tuple)


def test_padded_shape_then_grid_has_single_start_on_small_axes():
    shape, patch, stride = (20, 64, 10), (32, 32, 32), (16, 16, 16)
    grid = patch_grid(padded_shape(shape, patch), patch, stride)
    assert sorted({zs.start for zs, _, _ in grid}) == [0]
    assert sorted({ys.start for _, ys, _ in grid}) == [0, 16, 32]
    assert sorted({xs.start for _, _, xs in grid}) == [0]


def test_padded_shape_rejects_bad_input():
    with pytest.raises(ValueError, match="3 entries"):
        padded_shape((4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="patch size 0 along axis x"):
        padded_shape((4, 4, 4), (2, 2, 0))
    with pytest.raises(ValueError, match="volume size 0 along axis z"):
        padded_shape((0, 4, 4), (2, 2, 2))
