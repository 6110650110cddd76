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


# --------------------------------------------------------------------------------------------------- nnU-Net-style
# The spatial and intensity augmentations of nnU-Net (Isensee et al., "nnU-Net: a self-configuring method for deep
# learning-based biomedical image segmentation", Nature Methods 18, 2021, Supplementary Note 4: rotation, scaling,
# Gaussian noise and blur, brightness, contrast, simulated low resolution, gamma), each with its own probability.


class RandomAffine:
    """Random rotation by arbitrary angles and isotropic scaling, as one resampling of raw, label and weight.

    Output voxel ``v`` reads the input at ``c + R^T (v - c) / s`` (``c`` the patch centre, coordinates in voxels),
    clamped to the patch (edge values are repeated, never zeros invented): raw by trilinear interpolation
    (``grid_sample``, ``align_corners=True``), label and weight at the nearest voxel (an exact index lookup, so class
    ids are never blended and raw and labels are read at the same points). ``R`` rotates by ``θ_yx ~ U(±degrees)``
    in the (y, x) plane and by ``θ_zx, θ_zy ~ U(±z_degrees)`` in the planes containing z (skipped on one-slice
    patches); ``s ~ U(scale_range)`` magnifies (``s > 1``) or shrinks the content. Rotation and scaling are decided
    separately (probabilities ``rotation_p``, ``scale_p``) and applied together when both happen; the random numbers
    drawn do not depend on which do.

    Args:
        rotation_p: probability of a rotation, in ``[0, 1]``. Default 0.2 (nnU-Net's).
        degrees: largest in-plane (y, x) rotation angle in degrees, ``>= 0``. Default 180.
        z_degrees: largest angle of the rotations that tilt z into the plane, ``>= 0``. Default 0.0 (anisotropic
            volumes, see :class:`RandomRotate90`); nnU-Net uses 30 for isotropic data.
        scale_p: probability of a scaling, in ``[0, 1]``. Default 0.2 (nnU-Net's).
        scale_range: ``(low, high)`` of the factor ``s``, ``0 < low <= high``. Default ``(0.7, 1.4)`` (nnU-Net's).
    """

    def __init__(
        self,
        rotation_p: float = 0.2,
        degrees: float = 180.0,
        z_degrees: float = 0.0,
        scale_p: float = 0.2,
        scale_range: Sequence[float] = (0.7, 1.4),
    ) -> None:
        self.rotation_p = _probability(rotation_p, "RandomAffine rotation_p")
        self.degrees = _non_negative(degrees, "RandomAffine degrees")
        self.z_degrees = _non_negative(z_degrees, "RandomAffine z_degrees")
        self.scale_p = _probability(scale_p, "RandomAffine scale_p")
        self.scale_range = _positive_range(scale_range, "RandomAffine scale_range")

    def matrix(self, generator: torch.Generator, flat_z: bool = False) -> Tensor | None:
        """The ``3 x 3`` map ``R^T / s`` from output to input offsets (``(z, y, x)`` order), or None for none."""
        u = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
        rotate, scale = u[0] < self.rotation_p, u[1] < self.scale_p
        if not (rotate or scale):
            return None
        matrix = torch.eye(3, dtype=torch.float64)
        if rotate:
            yx = math.radians(self.degrees * (2 * u[2] - 1))
            zx, zy = (0.0, 0.0) if flat_z else (math.radians(self.z_degrees * (2 * v - 1)) for v in u[3:5])
            for (a, b), angle in (((1, 2), yx), ((0, 2), zx), ((0, 1), zy)):
                turn = torch.eye(3, dtype=torch.float64)
                turn[a, a] = turn[b, b] = math.cos(angle)
                turn[a, b], turn[b, a] = -math.sin(angle), math.sin(angle)
                matrix = turn @ matrix
            matrix = matrix.T
        if scale:
            low, high = self.scale_range
            matrix = matrix / (low + (high - low) * u[5])
        return matrix

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        shape = _spatial_shape(sample)
        matrix = self.matrix(generator, flat_z=shape[0] == 1)
        if matrix is None:
            return _unchanged(sample)
        device = sample["raw"].device
        grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij"))
        centre = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float32).view(3, 1, 1, 1)
        points = torch.einsum("ij,j...->i...", matrix.float(), grid - centre) + centre
        coords = [points[a].clamp(0, n - 1).to(device) for a, n in enumerate(shape)]
        return _resample(sample, coords, shape)

    def __repr__(self) -> str:
        return (
            f"RandomAffine(rotation_p={self.rotation_p}, degrees={self.degrees}, z_degrees={self.z_degrees}, "
            f"scale_p={self.scale_p}, scale_range={self.scale_range})"
        )


class RandomGamma:
    """Gamma correction of the raw intensities, per channel within the patch's own range:
    ``lo + (hi - lo) * ((x - lo) / (hi - lo)) ** γ`` with ``lo``, ``hi`` the channel's minimum and maximum in the
    patch and ``γ ~ U(gamma_range)`` once per sample (a constant channel is left as it is). Raw only.

    Args:
        gamma_range: ``(low, high)`` of ``γ``, ``0 < low <= high``. Default ``(0.7, 1.5)`` (nnU-Net's).
        p: probability per sample, in ``[0, 1]``. Default 0.3 (nnU-Net's).
    """

    def __init__(self, gamma_range: Sequence[float] = (0.7, 1.5), p: float = 0.3) -> None:
        self.gamma_range = _positive_range(gamma_range, "RandomGamma gamma_range")
        self.p = _probability(p, "RandomGamma p")

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        raw = _raw(sample)
        u_apply, u_gamma = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        if u_apply >= self.p:
            return _unchanged(sample)
        gamma = self.gamma_range[0] + (self.gamma_range[1] - self.gamma_range[0]) * u_gamma
        flat = raw.reshape(raw.shape[0], -1)
        low = flat.min(dim=1).values.view(-1, 1, 1, 1)
        span = (flat.max(dim=1).values.view(-1, 1, 1, 1) - low)
        safe = torch.where(span > 0, span, torch.ones_like(span))
        out = _unchanged(sample)
        out["raw"] = (low + safe * ((raw - low) / safe).clamp(0, 1) ** gamma).contiguous()
        return out

    def __repr__(self) -> str:
        return f"RandomGamma(gamma_range={self.gamma_range}, p={self.p})"


class RandomBrightnessContrast:
    """Multiplicative brightness ``x * b``, then contrast ``(x - m) * k + m`` clipped to the channel's range before
    it (``m`` the channel's mean in the patch), ``b ~ U(brightness_range)`` and ``k ~ U(contrast_range)`` once per
    sample, each applied with its own probability. Raw only.

    Args:
        brightness_range: ``(low, high)`` of ``b``, ``0 < low <= high``. Default ``(0.75, 1.25)`` (nnU-Net's).
        brightness_p: probability of the brightness change, in ``[0, 1]``. Default 0.15 (nnU-Net's).
        contrast_range: ``(low, high)`` of ``k``, ``0 < low <= high``. Default ``(0.75, 1.25)`` (nnU-Net's).
        contrast_p: probability of the contrast change, in ``[0, 1]``. Default 0.15 (nnU-Net's).
    """

    def __init__(
        self,
        brightness_range: Sequence[float] = (0.75, 1.25),
        brightness_p: float = 0.15,
        contrast_range: Sequence[float] = (0.75, 1.25),
        contrast_p: float = 0.15,
    ) -> None:
        self.brightness_range = _positive_range(brightness_range, "RandomBrightnessContrast brightness_range")
        self.brightness_p = _probability(brightness_p, "RandomBrightnessContrast brightness_p")
        self.contrast_range = _positive_range(contrast_range, "RandomBrightnessContrast contrast_range")
        self.contrast_p = _probability(contrast_p, "RandomBrightnessContrast contrast_p")

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        raw = _raw(sample)
        u_b, u_bv, u_c, u_cv = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        brighten, contrast = u_b < self.brightness_p, u_c < self.contrast_p
        if not (brighten or contrast):
            return _unchanged(sample)
        x = raw
        if brighten:
            x = x * (self.brightness_range[0] + (self.brightness_range[1] - self.brightness_range[0]) * u_bv)
        if contrast:
            k = self.contrast_range[0] + (self.contrast_range[1] - self.contrast_range[0]) * u_cv
            flat = x.reshape(x.shape[0], -1)
            mean = flat.mean(dim=1).view(-1, 1, 1, 1)
            low, high = flat.min(dim=1).values.view(-1, 1, 1, 1), flat.max(dim=1).values.view(-1, 1, 1, 1)
            x = torch.minimum(torch.maximum((x - mean) * k + mean, low), high)
        out = _unchanged(sample)
        out["raw"] = x.contiguous()
        return out

    def __repr__(self) -> str:
        return (
            f"RandomBrightnessContrast(brightness_range={self.brightness_range}, brightness_p={self.brightness_p}, "
            f"contrast_range={self.contrast_range}, contrast_p={self.contrast_p})"
        )


class GaussianBlur:
    """Gaussian smoothing of the raw intensities with ``σ ~ U(sigma_range)`` voxels once per sample, the same along
    every axis of more than one voxel: separable kernels of radius ``int(3σ + 0.5)``, normalised, with the edge
    voxels repeated beyond the patch (as ``scipy.ndimage.gaussian_filter(mode="nearest", truncate=3)``). Raw only.

    Args:
        sigma_range: ``(low, high)`` of ``σ`` in voxels, ``0 < low <= high``. Default ``(0.5, 1.0)`` (nnU-Net's).
        p: probability per sample, in ``[0, 1]``. Default 0.2 (nnU-Net's).
    """

    def __init__(self, sigma_range: Sequence[float] = (0.5, 1.0), p: float = 0.2) -> None:
        self.sigma_range = _positive_range(sigma_range, "GaussianBlur sigma_range")
        self.p = _probability(p, "GaussianBlur p")

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        raw = _raw(sample)
        u_apply, u_sigma = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        if u_apply >= self.p:
            return _unchanged(sample)
        sigma = self.sigma_range[0] + (self.sigma_range[1] - self.sigma_range[0]) * u_sigma
        radius = int(3.0 * sigma + 0.5)
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = (kernel / kernel.sum()).to(raw.dtype).to(raw.device)
        x = raw[None]
        channels = raw.shape[0]
        for axis in range(3):
            size = raw.shape[1 + axis]
            if size == 1 or radius == 0:
                continue
            view = [1, 1, 1]
            view[axis] = kernel.numel()
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
            weight = kernel.view(1, 1, *view).expand(channels, 1, *view)
            x = F.conv3d(F.pad(x, pad, mode="replicate"), weight, groups=channels)
        out = _unchanged(sample)
        out["raw"] = x[0].contiguous()
        return out

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma_range={self.sigma_range}, p={self.p})"


class SimulateLowResolution:
    """Simulated low resolution: the raw patch is shrunk by ``zoom ~ U(zoom_range)`` along every axis of more than
    one voxel (nearest-neighbour, to ``max(1, round(n * zoom))`` voxels) and enlarged back (trilinear,
    ``align_corners=False``), once per sample; fine detail is lost as in a coarser acquisition. Raw only.

    Args:
        zoom_range: ``(low, high)`` of ``zoom``, ``0 < low <= high <= 1``. Default ``(0.5, 1.0)`` (nnU-Net's).
        p: probability per sample, in ``[0, 1]``. Default 0.25 (nnU-Net's).
    """

    def __init__(self, zoom_range: Sequence[float] = (0.5, 1.0), p: float = 0.25) -> None:
        self.zoom_range = _positive_range(zoom_range, "SimulateLowResolution zoom_range")
        if self.zoom_range[1] > 1:
            raise ConfigurationError(
                f"SimulateLowResolution zoom_range {self.zoom_range} must lie in (0, 1]: it shrinks the patch"
            )
        self.p = _probability(p, "SimulateLowResolution p")

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        raw = _raw(sample)
        u_apply, u_zoom = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        if u_apply >= self.p:
            return _unchanged(sample)
        zoom = self.zoom_range[0] + (self.zoom_range[1] - self.zoom_range[0]) * u_zoom
        shape = tuple(raw.shape[1:])
        small = tuple(n if n == 1 else max(1, round(n * zoom)) for n in shape)
        low = F.interpolate(raw[None], size=small, mode="nearest")
        out = _unchanged(sample)
        out["raw"] = F.interpolate(low, size=shape, mode="trilinear", align_corners=False)[0].contiguous()
        return out

    def __repr__(self) -> str:
        return f"SimulateLowResolution(zoom_range={self.zoom_range}, p={self.p})"


def _resample(sample: Sample, coords: list[Tensor], shape: tuple[int, int, int]) -> Sample:
    """Raw read trilinearly, label and weight at the nearest voxel, at the (clamped) points ``coords`` (z, y, x)."""
    raw = sample["raw"]
    normalised = [c * (2.0 / (n - 1)) - 1 if n > 1 else torch.zeros_like(c) for c, n in zip(coords, shape)]
    grid = torch.stack(normalised[::-1], dim=-1)[None].to(raw.dtype)
    out = _unchanged(sample)
    out["raw"] = F.grid_sample(raw[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
    out["raw"] = out["raw"].contiguous()
    zi, yi, xi = (c.round().long() for c in coords)
    for key in ("label", "weight"):
        if key in sample:
            out[key] = sample[key][..., zi, yi, xi].contiguous()
    return out


def _positive_range(values: Sequence[float], what: str) -> tuple[float, float]:
    low, high = _range(values, what)
    if low <= 0:
        raise ConfigurationError(f"{what} {values!r} must hold numbers > 0")
    return low, high


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

    The augmentations of nnU-Net (Isensee et al., Nature Methods 2021), each off at probability 0 (the default, so
    that earlier settings train as before) and on with nnU-Net's values listed in the README's recipe:

        rotation_p: probability of a rotation by an arbitrary angle (:class:`RandomAffine`, one trilinear
            resampling of raw, labels and weights read at the nearest voxel, together with the scaling). Default 0.0.
        rotation_degrees: largest (y, x) rotation angle, in degrees. Default 180.0.
        rotation_z_degrees: largest angle of the rotations tilting z into the plane (for isotropic data), in
            degrees. Default 0.0.
        scale_p: probability of an isotropic scaling by ``s ~ U(scale_range)`` (:class:`RandomAffine`). Default 0.0.
        scale_range: ``(low, high)`` of ``s``, ``0 < low <= high``. Default ``(0.7, 1.4)``.
        gamma_p: probability of a gamma correction within the patch's range (:class:`RandomGamma`). Default 0.0.
        gamma_range: ``(low, high)`` of ``γ``. Default ``(0.7, 1.5)``.
        brightness_p: probability of a multiplicative brightness change (:class:`RandomBrightnessContrast`).
            Default 0.0.
        brightness_range: ``(low, high)`` of the factor. Default ``(0.75, 1.25)``.
        contrast_p: probability of a contrast change around the patch's mean (:class:`RandomBrightnessContrast`).
            Default 0.0.
        contrast_range: ``(low, high)`` of the factor. Default ``(0.75, 1.25)``.
        blur_p: probability of a Gaussian blur (:class:`GaussianBlur`). Default 0.0.
        blur_sigma: ``(low, high)`` of its ``σ`` in voxels. Default ``(0.5, 1.0)``.
        low_resolution_p: probability of a simulated low resolution (:class:`SimulateLowResolution`). Default 0.0.
        low_resolution_zoom: ``(low, high)`` of its zoom factor, in ``(0, 1]``. Default ``(0.5, 1.0)``.

    Order: elastic warp, rotation/scaling, flips, 90° rotations, intensity change, noise, blur, brightness/contrast,
    low resolution, gamma.
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
    rotation_p: float = 0.0
    rotation_degrees: float = 180.0
    rotation_z_degrees: float = 0.0
    scale_p: float = 0.0
    scale_range: tuple[float, float] = (0.7, 1.4)
    gamma_p: float = 0.0
    gamma_range: tuple[float, float] = (0.7, 1.5)
    brightness_p: float = 0.0
    brightness_range: tuple[float, float] = (0.75, 1.25)
    contrast_p: float = 0.0
    contrast_range: tuple[float, float] = (0.75, 1.25)
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    low_resolution_p: float = 0.0
    low_resolution_zoom: tuple[float, float] = (0.5, 1.0)

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
        for name in ("rotation_p", "scale_p", "gamma_p", "brightness_p", "contrast_p", "blur_p", "low_resolution_p"):
            setattr(self, name, _probability(getattr(self, name), f"data.augmentation.{name}"))
        for name in ("rotation_degrees", "rotation_z_degrees"):
            setattr(self, name, _non_negative(getattr(self, name), f"data.augmentation.{name}"))
        for name in ("scale_range", "gamma_range", "brightness_range", "contrast_range", "blur_sigma",
                     "low_resolution_zoom"):
            setattr(self, name, _positive_range(getattr(self, name), f"data.augmentation.{name}"))
        if self.low_resolution_zoom[1] > 1:
            raise ConfigurationError(
                f"data.augmentation.low_resolution_zoom {self.low_resolution_zoom} must lie in (0, 1]: it shrinks"
            )

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
        if self.rotation_p > 0 or self.scale_p > 0:
            transforms.append(RandomAffine(
                self.rotation_p, self.rotation_degrees, self.rotation_z_degrees, self.scale_p, self.scale_range
            ))
        if self.flip:
            transforms.append(RandomFlip())
        if self.rotate90:
            transforms.append(RandomRotate90())
        if self.intensity:
            transforms.append(RandomIntensity(self.intensity_scale, self.intensity_shift))
        if self.noise_sigma > 0:
            transforms.append(GaussianNoise(self.noise_sigma))
        if self.blur_p > 0:
            transforms.append(GaussianBlur(self.blur_sigma, self.blur_p))
        if self.brightness_p > 0 or self.contrast_p > 0:
            transforms.append(RandomBrightnessContrast(
                self.brightness_range, self.brightness_p, self.contrast_range, self.contrast_p
            ))
        if self.low_resolution_p > 0:
            transforms.append(SimulateLowResolution(self.low_resolution_zoom, self.low_resolution_p))
        if self.gamma_p > 0:
            transforms.append(RandomGamma(self.gamma_range, self.gamma_p))
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
