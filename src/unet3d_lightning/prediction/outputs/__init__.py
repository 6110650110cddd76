"""Prediction outputs: one store per format, written atomically, in chunks.

For each volume the writer produces ``<stem>_predictions.h5`` (:mod:`.hdf5`) or, with ``format="zarr"``, a Zarr
(format 3) store ``<stem>_predictions.zarr`` (:mod:`.zarr`), holding

- ``predictions``: ``(C, D, H, W)`` probabilities, float32 by default, in chunks of one channel and up to
  :data:`~.chunks.CHUNK_ZYX` = 16 x 256 x 256 voxels, compressed with HDF5's standard shuffle + gzip (or lzf)
  filters, or Blosc-zstd for Zarr;
- ``segmentation`` (optional): ``(D, H, W)`` argmax class ids or ``(C, D, H, W)`` masks thresholded at 0.5, uint8
  (uint16 beyond 255 classes);
- ``instances`` (optional): ``(D, H, W)`` uint32 (uint64 beyond 2**32 - 1 objects) instance ids from a seeded
  watershed of the whole stitched volume, computed when its maps are complete, before the store is renamed.

A :class:`VolumeOutput` writes its store under a temporary name and renames it when complete
(:mod:`~unet3d_lightning.prediction.paths` holds the names and what may be replaced). Rows arrive in z order and
are gathered into whole rows of chunks (:class:`~.chunks.ChunkRowDataset`), which a small thread pool compresses in
parallel where the format lets the writer do it; a :class:`BackgroundWriter` runs a volume's writes in order, beside
the model. A new format is a module with a :class:`~.base.Store` class, registered in :data:`STORES`.

``format="ome-zarr"`` writes an NGFF 0.4 image ``<stem>_predictions.ome.zarr`` (:mod:`.ome_zarr`: level 0 as above,
smaller levels after it, the segmentation and instances as label images) and ``format="tiff"`` ImageJ hyperstacks
``<stem>_predictions.tif``, ``<stem>_segmentation.tif``, ``<stem>_instances.tif`` (:mod:`.tiff`), both at the
volume's voxel size.
"""

from .base import BackgroundWriter, Store, replace_directory, writing
from .chunks import CHUNK_ZYX, COMPRESSION_THREADS, MAX_PENDING_CHUNKS, ChunkRowDataset, compression_pool
from .hdf5 import GZIP_LEVEL, Hdf5Store
from .ome_zarr import OmeZarrStore
from .tiff import TiffStore
from .volume import STORES, VolumeOutput, compresses_in_threads
from .zarr import ZARR_CLEVEL, ZarrStore

__all__ = [
    "CHUNK_ZYX", "COMPRESSION_THREADS", "GZIP_LEVEL", "MAX_PENDING_CHUNKS", "STORES", "ZARR_CLEVEL",
    "BackgroundWriter", "ChunkRowDataset", "Hdf5Store", "Store", "VolumeOutput", "ZarrStore", "compresses_in_threads",
    "compression_pool", "replace_directory", "writing",
]
__all__ += ["OmeZarrStore", "TiffStore"]
