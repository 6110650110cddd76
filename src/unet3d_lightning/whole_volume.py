"""``unet3d validate|test --whole_volume true``: the metrics of ``unet3d evaluate`` on whole, stitched volumes.

Patch-averaged validation metrics count an object cut by patch borders once per patch and cannot see surface
distances across patches. With ``--whole_volume true``, after the usual patch metrics, every validation (test) volume
is predicted whole: its patch grid (``data.val_patch_shape``/``val_stride_shape``, as validation uses) through the
model, blended by the prediction stitcher (:class:`~unet3d_lightning.prediction.stitcher.StreamingStitcher`,
``average`` blending, the raw normalised as for prediction), turned into class ids (argmax, softmax models) or masks
(probability > 0.5, sigmoid models) and scored against the volume's labels by
:func:`~unet3d_lightning.evaluate.score_volume`, the code of ``unet3d evaluate``.

Logged (and in the table Lightning prints at the end; ``stage`` is ``val`` or ``test``):

- ``{stage}/whole/<metric>`` for ``dice``, ``iou``, ``hd95``, ``assd``, ``surface_dice``: the mean over classes of
  the per-class means over volumes (background left out for class-id labels; nan classes, absent from a volume's
  label and prediction, left out);
- ``{stage}/whole/<metric>_class<c>``: the mean over volumes of class ``c``;
- for models trained on instance targets (``data.label_transform``): ``{stage}/whole/arand``, ``ap50``, ``map``,
  ``precision``, ``recall`` of the instances that validation makes (connected components of the stitched maps'
  interior grown by a watershed, :func:`~unet3d_lightning.instances.components_instances`) against the label's
  instance ids, and the foreground's class metrics as class 1.

A table of every volume's metrics is printed too. Distances are in voxels (voxel size 1; the surface Dice tolerance is
1 voxel). Memory: one volume's class ids (int32) and, for instance targets, its maps (4 bytes per voxel and channel)
and the watershed (see :data:`~unet3d_lightning.instances.WATERSHED_BYTES_PER_VOXEL`) are held at a time; the
stitcher's band streams. Under DDP the first process computes the metrics and sends them to the others (the others
wait).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from .metrics import CLASS_METRICS, INSTANCE_METRICS

_ROLES = {"validate": "val", "test": "test"}


class WholeVolumeMetrics(Callback):
    """Whole-volume metrics of the validation (test) volumes, logged as ``{stage}/whole/...`` (see the module).

    Args:
        tolerance: surface Dice tolerance in voxels. Default 1.0.
    """

    def __init__(self, tolerance: float = 1.0) -> None:
        from .evaluate import require_scipy

        require_scipy("whole_volume")
        self.tolerance = float(tolerance)
        self.report: dict[str, Any] | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._run(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module, "test")

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        report = None
        if trainer.is_global_zero:
            report = whole_volume_report(datamodule, pl_module, stage, self.tolerance)
        if trainer.world_size > 1:
            report = trainer.strategy.broadcast(report, src=0)
        self.report = report
        for name, value in logged_values(report, stage).items():
            pl_module.log(name, value, sync_dist=False)
        if trainer.is_global_zero:
            from .evaluate import format_table

            print(f"whole-volume metrics ({stage}):\n{format_table(report)}", file=sys.stdout, flush=True)


def logged_values(report: dict[str, Any], stage: str) -> dict[str, float]:
    """The names and values :class:`WholeVolumeMetrics` logs for a report (see the module docstring)."""
    values: dict[str, float] = {}
    classes = report["mean"]["classes"]
    for metric in CLASS_METRICS:
        per_class = [v[metric] for v in classes.values() if not math.isnan(v[metric])]
        values[f"{stage}/whole/{metric}"] = float(np.mean(per_class)) if per_class else math.nan
        for c, v in classes.items():
            values[f"{stage}/whole/{metric}_class{c}"] = float(v[metric])
    for metric, value in report["mean"].get("instances", {}).items():
        values[f"{stage}/whole/{metric}"] = float(value)
    return values


def whole_volume_report(datamodule: Any, model: Any, stage: str, tolerance: float = 1.0) -> dict[str, Any]:
    """The :func:`~unet3d_lightning.evaluate.evaluate`-style report of the ``stage`` (``"val"``/``"test"``) volumes of
    ``datamodule``, each predicted whole by ``model`` (see the module docstring)."""
    from .data.datasets import PredictDataset, PredictionPlan
    from .data.io.handles import FileCache
    from .data.patches import padded_shape, patch_grid
    from .data.volumes import read_region
    from .evaluate import Side, score_volume
    from .metrics import mean_scores

    patch, stride = datamodule._shapes(stage)
    files = FileCache()
    targets = model.hparams.get("targets") if getattr(model, "instance_targets", False) else None
    volumes: dict[str, Any] = {}
    try:
        for index, volume in enumerate(datamodule.volumes[stage]):
            padded = padded_shape(volume.spatial_shape, patch)
            plan = PredictionPlan(volume, padded, patch_grid(padded, patch, stride))
            maps = _stitched(PredictDataset([plan], datamodule.normalization), plan, model,
                             int(getattr(datamodule, "batch_size", 1) or 1), keep_maps=targets is not None)
            everything = tuple(slice(0, n) for n in volume.spatial_shape)
            is_4d = volume.label_kind == "binary"
            label = read_region(volume, files, "label", everything, is_4d)  # type: ignore[arg-type]
            where = volume.describe(volume.label_internal_path, "label")
            truth = instances = None
            if targets is not None:
                from .instances import boundary_evidence, components_instances

                boundary, foreground = boundary_evidence(maps, targets)
                instances = components_instances(boundary, foreground)
                truth = np.asarray(label)  # as stored: uint64 ids stay whole (negative ids of signed labels: ignored)
                if np.issubdtype(truth.dtype, np.floating):
                    truth = truth.astype(np.int64)
                sides = (Side(truth, "foreground", where), Side(instances, "foreground", "stitched instances"))
                mode = "ids"
            elif model.multiclass:
                sides = (Side(label, "ids", where), Side(maps, "ids", "stitched prediction"))
                mode = "ids"
            else:
                sides = (Side(label, "masks", where), Side(maps, "masks", "stitched prediction"))
                mode = "masks"
            ignore = None if targets is not None else model.hparams.get("ignore_index")
            name = f"{index}:{volume.path.name}"
            volumes[name] = {
                "label": str(volume.file_of("label")),
                **score_volume(*sides, mode, tolerance=tolerance, ignore_index=ignore, truth=truth,
                               instances=instances),
            }
    finally:
        files.close()
    class_ids = sorted({c for v in volumes.values() for c in v["classes"]}, key=int)
    mean: dict[str, Any] = {"classes": {
        c: mean_scores([v["classes"][c] for v in volumes.values() if c in v["classes"]], CLASS_METRICS)
        for c in class_ids}}
    with_instances = [v["instances"] for v in volumes.values() if "instances" in v]
    if with_instances:
        mean["instances"] = mean_scores(with_instances, INSTANCE_METRICS)
    return {"metrics": {"classes": list(CLASS_METRICS), "instances": list(INSTANCE_METRICS)},
            "tolerance": tolerance, "volumes": volumes, "mean": mean}


def _stitched(dataset: Any, plan: Any, model: Any, batch_size: int, keep_maps: bool) -> np.ndarray:
    """The model's stitched output of one volume: the probability maps ``(C, D, H, W)`` float32 (``keep_maps``), or
    class ids ``(D, H, W)`` int32 (softmax models), or masks ``(C, D, H, W)`` bool (sigmoid models)."""
    from .prediction.engine import inference_context
    from .prediction.stitcher import StreamingStitcher

    channels = int(model.hparams.out_channels)
    shape = tuple(plan.volume.spatial_shape)
    stitcher = StreamingStitcher(shape, plan.grid, channels, blend="average", device=model.device)
    if keep_maps:
        out = np.zeros((channels, *shape), np.float32)
    elif model.multiclass:
        out = np.zeros(shape, np.int32)
    else:
        out = np.zeros((channels, *shape), bool)

    def store(slabs: list) -> None:
        for z0, z1, slab in slabs:
            if keep_maps:
                out[:, z0:z1] = slab.float().cpu().numpy()
            elif model.multiclass:
                out[z0:z1] = slab.argmax(0).cpu().numpy()
            else:
                out[:, z0:z1] = (slab > 0.5).cpu().numpy()

    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(first, min(first + batch_size, len(dataset)))]
            raw = torch.stack([item["raw"] for item in items]).to(model.device)
            starts = torch.stack([item["start"] for item in items])
            with torch.no_grad(), inference_context(raw.device, model.net):
                probabilities = model.final_activation(model(raw))
            store(stitcher.add(probabilities, starts))
        store(stitcher.finish())
    finally:
        dataset.close()
        model.train(was_training)
    return out
