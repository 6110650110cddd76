"""Tests of the nnU-Net augmentations: rotation/scaling keep raw, label and weight aligned (one resampling), the
intensity augmentations leave labels alone, every one is reproducible from its seed; values against SciPy's
``ndimage`` (affine_transform, gaussian_filter) and hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from unet3d_lightning.data.transforms import (
    Augmentation,
    GaussianBlur,
    GaussianNoise,
    RandomAffine,
    RandomBrightnessContrast,
    RandomFlip,
    RandomGamma,
    RandomIntensity,
    RandomRotate90,
    SimulateLowResolution,
)
from unet3d_lightning.errors import ConfigurationError


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def ramps(shape) -> torch.Tensor:
    """(3, D, H, W): channel a holds each voxel's coordinate along axis a."""
    return torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij"))


def smooth(shape) -> torch.Tensor:
    z, y, x = ramps(shape)
    return 0.5 + 0.4 * torch.sin(2 * math.pi * x / 14) * torch.cos(2 * math.pi * y / 17) + 0.1 * torch.sin(z / 3)


INTENSITY = [
    lambda: RandomGamma(p=1.0),
    lambda: RandomBrightnessContrast(brightness_p=1.0, contrast_p=1.0),
    lambda: GaussianBlur(p=1.0),
    lambda: SimulateLowResolution(p=1.0),
]


@pytest.mark.parametrize("kind", ["rotation", "scale", "both"])
def test_affine_reads_label_and_weight_at_the_raw_sampling_point(kind):
    # Trilinear interpolation reproduces a linear ramp exactly, so the transformed ramps are the sampling point of
    # each output voxel; label and weight (also ramps) must be that point rounded: the same map, one resampling.
    shape = (9, 20, 24)
    raw = ramps(shape)
    sample = {"raw": raw, "label": raw[2].long(), "weight": raw[1].clone()}
    transform = RandomAffine(rotation_p=float(kind != "scale"), degrees=180, z_degrees=20,
                             scale_p=float(kind != "rotation"))
    for seed in range(4):
        out = transform(sample, generator(seed))
        point = out["raw"]
        assert (point - raw).abs().max() > 0.2  # it moved
        for axis, size in enumerate(shape):
            assert point[axis].min() >= -1e-4 and point[axis].max() <= size - 1 + 1e-4
        assert (out["label"] - point[2]).abs().max() <= 0.5 + 1e-3
        assert (out["weight"] - point[1]).abs().max() <= 0.5 + 1e-3
        assert out["label"].dtype == torch.int64


def test_affine_equals_scipy_affine_transform():
    # Output voxel o reads the input at M (o - c) + c, M = R^T / s; scipy.ndimage.affine_transform computes exactly
    # that for matrix M and offset c - M c (order 1 with mode "nearest" = clamped trilinear, order 0 = nearest).
    shape = (10, 16, 18)
    raw = smooth(shape)[None]
    label = (raw[0] > 0.5).long() + (raw[0] > 0.7).long()
    transform = RandomAffine(rotation_p=1.0, degrees=90, z_degrees=15, scale_p=1.0)
    matrix = transform.matrix(generator(3)).numpy()
    assert not np.allclose(matrix, np.eye(3))
    centre = np.array([(n - 1) / 2 for n in shape])
    offset = centre - matrix @ centre
    expected = ndimage.affine_transform(raw[0].double().numpy(), matrix, offset=offset, order=1, mode="nearest")
    out = transform({"raw": raw, "label": label}, generator(3))
    np.testing.assert_allclose(out["raw"][0].numpy(), expected, atol=1e-4)
    expected_label = ndimage.affine_transform(label.numpy(), matrix, offset=offset, order=0, mode="nearest")
    assert (out["label"].numpy() == expected_label).mean() > 0.99  # ties at half-voxels may round apart
    # The rotation part is orthonormal, the scale within its range.
    scale = 1 / np.cbrt(abs(np.linalg.det(matrix)))
    assert 0.7 <= scale <= 1.4
    np.testing.assert_allclose(matrix @ matrix.T * scale**2, np.eye(3), atol=1e-9)


def test_affine_rotation_by_90_degrees_is_rot90():
    # A (y, x) rotation by exactly 90 degrees of a square plane is an exact voxel permutation: torch.rot90.
    class Quarter(RandomAffine):
        def matrix(self, generator, flat_z=False):
            return torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]], dtype=torch.float64)

    raw = torch.rand(2, 5, 12, 12, generator=generator(0))
    label = (raw[0] > 0.5).long()
    out = Quarter()({"raw": raw, "label": label}, generator(0))
    turned = [torch.rot90(raw, 1, (-2, -1)), torch.rot90(raw, -1, (-2, -1))]
    assert any(torch.allclose(out["raw"], t, atol=1e-5) for t in turned)
    k = 1 if torch.allclose(out["raw"], turned[0], atol=1e-5) else -1
    assert torch.equal(out["label"], torch.rot90(label, k, (-2, -1)))


def test_affine_keeps_a_one_slice_patch_in_its_plane_and_classes_unblended():
    raw = smooth((1, 24, 24))[None]
    label = (raw[0] > 0.45).long() * 3
    out = RandomAffine(rotation_p=1.0, z_degrees=45, scale_p=1.0)({"raw": raw, "label": label}, generator(1))
    assert out["raw"].shape == raw.shape and set(out["label"].unique().tolist()) <= {0, 3}
    agree = out["label"] == (out["raw"][0] > 0.45).long() * 3
    assert agree.float().mean() > 0.97


@pytest.mark.parametrize("factory", INTENSITY)
def test_intensity_augmentations_change_raw_only_and_are_seeded(factory):
    raw = smooth((6, 12, 12))[None].repeat(2, 1, 1, 1) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    label = (raw[0] > 0.5).long()
    weight = raw[0] * 2
    sample = {"raw": raw, "label": label, "weight": weight}
    before = {k: v.clone() for k, v in sample.items()}
    transform = factory()
    a = transform(sample, generator(7))
    b = transform(sample, generator(7))
    c = transform(sample, generator(8))
    assert a["label"] is label and a["weight"] is weight  # untouched, not even copied
    assert not torch.allclose(a["raw"], raw, atol=1e-4)
    assert torch.equal(a["raw"], b["raw"]) and not torch.equal(a["raw"], c["raw"])
    assert all(torch.equal(sample[k], before[k]) for k in sample)  # inputs not modified
    assert a["raw"].dtype == raw.dtype and a["raw"].shape == raw.shape


def test_gamma_hand_worked():
    raw = torch.tensor([0.0, 1.0, 2.0, 4.0]).view(1, 1, 1, 4)
    transform = RandomGamma(gamma_range=(2.0, 2.0), p=1.0)
    out = transform({"raw": raw}, generator(0))["raw"]
    # lo = 0, hi = 4: 4 * (x / 4) ** 2 = x^2 / 4
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 0.25, 1.0, 4.0]))
    constant = torch.full((1, 1, 2, 2), 3.0)
    assert torch.equal(transform({"raw": constant}, generator(0))["raw"], constant)


def test_brightness_and_contrast_hand_worked():
    raw = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(1, 1, 1, 4)
    only_brightness = RandomBrightnessContrast(brightness_range=(2.0, 2.0), brightness_p=1.0, contrast_p=0.0)
    torch.testing.assert_close(only_brightness({"raw": raw}, generator(0))["raw"], raw * 2)
    only_contrast = RandomBrightnessContrast(brightness_p=0.0, contrast_range=(2.0, 2.0), contrast_p=1.0)
    # mean 3: (x - 3) * 2 + 3 = (-1, 1, 3, 9), clipped to [1, 6]
    torch.testing.assert_close(only_contrast({"raw": raw}, generator(0))["raw"].flatten(),
                               torch.tensor([1.0, 1.0, 3.0, 6.0]))


def test_blur_equals_scipy_gaussian_filter():
    raw = torch.rand(2, 7, 11, 13, generator=generator(2))
    transform = GaussianBlur(sigma_range=(0.8, 0.8), p=1.0)
    out = transform({"raw": raw}, generator(0))["raw"]
    for c in range(2):
        expected = ndimage.gaussian_filter(raw[c].double().numpy(), sigma=0.8, mode="nearest", truncate=3.0)
        np.testing.assert_allclose(out[c].numpy(), expected, atol=1e-5)
    flat = torch.rand(1, 1, 9, 9, generator=generator(3))  # one slice: z is not blurred
    expected = ndimage.gaussian_filter(flat[0, 0].double().numpy(), sigma=0.8, mode="nearest", truncate=3.0)
    np.testing.assert_allclose(transform({"raw": flat}, generator(0))["raw"][0, 0].numpy(), expected, atol=1e-5)


def test_low_resolution_removes_detail_finer_than_the_zoom():
    # A checkerboard shrunk by 2 with nearest neighbours keeps only the even voxels, which have one colour: it
    # comes back constant. Zoom 1 changes nothing.
    z, y, x = ramps((4, 8, 8)).long()
    board = ((z + y + x) % 2).float()[None] * 2 - 1
    half = SimulateLowResolution(zoom_range=(0.5, 0.5), p=1.0)({"raw": board}, generator(0))["raw"]
    torch.testing.assert_close(half, torch.full_like(board, float(board[0, 0, 0, 0])))
    same = SimulateLowResolution(zoom_range=(1.0, 1.0), p=1.0)({"raw": board}, generator(0))["raw"]
    torch.testing.assert_close(same, board)


def test_augmentation_keys_build_the_pipeline_in_order_and_default_is_unchanged():
    default = [type(t) for t in Augmentation().build()]
    assert default == [RandomFlip, RandomRotate90, RandomIntensity, GaussianNoise]
    settings = Augmentation(rotation_p=0.2, scale_p=0.2, scale_range=[0.8, 1.2], gamma_p=0.3, brightness_p=0.15,
                            contrast_p=0.15, blur_p=0.2, blur_sigma=[0.5, 1.5], low_resolution_p=0.25)
    pipeline = list(settings.build())
    assert [type(t) for t in pipeline] == [
        RandomAffine, RandomFlip, RandomRotate90, RandomIntensity, GaussianNoise, GaussianBlur,
        RandomBrightnessContrast, SimulateLowResolution, RandomGamma,
    ]
    assert pipeline[0].scale_range == (0.8, 1.2) and pipeline[0].rotation_p == 0.2
    assert pipeline[5].sigma_range == (0.5, 1.5) and pipeline[8].p == 0.3


def test_full_recipe_keeps_labels_aligned_and_is_reproducible():
    # Every spatial transform of the recipe moves raw and label together; intensity ones keep the raw's order
    # within a channel only approximately (blur, low resolution), so alignment is checked on the ramp of z.
    shape = (8, 16, 16)
    raw = ramps(shape)
    sample = {"raw": raw, "label": raw[2].long()}
    pipeline = Augmentation(rotation_p=1.0, scale_p=1.0, intensity=False, noise_sigma=0.0).build()
    for seed in range(3):
        out = pipeline(sample, generator(seed))
        assert (out["label"] - out["raw"][2]).abs().max() <= 0.5 + 1e-3
        assert torch.equal(out["raw"], pipeline(sample, generator(seed))["raw"])


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"rotation_p": 1.5}, "rotation_p"),
        ({"scale_range": (0.0, 1.0)}, "scale_range"),
        ({"gamma_range": (1.5, 0.7)}, "gamma_range"),
        ({"blur_sigma": (-1, 1)}, "blur_sigma"),
        ({"low_resolution_zoom": (0.5, 2.0)}, "low_resolution_zoom"),
        ({"rotation_degrees": float("inf")}, "rotation_degrees"),
    ],
)
def test_recipe_settings_are_checked(kwargs, needle):
    with pytest.raises(ConfigurationError, match=needle):
        Augmentation(**kwargs)
