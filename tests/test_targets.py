"""Boundary and affinity targets from instance labels, checked on hand-made label arrays."""

import numpy as np
import pytest
import torch
from skimage.segmentation import find_boundaries

from unet3d_lightning.data.targets import (
    IGNORED_ID,
    MASKED,
    LabelTransform,
    TargetOptions,
    affinities,
    boundaries,
    relabel,
)
from unet3d_lightning.data.transforms import (
    ElasticDeformation,
    GaussianNoise,
    RandomFlip,
    RandomIntensity,
    RandomRotate90,
)
from unet3d_lightning.errors import ConfigurationError


def two_cubes(gap: bool = False) -> np.ndarray:
    """(4, 4, 6): cube id 5 in x 0-2 touching cube id 9 in x 3-5; with ``gap`` a background column at x = 3."""
    label = np.zeros((4, 4, 6), np.int64)
    label[:, :, :3] = 5
    label[:, :, 3:] = 9
    if gap:
        label[:, :, 3] = 0
    return label


def test_boundaries_of_two_touching_cubes_mark_both_sides_of_the_contact():
    target = boundaries(two_cubes())
    assert target.shape == (1, 4, 4, 6) and target.dtype == np.float32
    expected = np.zeros((4, 4, 6), np.float32)
    expected[:, :, 2:4] = 1  # the two voxel planes that touch, x = 2 (id 5) and x = 3 (id 9)
    np.testing.assert_array_equal(target[0], expected)


def test_boundaries_equal_scikit_image_thick_boundaries():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (6, 7, 8))
    np.testing.assert_array_equal(
        boundaries(label)[0] == 1, find_boundaries(label, connectivity=1, mode="thick")
    )


def test_background_gap_and_background_boundaries_switch():
    label = two_cubes(gap=True)
    with_background = boundaries(label)[0]
    # Object 5 ends at x = 2, background at x = 3, object 9 starts at x = 4: all three planes touch another id.
    assert with_background[:, :, 2:5].min() == 1 and with_background[:, :, [0, 1, 5]].max() == 0
    without = boundaries(label, background_boundaries=False)[0]
    assert without.max() == 0  # the objects never touch each other


def test_thicken_and_foreground_channel():
    target = boundaries(two_cubes(), thicken=1, foreground_channel=True)
    assert target.shape == (2, 4, 4, 6)
    expected = np.zeros((4, 4, 6), np.float32)
    expected[:, :, 1:5] = 1  # x = 2..3 grown by one voxel on each side
    np.testing.assert_array_equal(target[0], expected)
    np.testing.assert_array_equal(target[1], np.ones((4, 4, 6)))
    gap = boundaries(two_cubes(gap=True), foreground_channel=True)[1]
    assert gap[:, :, 3].max() == 0 and gap[:, :, [0, 1, 2, 4, 5]].min() == 1


def test_ignore_label_is_masked_and_makes_no_boundary():
    label = two_cubes()
    label[:, :, 3] = 7  # unknown voxels between the cubes
    target = boundaries(label, ignore_label=7, foreground_channel=True)
    assert (target[:, :, :, 3] == MASKED).all()
    # Neither neighbour of the ignored plane is a boundary: what lies behind it is unknown.
    assert target[0][:, :, [0, 1, 2, 4, 5]].max() == 0
    assert target[1][:, :, [0, 1, 2, 4, 5]].min() == 1


def test_ids_above_two_to_the_32_and_63():
    small = two_cubes()
    huge = np.where(small == 5, np.uint64(2**32 + 5), np.uint64(2**63 + 9)).astype(np.uint64)
    np.testing.assert_array_equal(boundaries(huge), boundaries(small))
    np.testing.assert_array_equal(affinities(huge), affinities(small))
    # 2**32 + 5 and 5 must stay different ids after the int64 relabelling (they would collide in 32 bits).
    mixed = np.where(small == 5, np.uint64(2**32 + 5), np.uint64(5))
    ids = relabel(mixed)
    assert ids.dtype == np.int64 and set(np.unique(ids)) == {1, 2}
    np.testing.assert_array_equal(boundaries(ids), boundaries(small))


def test_relabel_maps_background_ignore_and_keeps_equality():
    label = np.array([[[0, 2**64 - 1, 2**40, 2**40, 7]]], np.uint64)
    np.testing.assert_array_equal(relabel(label, ignore_label=7), [[[0, 2, 1, 1, IGNORED_ID]]])
    # An ignore id the dtype cannot hold matches nothing instead of failing.
    np.testing.assert_array_equal(relabel(label, ignore_label=-1), [[[0, 3, 2, 2, 1]]])


def test_nearest_neighbour_affinities_of_two_touching_cubes():
    target = affinities(two_cubes())
    assert target.shape == (3, 4, 4, 6)
    z, y, x = target
    # v and v + (1, 0, 0): the last z plane has no neighbour inside the patch; it is masked, not 0.
    assert (z[3] == MASKED).all() and (z[:3] == 1).all()
    assert (y[:, 3] == MASKED).all() and (y[:, :3] == 1).all()
    assert (x[:, :, 5] == MASKED).all()
    np.testing.assert_array_equal(x[0, 0, :5], [1, 1, 0, 1, 1])  # the 5 | 9 contact between x = 2 and 3


def test_affinities_background_gap_long_offset_and_ignore():
    label = two_cubes(gap=True)
    x = affinities(label, [[0, 0, 1]])[0]
    np.testing.assert_array_equal(x[0, 0], [1, 1, 0, 0, 1, MASKED])  # background pairs are 0, not 1
    long = affinities(label, [[0, 0, 2], [0, 0, -2]])
    np.testing.assert_array_equal(long[0, 0, 0], [1, 0, 0, 0, MASKED, MASKED])
    np.testing.assert_array_equal(long[1, 0, 0], [MASKED, MASKED, 1, 0, 0, 0])
    label[:, :, 1] = 7
    ignored = affinities(label, [[0, 0, 1]], ignore_label=7)[0]
    np.testing.assert_array_equal(ignored[0, 0], [MASKED, MASKED, 0, 0, 1, MASKED])


def test_options_are_checked():
    with pytest.raises(ConfigurationError, match="offsets"):
        TargetOptions(offsets=[[0, 0, 0]])
    with pytest.raises(ConfigurationError, match="thicken"):
        TargetOptions(thicken=-1)
    with pytest.raises(ConfigurationError, match="label_transform"):
        LabelTransform("distance")


# ------------------------------------------------------------------------------------------- augmentation alignment
SHAPE = (6, 8, 8)
AUGMENTATIONS = {
    "flip_z": RandomFlip(axes=["z"], p=1.0),
    "flip_y": RandomFlip(axes=["y"], p=1.0),
    "flip_zyx": RandomFlip(p=1.0),
    "rotate_yx": RandomRotate90(),
    "rotate_zy": RandomRotate90(planes=[["z", "y"]]),
    "intensity": RandomIntensity(),
    "noise": GaussianNoise(p=1.0),
    "elastic": ElasticDeformation(magnitude=2.0, z_magnitude=1.0, spacing=4, p=1.0),
}
SPATIAL = ("flip_z", "flip_y", "flip_zyx", "rotate_yx", "rotate_zy")


def _ids(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 4, (3, 4, 4)).repeat(2, 0).repeat(2, 1).repeat(2, 2)  # 2-voxel blocks: many contacts
    ids[0, 0, :3] = IGNORED_ID
    return ids


def _augment(name: str, label: np.ndarray | torch.Tensor, seed: int) -> dict:
    """The augmentation applied as training applies it, with a fixed seed (so two calls draw the same)."""
    raw = torch.from_numpy(np.random.default_rng(seed).normal(size=(1, *SHAPE)).astype(np.float32))
    label = torch.as_tensor(label)
    return AUGMENTATIONS[name]({"raw": raw, "label": label}, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_boundaries_derived_after_augmentation_equal_augmented_boundaries(name, seed):
    """transform then derive == derive then transform, for every augmentation that moves voxels as a whole
    (flips, rotations) or not at all (intensity, noise); the warp resamples, where the two are not defined alike."""
    transform = LabelTransform("boundaries", TargetOptions(foreground_channel=True))
    ids = _ids(seed)
    out = transform(_augment(name, ids, seed))
    np.testing.assert_array_equal(out["label"].numpy(), transform.derive(out["instances"].numpy()))
    if name == "elastic":
        assert set(np.unique(out["instances"].numpy())) <= set(np.unique(ids))  # nearest lookup: no new ids
        return
    derived_first = _augment(name, torch.from_numpy(transform.derive(ids)), seed)["label"].numpy()
    np.testing.assert_array_equal(out["label"].numpy(), derived_first)


def _pair_values(values: np.ndarray, source: np.ndarray) -> dict:
    """{unordered pair of source voxel indices: affinity} over the unmasked nearest-neighbour affinities."""
    pairs = {}
    for k, offset in enumerate(((1, 0, 0), (0, 1, 0), (0, 0, 1))):
        a = tuple(slice(0, n - o) for n, o in zip(SHAPE, offset))
        b = tuple(slice(o, n) for n, o in zip(SHAPE, offset))
        for u, v, value in zip(source[a].ravel(), source[b].ravel(), values[k][a].ravel()):
            if value != MASKED:
                pairs[(min(u, v), max(u, v))] = value
    return pairs


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_affinities_derived_after_augmentation_link_the_same_voxel_pairs(name, seed):
    """An affinity belongs to a pair of voxels, and a flip or rotation turns an offset into its opposite or another
    axis, so the channels themselves do not commute; the pairs do. Every affinity derived after the augmentation
    equals the affinity the original label gives the same two voxels (found through an index volume augmented with
    the same seed), wherever those were neighbours; for flips and rotations that is every pair."""
    transform = LabelTransform("affinities")
    ids = _ids(seed)
    out = transform(_augment(name, ids, seed))
    index = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    source = _augment(name, index, seed)["label"].numpy()  # output voxel -> the input voxel it came from
    before = _pair_values(affinities(ids, ignore_label=IGNORED_ID), index)
    after = _pair_values(out["label"].numpy(), source)
    shared = [pair for pair in after if pair in before]
    assert all(after[pair] == before[pair] for pair in shared)
    if name != "elastic":
        assert len(shared) == len(after) == len(before)
    else:
        assert len(shared) > len(before) // 3


# ------------------------------------------------------------------------------------------- masked elements in losses
@pytest.mark.parametrize("loss", ["bce", "dice", "bce_dice"])
def test_masked_affinities_are_left_out_of_the_loss(loss):
    """Out-of-patch neighbours (and ignored voxels) are MASKED: the module's loss equals the loss over the other
    elements only (BCE: their mean; Dice: prediction and target multiplied by the mask), not one that counts them
    as 0."""
    import torch.nn.functional as F

    from unet3d_lightning import UNet3DModule

    label = two_cubes()
    label[0, 0, 0] = 7
    target = torch.from_numpy(affinities(relabel(label, ignore_label=7), ignore_label=IGNORED_ID))[None]
    assert (target == MASKED).any()
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    module = UNet3DModule(out_channels=3, f_maps=4, num_levels=2, num_groups=2, loss=loss, ignore_index=7)
    module.use_label_kind("instances")
    got = module.loss_fn(logits, target)

    keep = target != MASKED
    bce = F.binary_cross_entropy_with_logits(logits[keep], target[keep])
    p, r = torch.sigmoid(logits) * keep, target.clamp(min=0) * keep
    counts = r.sum(dim=(0, 2, 3, 4))
    w = (counts.min() / counts) ** 2  # Sudre's 1 / count^2, scaled by its maximum (every channel has ones here)
    dice = 1 - (2 * (w * (p * r).sum(dim=(0, 2, 3, 4))).sum() + 1e-6) / ((w * (p + r).sum(dim=(0, 2, 3, 4))).sum()
                                                                         + 1e-6)
    expected = {"bce": bce, "dice": dice, "bce_dice": bce + dice}[loss]
    torch.testing.assert_close(got, expected)
    counted_as_zero = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0))
    assert loss == "dice" or not torch.allclose(got, counted_as_zero + (dice if loss == "bce_dice" else 0))
