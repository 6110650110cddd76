"""NIfTI volumes (``*.nii``, ``*.nii.gz``; NIfTI-1 and NIfTI-2), read with nibabel: the format of medical imaging.

NIfTI stores ``(x, y, z)`` (or ``(x, y, z, c)``, the 4th axis as channels); they are read as ``(z, y, x)`` and
``(c, z, y, x)``, the axis order of SimpleITK and nnU-Net (nibabel's array transposed). Length-1 axes beyond the
third (a 5D ``(x, y, z, 1, c)`` vector image) are dropped; more axes than that are refused. Values are read with the
header's scaling (``scl_slope``/``scl_inter``) applied, as nibabel reads them.

The internal path is ignored: a NIfTI file holds one image, so labels come from a second file
(``data.label_paths``: the medical layout ``case.nii.gz`` + ``case_seg.nii.gz``). An uncompressed ``.nii`` is read
lazily, region by region, through nibabel's memory-mapped array proxy; a ``.nii.gz`` cannot be read piece by piece
(gzip has no random access), so each reading process decompresses it whole into memory on its first read, with a
``note:`` stating how much. The voxel size comes from the header's zooms (``pixdim``) and spatial unit
(``xyzt_units``). Needs nibabel, from the optional ``formats`` extra.
"""

from __future__ import annotations

import math
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigurationError
from .spacing import VoxelSize, voxel_size_or_none
from .base import AxisView, VolumeFile, error_summary, one_slice

SUFFIXES = (".nii", ".nii.gz")
# What reading a damaged file raises besides OSError: a gzip stream cut short (EOFError), a bad gzip block
# (zlib.error), an array that does not fit the bytes (ValueError).
_DAMAGE = (OSError, EOFError, zlib.error, ValueError)
# The compressed files this process read whole, so that the note is printed once per file and process.
_NOTED: set[str] = set()


def require_nibabel(what: str) -> Any:
    """nibabel, or a one-line error naming the ``formats`` extra when it is not installed."""
    try:
        import nibabel
    except ImportError:
        raise ConfigurationError(
            f"{what} needs nibabel, from the optional 'formats' extra: pip install 'unet3d-lightning[formats]'"
        ) from None
    return nibabel


def is_nifti_name(path: str | Path) -> bool:
    """Whether a file name is a NIfTI file's (``.nii`` or ``.nii.gz``, any case)."""
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


class _NiftiData:
    """The stored ``(x, y, z[, ...])`` array of a NIfTI image, read on demand: region reads through nibabel's array
    proxy (memory-mapped for an uncompressed file), or for a compressed file from the whole array, decompressed on
    the first read. Damage found while reading is an OSError, the read error every format shares."""

    def __init__(self, image: Any, path: Path, role: str, dtype: np.dtype) -> None:
        self.image = image
        self.path = path
        self.role = role
        self.shape = tuple(int(n) for n in image.shape)
        self.ndim = len(self.shape)
        self.dtype = dtype
        self.chunks = None
        self.compressed = path.name.lower().endswith(".gz")
        self._whole: np.ndarray | None = None

    def __getitem__(self, index: Any) -> np.ndarray:
        try:
            if not self.compressed:
                region = np.asarray(self.image.dataobj[index])
                # a read-only view of the memory map: readers may normalise a region in place, so it is copied
                return region if region.flags.writeable else region.copy()
            if self._whole is None:
                self._whole = np.asarray(self.image.dataobj)
                name = str(self.path.resolve())
                if name not in _NOTED:
                    _NOTED.add(name)
                    print(
                        f"note: {self.role} volume {self.path}: a compressed NIfTI file cannot be read piece by "
                        f"piece; it is read whole into memory, {self._whole.nbytes / 2**20:,.0f} MiB in each reading "
                        "process (store it uncompressed, .nii, to read it region by region)",
                        file=sys.stderr, flush=True,
                    )
            return self._whole[index].copy()  # readers may normalise a region in place
        except _DAMAGE as err:
            raise OSError(error_summary(err)) from None


class NiftiFile(VolumeFile):
    """A NIfTI image, as ``(D, H, W)`` or ``(C, D, H, W)``; internal paths are ignored (one image per file)."""

    format = "nifti"
    suffixes = SUFFIXES

    @classmethod
    def recognises(cls, path: Path) -> bool:
        return is_nifti_name(path)

    def __init__(self, path: Path, role: str) -> None:
        super().__init__(path, role)
        nibabel = require_nibabel(f"{role} volume {path}")
        if not path.is_file():
            raise ConfigurationError(f"{role} volume {path}: file does not exist")
        where = f"{role} volume {path}"
        try:
            # mmap: an uncompressed file's voxels are paged in as regions are read, never copied whole.
            self.image = nibabel.load(str(path), mmap=True)
            if not isinstance(self.image, (nibabel.Nifti1Image, nibabel.Nifti2Image)):
                raise ConfigurationError(
                    f"{where}: holds a {type(self.image).__name__}, not a NIfTI image; convert it to NIfTI"
                )
            shape = tuple(int(n) for n in self.image.shape)
        except (nibabel.filebasedimages.ImageFileError, *_DAMAGE) as err:
            raise ConfigurationError(
                f"{where}: cannot be read as a NIfTI file ({error_summary(err)}); it may be truncated or not NIfTI"
            ) from None
        self._check_size(shape)
        self._array: Any = None

    def _check_size(self, shape: tuple[int, ...]) -> None:
        """An uncompressed file must hold every voxel its header announces: a copy cut short would otherwise fail
        only when the missing rows are read."""
        if self.path.name.lower().endswith(".gz"):
            return  # a gzip stream cut short fails on its first read, which the scan at setup does
        header = self.image.header
        expected = int(header.get_data_offset()) + math.prod(shape) * np.dtype(header.get_data_dtype()).itemsize
        size = self.path.stat().st_size
        if size < expected:
            raise ConfigurationError(
                f"{self.role} volume {self.path}: truncated NIfTI file ({size:,} bytes, but its header announces "
                f"{expected:,} for shape {shape} of {header.get_data_dtype()}); copy it again"
            )

    def array(self, key: str) -> Any:
        if self._array is None:
            self._array = self._open()
        return self._array

    def _open(self) -> Any:
        where = f"{self.role} volume {self.path}"
        shape = tuple(int(n) for n in self.image.shape)
        # (x, y, z) and then length-1 axes (time, a single component) that carry no information
        keep = [i for i, n in enumerate(shape) if i < 3 or n > 1]
        if len(keep) > 4 or len(shape) < 2:
            raise ConfigurationError(
                f"{where}: the NIfTI image has shape {shape} (x, y, z, ...); expected 3D (x, y, z) or 4D "
                "(x, y, z, c) with the channels on the 4th axis"
            )
        try:
            # the dtype values have once the header's scaling is applied (a float for scaled integers)
            first = np.asarray(self.image.dataobj[(slice(0, 1),) * len(shape)])
        except _DAMAGE as err:
            raise ConfigurationError(
                f"{where}: cannot be read ({error_summary(err)}); the file may be corrupt or truncated"
            ) from None
        data = _NiftiData(self.image, self.path, self.role, first.dtype)
        if len(keep) == 2:  # a 2D image (x, y): the one-slice volume (1, y, x)
            return one_slice(AxisView(data, keep, (1, 0)))
        # view axes (z, y, x) are stored axes (2, 1, 0); (c, z, y, x) are (3, 2, 1, 0)
        order = tuple(range(len(keep) - 1, -1, -1))
        return AxisView(data, keep, order)

    def voxel_size(self, key: str) -> VoxelSize | None:
        """The header's zooms (``pixdim[1:4]``, x, y, z) as ``(z, y, x)``, in its spatial unit (``xyzt_units``:
        millimetre, micron or metre; None when "unknown")."""
        header = self.image.header
        try:
            zooms = header.get_zooms()[:3]
            unit = header.get_xyzt_units()[0]
        except (ValueError, IndexError):
            return None
        if len(zooms) < 3:
            zooms = (*zooms, 1.0)
        # pixdim is float32: 0.9 is stored as 0.89999998; its shortest decimal is the size that was written.
        zyx = tuple(float(str(np.float32(z))) for z in reversed(zooms))
        return voxel_size_or_none(zyx, unit)
