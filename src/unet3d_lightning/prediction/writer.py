"""The names this module held before the writer was split, re-exported from where they now live:
:mod:`~unet3d_lightning.prediction.callback` (the callback), :mod:`~unet3d_lightning.prediction.outputs` (the
stores and chunk writing), :mod:`~unet3d_lightning.prediction.paths` (names and checks) and
:mod:`~unet3d_lightning.prediction.memory` (the estimate). New code imports from those modules.
"""

from __future__ import annotations

from .callback import PredictionWriter
from .memory import ACTIVATION_VALUES_PER_FEATURE, FEATURE_BLOCK, available_memory, estimate_predict_memory
from .outputs import CHUNK_ZYX, COMPRESSION_THREADS, GZIP_LEVEL, MAX_PENDING_CHUNKS, ZARR_CLEVEL
from .outputs.base import BackgroundWriter as _BackgroundWriter  # noqa: F401
from .outputs.chunks import ChunkRowDataset as _ChunkRowDataset  # noqa: F401
from .outputs.volume import VolumeOutput as _VolumeOutput  # noqa: F401
from .outputs.zarr import ZarrStore as _ZarrOutput  # noqa: F401
from .paths import (
    OUTPUT_ARRAYS,
    OUTPUT_SUFFIX,
    OUTPUT_SUFFIXES,
    check_collisions,
    check_output_dir,
    check_outputs,
    output_path,
    previous_output_problem,
    remove_created_dirs,
    remove_stale_temporaries,
    temporary_path,
)

__all__ = [
    "ACTIVATION_VALUES_PER_FEATURE", "CHUNK_ZYX", "COMPRESSION_THREADS", "FEATURE_BLOCK", "GZIP_LEVEL",
    "MAX_PENDING_CHUNKS", "OUTPUT_ARRAYS", "OUTPUT_SUFFIX", "OUTPUT_SUFFIXES", "ZARR_CLEVEL", "PredictionWriter",
    "available_memory", "check_collisions", "check_output_dir", "check_outputs", "estimate_predict_memory",
    "output_path", "previous_output_problem", "remove_created_dirs", "remove_stale_temporaries", "temporary_path",
]
