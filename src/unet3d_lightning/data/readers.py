"""The names of :mod:`unet3d_lightning.data.io` (the readers of every format and their registry), importable from
here for code written against earlier versions; new code imports from :mod:`~unet3d_lightning.data.io`."""

from .io import (  # noqa: F401
    COMPOUND_SUFFIXES,
    FORMAT_READ_ERRORS,
    HDF5_SUFFIXES,
    TIFF_SUFFIXES,
    ZARR_SUFFIXES,
    CachedChunks,
    HDF5File,
    MissingChunks,
    TiffFile,
    VolumeFile,
    ZarrFile,
    is_volume,
    multiscale_level0,
    open_file,
    require_formats_extra,
    volume_format,
    volume_stem,
)
from .io.zarr import MARKERS as ZARR_MARKERS  # noqa: F401
