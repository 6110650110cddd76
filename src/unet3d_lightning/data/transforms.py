"""Training augmentations applied jointly to the raw patch, its label and its loss weight.

Sample
------
A sample is a dict of tensors:

- ``"raw"``: float ``(C, D, H, W)``;
- ``"label"`` (optional): int64 ``(D, H, W)`` class ids, or float ``(C', D, H, W)`` binary masks;
- ``"weight"`` (optional): float ``(D, H, W)`` or ``(C', D, H, W)`` per-voxel loss weights.

The last three dimensions are always the spatial ``(z, y, x)`` ones and must agree between the three entries. Any other
key is passed through untouched.

Joint transforms
----------------
Spatial transforms (:class:`RandomFlip`, :class:`RandomRotate90`, :class:`ElasticDeformation`) move raw, label and
weight by the same map. Labels and weights are never interpolated: flips and rotations are exact index permutations,
and the elastic warp reads them at the nearest voxel, so a label stays within the set of values it had (a class id is
never averaged into another class). Intensity transforms (:class:`RandomIntensity`, :class:`GaussianNoise`) change
raw only.

Randomness
----------
Every transform takes a ``torch.Generator`` and draws all its random numbers from it, never from the global RNG. The
training dataset seeds one generator per sample from a seed drawn in the main process, so augmentations do not depend
on which DataLoader worker handles a sample, nor on how many workers there are: runs are reproducible for any
``num_workers``. The generator lives on the CPU; random tensors are drawn there and moved to the data's device.

Outputs
-------
Each call returns a new dict. Inputs are never modified in place. Returned tensors are contiguous; a tensor that a
transform leaves unchanged (label and weight under an intensity transform, everything when a random transform decides
not to act) is returned as it came (the same object when it was already contiguous) rather than copied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigurationError

Sample = dict[str, Tensor]
AXES = ("z", "y", "x")
# Keys moved by spatial transforms; the sample's other entries are not spatial maps.
SPATIAL_KEYS = ("raw", "label", "weight")


class RandomFlip:
    """Flip each of the given axes independently with probability ``p``.

    Args:
        axes: spatial axes that may be flipped, by name among ``"z"``, ``"y"``, ``"x"``. Default ``("z", "y", "x")``:
            mirror images are equally plausible along every axis of a microscopy or medical volume.
        p: probability that each axis is flipped, in ``[0, 1]``. Default 0.5 (all ``2 ** len(axes)`` flip
            combinations equally likely).
    """

    def __init__(self, axes: Sequence[str] = AXES, p: float = 0.5) -> None:
        self.axes = _axis_names(axes, "RandomFlip axes")
        self.p = _probability(p, "RandomFlip p")

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        shape = _spatial_shape(sample)
        draws = torch.rand(len(self.axes), generator=generator)
        # An axis of size 1 (z of the one-slice patches of 2D models) has nothing to mirror: it is skipped (the
        # draws are made all the same, so the other axes' flips do not depend on the patch's depth).
        dims = [_dim(axis) for axis, u in zip(self.axes, draws.tolist()) if u < self.p and shape[_dim(axis)] > 1]
        if not dims:
            return _unchanged(sample)
        return _map_spatial(sample, lambda t: torch.flip(t, dims))

    def __repr__(self) -> str:
        return f"RandomFlip(axes={self.axes}, p={self.p})"


class RandomRotate90:
    """Rotate by ``k * 90°`` in each of the given planes, ``k`` uniform in ``{0, 1, 2, 3}``.

    By default only the ``(y, x)`` plane rotates: microscopy (and many medical) volumes are anisotropic, with a z
    spacing coarser than the in-plane spacing, so a rotation that brings z into the plane would show the network
    geometry that never occurs in real data. Add ``("z", "y")`` / ``("z", "x")`` planes for isotropic data.

    When a plane is not square in the patch (its two sizes differ), ``k`` is drawn from ``{0, 2}`` instead, so that the
    patch keeps its shape and patches of a batch can still be stacked.

    Args:
        planes: pairs of distinct axis names; each pair ``(a, b)`` rotates from ``a`` towards ``b`` like
            ``torch.rot90(t, k, dims=(a, b))``. Applied in the order given, each with its own ``k``.
            Default ``(("y", "x"),)``.
    """

    def __init__(self, planes: Sequence[Sequence[str]] = (("y", "x"),)) -> None:
        checked = []
        for plane in planes:
            pair = _axis_names(plane, "RandomRotate90 plane")
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ConfigurationError(
                    f"RandomRotate90 plane {tuple(plane)!r} must name two different axes among 'z', 'y', 'x'"
                )
            checked.append(pair)
        self.planes: tuple[tuple[str, ...], ...] = tuple(checked)

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        shape = _spatial_shape(sample)
        ks = torch.randint(0, 4, (len(self.planes),), generator=generator).tolist()
        out = sample
        for (a, b), k in zip(self.planes, ks):
            dims = (_dim(a), _dim(b))
            if shape[dims[0]] != shape[dims[1]]:
                k = 2 * (k % 2)  # maps {0,1,2,3} onto {0,2} uniformly: half-turns keep a non-square plane's shape
            if k:
                out = _map_spatial(out, lambda t, k=k, dims=dims: torch.rot90(t, k, dims))
        return out if out is not sample else _unchanged(sample)

    def __repr__(self) -> str:
        return f"RandomRotate90(planes={self.planes})"


class RandomIntensity:
    """Random affine change of the raw intensities: ``raw * a + b``.

    ``a ~ U(scale_range)`` and ``b ~ U(shift_range)`` are drawn once per sample and shared by all channels and voxels,
    which mimics a change of exposure or gain of the whole acquisition while keeping the channels' relative contrast.
    Intensities are usually normalised (zero mean, unit spread) before this runs, so ranges near ``1`` and ``0``
    are gentle changes.

    Args:
        scale_range: ``(low, high)`` of the multiplicative factor ``a``, ``0 < low <= high``. Default ``(0.9, 1.1)``.
        shift_range: ``(low, high)`` of the additive offset ``b``, ``low <= high``. Default ``(-0.1, 0.1)``.
        p: probability that the change is applied to a sample, in ``[0, 1]``. Default 0.5; otherwise the sample is
            returned unchanged.
    """

    def __init__(
        self,
        scale_range: Sequence[float] = (0.9, 1.1),
        shift_range: Sequence[float] = (-0.1, 0.1),
        p: float = 0.5,
    ) -> None:
        self.scale_range = _range(scale_range, "RandomIntensity scale_range")
        if self.scale_range[0] <= 0:
            raise ConfigurationError(
                f"RandomIntensity scale_range {self.scale_range} must be positive; a factor <= 0 erases or inverts "
                "the image"
            )
        self.shift_range = _range(shift_range, "RandomIntensity shift_range")
        self.p = _probability(p, "RandomIntensity p")

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        raw = _raw(sample)
        u_apply, u_scale, u_shift = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        if u_apply >= self.p:
            return _unchanged(sample)
        a = self.scale_range[0] + (self.scale_range[1] - self.scale_range[0]) * u_scale
        b = self.shift_range[0] + (self.shift_range[1] - self.shift_range[0]) * u_shift
        out = _unchanged(sample)
        out["raw"] = (raw * a + b).contiguous()  # Python scalars keep raw's dtype
        return out

    def __repr__(self) -> str:
        return f"RandomIntensity(scale_range={self.scale_range}, shift_range={self.shift_range}, p={self.p})"


class GaussianNoise:
    """Additive Gaussian noise on the raw intensities: ``raw + sigma * N(0, 1)`` voxel-wise.

    ``sigma ~ U(0, max_sigma)`` is drawn once per sample (same level for all channels); the noise itself is drawn
    independently for every voxel and channel.

    Args:
        max_sigma: largest noise standard deviation, in raw intensity units, ``>= 0``. Default 0.05 (5 % of the unit
            spread of normalised intensities). 0 makes the transform a no-op.
        p: probability that noise is added to a sample, in ``[0, 1]``. Default 0.5.
    """

    def __init__(self, max_sigma: float = 0.05, p: float = 0.5) -> None:
        self.max_sigma = _non_negative(max_sigma, "GaussianNoise max_sigma")
        self.p = _probability(p, "GaussianNoise p")

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        raw = _raw(sample)
        u_apply, u_sigma = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        if u_apply >= self.p or self.max_sigma == 0:
            return _unchanged(sample)
        sigma = self.max_sigma * u_sigma
        noise = torch.randn(raw.shape, generator=generator, dtype=raw.dtype, device=generator.device)
        out = _unchanged(sample)
        out["raw"] = (raw + sigma * noise.to(raw.device)).contiguous()
        return out

    def __repr__(self) -> str:
        return f"GaussianNoise(max_sigma={self.max_sigma}, p={self.p})"


class ElasticDeformation:
    """Smooth random elastic warp of raw, label and weight.

    Construction of the displacement field ``d`` (in voxels, one component per axis):

    1. a coarse grid of nodes is laid over the patch, ``n = max(2, ceil((size - 1) / spacing) + 1)`` nodes per axis,
       so neighbouring nodes are at most ``spacing`` voxels apart and the corner nodes sit on the patch corners;
    2. each node gets an independent displacement ``U(-m, m)`` per component, ``m = z_magnitude`` for z and
       ``magnitude`` for y and x;
    3. the node displacements are upsampled trilinearly (``align_corners=True``) to every voxel. Trilinear
       interpolation is a convex combination, so ``|d_z| <= z_magnitude`` and ``|d_y|, |d_x| <= magnitude``
       everywhere, and the field is smooth on the scale of ``spacing``.

    Output voxel ``v`` reads the input at ``v + d(v)``, clamped to the patch (edge values are repeated, never zeros
    invented): raw by trilinear interpolation (``grid_sample``, ``align_corners=True``), label and weight by taking the
    nearest voxel (an exact index lookup, so label values stay within their original set and class ids are never
    blended). Raw and label are read at the same points, so they stay aligned up to the half-voxel rounding of the
    nearest lookup.

    Args:
        magnitude: largest in-plane (y, x) displacement in voxels, ``>= 0``. Default 3.0.
        z_magnitude: largest z displacement in voxels, ``>= 0``. Default 1.0: smaller than in-plane because z is
            usually sampled more coarsely, so a voxel step in z is a larger physical distance.
        spacing: largest distance in voxels between nodes of the coarse grid, ``>= 1``. Default 16; smaller values
            give more local, wigglier warps (keep ``spacing`` well above ``2 * magnitude`` to avoid folding).
        p: probability that a sample is warped, in ``[0, 1]``. Default 0.5.
        interpolate_label: read the label trilinearly like the raw instead of at the nearest voxel: for float
            regression targets (a clean image), which are values to resample, not ids. Default False.
    """

    def __init__(
        self, magnitude: float = 3.0, z_magnitude: float = 1.0, spacing: int = 16, p: float = 0.5,
        interpolate_label: bool = False,
    ) -> None:
        self.interpolate_label = bool(interpolate_label)
        self.magnitude = _non_negative(magnitude, "ElasticDeformation magnitude")
        self.z_magnitude = _non_negative(z_magnitude, "ElasticDeformation z_magnitude")
        if isinstance(spacing, bool) or not isinstance(spacing, int) or spacing < 1:
            raise ConfigurationError(f"ElasticDeformation spacing {spacing!r} must be an integer of at least 1")
        self.spacing = spacing
        self.p = _probability(p, "ElasticDeformation p")

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        shape = _spatial_shape(sample)
        if torch.rand((), generator=generator).item() >= self.p or self.magnitude == self.z_magnitude == 0:
            return _unchanged(sample)
        raw = sample["raw"]
        device = raw.device
        nodes = [max(2, math.ceil((size - 1) / self.spacing) + 1) for size in shape]
        coarse = torch.rand((3, *nodes), generator=generator, dtype=torch.float32) * 2 - 1
        coarse *= torch.tensor([self.z_magnitude, self.magnitude, self.magnitude]).view(3, 1, 1, 1)
        field = F.interpolate(coarse[None], size=shape, mode="trilinear", align_corners=True)[0].to(device)

        coords = []
        for axis, size in enumerate(shape):
            view = [1, 1, 1]
            view[axis] = size
            base = torch.arange(size, dtype=torch.float32, device=device).view(view)
            # Clamping here (rather than relying on grid_sample's border padding alone) makes the nearest-voxel
            # indices of label/weight and raw's sampling points the same clamped points.
            coords.append((base + field[axis]).clamp_(0, size - 1))

        # grid_sample wants normalised coordinates in [-1, 1] with the last dimension ordered (x, y, z), the reverse
        # of the tensor's (z, y, x); an axis of size 1 has no extent to normalise over and stays at its only voxel.
        normalised = [c * (2.0 / (size - 1)) - 1 if size > 1 else torch.zeros_like(c) for c, size in zip(coords, shape)]
        grid = torch.stack(normalised[::-1], dim=-1)[None].to(raw.dtype)
        out = _unchanged(sample)
        out["raw"] = F.grid_sample(
            raw[None], grid, mode="bilinear", padding_mode="border", align_corners=True
        )[0].contiguous()  # "bilinear" on 5D input is trilinear
        keys = ["label", "weight"]
        if self.interpolate_label and "label" in sample:
            label = sample["label"]
            out["label"] = F.grid_sample(
                label.float()[None], grid.to(torch.float32), mode="bilinear", padding_mode="border", align_corners=True
            )[0].to(label.dtype).contiguous()
            keys.remove("label")

        zi, yi, xi = (c.round().long() for c in coords)
        for key in keys:
            if key in sample:
                out[key] = sample[key][..., zi, yi, xi].contiguous()
        return out

    def __repr__(self) -> str:
        return (
            f"ElasticDeformation(magnitude={self.magnitude}, z_magnitude={self.z_magnitude}, "
            f"spacing={self.spacing}, p={self.p})"
        )


class Compose:
    """Apply transforms in order, all drawing from the same generator.

    Args:
        transforms: callables ``(sample, generator) -> sample``, applied first to last. Default: none, which
            returns the sample unchanged (a new dict holding the same contiguous tensors).
    """

    def __init__(self, transforms: Sequence[Callable[[Sample, torch.Generator], Sample]] = ()) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        out = _unchanged(sample)
        for transform in self.transforms:
            out = transform(out, generator)
        return out

    def __len__(self) -> int:
        return len(self.transforms)

    def __iter__(self) -> Iterator[Callable[[Sample, torch.Generator], Sample]]:
        return iter(self.transforms)

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


@dataclass
class Augmentation:
    """Training augmentation settings; a nested config group ``data.augmentation`` in the CLI.

    :meth:`build` turns them into a :class:`Compose` applied to training patches only (never to validation or
    prediction). The pipeline order is elastic warp, flips, 90° rotations, intensity change, noise: geometry first,
    then intensities, so the noise is not warped or smoothed by interpolation. On the one-slice patches of 2D models
    (``model.spatial_dims: 2``) z flips and z displacements have nothing to act on and are skipped; in-plane flips,
    rotations and warps apply as usual.

    Args:
        flip: random flips along z, y and x, each with probability 0.5 (:class:`RandomFlip`). Default True.
        rotate90: random ``k * 90°`` rotations in the (y, x) plane only (:class:`RandomRotate90`). Default True.
        intensity: random ``raw * a + b`` with probability 0.5 (:class:`RandomIntensity`). Default True.
        intensity_scale: ``(low, high)`` range of the factor ``a``, ``0 < low <= high``. Default ``(0.9, 1.1)``.
        intensity_shift: ``(low, high)`` range of the offset ``b``, ``low <= high``. Default ``(-0.1, 0.1)``.
        noise_sigma: largest standard deviation of additive Gaussian noise, with probability 0.5
            (:class:`GaussianNoise`); 0 disables the noise. Default 0.05.
        elastic: smooth random elastic warp with probability 0.5 (:class:`ElasticDeformation`). Default False (it
            costs a trilinear resampling of every training patch).
        elastic_magnitude: largest in-plane (y, x) displacement of the warp, in voxels, ``>= 0``. Default 3.0.
        elastic_z_magnitude: largest z displacement of the warp, in voxels, ``>= 0``. Default 1.0 (z is usually
            sampled more coarsely).
        elastic_spacing: largest distance in voxels between the warp's control points, ``>= 1``. Default 16.
    """

    flip: bool = True
    rotate90: bool = True
    intensity: bool = True
    intensity_scale: tuple[float, float] = (0.9, 1.1)
    intensity_shift: tuple[float, float] = (-0.1, 0.1)
    noise_sigma: float = 0.05
    elastic: bool = False
    elastic_magnitude: float = 3.0
    elastic_z_magnitude: float = 1.0
    elastic_spacing: int = 16

    def __post_init__(self) -> None:
        # Config parsers hand over lists for tuple fields; normalise so equality and repr are stable.
        self.intensity_scale = _range(self.intensity_scale, "data.augmentation.intensity_scale")
        if self.intensity_scale[0] <= 0:
            raise ConfigurationError(
                f"data.augmentation.intensity_scale {self.intensity_scale} must be positive; a factor <= 0 erases "
                "or inverts the image"
            )
        self.intensity_shift = _range(self.intensity_shift, "data.augmentation.intensity_shift")
        self.noise_sigma = _non_negative(self.noise_sigma, "data.augmentation.noise_sigma")
        self.elastic_magnitude = _non_negative(self.elastic_magnitude, "data.augmentation.elastic_magnitude")
        self.elastic_z_magnitude = _non_negative(self.elastic_z_magnitude, "data.augmentation.elastic_z_magnitude")
        spacing = self.elastic_spacing
        if isinstance(spacing, bool) or not isinstance(spacing, int) or spacing < 1:
            raise ConfigurationError(f"data.augmentation.elastic_spacing {spacing!r} must be an integer of at least 1")

    def build(self, interpolate_label: bool = False) -> Compose:
        """The transform pipeline these settings describe; an empty :class:`Compose` when everything is off.

        Args:
            interpolate_label: the elastic warp resamples the label trilinearly, like the raw (float regression
                targets); see :class:`ElasticDeformation`. Default False: nearest voxel (ids, masks).
        """
        transforms: list[Callable[[Sample, torch.Generator], Sample]] = []
        if self.elastic:
            transforms.append(ElasticDeformation(
                self.elastic_magnitude, self.elastic_z_magnitude, self.elastic_spacing,
                interpolate_label=interpolate_label,
            ))
        if self.flip:
            transforms.append(RandomFlip())
        if self.rotate90:
            transforms.append(RandomRotate90())
        if self.intensity:
            transforms.append(RandomIntensity(self.intensity_scale, self.intensity_shift))
        if self.noise_sigma > 0:
            transforms.append(GaussianNoise(self.noise_sigma))
        return Compose(transforms)


def _dim(axis: str) -> int:
    # Negative dims address (z, y, x) identically in 3D labels and 4D raw / masks / weights.
    return AXES.index(axis) - 3


def _unchanged(sample: Sample) -> Sample:
    return {key: value.contiguous() if isinstance(value, Tensor) else value for key, value in sample.items()}


def _map_spatial(sample: Sample, fn: Callable[[Tensor], Tensor]) -> Sample:
    out = dict(sample)
    for key in SPATIAL_KEYS:
        if key in sample:
            out[key] = fn(sample[key]).contiguous()
    return out


def _raw(sample: Sample) -> Tensor:
    if "raw" not in sample:
        raise ValueError(f"a sample must have a 'raw' entry; it has {sorted(sample)}")
    raw = sample["raw"]
    if raw.dim() != 4 or not raw.is_floating_point():
        raise ValueError(
            f"sample 'raw' must be a float (C, D, H, W) tensor; got {raw.dtype} of shape {tuple(raw.shape)}"
        )
    return raw


def _spatial_shape(sample: Sample) -> tuple[int, int, int]:
    shape = tuple(_raw(sample).shape[-3:])
    for key in ("label", "weight"):
        if key in sample:
            value = sample[key]
            if value.dim() not in (3, 4) or tuple(value.shape[-3:]) != shape:
                raise ValueError(
                    f"sample '{key}' of shape {tuple(value.shape)} must be (D, H, W) or (C, D, H, W) with the "
                    f"raw's spatial shape {shape}"
                )
    return shape  # type: ignore[return-value]


def _axis_names(axes: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(axes, str):
        axes = (axes,)
    axes = tuple(axes)
    for axis in axes:
        if axis not in AXES:
            raise ConfigurationError(f"{what} {axes!r}: {axis!r} is not one of 'z', 'y', 'x'")
    if len(set(axes)) != len(axes):
        raise ConfigurationError(f"{what} {axes!r} names an axis twice")
    return axes


def _probability(p: float, what: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ConfigurationError(f"{what} {p!r} must be a probability in [0, 1]")
    return float(p)


def _non_negative(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ConfigurationError(f"{what} {value!r} must be a finite number >= 0")
    return float(value)


def _range(values: Sequence[float], what: str) -> tuple[float, float]:
    try:
        low, high = values
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{what} {values!r} must be a (low, high) pair of numbers") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigurationError(f"{what} {values!r} must hold finite numbers")
    if low > high:
        raise ConfigurationError(f"{what} {values!r} must be ordered (low <= high)")
    return low, high
