"""PredictionWriter: a Lightning callback that stitches predicted patches and writes one HDF5 file per volume.

For each input volume ``<dir>/<stem>.h5`` it writes ``<output_dir>/<stem>_predictions.h5`` holding

- ``predictions``: ``(C, D, H, W)`` probabilities (the model's ``final_activation``: softmax for class-id
  labels, per-channel sigmoid for binary masks), float32 by default, chunked and compressed;
- ``segmentation`` (``save_segmentation=True``): ``(D, H, W)`` argmax class ids (softmax models) or
  ``(C, D, H, W)`` masks thresholded at 0.5 (sigmoid models), uint8 (uint16 beyond 255 classes).

Files are written under a temporary name in the same directory and renamed when complete, so an interrupted run
never leaves a truncated file under the final name.

Patches arrive from the predict dataloader in z-major order, volume after volume. The writer feeds them to a
:class:`~unet3d_lightning.prediction.stitcher.StreamingStitcher` on the model's device and writes each z-slab as
soon as it is final, from a background thread (HDF5 compression overlaps the next batches' compute). Under DDP each
rank stitches its own share of the patches and the ranks sum every band (``trainer.strategy.reduce``) before it is
normalised; rank 0 writes. The result equals the single-device file up to float32 summation order.

The predict dataloader's dataset must expose ``plans``: one entry per volume with ``volume.path``,
``volume.spatial_shape`` and ``grid`` (patch slices in z-major order, padded coordinates), as
:class:`~unet3d_lightning.data.datamodule.PredictDataset` does; batches are dicts with ``probabilities``,
``volume`` and ``start`` from ``UNet3DModule.predict_step``.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import h5py
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

from ..errors import ConfigurationError
from .stitcher import StreamingStitcher

OUTPUT_SUFFIX = "_predictions.h5"


def output_path(output_dir: str | os.PathLike, volume_path: str | os.PathLike) -> Path:
    """``<output_dir>/<input stem>_predictions.h5``."""
    return Path(output_dir) / f"{Path(volume_path).stem}{OUTPUT_SUFFIX}"


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create ``output_dir`` if needed and make sure files can be created in it; raise a one-line error if not."""
    path = Path(output_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".unet3d-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigurationError(f"prediction.output_dir {path}: not writable ({reason})") from None
    return path


class _BackgroundWriter:
    """One thread performing the HDF5 writes of one file in order; errors resurface in the caller."""

    def __init__(self, max_pending: int = 4) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="unet3d-hdf5-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:
                try:
                    job()
                except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = err

    def submit(self, job: Any) -> None:
        self._raise()
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


class _VolumeOutput:
    """The temporary HDF5 file of one volume while it is being written."""

    def __init__(
        self, final: Path, shape: Sequence[int], channels: int, dtype: str, segmentation: str | None,
        compression: str | None,
    ) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self.file = h5py.File(self.tmp, "w")
        d, h, w = shape
        opts = {"compression": compression, "compression_opts": 1 if compression == "gzip" else None}
        opts = {k: v for k, v in opts.items() if v is not None}
        # One chunk: one channel, a few z-rows, a wide y/x tile — slabs are written in z order.
        chunks = (1, min(d, 16), min(h, 256), min(w, 256))
        self.scale = 255.0 if dtype == "uint8" else 1.0
        self.predictions = self.file.create_dataset(
            "predictions", shape=(channels, d, h, w), dtype=dtype, chunks=chunks, **opts
        )
        self.predictions.attrs["scale"] = self.scale  # probabilities = stored values / scale
        self.segmentation = None
        if segmentation == "argmax":
            seg_dtype = "uint8" if channels <= 256 else "uint16"
            self.segmentation = self.file.create_dataset(
                "segmentation", shape=(d, h, w), dtype=seg_dtype, chunks=chunks[1:], **opts
            )
        elif segmentation == "threshold":
            self.segmentation = self.file.create_dataset(
                "segmentation", shape=(channels, d, h, w), dtype="uint8", chunks=chunks, **opts
            )

    def write(self, z0: int, z1: int, probabilities: np.ndarray, segmentation: np.ndarray | None) -> None:
        if self.scale != 1.0:
            probabilities = np.rint(probabilities * self.scale)
        self.predictions[:, z0:z1] = probabilities.astype(self.predictions.dtype, copy=False)
        if self.segmentation is not None and segmentation is not None:
            if self.segmentation.ndim == 3:
                self.segmentation[z0:z1] = segmentation
            else:
                self.segmentation[:, z0:z1] = segmentation

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        try:
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class PredictionWriter(Callback):
    """Stitch predicted patches on the model's device and write ``<output_dir>/<stem>_predictions.h5`` per volume.

    Args:
        output_dir: directory for the output files, created if missing. Default ``"predictions"``.
        blend: how overlapping patches are combined: ``"average"`` (every covering patch counts equally, as the
            original tool) or ``"gaussian"`` (importance weights peaking at the patch centre, ``sigma = patch / 8``
            per axis, as nnU-Net and MONAI). Default ``"average"``.
        halo: voxels discarded at each interior face of every patch before blending (one int, or one per axis
            ``[z, y, x]``); faces on the volume border are kept. Needs ``stride <= patch - 2 * halo``. Default 0.
        save_segmentation: also write a ``segmentation`` dataset (argmax for softmax models, probability > 0.5 per
            channel for sigmoid models). Default False.
        dtype: storage type of ``predictions``: ``"float32"``, ``"float16"`` or ``"uint8"`` (probability × 255,
            rounded; the dataset's ``scale`` attribute says 255). Default ``"float32"``.
        compression: HDF5 compression of the outputs: ``"gzip"`` (level 1), ``"lzf"`` (faster, larger) or
            ``"none"``. Default ``"gzip"``.
        tta: flip test-time augmentation: average the predictions of the 8 flips of each patch (8× the compute).
            Default False.

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
    ) -> None:
        if blend not in ("average", "gaussian"):
            raise ConfigurationError(f"prediction.blend {blend!r} is not one of average, gaussian")
        if dtype not in ("float32", "float16", "uint8"):
            raise ConfigurationError(f"prediction.dtype {dtype!r} is not one of float32, float16, uint8")
        if compression not in ("gzip", "lzf", "none"):
            raise ConfigurationError(f"prediction.compression {compression!r} is not one of gzip, lzf, none")
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
        self.written: list[Path] = []
        self._reset()

    def _reset(self) -> None:
        self._plans: list[Any] = []
        self._next = 0  # the first volume never opened
        self._current: int | None = None
        self._stitcher: StreamingStitcher | None = None
        self._output: _VolumeOutput | None = None
        self._writer: _BackgroundWriter | None = None
        self._bar: Any = None
        self._voxels = 0
        self._start = 0.0

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict" and trainer.is_global_zero:
            check_output_dir(self.output_dir)

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
        finals: dict[Path, Path] = {}
        for plan in plans:
            final = output_path(self.output_dir, plan.volume.path)
            if final in finals:
                raise ConfigurationError(
                    f"predict volumes {finals[final]} and {plan.volume.path} would both be written to {final}; "
                    "rename one or predict them in separate runs"
                )
            finals[final] = plan.volume.path
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
        volumes = torch.as_tensor(outputs["volume"]).tolist()
        starts = torch.as_tensor(outputs["start"]).cpu()
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
        if self._bar is not None:
            self._bar.close()
        self._reset()

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
            self._output = _VolumeOutput(
                output_path(self.output_dir, plan.volume.path), plan.volume.spatial_shape, channels, self.dtype,
                segmentation, self.compression,
            )
            self._writer = _BackgroundWriter()
            if trainer.progress_bar_callback is not None:
                self._bar = tqdm(
                    total=self._share[index], desc=f"{Path(plan.volume.path).name} ({index + 1}/{len(self._plans)})",
                    unit="patch", leave=True, dynamic_ncols=True,
                )

    def _write_slabs(self, slabs: list) -> None:
        if self._output is None:
            return  # ranks other than 0 only take part in the reductions
        for z0, z1, slab in slabs:
            segmentation = None
            if self.save_segmentation:
                if self._activation == "softmax":
                    segmentation = slab.argmax(0).to(torch.uint8 if slab.shape[0] <= 256 else torch.int32)
                else:
                    segmentation = (slab > 0.5).to(torch.uint8)
                segmentation = segmentation.cpu().numpy()
            values = slab.cpu().numpy()
            self._voxels += values[0].size
            output = self._output
            self._writer.submit(lambda z0=z0, z1=z1, v=values, s=segmentation: output.write(z0, z1, v, s))

    def _finish_volume(self) -> None:
        self._write_slabs(self._stitcher.finish())
        if self._output is not None:
            self._writer.close()
            self._output.commit()
            self.written.append(self._output.final)
        if self._bar is not None:
            self._bar.close()
        self._stitcher = self._output = self._writer = self._bar = None
        self._current = None
