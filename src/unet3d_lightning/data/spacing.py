"""Voxel sizes, by the name the rest of the package (and the prediction outputs) import them under; the module
itself lives in :mod:`unet3d_lightning.data.io.spacing`, beside the readers that report them (``io`` imports
nothing above it)."""

from .io.spacing import (  # noqa: F401
    TOLERANCE,
    UNIT_METRES,
    UNIT_SYMBOLS,
    VoxelSize,
    common_voxel_size,
    describe,
    differs,
    mismatch_warning,
    relative_differences,
    scale_factors,
    unit_name,
    voxel_size_or_none,
)
