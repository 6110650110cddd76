"""OME-Zarr outputs: one NGFF 0.4 multiscale image per volume, ``<stem>_predictions.ome.zarr`` (needs the ``formats``
extra), which ome-zarr-py, napari's OME-Zarr reader and Fiji (MoBIE, n5-viewer) open at the right physical scale.

NGFF 0.4 is stored as Zarr format 2 (format 3 arrived with NGFF 0.5, which most viewers do not read yet). Layout::

    <stem>_predictions.ome.zarr/
        .zgroup  .zattrs          multiscales (axes c, z, y, x; one scale per level) and our own "unet3d" entry
        0/  1/  ...               predictions, level 0 = the full grid, each further level halved in y, x (and z)
        labels/.zattrs            {"labels": ["segmentation", "instances"]} (those written)
        labels/segmentation/      an NGFF label image (image-label + multiscales), axes z, y, x (c, z, y, x for the
                                  per-channel masks of sigmoid models)
        labels/instances/         the same for the watershed's instance ids

Level 0 is written while the volume streams, by rows of chunks, like the Zarr output (every chunk is written whole,
once: under DDP each rank could write its own rows). The smaller levels are computed after level 0 is complete, in
a pass that reads the previous level in slabs of a few chunk rows (memory: one slab of the previous level, whatever
the depth), so they cost one extra read of the output, not of the input.

Downsampling (:func:`pyramid_factors`): each level halves y and x; it halves z too while the z spacing of the
current level is at most sqrt(2) times its in-plane spacing (near-isotropic or finer in z), the choice that keeps
each level's voxels closest to cubes (halving z keeps the ratio r = z / yx, not halving gives r / 2; |log r| <=
|log(r / 2)| exactly when r <= sqrt(2)). Levels are added while the last one is wider than :data:`PYRAMID_MIN_SIZE`
in y or x, at most :data:`MAX_LEVELS` in all. Probabilities are mean-pooled (edge blocks: the mean of the voxels
there); labels are subsampled (the first voxel of each block: ids stay ids, and no id is invented), with the scale
and translation of each level saying where its voxels lie.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import replace_directory
from .zarr import ZARR_CLEVEL

# A level is added below the last while that one is wider than this in y or x.
PYRAMID_MIN_SIZE = 256
# Levels in all, level 0 included.
MAX_LEVELS = 5
# z-rows of the previous level read at once while a smaller level is computed (a multiple of 2).
PYRAMID_SLAB_ROWS = 32
NGFF_VERSION = "0.4"
# Spellings of a unit as files carry them -> the UDUNITS names NGFF 0.4 lists for space axes.
_NGFF_UNITS = {
    "um": "micrometer", "µm": "micrometer", "μm": "micrometer", "micron": "micrometer", "microns": "micrometer",
    "micrometre": "micrometer", "nm": "nanometer", "nanometre": "nanometer", "mm": "millimeter",
    "millimetre": "millimeter", "cm": "centimeter", "m": "meter", "metre": "meter", "pm": "picometer",
    "å": "angstrom", "a": "angstrom",
}
_KNOWN_NGFF_UNITS = {
    "angstrom", "attometer", "centimeter", "decimeter", "exameter", "femtometer", "foot", "gigameter", "hectometer",
    "inch", "kilometer", "megameter", "meter", "micrometer", "mile", "millimeter", "nanometer", "parsec", "petameter",
    "picometer", "terameter", "yard", "yoctometer", "yottameter", "zeptometer", "zettameter",
}


def ngff_unit(unit: str | None) -> str | None:
    """The NGFF (UDUNITS) name of a space unit (``"um"``, ``"µm"``, ``"micron"`` -> ``"micrometer"``), or None when
    it is unknown or not a length (then the axes carry no unit, which NGFF allows)."""
    if not unit:
        return None
    name = unit.strip().lower()
    name = _NGFF_UNITS.get(name, name)
    return name if name in _KNOWN_NGFF_UNITS else None


def pyramid_factors(shape: Sequence[int], voxel_size: Sequence[float]) -> list[tuple[int, int, int]]:
    """The ``(z, y, x)`` factor of each level after level 0 relative to the level before it (see the module).

    Args:
        shape: level 0's ``(D, H, W)``.
        voxel_size: level 0's ``(z, y, x)`` spacing.
    """
    d, h, w = (int(n) for n in shape)
    sz, sy, sx = (float(s) for s in voxel_size)
    factors: list[tuple[int, int, int]] = []
    while max(h, w) > PYRAMID_MIN_SIZE and len(factors) + 1 < MAX_LEVELS:
        fz = 2 if d > 1 and sz <= math.sqrt(2) * min(sy, sx) else 1
        factors.append((fz, 2, 2))
        d, h, w = -(-d // fz), -(-h // 2), -(-w // 2)
        sz, sy, sx = sz * fz, sy * 2, sx * 2
    return factors


def mean_pool(block: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Mean of each ``factors`` block over the last three axes of ``block``; a partial block at the far edge is the
    mean of the voxels it holds. Sums in float32 (a block has at most 8 voxels); returns float32, the caller rounds
    for integer storage. Memory: the result and its counts beside ``block``, no padded copy."""
    factors = tuple(int(f) for f in factors)
    d, h, w = block.shape[-3:]
    out_shape = tuple(-(-n // f) for n, f in zip((d, h, w), factors))
    total = np.zeros((*block.shape[:-3], *out_shape), np.float32)
    for dz in range(factors[0]):
        for dy in range(factors[1]):
            for dx in range(factors[2]):
                part = block[..., dz::factors[0], dy::factors[1], dx::factors[2]]
                total[..., : part.shape[-3], : part.shape[-2], : part.shape[-1]] += part
    # Voxels per block along each axis: f, except at a far edge that holds fewer; the count is their product.
    counts = [np.minimum(n - np.arange(m) * f, f).astype(np.float32) for n, m, f in zip((d, h, w), out_shape, factors)]
    total /= counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
    return total


def subsample(block: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """The first voxel of each ``factors`` block over the last three axes (nearest-neighbour downsampling of ids)."""
    fz, fy, fx = factors
    return np.ascontiguousarray(block[..., ::fz, ::fy, ::fx])


class OmeZarrStore:
    """A new NGFF 0.4 OME-Zarr image (Zarr format 2) at ``path``, Blosc-zstd compressed unless ``compression`` is
    None (``"gzip"`` stands for Blosc-zstd, as for Zarr outputs).

    ``predictions`` becomes the multiscale image (level 0 at ``0``), ``segmentation`` and ``instances`` the label
    images ``labels/<name>``; the smaller levels and the metadata are written by :meth:`close`, once every dataset
    is complete.

    Args:
        path: the (temporary) path of the store.
        compression: ``"gzip"`` (Blosc-zstd), or None.
        voxel_size: level 0's ``(z, y, x)`` spacing, or None when unknown (then 1.0 per axis and no unit).
            Default None.
        unit: the spacing's unit (``"um"``, ``"micrometer"``, ...), or None. Default None.
        attach: open the store another process created at ``path`` (every DDP rank writes its own chunk rows of
            level 0 into the one store, or a resumed run continues it): ``create_dataset`` returns the existing
            level-0 arrays, checked against what is asked for. The smaller levels and the metadata are written by
            the process that completes the output (rank 0), in :meth:`close`; the others only :meth:`release`.
            Default False.
    """

    encode = None
    physical = True  # takes voxel_size and unit
    shared_writes = True  # several processes may write disjoint chunk rows of level 0
    replace = staticmethod(replace_directory)

    def __init__(self, path: Path, compression: str | None, voxel_size: Sequence[float] | None = None,
                 unit: str | None = None, attach: bool = False) -> None:
        import numcodecs
        import zarr

        self._numcodecs = numcodecs
        self.path = path
        self.compression = compression
        self.voxel_size = tuple(float(s) for s in voxel_size) if voxel_size is not None else (1.0, 1.0, 1.0)
        self.unit = ngff_unit(unit) if voxel_size is not None else None
        self.attached = attach
        self.group = zarr.open_group(str(path), mode="r+" if attach else "w-", zarr_format=2)
        self._labels: Any = self.group["labels"] if attach and "labels" in self.group else None
        self._arrays: dict[str, Any] = {}

    @staticmethod
    def encoder(compression: str | None) -> None:
        return None  # Blosc runs inside zarr

    def _create(self, group: Any, path: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...]) -> Any:
        compressor = None if self.compression is None else self._numcodecs.Blosc(
            cname="zstd", clevel=ZARR_CLEVEL, shuffle=self._numcodecs.Blosc.SHUFFLE
        )
        # NGFF 0.4 asks for "/" between the chunk indices of a key (0/1/2, not 0.1.2).
        # overwrite: a smaller level that a killed run had begun is written afresh when the output is resumed
        return group.create_array(path, shape=shape, dtype=dtype, chunks=chunks, compressors=compressor,
                                  fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"}, overwrite=True)

    def create_dataset(self, name: str, *, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...]) -> Any:
        if self.attached:
            array = self.group["0"] if name == "predictions" else self.group["labels"][name]["0"]
            if tuple(array.shape) != tuple(shape) or str(array.dtype) != str(dtype) or tuple(array.chunks) != chunks:
                raise RuntimeError(f"{name} of {self.path} is {array.shape} {array.dtype} in chunks {array.chunks}, "
                                   f"not {shape} {dtype} in {chunks}")
            self._arrays[name] = array
            return array
        if name == "predictions":
            array = self._create(self.group, "0", shape, dtype, chunks)
        else:
            if self._labels is None:
                self._labels = self.group.create_group("labels")
            array = self._create(self._labels.create_group(name), "0", shape, dtype, chunks)
        self._arrays[name] = array
        return array

    @staticmethod
    def write_encoded(dataset: Any, offset: tuple[int, ...], data: bytes) -> None:
        raise NotImplementedError("Zarr stores compress their chunks themselves")

    def release(self) -> None:
        """A DDP rank's rows are written: nothing is held open, and the pyramid is the completing process's."""

    def close(self) -> None:
        """Write the smaller levels of every array and the NGFF metadata: called when every dataset is complete."""
        factors = pyramid_factors(self._arrays["predictions"].shape[-3:], self.voxel_size)
        for name, level0 in self._arrays.items():
            group = self.group if name == "predictions" else self._labels[name]
            pool = mean_pool if name == "predictions" else subsample
            levels = [level0]
            for i, factor in enumerate(factors, start=1):
                levels.append(self._downsample(group, str(i), levels[-1], factor, pool))
            group.attrs["multiscales"] = [self._multiscale(name, levels, factors, averaged=pool is mean_pool)]
            if name != "predictions":
                group.attrs["image-label"] = {"version": NGFF_VERSION, "source": {"image": "../../"}}
        if self._labels is not None:
            self._labels.attrs["labels"] = [name for name in self._arrays if name != "predictions"]
        self.group.attrs["unet3d"] = {"output": "predictions", "voxel_size": list(self.voxel_size),
                                      "unit": self.unit}

    def _downsample(self, group: Any, path: str, source: Any, factor: tuple[int, int, int], pool: Any) -> Any:
        """Level ``path`` from ``source`` (the level above), read in slabs of :data:`PYRAMID_SLAB_ROWS` z-rows."""
        fz = factor[0]
        d, h, w = source.shape[-3:]
        lead = source.shape[:-3]
        shape = (*lead, -(-d // fz), -(-h // factor[1]), -(-w // factor[2]))
        chunks = tuple(min(c, n) for c, n in zip(source.chunks, shape))
        target = self._create(group, path, shape, source.dtype, chunks)
        if "scale" in source.attrs:
            target.attrs["scale"] = source.attrs["scale"]
        # Slabs a whole number of target chunk rows deep, so that every chunk of the target is written once, whole.
        rows = max(PYRAMID_SLAB_ROWS // fz, 1)
        rows = max(rows // chunks[-3], 1) * chunks[-3]
        integer = np.issubdtype(source.dtype, np.integer)
        # One channel at a time: a slab of one channel is what the pass holds.
        for channel in (range(lead[0]) if lead else [None]):
            first = () if channel is None else (channel,)
            for t0 in range(0, shape[-3], rows):
                t1 = min(t0 + rows, shape[-3])
                block = np.asarray(source[(*first, slice(t0 * fz, min(t1 * fz, d)))])
                values = pool(block, factor)
                if integer and pool is mean_pool:
                    values = np.rint(values)
                target[(*first, slice(t0, t1))] = values.astype(source.dtype)
        return target

    def _multiscale(self, name: str, levels: list[Any], factors: list[tuple[int, int, int]], averaged: bool) -> dict:
        """The NGFF 0.4 ``multiscales`` entry of one image: axes, and per level its scale (the voxel size times the
        product of the factors so far) and, for averaged levels, the translation of its voxel centres ((F - 1) / 2
        level-0 voxels, F the product of the factors), so that every level lies where level 0 does."""
        channels = len(levels[0].shape) == 4
        space: dict[str, str] = {"type": "space"}
        if self.unit is not None:
            space["unit"] = self.unit
        axes = ([{"name": "c", "type": "channel"}] if channels else []) + [
            {"name": axis, **space} for axis in "zyx"
        ]
        datasets = []
        total = (1, 1, 1)
        for i, _ in enumerate(levels):
            if i:
                total = tuple(t * f for t, f in zip(total, factors[i - 1]))
            scale = [s * t for s, t in zip(self.voxel_size, total)]
            transforms: list[dict[str, Any]] = [{"type": "scale", "scale": ([1.0] if channels else []) + scale}]
            if averaged and i:
                shift = [(t - 1) / 2 * s for s, t in zip(self.voxel_size, total)]
                transforms.append({"type": "translation", "translation": ([0.0] if channels else []) + shift})
            datasets.append({"path": str(i), "coordinateTransformations": transforms})
        return {"version": NGFF_VERSION, "name": name, "axes": axes, "datasets": datasets,
                "type": "mean" if averaged else "nearest"}

    def discard(self) -> None:
        pass  # nothing is held open
