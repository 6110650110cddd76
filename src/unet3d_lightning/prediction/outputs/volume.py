"""The output of one volume while it is written: a store of a registered format at a temporary name, its datasets
filled by chunk rows, and the rename to the final name once it is complete."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigurationError
from ...instances import WatershedOptions
from ..paths import not_ours_message, previous_output_problem, remove_path, temporary_path
from .chunks import ChunkRowDataset
from .hdf5 import Hdf5Store
from .ome_zarr import OmeZarrStore
from .tiff import TiffStore
from .nifti import NiftiStore
from .zarr import ZarrStore

# The output formats, by the name ``prediction.format`` takes. A new format adds its store here (see
# :class:`~.base.Store`), its suffix to ``paths.OUTPUT_SUFFIXES`` and what its earlier outputs look like to
# ``paths.previous_output_problem``.
STORES: dict[str, Any] = {"hdf5": Hdf5Store, "zarr": ZarrStore}
STORES["nifti"] = NiftiStore
STORES["ome-zarr"] = OmeZarrStore
STORES["tiff"] = TiffStore


def compresses_in_threads(format: str, compression: str | None) -> bool:
    """Whether outputs of ``format`` with ``compression`` want a :func:`~.chunks.compression_pool`."""
    return STORES[format].encoder(compression) is not None


class VolumeOutput:
    """The temporary HDF5 file (or Zarr store) of one volume while it is being written; renamed to its final name
    when complete.

    Args:
        final: the output's final path (:func:`~unet3d_lightning.prediction.paths.output_path`).
        shape: the volume's ``(D, H, W)``.
        channels: the model's output channels.
        dtype: storage type of ``predictions`` (``"float32"``, ``"float16"``, or ``"uint8"``: probability × 255).
        segmentation: ``"argmax"``, ``"threshold"`` or None: what ``segmentation`` holds, if written.
        compression: ``"gzip"``, ``"lzf"`` or None.
        pool: threads compressing chunks, or None.
        format: a name of :data:`STORES`. Default ``"hdf5"``.
        instances: (the model's target spec, watershed settings) to write ``instances`` when the maps are complete,
            or None. Default None.
        volume: the input :class:`~unet3d_lightning.data.volumes.Volume`, for stores that take metadata from it
            (a store class with ``takes_volume = True``: NIfTI's header and affine). Default None.
        voxel_size: the volume's ``(z, y, x)`` voxel size, or None when unknown; the stores of formats that record
            it (OME-Zarr, TIFF: ``physical``) take it. Default None.
        unit: the voxel size's unit (``"um"``, ...), or None. Default None.
        preview: the activation (``"softmax"``/``"sigmoid"``) to gather the central planes of the preview's overlay
            while the rows stream past (:attr:`preview_planes`), or None for no preview. Default None.
        rows: ``(a, b)``, the chunk-aligned rows this process writes (a DDP rank's own rows). Default None: all.
        tmp: the temporary path. Default None: this process's own (:func:`~..paths.temporary_path`), removed
            first if a killed process of the same pid left it.
        attach: open the store another process created at ``tmp`` (a Zarr store every rank writes into, or one
            a resumed run continues) instead of creating it; its metadata is left as it is. Default False.
        skip: first rows of the chunk rows not to write again (finished by an interrupted run). Default none.
    """

    def __init__(
        self, final: Path, shape: Sequence[int], channels: int, dtype: str, segmentation: str | None,
        compression: str | None, pool: ThreadPoolExecutor | None, format: str = "hdf5",
        instances: tuple[dict[str, Any], WatershedOptions] | None = None, volume: Any = None,
        voxel_size: Sequence[float] | None = None, unit: str | None = None, preview: str | None = None,
        rows: tuple[int, int] | None = None, tmp: Path | None = None, attach: bool = False,
        skip: frozenset[int] = frozenset(),
    ) -> None:
        self.final = final
        self.preview_activation = preview
        self.preview_kind = "labels" if segmentation is not None else "probability"
        self._planes: Any = None
        self.instances = instances
        self.compression = compression
        self.tmp = temporary_path(final) if tmp is None else tmp
        self.format = format
        self.attached = attach
        store = STORES[format]
        try:
            extra = {"volume": volume} if getattr(store, "takes_volume", False) else {}
            if getattr(store, "physical", False):
                extra.update(voxel_size=voxel_size, unit=unit)
            if attach:
                self.file: Any = store(self.tmp, compression, attach=True, **extra)
            else:
                remove_path(self.tmp)  # left by a killed run of a process with our pid
                self.file = store(self.tmp, compression, **extra)
        except BaseException:
            if not attach:  # a store another process made (or a resumed one) is not this process's to remove
                self._remove_tmp()  # it may exist before the failure (HDF5 creates the file, then fails on a full disk)
            raise
        try:
            d, h, w = (int(n) for n in shape)
            self.scale = 255.0 if dtype == "uint8" else 1.0
            own = {"rows": rows, "skip": skip}
            self.predictions = ChunkRowDataset(self.file, "predictions", (channels, d, h, w), dtype, pool, **own)
            if not attach:
                self.predictions.dataset.attrs["scale"] = self.scale  # probabilities = stored values / scale
            self.segmentation: ChunkRowDataset | None = None
            self.segmentation_kind = segmentation
            if segmentation == "argmax":
                seg_dtype = "uint8" if channels <= 256 else "uint16"
                self.segmentation = ChunkRowDataset(self.file, "segmentation", (d, h, w), seg_dtype, pool, **own)
            elif segmentation == "threshold":
                self.segmentation = ChunkRowDataset(self.file, "segmentation", (channels, d, h, w), "uint8", pool,
                                                    **own)
        except BaseException:
            self.discard(keep=attach)
            raise

    def write(self, z0: int, z1: int, probabilities: np.ndarray, segmentation: np.ndarray | None) -> None:
        """Store rows ``[z0, z1)``: float32 ``(C, z1 - z0, H, W)`` probabilities and, if computed already (on the
        device), their segmentation; otherwise the segmentation is derived here."""
        if self.segmentation is not None and segmentation is None:
            if self.segmentation_kind == "argmax":
                segmentation = probabilities.argmax(0).astype(self.segmentation.dataset.dtype)
            else:
                segmentation = (probabilities > 0.5).astype(np.uint8)
        if self.preview_activation is not None:
            self._collect_planes(z0, z1, probabilities, segmentation)
        if self.scale != 1.0:
            probabilities = np.clip(np.rint(probabilities * self.scale), 0, self.scale)
        # The chunk-row buffers have the storage dtype: copying into them is the cast.
        self.predictions.add(z0, z1, probabilities)
        if self.segmentation is not None:
            self.segmentation.add(z0, z1, segmentation)

    def _collect_planes(self, z0: int, z1: int, probabilities: np.ndarray, segmentation: np.ndarray | None) -> None:
        from ..preview import PlaneCollector, overlay_map

        values, self.preview_kind = overlay_map(probabilities, segmentation, self.preview_activation or "softmax")
        if self._planes is None:
            self._planes = PlaneCollector((self.predictions.shape[1], *values.shape[1:]))
        self._planes.add(z0, z1, values)

    @property
    def preview_planes(self) -> list[np.ndarray] | None:
        """The overlay's three central planes (see :mod:`~unet3d_lightning.prediction.preview`), once written."""
        return None if self._planes is None else self._planes.planes

    def commit(self) -> None:
        """Finish every dataset, then rename the store to its final name (replacing an earlier output there)."""
        self.predictions.close()
        if self.segmentation is not None:
            self.segmentation.close()
        if self.instances is not None:
            self._write_instances(*self.instances)
        self.file.close()
        # Checked at setup too; this catches what appeared at the final name while the volume was predicted.
        problem = previous_output_problem(self.final, self.format)
        if problem is not None:
            raise ConfigurationError(not_ours_message(self.final, problem))
        self.file.replace(self.tmp, self.final)

    @property
    def flushed(self) -> int:
        """Rows below this one (from this process's first) are in the store, in every dataset."""
        return min(d.flushed for d in (self.predictions, self.segmentation) if d is not None)

    def finish_rows(self, close: bool = True) -> None:
        """Finish this process's rows of every dataset (and close the store if ``close``), leaving the store at its
        temporary name: under DDP the other ranks' rows and the rename (:meth:`complete`) are rank 0's."""
        self.predictions.close()
        if self.segmentation is not None:
            self.segmentation.close()
        if close:
            # A store whose completion writes more (OME-Zarr's smaller levels) leaves that to rank 0's complete().
            (getattr(self.file, "release", None) or self.file.close)()

    def complete(self, parts: Sequence[Path] = ()) -> None:
        """Rank 0, once every rank has finished its rows: take the chunks of the other ranks' ``parts`` (HDF5 part
        files, see :meth:`~.hdf5.Hdf5Store.join`), write ``instances``, close, and rename to the final name."""
        for part in parts:
            self.file.join(part)
        if self.instances is not None:
            self._write_instances(*self.instances)
        self.file.close()
        problem = previous_output_problem(self.final, self.format)
        if problem is not None:
            raise ConfigurationError(not_ours_message(self.final, problem))
        self.file.replace(self.tmp, self.final)

    def _write_instances(self, spec: dict[str, Any], options: WatershedOptions) -> None:
        """Read the complete maps back and write their watershed as ``instances``: the watershed needs the whole
        volume at once, which the streamed slabs never were."""
        from ...blockwise import fits_whole
        from ...instances import boundary_evidence, instance_dtype, watershed_instances

        if not fits_whole(self.predictions.shape[1:], self.predictions.shape[0], options):
            self._write_instances_blockwise(spec, options)
            return
        maps = np.asarray(self.predictions.dataset[...], np.float32)
        if self.scale != 1.0:
            maps /= self.scale
        boundary, foreground = boundary_evidence(maps, spec, options.threshold)
        del maps
        labels = watershed_instances(boundary, foreground, options)
        count = int(labels.max()) if labels.size else 0
        # Written like the other outputs (same chunks and compression, HDF5 or Zarr), in one go.
        output = ChunkRowDataset(self.file, "instances", labels.shape, instance_dtype(count), None)
        output.add(0, labels.shape[0], labels)
        output.close()
        output.dataset.attrs["count"] = count
        output.dataset.attrs["method"] = f"seeded watershed of {spec['kind']}: {options}"

    def _write_instances_blockwise(self, spec: dict[str, Any], options: WatershedOptions) -> None:
        """``instances`` of a volume whose whole-volume watershed exceeds ``options.memory_limit_gb``: z-block by
        z-block with context rows, objects crossing block faces merged (:mod:`~unet3d_lightning.blockwise`)."""
        from ...blockwise import blockwise_instances, blockwise_plan
        from .chunks import CHUNK_ZYX

        channels, *zyx = self.predictions.shape
        shape = tuple(int(n) for n in zyx)
        chunks = tuple(min(n, c) for n, c in zip(shape, CHUNK_ZYX))
        plan = blockwise_plan(shape, channels, options, chunks[0], spec.get("offsets"))
        if plan is None:
            raise ConfigurationError(f"prediction.watershed.memory_limit_gb={options.memory_limit_gb:g} is too low "
                                     f"for even one block of {chunks[0]} rows of {shape}")
        # The ids of the blocks before merging are written first: uint32 holds them for any volume below 2**32 voxels.
        dtype = "uint32" if math.prod(shape) < 2**32 else "uint64"
        dataset = self.file.create_dataset("instances", shape=shape, dtype=dtype, chunks=chunks)
        predictions, scale = self.predictions.dataset, self.scale

        def read_maps(z0: int, z1: int) -> np.ndarray:
            maps = np.asarray(predictions[:, z0:z1], np.float32)
            return maps / scale if scale != 1.0 else maps

        def write(z0: int, z1: int, ids: np.ndarray) -> None:
            dataset[z0:z1] = ids.astype(dtype)

        count = blockwise_instances(read_maps, shape, spec, options, write, lambda z0, z1: dataset[z0:z1], plan)
        dataset.attrs["count"] = count
        dataset.attrs["method"] = (f"seeded watershed of {spec['kind']}: {options}; blockwise, blocks of {plan[0]} "
                                   f"z-rows with {plan[1]} rows of context, objects merged across block faces")

    def discard(self, keep: bool = False) -> None:
        """Close and delete the temporary file (``keep``: leave it, for a resumed run); never raises, since it runs
        while another error is handled."""
        self.file.discard()
        if not keep:
            self._remove_tmp()

    def _remove_tmp(self) -> None:
        with contextlib.suppress(OSError):
            remove_path(self.tmp)
