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
pool compresses in parallel. Under DDP (with the DataModule's predict data) each rank owns a contiguous, chunk-aligned
range of output rows (:mod:`~unet3d_lightning.prediction.distributed`), predicts the patches meeting them, stitches
and writes them itself: into the one Zarr store, or into a part file that rank 0 joins (HDF5, one writer per file);
after one gathering at the end rank 0 renames the outputs and prints one line per rank. With another predict dataset
the ranks sum every band instead (``trainer.strategy.reduce``) and rank 0 writes. Either way the result equals the
single-device file up to float32 summation order.

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
from ..data.resample import BackResampler, plan_shape
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
from .distributed import OwnedRowsSampler, RowAssignment, assign_rows, gather_objects, peak_rss, rank_report
from .resume import (
    Progress,
    check_settings,
    finish_record,
    finished_rows,
    partial_path,
    remove_partials,
    run_settings,
    start_record,
    state_dict_digest,
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
            store ``<stem>_predictions.zarr`` (needs the ``formats`` extra); ``"nifti"``: ``<stem>_predictions.nii.gz``
            ``(x, y, z, C)`` and, with ``save_segmentation``, ``<stem>_segmentation.nii.gz`` ``(x, y, z)``, with the
            input's NIfTI header and affine, or an affine of its voxel size (needs nibabel, from the ``formats``
            extra; see :mod:`~unet3d_lightning.prediction.outputs.nifti`); ``"ome-zarr"``: an NGFF 0.4 image
            ``<stem>_predictions.ome.zarr`` at the volume's voxel size, with smaller levels and the
            segmentation/instances as label images (:mod:`~unet3d_lightning.prediction.outputs.ome_zarr`);
            ``"tiff"``: an ImageJ hyperstack ``<stem>_predictions.tif`` with its spacing, and
            ``<stem>_segmentation.tif`` / ``<stem>_instances.tif`` beside it
            (:mod:`~unet3d_lightning.prediction.outputs.tiff`; uncompressed; float32 or uint8). All but HDF5 need
            the ``formats`` extra. Default ``"hdf5"``.
        instances: also write ``instances``, a ``(D, H, W)`` uint32/uint64 instance segmentation from a seeded
            watershed of the stitched maps; only for models trained with ``data.label_transform`` boundaries or
            affinities. MEMORY: the whole-volume watershed needs about 80 bytes per voxel plus 4 per voxel and output
            channel (a 1024^3 volume needs about 90 GB); volumes above ``watershed.memory_limit_gb`` are segmented
            blockwise within the limit (:mod:`~unet3d_lightning.blockwise`: z-blocks with context, merged across
            faces). Default False.
        watershed: settings of that watershed (threshold, seed smoothing and spacing, minimum size, memory limit);
            see :class:`~unet3d_lightning.instances.WatershedOptions`. Default ``WatershedOptions()``.
        rescale: predict each volume resampled to the model's voxel size (the one its checkpoint records) and
            write the output resampled back to the volume's grid, so it has the input's shape and voxel size; linear
            interpolation both ways, region by region and slab by slab (memory stays flat in depth), class ids and
            instances derived from the resampled-back probabilities; see :mod:`~unet3d_lightning.data.resample`.
            Needs the voxel size of the model and of every volume (``data.voxel_size``). Default False.
        preview: also write ``<stem>_preview.png`` beside each output: the three central planes of the raw with the
            segmentation (or the foreground probability) overlaid, at the physical aspect ratio
            (:mod:`~unet3d_lightning.prediction.preview`; needs Pillow, in the ``formats`` extra). Default False.
        resume: continue the outputs an interrupted run left (Zarr only): each output is written into
            ``.<name>.partial`` with a record of its finished chunk rows and of the settings that change the
            result; a run with ``resume`` predicts only the patches of the unfinished rows and refuses a record whose
            settings differ. Without it (default False) a run starts afresh and removes such leftovers.
        ensemble: more checkpoints (``.ckpt`` of ``unet3d fit``) whose probabilities are averaged with the
            ``--ckpt_path`` model's, patch by patch in the same pass (with ``tta``: each model's flip average, then
            the mean); they must agree with it on channels, label type, targets and normalisation (see
            :mod:`~unet3d_lightning.prediction.ensemble`). Default None: the one model.

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
        format: Literal["hdf5", "zarr", "nifti", "ome-zarr", "tiff"] = "hdf5",
        instances: bool = False,
        watershed: WatershedOptions = WatershedOptions(),
        rescale: bool = False,
        preview: bool = False,
        resume: bool = False,
        ensemble: list[str] | str | None = None,
    ) -> None:
        if blend not in ("average", "gaussian"):
            raise ConfigurationError(f"prediction.blend {blend!r} is not one of average, gaussian")
        if dtype not in ("float32", "float16", "uint8"):
            raise ConfigurationError(f"prediction.dtype {dtype!r} is not one of float32, float16, uint8")
        if compression not in ("gzip", "lzf", "none"):
            raise ConfigurationError(f"prediction.compression {compression!r} is not one of gzip, lzf, none")
        if format not in STORES:
            raise ConfigurationError(f"prediction.format {format!r} is not one of {', '.join(STORES)}")
        if format == "nifti":
            from ..data.io.nifti import require_nibabel

            require_nibabel("prediction.format nifti")
        if format == "zarr":
            require_formats_extra("prediction.format zarr")
            if compression == "lzf":
                raise ConfigurationError(
                    "prediction.compression lzf is HDF5's own; Zarr outputs take gzip (stored as Blosc-zstd) or none"
                )
        _check_physical_formats(format, compression, dtype, preview)
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
        self.rescale = rescale
        self.preview = preview
        self.resume = bool(resume)
        if self.resume and not getattr(STORES[format], "shared_writes", False):
            raise ConfigurationError(
                f"prediction.resume needs prediction.format zarr or ome-zarr (an HDF5, TIFF or NIfTI output has one "
                f"writer and no record of its finished rows); got prediction.format {format}"
            )
        self._assignment: RowAssignment | None = None
        if isinstance(ensemble, str):
            ensemble = [ensemble]
        self.ensemble = [str(path) for path in ensemble] if ensemble else []
        # The --ckpt_path model's checkpoint, set by the command, so that a member naming it again is refused.
        self.ckpt_path: str | None = None
        self.written: list[Path] = []
        self.previews: list[Path] = []  # the preview PNGs of prediction.preview, beside the written outputs
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
        self._back: BackResampler | None = None  # with rescale: the model's grid back to the volume's
        self._owned: RowAssignment | None = None  # rank-owned rows (DDP, resume) instead of band reductions
        self._outputs: dict[int, VolumeOutput] = {}  # rank 0, owned mode: every volume's output until the end
        self._shared: list[Path] = []  # owned mode, Zarr: the temporary store of each volume, rank 0's
        self._needed: set[int] = set()
        self._progress: Progress | None = None
        self._parts: dict[int, str] = {}  # owned mode, HDF5, ranks > 0: this rank's part file of each volume
        self._start_rank = time.perf_counter()
        self._patches = 0
        self._values = 0
        self._sent = 0

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict" and self.rescale:
            rescale = getattr(trainer.datamodule, "rescale_predictions_to", None)
            if rescale is None:
                raise ConfigurationError("prediction.rescale needs the VolumeDataModule's predict dataset")
            rescale(getattr(pl_module, "voxel_size", None))
        if stage == "predict" and trainer.is_global_zero:
            self._created = check_output_dir(self.output_dir)
            notes = remove_stale_temporaries(self.output_dir)
            if notes and sys.stderr is not None:
                with contextlib.suppress(OSError, ValueError):  # a closed stderr: the removals stand without notes
                    print("\n".join(f"note: {note}" for note in notes), file=sys.stderr, flush=True)
        if stage == "predict":
            if trainer.is_global_zero and not self.resume:
                plans = self._datamodule_plans(trainer) or []
                notes = remove_partials(self.output_dir, [plan.volume.path for plan in plans], self.format)
                if notes and sys.stderr is not None:
                    with contextlib.suppress(OSError, ValueError):
                        print("\n".join(f"note: {note}" for note in notes), file=sys.stderr, flush=True)
            self._plan_regions(trainer)

    @staticmethod
    def _datamodule_plans(trainer: pl.Trainer) -> list[Any] | None:
        datamodule = getattr(trainer, "datamodule", None)
        return getattr(getattr(datamodule, "datasets", {}).get("predict"), "plans", None)

    def _plan_regions(self, trainer: pl.Trainer) -> None:
        """Under DDP (or with ``resume``) split the output rows over the ranks and hand the DataModule the patches
        of each (:mod:`~.distributed`); its ``predict_dataloader`` returns them as the rank's sampler. The
        DataModule has built its predict dataset already (Lightning runs its setup before the callbacks')."""
        self._assignment = None
        datamodule = getattr(trainer, "datamodule", None)
        if getattr(datamodule, "predict_assignment", None) is not None:
            datamodule.predict_assignment = None  # an earlier run's: this run decides afresh
        if trainer.world_size <= 1 and not self.resume:
            return
        if self.rescale or self.preview:
            if self.resume:
                raise ConfigurationError(
                    "prediction.resume does not combine with prediction.rescale or prediction.preview yet; drop one "
                    "of them (a resumed output can be previewed by a second run over it)"
                )
            return  # resampled rows and the preview's central planes need the whole volume: the ranks reduce bands
        store = STORES[self.format]
        if not (getattr(store, "shared_writes", False) or hasattr(store, "join")):
            return  # a store that neither takes several writers nor joins part files: the ranks reduce bands
        plans = self._datamodule_plans(trainer)
        if plans is None:
            if self.resume:
                raise ConfigurationError("prediction.resume needs the predict data of VolumeDataModule (data.*)")
            return  # another DataModule: the ranks reduce bands instead
        finished = self._resume_finished(trainer, plans) if self.resume else None
        self._assignment = assign_rows(plans, trainer.world_size, self.halo[0], finished=finished)
        datamodule.predict_assignment = self._assignment

    def _resume_finished(self, trainer: pl.Trainer, plans: Sequence[Any]) -> list[set[tuple[int, int]]]:
        """``prediction.resume``, at setup on every rank: each volume's settings checked against the record of its
        interrupted output (:mod:`~.resume`; a mismatch raises), and the chunk rows it finished."""
        module = trainer.lightning_module
        digest = state_dict_digest(module)
        normalization = getattr(trainer.datamodule.datasets["predict"], "normalization", None)
        self._resume_settings = []
        finished = []
        for plan in plans:
            final = output_path(self.output_dir, plan.volume.path, self.format)
            settings = run_settings(plan, normalization, self, digest, int(module.hparams.out_channels))
            found = check_settings(final, settings)
            self._resume_settings.append((settings, found))
            finished.append(finished_rows(final) if found else set())
        return finished

    def _skip(self, index: int) -> frozenset[int]:
        """The first rows of the chunk rows of volume ``index`` an interrupted run finished (resume)."""
        return frozenset(z0 for z0, _ in self._owned.finished[index]) if self._owned.finished else frozenset()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        self.written = []
        self.previews = []
        loader = trainer.predict_dataloaders
        dataset = getattr(loader, "dataset", None)
        plans = getattr(dataset, "plans", None)
        if plans is None:
            raise ConfigurationError(
                "PredictionWriter needs the predict dataset of HDF5DataModule (one with 'plans' of volumes and grids)"
            )
        volumes = [Path(plan.volume.path) for plan in plans]
        check_collisions(Path(self.output_dir).expanduser(), volumes, format=self.format)
        check_outputs(self.output_dir, volumes, self.format, preview=self.preview)
        self._check_task(pl_module)
        self._check_halo(plans, int(pl_module.hparams.out_channels))
        self._check_memory(plans, pl_module, int(getattr(loader, "batch_size", None) or 1))
        self._targets = self._check_instances(plans, pl_module) if self.instances else None
        self._plans = list(plans)
        pl_module.predict_tta = self.tta
        if self.ensemble:
            from .ensemble import load_members

            pl_module.predict_members = load_members(self.ensemble, pl_module, getattr(trainer, "datamodule", None),
                                                     reference_path=self.ckpt_path)
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
        # Lightning wraps the predict batch sampler (to track indices); the sampler stays inside.
        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
        if isinstance(sampler, OwnedRowsSampler) and self._assignment is not None and \
                sampler.assignment is self._assignment:
            self._owned = self._assignment
            self._share = [self._owned.patches_of(rank, v, self._plans) for v in range(len(self._plans))]
            self._open_shared(trainer, pl_module)
        elif self.resume:
            raise ConfigurationError("prediction.resume needs the predict loader of VolumeDataModule")

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
            part, where_part = probabilities[i:j], starts[i:j]
            if self._owned is not None:
                # Only the patches meeting this rank's rows (the sampler sends no others).
                keep = [k for k, z in enumerate(where_part[:, 0].tolist()) if z in self._needed]
                if len(keep) < j - i:
                    index = torch.as_tensor(keep, dtype=torch.int64)
                    part, where_part = part[index.to(part.device)], where_part[index]
            if len(where_part):
                self._patches += len(where_part)
                self._write_slabs(self._stitcher.add(part, where_part))
            if self._bar is not None:
                self._bar.update(len(where_part))
            i = j

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Volumes this rank received no patch of still take part in the band reductions of the other ranks.
        self._advance_to(trainer, pl_module, len(self._plans))
        if self._owned is not None:
            self._complete_owned(trainer)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.predict_tta = False
        pl_module.predict_members = []
        self._created = []  # the run succeeded: its directories stay
        self._close_pool()
        if trainer.is_global_zero and self.written:
            seconds = time.perf_counter() - self._start
            lines = [f"predict finished: {len(self.written)} volume(s), {self._voxels / max(seconds, 1e-9):,.0f} "
                     f"voxels/s, {seconds:.1f} s"]
            lines += [f"  wrote {path}" for path in [*self.written, *self.previews]]
            print("\n".join(lines), flush=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except BaseException:  # noqa: BLE001 - the original exception is the one to report
                pass
        if self._output is not None and self._output not in self._outputs.values():
            self._output.discard(keep=self.resume)
        for output in self._outputs.values():
            output.discard(keep=self.resume)
        if (trainer.is_global_zero or self._owned is not None) and not self.resume:
            remove_own_temporaries(self.output_dir, [plan.volume.path for plan in self._plans], self.format)
        if self._bar is not None:
            self._bar.close()
        pl_module.predict_tta = False
        pl_module.predict_members = []
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
                StreamingStitcher(plan_shape(plan), plan.grid, channels, blend=self.blend, halo=self.halo)
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
        from ..blockwise import blockwise_plan
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
            # Above the limit the watershed runs blockwise (z-blocks with context, objects merged across faces);
            # refused only when even a block of one chunk row does not fit.
            if need > limit and blockwise_plan(tuple(shape), channels, self.watershed,
                                               offsets=targets.get("offsets")) is None:
                raise ConfigurationError(
                    f"predict volume {plan.volume.path}: the watershed of prediction.instances runs blockwise above "
                    f"the memory limit, in z-blocks of at least 16 rows with context, and even one such block of "
                    f"{tuple(shape)} needs more than "
                    f"prediction.watershed.memory_limit_gb={self.watershed.memory_limit_gb:g}; raise the limit if "
                    "the machine has the memory, or predict without instances"
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
        if self._owned is not None:
            self._open_owned(trainer, pl_module, index)
            return
        reduce = None
        if trainer.world_size > 1:
            def reduce(band: torch.Tensor) -> torch.Tensor:
                return trainer.strategy.reduce(band, reduce_op="sum")
        resampling = getattr(plan, "resampling", None)
        self._back = BackResampler(resampling) if resampling is not None else None
        self._stitcher = StreamingStitcher(
            plan_shape(plan), plan.grid, channels, blend=self.blend, halo=self.halo,
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
                    volume=plan.volume, **_physical(plan.volume),
                    preview=self._activation if self.preview else None,
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
        if self._back is not None:
            slabs = self._back.push(slabs)  # model-grid slabs to the rows of the volume's grid they complete
        output = self._output
        for z0, z1, slab in slabs:
            self._voxels += slab[0].numel()
            self._values += slab.numel()
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
                    event: Any = event, progress: Any = self._progress) -> None:
                if event is not None:
                    event.synchronize()
                output.write(z0, z1, values.numpy(), None if segmentation is None else segmentation.numpy())
                if progress is not None:  # resume: mark the chunk rows now in the store
                    progress.update(output.flushed)

            with writing(output.final, output.predictions.shape, self.dtype):
                self._writer.submit(job)

    def _segment(self, slab: torch.Tensor) -> torch.Tensor:
        if self._activation == "softmax":
            return slab.argmax(0).to(torch.uint8 if slab.shape[0] <= 256 else torch.int32)
        return (slab > 0.5).to(torch.uint8)

    def _finish_volume(self) -> None:
        if self._owned is not None:
            self._finish_owned()
            return
        self._write_slabs(self._stitcher.finish())
        if self._output is not None:
            with writing(self._output.final, self._output.predictions.shape, self.dtype):
                self._writer.close()
                self._output.commit()
            self.written.append(self._output.final)
            if self.preview:
                self.previews.append(_write_preview(self._plans[self._current].volume, self._output))
        if self._bar is not None:
            self._bar.close()
        self._stitcher = self._output = self._writer = self._bar = None
        self._current = None


    # ------------------------------------------------------------------------------------------------ owned rows
    def _new_output(self, pl_module: pl.LightningModule, index: int, rows: tuple[int, int], tmp: Path | None = None,
                    attach: bool = False, skip: frozenset[int] = frozenset()) -> VolumeOutput:
        plan = self._plans[index]
        channels = int(pl_module.hparams.out_channels)
        segmentation = None
        if self.save_segmentation:
            segmentation = "argmax" if getattr(pl_module, "activation", "softmax") == "softmax" else "threshold"
        if self._pool is None and compresses_in_threads(self.format, self.compression):
            self._pool = compression_pool()
        final = output_path(self.output_dir, plan.volume.path, self.format)
        with writing(final, (channels, *plan.volume.spatial_shape), self.dtype):
            return VolumeOutput(
                final, plan.volume.spatial_shape, channels, self.dtype, segmentation, self.compression, self._pool,
                self.format, instances=(self._targets, self.watershed) if self._targets else None,
                volume=plan.volume, **_physical(plan.volume), rows=rows, tmp=tmp, attach=attach, skip=skip,
            )

    def _open_shared(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Owned mode, at the start: rank 0 creates every volume's Zarr store (its metadata) and tells the other
        ranks where (the broadcast is the one synchronisation before the ranks write). HDF5: nothing to share, each
        rank writes a part file of its own."""
        self._start_rank = time.perf_counter()
        if not getattr(STORES[self.format], "shared_writes", False):
            return
        rank = trainer.global_rank
        paths = None
        if trainer.is_global_zero:
            for v in range(len(self._plans)):
                rows = self._owned.rows[rank][v]
                if not self.resume:
                    self._outputs[v] = self._new_output(pl_module, v, rows)
                    continue
                settings, found = self._resume_settings[v]
                final = output_path(self.output_dir, self._plans[v].volume.path, self.format)
                if found:  # continue the interrupted store
                    self._outputs[v] = self._new_output(pl_module, v, rows, tmp=partial_path(final), attach=True,
                                                        skip=self._skip(v))
                else:
                    self._outputs[v] = self._new_output(pl_module, v, rows, tmp=partial_path(final))
                    start_record(final, settings)
            paths = [str(self._outputs[v].tmp) for v in range(len(self._plans))]
        if trainer.world_size > 1:
            if trainer.is_global_zero:
                import pickle

                self._sent += len(pickle.dumps(paths)) * (trainer.world_size - 1)
            paths = trainer.strategy.broadcast(paths, src=0)
        self._shared = [Path(p) for p in paths]

    def _open_owned(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        """Owned mode: a stitcher of this rank's rows of volume ``index`` and the output they go to (none if the
        rank owns no rows of it)."""
        rank = trainer.global_rank
        plan = self._plans[index]
        self._current, self._next = index, index + 1
        self._activation = getattr(pl_module, "activation", "softmax")
        a, b = self._owned.rows[rank][index]
        self._stitcher, self._needed = None, set()
        if a == b:
            return
        self._stitcher = StreamingStitcher(
            plan.volume.spatial_shape, plan.grid, int(pl_module.hparams.out_channels), blend=self.blend,
            halo=self.halo, device=pl_module.device, rows=(a, b),
        )
        self._needed = set(self._stitcher.needed_z_starts())
        if index in self._outputs:
            self._output = self._outputs[index]
        elif getattr(STORES[self.format], "shared_writes", False):
            self._output = self._new_output(pl_module, index, (a, b), tmp=self._shared[index], attach=True,
                                            skip=self._skip(index))
        else:
            self._output = self._new_output(pl_module, index, (a, b))  # this rank's part file
            if trainer.is_global_zero:
                self._outputs[index] = self._output
        self._writer = BackgroundWriter()
        self._progress = Progress(self._output.final, self._owned.units[rank][index]) if self.resume else None
        if trainer.is_global_zero and trainer.progress_bar_callback is not None:
            self._bar = tqdm(
                total=self._share[index], desc=f"{Path(plan.volume.path).name} ({index + 1}/{len(self._plans)})",
                unit="patch", leave=True, dynamic_ncols=True,
            )

    def _finish_owned(self) -> None:
        if self._stitcher is not None:
            self._write_slabs(self._stitcher.finish())
        output = self._output
        if output is not None:
            with writing(output.final, output.predictions.shape, self.dtype):
                self._writer.close()
                # Rank 0 keeps its outputs open: the other ranks' rows, the instances and the rename come last.
                output.finish_rows(close=output not in self._outputs.values())
                if self._progress is not None:
                    self._progress.update(output.flushed)
            if not output.attached and output not in self._outputs.values():
                self._parts[self._current] = str(output.tmp)  # an HDF5 part file, for rank 0 to join
        if self._bar is not None:
            self._bar.close()
        self._stitcher = self._output = self._writer = self._bar = self._progress = None
        self._current = None

    def _complete_owned(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None = None) -> None:
        """Owned mode, at the end: one gathering of every rank's report (and HDF5 part files) — the only wait for
        the other ranks —, then rank 0 joins the parts, writes instances and renames each output."""
        rank = trainer.global_rank
        report = {"rank": rank, "patches": self._patches, "values": self._values,
                  "seconds": time.perf_counter() - self._start_rank, "parts": dict(self._parts),
                  "peak_rss": peak_rss(), "sent": self._sent}
        reports, sent = gather_objects(report, trainer.world_size)
        self._sent += sent
        if not trainer.is_global_zero:
            self._parts = {}
            return
        for v in range(len(self._plans)):
            output = self._outputs.get(v)
            if output is None:  # HDF5, a volume rank 0 owns no rows of: an empty file the parts are joined into
                output = self._outputs[v] = self._new_output(trainer.lightning_module, v, (0, 0))
                output.finish_rows(close=False)
            parts = [Path(r["parts"][v]) for r in reports if r["rank"] != 0 and v in r["parts"]]
            with writing(output.final, output.predictions.shape, self.dtype):
                output.complete(parts)
            if self.resume:
                finish_record(output.final)
            self.written.append(output.final)
        self._outputs = {}
        lines = rank_report(reports, self._owned)
        print("\n".join(lines), flush=True)


def _check_physical_formats(format: str, compression: str, dtype: str, preview: bool) -> None:
    """The settings the OME-Zarr and TIFF outputs and the preview refuse, before anything runs."""
    if format in ("ome-zarr", "tiff"):
        require_formats_extra(f"prediction.format {format}")
    if format == "ome-zarr" and compression == "lzf":
        raise ConfigurationError(
            "prediction.compression lzf is HDF5's own; OME-Zarr outputs take gzip (stored as Blosc-zstd) or none"
        )
    if format == "tiff" and dtype == "float16":
        raise ConfigurationError(
            "prediction.dtype float16 cannot be stored in an ImageJ TIFF (it holds uint8, uint16 and float32); with "
            "prediction.format tiff choose prediction.dtype float32 or uint8"
        )
    if preview:
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise ConfigurationError(
                "prediction.preview needs Pillow, from the optional 'formats' extra: "
                "pip install 'unet3d-lightning[formats]'"
            ) from None


def _physical(volume: Any) -> dict[str, Any]:
    """The volume's voxel size and unit as the outputs take them (None when the volume does not know its own)."""
    voxel_size = getattr(volume, "voxel_size", None)
    if voxel_size is None:
        return {"voxel_size": None, "unit": None}
    zyx = getattr(voxel_size, "zyx", voxel_size)
    return {"voxel_size": tuple(float(s) for s in zyx), "unit": getattr(voxel_size, "unit", None)}


def _write_preview(volume: Any, output: VolumeOutput) -> Path:
    """``<stem>_preview.png`` beside the complete output: the raw's central planes, read now, under the planes of
    the overlay gathered while the volume was written."""
    from .paths import side_path
    from .preview import compose, raw_planes, write_preview

    voxel_size = _physical(volume)["voxel_size"]
    image = compose(raw_planes(volume), output.preview_planes, output.preview_kind, voxel_size)
    return write_preview(side_path(output.final, output.format, "preview"), image)
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
