"""PredictionWriter: a Lightning callback that stitches predicted patches and writes one output per volume.

The callback decides *when* things happen; the outputs (:mod:`~unet3d_lightning.prediction.outputs`) decide *how*
they are stored, :mod:`~unet3d_lightning.prediction.paths` where and what may be replaced, and
:mod:`~unet3d_lightning.prediction.memory` whether the run fits.

- ``setup``: the output directory is checked (and created), temporaries of killed runs are removed;
- ``on_predict_start``: every check that can fail — names, collisions with inputs, earlier outputs, halo, memory,
  instances — runs before the first patch is predicted;
- ``on_predict_batch_end``: patches go to a :class:`~unet3d_lightning.prediction.stitcher.StreamingStitcher` on the
  model's device; each z-slab is written as soon as it is final;
- the end of a volume (the first patch of the next, or ``on_predict_epoch_end``): the output is completed and renamed;
- ``on_exception``: the open output and this process's temporaries are deleted, and the directories the run created.

Patches arrive from the predict dataloader in z-major order, volume after volume. Slabs leave the device through
asynchronous copies to pinned memory; a background thread gathers them into whole rows of chunks, which a small thread
pool compresses in parallel. Under DDP each rank stitches its own share of the patches and the ranks sum every band
(``trainer.strategy.reduce``) before it is normalised; rank 0 writes. The result equals the single-device file up to
float32 summation order.

The predict dataloader's dataset must expose ``plans``: one entry per volume with ``volume.path``,
``volume.spatial_shape`` and ``grid`` (patch slices in z-major order, padded coordinates), as
:class:`~unet3d_lightning.data.datamodule.PredictDataset` does; batches are dicts with ``probabilities``,
``volume`` and ``start`` from ``UNet3DModule.predict_step``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

from ..data.io import require_formats_extra
from ..errors import ConfigurationError
from ..instances import WatershedOptions
from .memory import check_predict_memory
from .outputs import STORES, BackgroundWriter, VolumeOutput, compresses_in_threads, compression_pool, writing
from .paths import (
    check_collisions,
    check_output_dir,
    check_outputs,
    output_path,
    remove_created_dirs,
    remove_own_temporaries,
    remove_stale_temporaries,
)
from .stitcher import StreamingStitcher


class PredictionWriter(Callback):
    """Stitch predicted patches on the model's device and write ``<output_dir>/<stem>_predictions.h5`` per volume.

    Args:
        output_dir: directory for the output files, created if missing. A path already at an output's name is
            replaced only if it is an earlier output of this writer; anything else there is refused before any work.
            Default ``"predictions"``.
        blend: how overlapping patches are combined: ``"average"`` (every covering patch counts equally, as the
            original tool) or ``"gaussian"`` (importance weights peaking at the patch centre, ``sigma = patch / 8``
            per axis, as nnU-Net and MONAI). Default ``"average"``.
        halo: voxels discarded at each interior face of every patch before blending (one int, or one per axis
            ``[z, y, x]``); faces on the volume border are kept. Needs ``stride <= patch - 2 * halo``. Default 0.
        save_segmentation: also write a ``segmentation`` dataset (argmax for softmax models, probability > 0.5 per
            channel for sigmoid models); refused for regression models (``model.loss`` ``mse``, ``l1``,
            ``smooth_l1``), whose ``predictions`` are the network's raw float outputs. Default False.
        dtype: storage type of ``predictions``: ``"float32"``, ``"float16"`` or ``"uint8"`` (probability × 255,
            rounded; the dataset's ``scale`` attribute says 255; refused for regression models, whose values it would
            clip to [0, 1]; ``float16`` keeps them, to about 3 significant digits and within ±65504).
            Default ``"float32"``.
        compression: HDF5 compression of the outputs: ``"gzip"`` (level 1), ``"lzf"`` (faster, larger) or
            ``"none"``; for Zarr outputs ``"gzip"`` stands for Blosc-zstd (level 3) and ``"lzf"`` is refused.
            Default ``"gzip"``.
        tta: flip test-time augmentation: average the predictions of the 8 flips of each patch (8× the compute).
            Default False.
        format: ``"hdf5"``: one HDF5 file ``<stem>_predictions.h5`` per volume; ``"zarr"``: one Zarr (format 3)
            store ``<stem>_predictions.zarr`` (needs the ``formats`` extra). Default ``"hdf5"``.
        instances: also write ``instances``, a ``(D, H, W)`` uint32/uint64 instance segmentation from a seeded
            watershed of the stitched maps; only for models trained with ``data.label_transform`` boundaries or
            affinities. MEMORY: unlike the rest of prediction, which streams, the watershed holds the WHOLE volume:
            about 80 bytes per voxel plus 4 per voxel and output channel (a 1024^3 volume needs about 90 GB).
            Volumes above ``watershed.memory_limit_gb`` are refused before prediction starts; segment such volumes
            blockwise from the written ``predictions`` (e.g. PlantSeg, elf, daisy/lsd). Default False.
        watershed: settings of that watershed (threshold, seed smoothing and spacing, minimum size, memory limit);
            see :class:`~unet3d_lightning.instances.WatershedOptions`. Default ``WatershedOptions()``.

    Example::

        trainer = Trainer(callbacks=[PredictionWriter("out/", blend="gaussian", save_segmentation=True)])
        trainer.predict(model, datamodule=HDF5DataModule(predict_paths=["vol.h5"], predict_patch_shape=[64, 128, 128]),
                        return_predictions=False)
    """

    def __init__(
        self,
        output_dir: str = "predictions",
        blend: Literal["average", "gaussian"] = "average",
        halo: int | tuple[int, int, int] = 0,
        save_segmentation: bool = False,
        dtype: Literal["float32", "float16", "uint8"] = "float32",
        compression: Literal["gzip", "lzf", "none"] = "gzip",
        tta: bool = False,
        format: Literal["hdf5", "zarr"] = "hdf5",
        instances: bool = False,
        watershed: WatershedOptions = WatershedOptions(),
    ) -> None:
        if blend not in ("average", "gaussian"):
            raise ConfigurationError(f"prediction.blend {blend!r} is not one of average, gaussian")
        if dtype not in ("float32", "float16", "uint8"):
            raise ConfigurationError(f"prediction.dtype {dtype!r} is not one of float32, float16, uint8")
        if compression not in ("gzip", "lzf", "none"):
            raise ConfigurationError(f"prediction.compression {compression!r} is not one of gzip, lzf, none")
        if format not in STORES:
            raise ConfigurationError(f"prediction.format {format!r} is not one of {', '.join(STORES)}")
        if format == "zarr":
            require_formats_extra("prediction.format zarr")
            if compression == "lzf":
                raise ConfigurationError(
                    "prediction.compression lzf is HDF5's own; Zarr outputs take gzip (stored as Blosc-zstd) or none"
                )
        halos = (halo,) * 3 if isinstance(halo, int) else tuple(halo)
        if len(halos) != 3 or min(halos) < 0:
            raise ConfigurationError(f"prediction.halo {halo!r} must be one int >= 0 or three, [z, y, x]")
        self.output_dir = output_dir
        self.blend = blend
        self.halo = halos
        self.save_segmentation = save_segmentation
        self.dtype = dtype
        self.compression = None if compression == "none" else compression
        self.tta = tta
        self.format = format
        self.instances = instances
        self.watershed = WatershedOptions(**watershed) if isinstance(watershed, dict) else watershed
        self.written: list[Path] = []
        self._created: list[Path] = []  # directories this run created, removed again if it fails
        self._reset()

    def _reset(self) -> None:
        self._plans: list[Any] = []
        self._next = 0  # the first volume never opened
        self._current: int | None = None
        self._stitcher: StreamingStitcher | None = None
        self._output: VolumeOutput | None = None
        self._writer: BackgroundWriter | None = None
        self._bar: Any = None
        self._voxels = 0
        self._start = 0.0
        self._pool: ThreadPoolExecutor | None = None
        self._targets: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict" and trainer.is_global_zero:
            self._created = check_output_dir(self.output_dir)
            notes = remove_stale_temporaries(self.output_dir)
            if notes and sys.stderr is not None:
                with contextlib.suppress(OSError, ValueError):  # a closed stderr: the removals stand without notes
                    print("\n".join(f"note: {note}" for note in notes), file=sys.stderr, flush=True)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        self.written = []
        loader = trainer.predict_dataloaders
        dataset = getattr(loader, "dataset", None)
        plans = getattr(dataset, "plans", None)
        if plans is None:
            raise ConfigurationError(
                "PredictionWriter needs the predict dataset of HDF5DataModule (one with 'plans' of volumes and grids)"
            )
        volumes = [Path(plan.volume.path) for plan in plans]
        check_collisions(Path(self.output_dir).expanduser(), volumes, format=self.format)
        check_outputs(self.output_dir, volumes, self.format)
        self._check_task(pl_module)
        self._check_halo(plans, int(pl_module.hparams.out_channels))
        self._check_memory(plans, pl_module, int(getattr(loader, "batch_size", None) or 1))
        self._targets = self._check_instances(plans, pl_module) if self.instances else None
        self._plans = list(plans)
        pl_module.predict_tta = self.tta
        self._start = time.perf_counter()
        # Rank r receives dataset items r, r + W, ... (the datamodule's sampler); count this rank's share per volume
        # for the progress bars.
        rank, world = trainer.global_rank, trainer.world_size
        self._share = []
        offset = 0
        for plan in self._plans:
            n = len(plan.grid)
            self._share.append(len(range((rank - offset) % world, n, world)))
            offset += n

    def on_predict_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        probabilities: torch.Tensor = outputs["probabilities"]
        # One host copy for both: when the locations arrive on an accelerator, each copy is a synchronisation.
        where = torch.cat(
            [torch.as_tensor(outputs["volume"]).reshape(-1, 1), torch.as_tensor(outputs["start"]).reshape(-1, 3)], 1
        ).cpu()
        padding = outputs.get("padding")
        if padding is not None and bool(torch.as_tensor(padding).any()):
            # DDP padding duplicates (ShardedSampler pad_uneven): another rank stitches the real patch.
            real = ~torch.as_tensor(padding).cpu()
            where, probabilities = where[real], probabilities[real.to(probabilities.device)]
        volumes = where[:, 0].tolist()
        starts = where[:, 1:]
        i = 0
        while i < len(volumes):
            v = volumes[i]
            j = i
            while j < len(volumes) and volumes[j] == v:
                j += 1
            self._advance_to(trainer, pl_module, v)
            self._write_slabs(self._stitcher.add(probabilities[i:j], starts[i:j]))
            if self._bar is not None:
                self._bar.update(j - i)
            i = j

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Volumes this rank received no patch of still take part in the band reductions of the other ranks.
        self._advance_to(trainer, pl_module, len(self._plans))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.predict_tta = False
        self._created = []  # the run succeeded: its directories stay
        self._close_pool()
        if trainer.is_global_zero and self.written:
            seconds = time.perf_counter() - self._start
            lines = [f"predict finished: {len(self.written)} volume(s), {self._voxels / max(seconds, 1e-9):,.0f} "
                     f"voxels/s, {seconds:.1f} s"]
            lines += [f"  wrote {path}" for path in self.written]
            print("\n".join(lines), flush=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except BaseException:  # noqa: BLE001 - the original exception is the one to report
                pass
        if self._output is not None:
            self._output.discard()
        if trainer.is_global_zero:
            remove_own_temporaries(self.output_dir, [plan.volume.path for plan in self._plans], self.format)
        if self._bar is not None:
            self._bar.close()
        pl_module.predict_tta = False
        self._close_pool()
        self._reset()
        remove_created_dirs(self._created)  # as far as they are empty: volumes finished before the failure stay
        self._created = []

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _check_task(self, pl_module: pl.LightningModule) -> None:
        """A regression model's ``predictions`` are its raw outputs (float, any range): nothing to segment, and no
        quantisation to 0..255, which would clip and round them."""
        if getattr(pl_module, "task", "segmentation") != "regression":
            return
        loss = pl_module.hparams.get("loss")
        if self.save_segmentation:
            raise ConfigurationError(
                f"prediction.save_segmentation: this is a regression model (loss {loss}), whose predictions are float "
                "values, not class probabilities; drop prediction.save_segmentation"
            )
        if self.instances:
            raise ConfigurationError(
                f"prediction.instances: this is a regression model (loss {loss}), not one trained on boundaries or "
                "affinities; drop prediction.instances"
            )
        if self.dtype == "uint8":
            raise ConfigurationError(
                f"prediction.dtype uint8 stores probabilities x 255, which would clip and round the outputs of this "
                f"regression model (loss {loss}); use prediction.dtype float32 (or float16)"
            )

    def _check_halo(self, plans: Sequence[Any], channels: int) -> None:
        """Build (without allocating) each volume's stitcher now, so that a halo the grid cannot take fails before
        any patch is predicted rather than after the first batch."""
        for plan in plans:
            try:
                StreamingStitcher(plan.volume.spatial_shape, plan.grid, channels, blend=self.blend, halo=self.halo)
            except ValueError as err:
                raise ConfigurationError(
                    f"prediction.halo {list(self.halo)} does not fit the patch grid of {plan.volume.path}: {err}"
                ) from None

    def _check_memory(self, plans: Sequence[Any], pl_module: pl.LightningModule, batch_size: int) -> None:
        """Refuse, before any patch is predicted, a run whose patches, network and stitcher cannot fit in memory
        (see :func:`~unet3d_lightning.prediction.memory.estimate_predict_memory`)."""
        check_predict_memory(plans, pl_module.hparams, pl_module.device, batch_size, tta=self.tta,
                             output_itemsize=np.dtype(self.dtype).itemsize)

    def _check_instances(self, plans: Sequence[Any], pl_module: pl.LightningModule) -> dict[str, Any]:
        """The model's target spec, after checking that it has one and that every volume's watershed fits in
        ``watershed.memory_limit_gb``: refused here, before any patch is predicted, rather than by the OOM killer."""
        from ..instances import require_instances_extra, watershed_bytes

        require_instances_extra("prediction.instances")
        targets = getattr(pl_module, "hparams", {}).get("targets")
        if not targets:
            raise ConfigurationError(
                "prediction.instances needs a model trained on boundaries or affinities (data.label_transform); this "
                "model predicts class probabilities or masks: drop prediction.instances or use such a checkpoint"
            )
        channels = int(pl_module.hparams.out_channels)
        limit = float(self.watershed.memory_limit_gb) * 1024**3
        for plan in plans:
            shape = plan.volume.spatial_shape
            need = watershed_bytes(shape) + 4 * channels * int(np.prod(shape))
            if need > limit:
                raise ConfigurationError(
                    f"predict volume {plan.volume.path}: the watershed of prediction.instances holds the whole volume "
                    f"{tuple(shape)} in memory, about {need / 1024**3:.1f} GB, above prediction.watershed."
                    f"memory_limit_gb={self.watershed.memory_limit_gb:g}; raise the limit if the machine has the "
                    "memory, or predict without instances and segment the predictions blockwise (e.g. PlantSeg, "
                    "elf, daisy/lsd)"
                )
        return dict(targets)

    # ------------------------------------------------------------------------------------------------ volumes
    def _advance_to(self, trainer: pl.Trainer, pl_module: pl.LightningModule, volume: int) -> None:
        """Finish the open volume, open-and-finish the volumes this rank has no patch of, then open ``volume``.

        ``volume == len(plans)`` finishes everything. Skipped volumes must still be stitched: under DDP the other
        ranks' patches arrive through the band reductions, in which every rank takes part.
        """
        if self._current == volume:
            return
        if self._current is not None:
            if volume < self._current:
                raise RuntimeError(f"predict batches went back from volume {self._current} to {volume}")
            self._finish_volume()
        while self._next < min(volume, len(self._plans)):
            self._open_volume(trainer, pl_module, self._next)
            self._finish_volume()
        if volume < len(self._plans):
            self._open_volume(trainer, pl_module, volume)

    def _open_volume(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        plan = self._plans[index]
        channels = int(pl_module.hparams.out_channels)
        reduce = None
        if trainer.world_size > 1:
            def reduce(band: torch.Tensor) -> torch.Tensor:
                return trainer.strategy.reduce(band, reduce_op="sum")
        self._stitcher = StreamingStitcher(
            plan.volume.spatial_shape, plan.grid, channels, blend=self.blend, halo=self.halo,
            device=pl_module.device, reduce=reduce,
        )
        self._current = index
        self._next = index + 1
        self._activation = getattr(pl_module, "activation", "softmax")
        if trainer.is_global_zero:
            segmentation = None
            if self.save_segmentation:
                segmentation = "argmax" if self._activation == "softmax" else "threshold"
            if self._pool is None and compresses_in_threads(self.format, self.compression):
                self._pool = compression_pool()
            final = output_path(self.output_dir, plan.volume.path, self.format)
            with writing(final, (channels, *plan.volume.spatial_shape), self.dtype):
                self._output = VolumeOutput(
                    final, plan.volume.spatial_shape, channels, self.dtype, segmentation, self.compression, self._pool,
                    self.format, instances=(self._targets, self.watershed) if self._targets else None,
                )
            self._writer = BackgroundWriter()
            if trainer.progress_bar_callback is not None:
                self._bar = tqdm(
                    total=self._share[index], desc=f"{Path(plan.volume.path).name} ({index + 1}/{len(self._plans)})",
                    unit="patch", leave=True, dynamic_ncols=True,
                )

    def _write_slabs(self, slabs: list) -> None:
        if self._output is None:
            return  # ranks other than 0 only take part in the reductions
        output = self._output
        for z0, z1, slab in slabs:
            self._voxels += slab[0].numel()
            segmentation = None
            if slab.device.type == "cuda":
                # The segmentation is cheaper on the device, and the copies to pinned memory run asynchronously:
                # the writer thread waits for the event, the next batches do not.
                if self.save_segmentation:
                    segmentation = pinned_copy(self._segment(slab))
                values = pinned_copy(slab)
                event = torch.cuda.Event()
                event.record()
            else:
                # A CPU slab is a fresh tensor nobody else holds; the writer thread derives the rest from it.
                values, event = slab.cpu(), None

            def job(z0: int = z0, z1: int = z1, values: torch.Tensor = values, segmentation: Any = segmentation,
                    event: Any = event) -> None:
                if event is not None:
                    event.synchronize()
                output.write(z0, z1, values.numpy(), None if segmentation is None else segmentation.numpy())

            with writing(output.final, output.predictions.shape, self.dtype):
                self._writer.submit(job)

    def _segment(self, slab: torch.Tensor) -> torch.Tensor:
        if self._activation == "softmax":
            return slab.argmax(0).to(torch.uint8 if slab.shape[0] <= 256 else torch.int32)
        return (slab > 0.5).to(torch.uint8)

    def _finish_volume(self) -> None:
        self._write_slabs(self._stitcher.finish())
        if self._output is not None:
            with writing(self._output.final, self._output.predictions.shape, self.dtype):
                self._writer.close()
                self._output.commit()
            self.written.append(self._output.final)
        if self._bar is not None:
            self._bar.close()
        self._stitcher = self._output = self._writer = self._bar = None
        self._current = None


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """Start an asynchronous copy of a device tensor into page-locked host memory and return the host tensor."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """Start an asynchronous copy of a device tensor into page-locked host memory and return the host tensor."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
