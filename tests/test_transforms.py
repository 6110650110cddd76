"""Tests of the joint augmentations: alignment of raw / label / weight, exactness, determinism, configuration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from unet3d_lightning.data.transforms import (
    Augmentation,
    Compose,
    ElasticDeformation,
    GaussianNoise,
    RandomFlip,
    RandomIntensity,
    RandomRotate90,
)
from unet3d_lightning.errors import ConfigurationError

LABEL_KINDS = ("class", "mask")


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def make_sample(kind: str = "class", shape=(6, 8, 8), channels: int = 2, seed: int = 0) -> dict:
    """Raw with distinct random values; label and weight derived from raw by a fixed voxel-wise rule.

    ``kind="class"``: label = (raw[0] > 0.5) as int64 (D, H, W), weight = 2 * raw[0] (D, H, W).
    ``kind="mask"``: label = (raw > 0.5) as float (C, D, H, W), weight = 2 * raw (C, D, H, W).
    """
    raw = torch.rand((channels, *shape), generator=generator(10_000 + seed))
    if kind == "class":
        return {"raw": raw, "label": (raw[0] > 0.5).long(), "weight": raw[0] * 2}
    return {"raw": raw, "label": (raw > 0.5).float(), "weight": raw * 2}


def assert_rule_holds(sample: dict, kind: str) -> None:
    raw = sample["raw"]
    if kind == "class":
        assert torch.equal(sample["label"], (raw[0] > 0.5).long())
        assert torch.equal(sample["weight"], raw[0] * 2)
    else:
        assert torch.equal(sample["label"], (raw > 0.5).float())
        assert torch.equal(sample["weight"], raw * 2)


def clone_sample(sample: dict) -> dict:
    return {k: v.clone() for k, v in sample.items()}


def assert_same_sample(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------------------- flips / rot90


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_flip_is_an_exact_joint_permutation(kind):
    sample = make_sample(kind)
    subsets = [dims for r in range(4) for dims in itertools.combinations((-3, -2, -1), r)]
    seen = set()
    for seed in range(64):
        out = RandomFlip()(sample, generator(seed))
        matches = [dims for dims in subsets if torch.equal(out["raw"], torch.flip(sample["raw"], dims))]
        assert len(matches) == 1, f"seed {seed}: output raw is not a flip of the input"
        dims = matches[0]
        seen.add(dims)
        assert torch.equal(out["label"], torch.flip(sample["label"], dims))
        assert torch.equal(out["weight"], torch.flip(sample["weight"], dims))
        assert_rule_holds(out, kind)
    assert len(seen) == 8  # every combination of the three axes occurs


def test_flip_with_p_one_on_chosen_axes_and_p_zero():
    sample = make_sample("class")
    out = RandomFlip(axes=("x",), p=1.0)(sample, generator(0))
    assert torch.equal(out["raw"], torch.flip(sample["raw"], (-1,)))
    assert torch.equal(out["label"], torch.flip(sample["label"], (-1,)))
    out = RandomFlip(axes=("z", "y"), p=1.0)(sample, generator(0))
    assert torch.equal(out["raw"], sample["raw"].flip(1).flip(2))
    assert torch.equal(out["weight"], sample["weight"].flip(0).flip(1))
    assert_same_sample(RandomFlip(p=0.0)(sample, generator(0)), sample)


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_rotate90_is_an_exact_joint_rotation_in_plane(kind):
    sample = make_sample(kind, shape=(4, 7, 7))
    seen = set()
    for seed in range(40):
        out = RandomRotate90()(sample, generator(seed))
        ks = [k for k in range(4) if torch.equal(out["raw"], torch.rot90(sample["raw"], k, (2, 3)))]
        assert len(ks) == 1, f"seed {seed}: output raw is not an in-plane rotation of the input"
        k = ks[0]
        seen.add(k)
        assert torch.equal(out["label"], torch.rot90(sample["label"], k, (-2, -1)))
        assert torch.equal(out["weight"], torch.rot90(sample["weight"], k, (-2, -1)))
        assert_rule_holds(out, kind)
    assert seen == {0, 1, 2, 3}


def test_rotate90_keeps_the_shape_of_a_non_square_plane():
    sample = make_sample("class", shape=(4, 6, 8))
    seen = set()
    for seed in range(30):
        out = RandomRotate90()(sample, generator(seed))
        assert out["raw"].shape == sample["raw"].shape
        ks = [k for k in (0, 2) if torch.equal(out["raw"], torch.rot90(sample["raw"], k, (2, 3)))]
        assert len(ks) == 1
        seen.add(ks[0])
        assert torch.equal(out["label"], torch.rot90(sample["label"], ks[0], (1, 2)))
    assert seen == {0, 2}


def test_rotate90_in_other_planes():
    sample = make_sample("mask", shape=(5, 5, 3))
    seen = set()
    for seed in range(30):
        out = RandomRotate90(planes=[("z", "y")])(sample, generator(seed))
        ks = [k for k in range(4) if torch.equal(out["raw"], torch.rot90(sample["raw"], k, (1, 2)))]
        assert len(ks) == 1
        seen.add(ks[0])
        assert torch.equal(out["label"], torch.rot90(sample["label"], ks[0], (1, 2)))
        assert torch.equal(out["weight"], torch.rot90(sample["weight"], ks[0], (1, 2)))
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("planes", [[("y", "y")], [("y",)], [("y", "w")], [("z", "y", "x")]])
def test_rotate90_rejects_bad_planes(planes):
    with pytest.raises(ConfigurationError):
        RandomRotate90(planes=planes)


# --------------------------------------------------------------------------------------------------- intensities


def fit_affine(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """Least-squares (a, b) with y ~ a * x + b, and the largest residual; computed in float64."""
    x, y = x.double().flatten(), y.double().flatten()
    design = torch.stack([x, torch.ones_like(x)], dim=1)
    solution = torch.linalg.lstsq(design, y[:, None]).solution.flatten()
    a, b = solution.tolist()
    return a, b, (design @ solution - y).abs().max().item()


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_random_intensity_is_one_affine_map_for_all_channels(kind):
    sample = make_sample(kind, channels=3)
    scales = []
    for seed in range(20):
        out = RandomIntensity(scale_range=(0.8, 1.2), shift_range=(-0.3, 0.2), p=1.0)(sample, generator(seed))
        a, b, residual = fit_affine(sample["raw"], out["raw"])
        assert residual < 1e-5
        assert 0.8 <= a <= 1.2 and -0.3 <= b <= 0.2
        for c in range(3):  # the same (a, b) fits each channel on its own
            a_c, b_c, _ = fit_affine(sample["raw"][c], out["raw"][c])
            assert a_c == pytest.approx(a, abs=1e-5) and b_c == pytest.approx(b, abs=1e-5)
        assert torch.equal(out["label"], sample["label"])
        assert torch.equal(out["weight"], sample["weight"])
        scales.append(a)
    assert max(scales) - min(scales) > 0.1  # the factor really varies between samples


def test_random_intensity_probability():
    sample = make_sample("class")
    applied = sum(
        not torch.equal(RandomIntensity(p=0.5)(sample, generator(seed))["raw"], sample["raw"]) for seed in range(200)
    )
    assert 70 < applied < 130  # ~100 expected; binomial sd ~7
    assert_same_sample(RandomIntensity(p=0.0)(sample, generator(0)), sample)


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_gaussian_noise_level_and_raw_only(kind):
    sample = make_sample(kind, shape=(16, 16, 16), channels=2)
    sigmas = []
    for seed in range(12):
        out = GaussianNoise(max_sigma=0.2, p=1.0)(sample, generator(seed))
        noise = (out["raw"] - sample["raw"]).double()
        std = noise.std().item()
        # 8192 values per channel: the sample std is within a few percent of sigma.
        assert std <= 0.2 * 1.05
        assert abs(noise.mean().item()) < 4 * std / math.sqrt(noise.numel()) + 1e-7
        std_0, std_1 = noise[0].std().item(), noise[1].std().item()
        assert std_0 == pytest.approx(std_1, rel=0.1)  # one sigma for all channels
        assert torch.equal(out["label"], sample["label"])
        assert torch.equal(out["weight"], sample["weight"])
        sigmas.append(std)
    assert max(sigmas) - min(sigmas) > 0.05  # sigma is drawn per sample


def test_gaussian_noise_off_cases():
    sample = make_sample("class")
    assert_same_sample(GaussianNoise(max_sigma=0.0, p=1.0)(sample, generator(0)), sample)
    assert_same_sample(GaussianNoise(max_sigma=0.1, p=0.0)(sample, generator(0)), sample)


# --------------------------------------------------------------------------------------------------- elastic


def ramps(shape) -> torch.Tensor:
    """(3, D, H, W): channel a holds each voxel's coordinate along axis a."""
    return torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij"))


def test_elastic_moves_raw_label_weight_by_the_same_bounded_smooth_field():
    # Trilinear interpolation reproduces a linear ramp exactly, so the warped coordinate ramps reveal the sampling
    # point of every output voxel; the nearest-voxel label / weight must be that point rounded.
    shape = (12, 33, 40)
    raw = ramps(shape)
    sample = {"raw": raw, "label": raw[2].long(), "weight": raw[1].clone()}
    magnitude, z_magnitude, spacing = 3.0, 1.0, 16
    transform = ElasticDeformation(magnitude=magnitude, z_magnitude=z_magnitude, spacing=spacing, p=1.0)
    for seed in range(4):
        out = transform(sample, generator(seed))
        point = out["raw"]
        for axis, size in enumerate(shape):
            assert point[axis].min() >= -1e-4 and point[axis].max() <= size - 1 + 1e-4
        displacement = point - raw
        eps = 1e-4
        assert displacement[0].abs().max() <= z_magnitude + eps
        assert displacement[1:].abs().max() <= magnitude + eps
        assert displacement[1:].abs().max() > 1.0  # it really moved
        assert (out["label"] - point[2]).abs().max() <= 0.5 + eps
        assert (out["weight"] - point[1]).abs().max() <= 0.5 + eps
        assert torch.equal(out["weight"], out["weight"].round())

        # Smoothness: away from the clamped border, neighbouring displacements differ by at most the largest node
        # difference (2 * magnitude) over the node spacing actually used along that axis.
        margins = (z_magnitude, magnitude, magnitude)
        inner = tuple(slice(math.ceil(m) + 1, n - math.ceil(m) - 1) for m, n in zip(margins, shape))
        for axis, size in enumerate(shape):
            node_spacing = (size - 1) / (max(2, math.ceil((size - 1) / spacing) + 1) - 1)
            steps = torch.diff(displacement[(slice(None), *inner)], dim=axis + 1).abs().max().item()
            assert steps <= 2 * magnitude / node_spacing + eps


def smooth_volume(shape) -> torch.Tensor:
    z, y, x = ramps(shape)
    return 0.5 + 0.4 * torch.sin(2 * math.pi * x / 24) * torch.cos(2 * math.pi * y / 28) + 0.1 * torch.sin(
        2 * math.pi * z / 20
    )


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_elastic_threshold_rule_survives_the_warp(kind):
    shape = (16, 48, 48)
    raw = smooth_volume(shape)[None]
    if kind == "class":  # three classes from two thresholds
        label = (raw[0] > 0.4).long() + (raw[0] > 0.6).long()
        sample = {"raw": raw, "label": label, "weight": raw[0] * 2}
    else:
        sample = {"raw": raw, "label": (raw > 0.5).float(), "weight": raw * 2}
    values = set(sample["label"].unique().tolist())
    transform = ElasticDeformation(magnitude=4.0, z_magnitude=1.5, spacing=12, p=1.0)
    for seed in range(3):
        out = transform(sample, generator(seed))
        warped = out["raw"]
        assert not torch.allclose(warped, raw, atol=1e-3)
        assert set(out["label"].unique().tolist()) <= values
        if kind == "class":
            expected = (warped[0] > 0.4).long() + (warped[0] > 0.6).long()
            far = ((warped[0] - 0.4).abs() > 0.05) & ((warped[0] - 0.6).abs() > 0.05)
        else:
            expected = (warped > 0.5).float()
            far = (warped - 0.5).abs() > 0.05
        agree = out["label"] == expected
        # Near a threshold surface the nearest-voxel label and the interpolated raw may fall on different sides
        # (half-voxel rounding); away from it they must agree. A label left unwarped agrees on only ~85-94 % there.
        assert agree[far].float().mean() > 0.995
        assert agree.float().mean() > 0.9
        # The weight is read at the nearest voxel, so it is 2 * raw at a voxel near the sampling point.
        assert set(out["weight"].unique().tolist()) <= set(sample["weight"].unique().tolist())
        assert (out["weight"] - 2 * warped[0 if kind == "class" else slice(None)]).abs().mean() < 0.05


def test_elastic_identity_cases_and_flat_axis():
    sample = make_sample("mask", shape=(5, 9, 11))
    assert_same_sample(ElasticDeformation(p=0.0)(sample, generator(0)), sample)
    assert_same_sample(ElasticDeformation(magnitude=0.0, z_magnitude=0.0, p=1.0)(sample, generator(0)), sample)
    # A single-slice axis has no extent to warp along but the others still are.
    flat = {"raw": ramps((1, 20, 20)), "label": ramps((1, 20, 20))[2].long()}
    out = ElasticDeformation(magnitude=2.0, z_magnitude=2.0, spacing=8, p=1.0)(flat, generator(1))
    assert torch.equal(out["raw"][0], flat["raw"][0])
    assert not torch.equal(out["raw"][2], flat["raw"][2])
    assert (out["label"] - out["raw"][2]).abs().max() <= 0.5 + 1e-4


@pytest.mark.parametrize(
    "kwargs", [{"magnitude": -1.0}, {"z_magnitude": -0.5}, {"spacing": 0}, {"spacing": 2.5}, {"p": 1.5}]
)
def test_elastic_rejects_bad_parameters(kwargs):
    with pytest.raises(ConfigurationError):
        ElasticDeformation(**kwargs)


# --------------------------------------------------------------------------------------------------- common contract


def all_transforms() -> list:
    return [
        RandomFlip(p=0.5),
        RandomRotate90(),
        RandomIntensity(p=0.5),
        GaussianNoise(p=0.5),
        ElasticDeformation(p=0.5),
        Augmentation(elastic=True).build(),
    ]


@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_determinism_and_independence_from_global_rng(index, kind):
    transform = all_transforms()[index]
    sample = make_sample(kind, shape=(8, 10, 10))
    torch.manual_seed(1)
    first = transform(sample, generator(7))
    torch.manual_seed(2)
    torch.rand(100)
    second = transform(sample, generator(7))
    assert_same_sample(first, second)
    outputs = [transform(sample, generator(seed))["raw"] for seed in range(10)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_inputs_untouched_dtypes_kept_outputs_contiguous(index, kind):
    transform = all_transforms()[index]
    sample = make_sample(kind, shape=(8, 10, 10))
    sample["location"] = torch.tensor([1, 2, 3])  # non-spatial entries pass through
    # A non-contiguous input (a transposed view) must still give contiguous outputs.
    sample["raw"] = sample["raw"].transpose(2, 3).contiguous().transpose(2, 3)
    assert not sample["raw"].is_contiguous()
    before = clone_sample(sample)
    for seed in range(6):
        out = transform(sample, generator(seed))
        assert_same_sample(sample, before)
        assert out is not sample
        assert set(out) == set(sample)
        assert torch.equal(out["location"], sample["location"])
        for key in ("raw", "label", "weight"):
            assert out[key].dtype == sample[key].dtype, key
            assert out[key].shape == sample[key].shape, key
            assert out[key].is_contiguous(), key


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_full_pipeline_without_intensity_keeps_the_rule(kind):
    pipeline = Augmentation(intensity=False, noise_sigma=0.0).build()
    sample = make_sample(kind, shape=(8, 10, 10))
    for seed in range(10):
        assert_rule_holds(pipeline(sample, generator(seed)), kind)


def test_samples_without_label_or_weight():
    raw = torch.rand(1, 8, 8, 8, generator=generator(3))
    for transform in all_transforms():
        out = transform({"raw": raw}, generator(5))
        assert set(out) == {"raw"} and out["raw"].shape == raw.shape


def test_malformed_samples_are_rejected():
    raw = torch.rand(1, 4, 4, 4)
    with pytest.raises(ValueError, match="raw"):
        RandomFlip()({"raw": raw[0]}, generator(0))
    with pytest.raises(ValueError, match="label"):
        RandomFlip()({"raw": raw, "label": torch.zeros(4, 4, 5, dtype=torch.long)}, generator(0))
    with pytest.raises(ValueError, match="raw"):
        GaussianNoise()({"label": torch.zeros(4, 4, 4)}, generator(0))


# --------------------------------------------------------------------------------------------------- configuration


def test_default_augmentation_builds_the_expected_pipeline():
    pipeline = Augmentation().build()
    assert isinstance(pipeline, Compose)
    assert [type(t) for t in pipeline] == [RandomFlip, RandomRotate90, RandomIntensity, GaussianNoise]
    flip, rotate, intensity, noise = pipeline
    assert flip.axes == ("z", "y", "x") and rotate.planes == (("y", "x"),)
    assert intensity.scale_range == (0.9, 1.1) and intensity.shift_range == (-0.1, 0.1)
    assert noise.max_sigma == 0.05


def test_augmentation_settings_reach_the_transforms():
    settings = Augmentation(
        flip=False,
        rotate90=False,
        intensity_scale=[0.5, 2.0],
        intensity_shift=(-1, 1),
        noise_sigma=0.3,
        elastic=True,
        elastic_magnitude=5.0,
        elastic_z_magnitude=0.5,
        elastic_spacing=24,
    )
    assert settings.intensity_scale == (0.5, 2.0)  # lists from a config file become tuples
    pipeline = list(settings.build())
    assert [type(t) for t in pipeline] == [ElasticDeformation, RandomIntensity, GaussianNoise]
    elastic, intensity, noise = pipeline
    assert (elastic.magnitude, elastic.z_magnitude, elastic.spacing) == (5.0, 0.5, 24)
    assert intensity.scale_range == (0.5, 2.0) and intensity.shift_range == (-1.0, 1.0)
    assert noise.max_sigma == 0.3


def test_all_off_is_the_identity():
    pipeline = Augmentation(flip=False, rotate90=False, intensity=False, noise_sigma=0.0, elastic=False).build()
    assert len(pipeline) == 0
    sample = make_sample("mask")
    before = clone_sample(sample)
    out = pipeline(sample, generator(0))
    assert_same_sample(out, before)
    assert out is not sample


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"intensity_scale": (1.1, 0.9)}, "intensity_scale"),
        ({"intensity_scale": (0.0, 1.0)}, "intensity_scale"),
        ({"intensity_scale": (0.9, 1.0, 1.1)}, "intensity_scale"),
        ({"intensity_shift": (0.1, -0.1)}, "intensity_shift"),
        ({"intensity_shift": (float("nan"), 0.1)}, "intensity_shift"),
        ({"noise_sigma": -0.01}, "noise_sigma"),
        ({"elastic_magnitude": -1.0}, "elastic_magnitude"),
        ({"elastic_z_magnitude": float("inf")}, "elastic_z_magnitude"),
        ({"elastic_spacing": 0}, "elastic_spacing"),
        ({"elastic_spacing": 8.5}, "elastic_spacing"),
    ],
)
def test_augmentation_validation(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Augmentation(**kwargs)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: RandomFlip(axes=("w",)),
        lambda: RandomFlip(axes=("x", "x")),
        lambda: RandomFlip(p=-0.1),
        lambda: RandomIntensity(scale_range=(1.2, 0.8)),
        lambda: RandomIntensity(shift_range=(0.1,)),
        lambda: GaussianNoise(max_sigma=-1.0),
        lambda: GaussianNoise(p=2.0),
    ],
)
def test_transform_parameter_validation(factory):
    with pytest.raises(ConfigurationError):
        factory()
