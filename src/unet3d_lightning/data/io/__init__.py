"""Reading volumes: one module per format (:mod:`.hdf5`, :mod:`.zarr`, :mod:`.tiff`) and the registry that picks a
format by the path.

A volume lives in a *file* (an HDF5 file, a Zarr store directory, a TIFF file) at an *internal path* (an HDF5
dataset, a Zarr array inside the store's group; a TIFF file holds one image, so TIFF ignores internal paths).
:func:`open_file` opens a file read-only and returns a :class:`~.base.VolumeFile`, whose ``array(key)`` gives an
array with ``shape``, ``dtype``, ``ndim``, ``chunks`` and region reads by slices.

The format comes from the path (each format's module documents its internal paths):

- ``*.h5``, ``*.hdf5``, ``*.hdf`` (and any other file, as before other formats were read): HDF5;
- a ``*.zarr`` directory, or any directory holding ``zarr.json``/``.zgroup``/``.zarray``: a Zarr store (format 2
  or 3, OME-Zarr included);
- ``*.tif``, ``*.tiff``: TIFF;
- ``*.nii``, ``*.nii.gz``: NIfTI (read as ``(z, y, x)``, see :mod:`.nifti`).

Chunks that a file does not store read as the array's fill value; ``VolumeFile.missing_chunks`` finds them (from
the store's listing or HDF5's chunk index, without reading data), so that the checks can refuse or announce them
(:class:`~.chunks.ChunkAudit`). Zarr, TIFF and NIfTI need the optional ``formats`` extra
(``pip install 'unet3d-lightning[formats]'``).

A new format is a module with a :class:`~.base.VolumeFile` subclass (its ``format``, ``suffixes`` and ``array``),
added to :data:`READERS`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import (
    FORMAT_READ_ERRORS,
    READ_ERRORS,
    AxisView,
    OneSlice,
    VolumeFile,
    error_summary,
    one_slice,
    require_formats_extra,
)
from .chunks import (
    CHUNK_CACHE_BYTES,
    MISSING_CHUNKS_POLICIES,
    CachedChunks,
    ChunkAudit,
    MissingChunks,
    MissingChunksPolicy,
    MissingChunksWarning,
)
from .hdf5 import HDF5File
from .nifti import NiftiFile
from .tiff import TiffFile
from .zarr import ZarrFile, multiscale_level0

HDF5_SUFFIXES = HDF5File.suffixes
ZARR_SUFFIXES = ZarrFile.suffixes
TIFF_SUFFIXES = TiffFile.suffixes
NIFTI_SUFFIXES = NiftiFile.suffixes
# Suffixes stripped from an input's name to name its outputs (image.ome.zarr -> image_predictions.zarr).
COMPOUND_SUFFIXES = (".ome.zarr", ".ome.tiff", ".ome.tif", ".nii.gz")

# The readers, in the order they are asked whether a path is theirs (a directory holding Zarr metadata is a store
# whatever its suffix); a path none of them claims is read as HDF5, as every path was before other formats.
READERS: tuple[type[VolumeFile], ...] = (ZarrFile, TiffFile, NiftiFile, HDF5File)
DEFAULT_READER: type[VolumeFile] = HDF5File

__all__ = [
    "CHUNK_CACHE_BYTES", "COMPOUND_SUFFIXES", "FORMAT_READ_ERRORS", "HDF5_SUFFIXES", "MISSING_CHUNKS_POLICIES",
    "READERS", "READ_ERRORS", "TIFF_SUFFIXES", "ZARR_SUFFIXES", "AxisView", "CachedChunks", "ChunkAudit",
    "HDF5File", "NIFTI_SUFFIXES", "NiftiFile", "MissingChunks", "MissingChunksPolicy", "MissingChunksWarning", "OneSlice", "TiffFile", "VolumeFile",
    "ZarrFile", "error_summary", "is_volume", "multiscale_level0", "one_slice", "open_file", "require_formats_extra",
    "volume_format", "volume_stem",
]


def _claimant(path: Path) -> type[VolumeFile] | None:
    return next((reader for reader in READERS if reader.recognises(path)), None)


def volume_format(path: str | os.PathLike) -> str:
    """``"hdf5"``, ``"zarr"``, ``"tiff"`` or ``"nifti"`` for a volume path, by its suffix (a directory: Zarr when it is a store).

    Any other file is HDF5, as every path was before the other formats were read.
    """
    return (_claimant(Path(path)) or DEFAULT_READER).format


def is_volume(path: Path) -> bool:
    """Whether ``path``, found inside a directory or by a glob pattern, is a volume: an HDF5 or TIFF file by its
    suffix, a NIfTI file (``.nii``, ``.nii.gz``), or a Zarr store directory."""
    reader = _claimant(path)
    if reader is None:
        return False
    return path.is_dir() if reader.is_directory else path.is_file()


def volume_stem(path: str | os.PathLike) -> str:
    """The name of a volume without its format suffix: ``a.h5`` -> ``a``, ``image.ome.zarr`` -> ``image``."""
    name = Path(path).name
    for suffix in COMPOUND_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def open_file(path: str | os.PathLike, role: str = "input") -> VolumeFile:
    """Open a volume file read-only, choosing the format by the path (see the module's list).

    Args:
        path: an HDF5 file, a Zarr store directory or a TIFF file.
        role: ``"train"``, ``"val"``, ``"test"`` or ``"predict"``; only used to name the file in error messages.
            Default ``"input"``.

    Raises:
        ConfigurationError: the file does not exist or cannot be read in its format; the optional extra a format
        needs is missing.
    """
    path = Path(path)
    return (_claimant(path) or DEFAULT_READER)(path, role)
