"""``unet3d evaluate``: whole-volume metrics of predictions against labels, per volume and class, and their means.

Usage::

    unet3d evaluate --prediction_paths 'predictions/' --label_paths 'data/test/' --output report.json
    unet3d evaluate --prediction_paths '[out/a_predictions.h5, out/b_predictions.h5]' \\
        --label_paths 'labels/*_seg.h5' --voxel_size '[2.0, 0.5, 0.5]' --tolerance 1.0

Pairing (files, directories and glob patterns as ``data.*_paths`` take them, in any format the readers know): a
prediction's *name* is its file name without the format suffix and without a trailing ``_predictions`` or
``_segmentation`` (what ``unet3d predict`` appends): ``case_predictions.h5`` -> ``case``. A label pairs with the
prediction of its name (``case.h5``), or, when no label has exactly that name, with one whose name has a trailing
``_seg``, ``_label``, ``_labels`` or ``_gt`` dropped (``case_seg.nii.gz``). One prediction and one label given on
their own pair whatever their names. A file left without a partner, or two files of the same name, are one error
naming them, before anything is read.

What is compared (see :mod:`unet3d_lightning.metrics` for the metrics and their empty-mask conventions):

- labels (``--label_key``, default ``label``): ``(D, H, W)`` class ids, or ``(C, D, H, W)`` binary masks (one class
  per channel), or, against ``instances``, instance ids (0 background, negative ids ignored);
- a prediction file holding ``instances`` (``prediction.instances``): the instance metrics (``arand``, ``ap50``,
  ``map``, ``precision``, ``recall``) against the label's ids, and the class metrics of the foreground (class 1:
  label > 0 against instances > 0);
- otherwise its ``segmentation`` (``prediction.save_segmentation``) or, without one, its ``predictions``: their argmax
  over channels (several channels and class-id labels), or ``probability > --threshold`` per channel (one channel,
  or mask labels); uint8 ``predictions`` are divided by their ``scale`` attribute first. ``--prediction_key`` names
  another dataset. A TIFF or NIfTI file holds one array: integer ones are read as a segmentation, others as
  probabilities.

Class metrics (``dice``, ``iou``, ``hd95``, ``assd``, ``surface_dice``) are computed for every class id found in the
label or the prediction, class 0 (background) only with ``--include_background true``; voxels of ``--ignore_index``
(and negative label ids) count nowhere. Distances are in the units of the voxel size: ``--voxel_size`` if given, else
the one the label file records (then the prediction's; readers that record voxel sizes), else 1 per axis.

Memory: the volumes are read in z-slabs of about ``SLAB_VOXELS`` voxels for the counts (Dice, IoU, the instance
overlaps); the surface metrics of a class read the class's bounding box (the union of its label and predicted voxels)
z-slab by z-slab (with one row of halo) and keep only the class's surface voxels, about 100 bytes each (k-d trees of
the surfaces); the instance metrics keep 16 bytes per overlapping (object, instance) pair. The background class, with
``--include_background``, spans the whole volume.

Output: a table on stdout; with ``--output report.json``, the report as JSON (``volumes -> name -> classes -> id ->
metric``, ``volumes -> name -> instances -> metric``, ``mean`` likewise; nan is written as null, infinity as
``"inf"``) and as CSV beside it (``report.csv``: one row per volume and class, then the means; nan and inf as text),
each written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigurationError, one_line
from .metrics import (
    CLASS_METRICS,
    INSTANCE_METRICS,
    BoundingBoxes,
    ConfusionCounts,
    InstanceCounts,
    distance_scores,
    instance_scores,
    mean_scores,
    overlap_scores,
    plain_number,
    surface_points,
    surface_scores,
)

# Voxels per z-slab read for the counts (a few arrays of this many int64 values live at a time: about 200 MB).
SLAB_VOXELS = 4 * 1024**2
PREDICTION_SUFFIXES = ("_predictions", "_segmentation")
LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_gt")
SINGLE_ARRAY_FORMATS = ("tiff", "nifti")


@dataclass(frozen=True)
class Pair:
    """One prediction file and its label file, under the name they share."""

    name: str
    prediction: Path
    label: Path


def file_stem(path: Path) -> str:
    """The file name without its format suffix (``a.h5`` -> ``a``, ``a.ome.zarr`` -> ``a``, ``a.nii.gz`` -> ``a``)."""
    from .data.io import volume_stem

    name = Path(path).name
    for compound in (".nii.gz",):
        if name.lower().endswith(compound):
            return name[: -len(compound)]
    return volume_stem(path)


def _strip(stem: str, suffixes: Sequence[str]) -> str:
    for suffix in suffixes:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def pair_paths(prediction_entries: Sequence[str], label_entries: Sequence[str]) -> list[Pair]:
    """Pair prediction and label files by name (the rule is in the module docstring), in the predictions' order.

    Raises:
        ConfigurationError: a path that does not exist, a pattern or directory without volumes, a file left without
        a partner, two predictions or two labels of one name.
    """
    from .data.volumes import resolve_paths

    predictions = resolve_paths(list(prediction_entries), "prediction")
    labels = resolve_paths(list(label_entries), "label")
    if not predictions:
        raise ConfigurationError("prediction_paths names no file; give the prediction files, a directory or a pattern")
    if not labels:
        raise ConfigurationError("label_paths names no file; give the label files, a directory or a pattern")
    if len(predictions) == 1 and len(labels) == 1:
        return [Pair(_strip(file_stem(predictions[0]), PREDICTION_SUFFIXES), predictions[0], labels[0])]
    by_name: dict[str, Path] = {}
    for path in predictions:
        name = _strip(file_stem(path), PREDICTION_SUFFIXES)
        if name in by_name:
            raise ConfigurationError(
                f"prediction_paths: {by_name[name]} and {path} are both predictions of '{name}'; give one of them"
            )
        by_name[name] = path
    full: dict[str, list[Path]] = {}
    short: dict[str, list[Path]] = {}
    for path in labels:
        full.setdefault(file_stem(path), []).append(path)
        short.setdefault(_strip(file_stem(path), LABEL_SUFFIXES), []).append(path)
    pairs, used = [], set()
    missing = []
    for name, prediction in by_name.items():
        found = full.get(name) or short.get(name) or []
        if len(found) > 1:
            raise ConfigurationError(
                f"label_paths: {' and '.join(str(p) for p in found)} are all labels of '{name}' (the prediction "
                f"{prediction}); give one of them"
            )
        if not found:
            missing.append(str(prediction))
            continue
        pairs.append(Pair(name, prediction, found[0]))
        used.add(found[0])
    unpaired = [str(p) for p in labels if p not in used]
    if missing or unpaired:
        parts = []
        if missing:
            parts.append(f"prediction(s) without a label: {', '.join(missing)}")
        if unpaired:
            parts.append(f"label(s) without a prediction: {', '.join(unpaired)}")
        raise ConfigurationError(
            f"evaluate pairs files by name ({'; '.join(parts)}); a prediction 'NAME_predictions.h5' pairs with the "
            "label 'NAME.h5' or 'NAME_seg.h5' (any format; _label, _labels, _gt too): rename them or give only files "
            "that pair"
        )
    return pairs


def require_scipy(what: str) -> None:
    """Raise a one-line error naming the ``instances`` extra when SciPy (the distances, the matching) is missing."""
    try:
        import scipy  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            f"{what} needs scipy, from the optional 'instances' extra: pip install 'unet3d-lightning[instances]'"
        ) from None


def _array_or_none(file: Any, key: str) -> Any:
    try:
        return file.array(key)
    except ConfigurationError:
        return None


def _voxel_size_of(file: Any, key: str) -> tuple[tuple[float, float, float], str | None] | None:
    """The voxel size a file records for ``key`` (readers that know one: ``VolumeFile.voxel_size``), or None."""
    method = getattr(file, "voxel_size", None)
    if not callable(method):
        return None
    try:
        size = method(key)
    except (ConfigurationError, OSError, ValueError, KeyError):
        return None
    if size is None:
        return None
    zyx = getattr(size, "zyx", size)
    try:
        values = tuple(float(v) for v in zyx)
    except (TypeError, ValueError):
        return None
    return (values, getattr(size, "unit", None)) if len(values) == 3 else None  # type: ignore[return-value]


def _scale_of(array: Any) -> float:
    attrs = getattr(array, "attrs", None)
    try:
        scale = attrs.get("scale") if attrs is not None else None
    except (OSError, RuntimeError, KeyError, TypeError):
        scale = None
    if scale is not None:
        return float(np.asarray(scale).ravel()[0])
    return 255.0 if np.dtype(array.dtype) == np.uint8 else 1.0


class Side:
    """How one array (a file's dataset, or a numpy array) becomes class ids ``(d, h, w)`` or masks
    ``(C, d, h, w)`` for a region.

    Args:
        array: the array, ``(D, H, W)`` or ``(C, D, H, W)``, read by slices.
        how: ``"ids"`` (class ids as stored), ``"foreground"`` (instance ids: 1 for objects, -1 for ignored negative
            ids), ``"argmax"`` (over channels), ``"threshold_ids"`` (one channel: 1 above the threshold), ``"masks"``
            (stored masks, > 0) or ``"threshold"`` (per-channel masks above the threshold).
        where: how error messages name the array.
        threshold: probability threshold. Default 0.5.
        scale: stored value of probability 1 (255 for uint8 predictions). Default 1.
    """

    def __init__(self, array: Any, how: str, where: str, threshold: float = 0.5, scale: float = 1.0) -> None:
        self.array, self.how, self.where = array, how, where
        self.threshold, self.scale = threshold, scale
        self.spatial_shape = tuple(int(s) for s in array.shape[-3:])
        self.channels = int(array.shape[0]) if len(array.shape) == 4 else None

    def read(self, region: tuple[slice, slice, slice]) -> np.ndarray:
        from .data.io import READ_ERRORS, error_summary

        try:
            block = np.asarray(self.array[region] if self.channels is None else self.array[(slice(None), *region)])
        except READ_ERRORS as err:
            raise ConfigurationError(f"{self.where}: cannot be read ({error_summary(err)})") from None
        if self.how == "ids":
            if np.issubdtype(block.dtype, np.floating):
                if not np.all(block == np.round(block)):
                    raise ConfigurationError(f"{self.where}: holds values that are not whole numbers; give class ids")
                block = block.astype(np.int64)
            return block
        if self.how == "foreground":  # instance ids as class 1 (objects) / 0; ignored (negative) ids stay -1
            out = (block > 0).astype(np.int64)
            if np.issubdtype(block.dtype, np.signedinteger):
                out[block < 0] = -1
            return out
        if self.how == "argmax":
            return block.argmax(0)
        if self.how == "threshold_ids":  # one channel of probabilities: class 1 where above the threshold
            return (block[0] > self.threshold * self.scale).astype(np.int64)
        if self.how == "masks":
            return block > 0
        return block > self.threshold * self.scale  # "threshold": per-channel masks of probabilities


def _prediction_side(file: Any, path: Path, key: str | None, mode: str, threshold: float) -> Side:
    """The prediction's array read as class ids (``mode`` "ids") or masks (``mode`` "masks")."""
    single = getattr(file, "format", "") in SINGLE_ARRAY_FORMATS
    if key is not None or single:
        array = file.array(key or "")
        if single and key is None:
            kind = "segmentation" if np.issubdtype(np.dtype(array.dtype), np.integer) else "predictions"
        else:
            kind = "predictions" if np.issubdtype(np.dtype(array.dtype), np.floating) else "segmentation"
        name = key or kind
    else:
        name = "segmentation"
        array = _array_or_none(file, "segmentation")
        kind = "segmentation"
        if array is None:
            name = kind = "predictions"
            array = _array_or_none(file, "predictions")
        if array is None:
            raise ConfigurationError(
                f"prediction {path}: has neither 'segmentation' nor 'predictions' (nor 'instances'); give an output of "
                "unet3d predict or name the dataset with --prediction_key"
            )
    where = f"prediction {path}: dataset '{name}'"
    ndim = len(array.shape)
    if ndim not in (3, 4):
        raise ConfigurationError(f"{where} has shape {tuple(array.shape)}; expected (D, H, W) or (C, D, H, W)")
    if kind == "segmentation":
        if mode == "masks":
            if ndim != 4:
                raise ConfigurationError(f"{where} holds class ids {tuple(array.shape)} but the labels are "
                                         "(C, D, H, W) masks; give a per-channel (sigmoid) model's output")
            return Side(array, "masks", where)
        if ndim == 4 and array.shape[0] != 1:
            raise ConfigurationError(f"{where} holds {array.shape[0]} masks but the labels are class ids (D, H, W); "
                                     "give (C, D, H, W) mask labels or a softmax model's output")
        if ndim == 4:
            return Side(array, "threshold_ids", where, threshold=0.5, scale=1.0)
        return Side(array, "ids", where)
    if ndim != 4:
        raise ConfigurationError(f"{where} has shape {tuple(array.shape)}; probabilities are (C, D, H, W)")
    scale = _scale_of(array)
    if mode == "masks":
        return Side(array, "threshold", where, threshold, scale)
    return Side(array, "threshold_ids" if array.shape[0] == 1 else "argmax", where, threshold, scale)


def _slabs(depth: int, rows: int) -> list[slice]:
    return [slice(z, min(z + rows, depth)) for z in range(0, depth, rows)]


def evaluate_pair(
    pair: Pair,
    label_key: str = "label",
    prediction_key: str | None = None,
    voxel_size: Sequence[float] | None = None,
    tolerance: float = 1.0,
    include_background: bool = False,
    ignore_index: int | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """The metrics of one prediction against its label: ``{"prediction", "label", "voxel_size", "unit", "classes":
    {id: {metric: value}}, ["instances": {metric: value}]}`` (arguments as the command's flags)."""
    from .data.io import open_file

    with open_file(pair.label, role="label") as label_file, open_file(pair.prediction, role="prediction") as pred_file:
        label_array = label_file.array(label_key)
        if len(label_array.shape) not in (3, 4):
            raise ConfigurationError(
                f"label volume {pair.label}: dataset '{label_key}' has shape {tuple(label_array.shape)}; expected "
                "(D, H, W) class or instance ids or (C, D, H, W) masks"
            )
        instances = None if prediction_key is not None else _array_or_none(pred_file, "instances")
        if getattr(pred_file, "format", "") in SINGLE_ARRAY_FORMATS:
            instances = None
        label_where = f"label volume {pair.label}: dataset '{label_key}'"
        if instances is not None:
            if len(label_array.shape) != 3:
                raise ConfigurationError(f"{label_where} has shape {tuple(label_array.shape)}; instance metrics "
                                         "need (D, H, W) instance ids")
            label = Side(label_array, "foreground", label_where)
            prediction = Side(instances, "foreground", f"prediction {pair.prediction}: dataset 'instances'")
            mode = "ids"
        else:
            mode = "masks" if len(label_array.shape) == 4 else "ids"
            label = Side(label_array, "masks" if mode == "masks" else "ids", label_where)
            prediction = _prediction_side(pred_file, pair.prediction, prediction_key, mode, threshold)
        if label.spatial_shape != prediction.spatial_shape:
            raise ConfigurationError(
                f"prediction {pair.prediction} is {prediction.spatial_shape} (z, y, x) but its label {pair.label} is "
                f"{label.spatial_shape}: they do not belong together"
            )
        if mode == "masks" and prediction.channels != label.channels:
            raise ConfigurationError(
                f"prediction {pair.prediction} has {prediction.channels} channels but its label {pair.label} "
                f"'{label_key}' {label.channels} masks"
            )
        unit = None
        if voxel_size is not None:
            size, source = tuple(float(v) for v in voxel_size), "--voxel_size"
        else:
            found = _voxel_size_of(label_file, label_key)
            source = "label file"
            if found is None:
                found = _voxel_size_of(pred_file, prediction_key or "predictions")
                source = "prediction file"
            if found is None:
                size, source = (1.0, 1.0, 1.0), "default (1 per axis)"
            else:
                size, unit = found
        return {
            "prediction": str(pair.prediction), "label": str(pair.label), "voxel_size": list(size), "unit": unit,
            "voxel_size_from": source,
            **score_volume(label, prediction, mode, size, tolerance, include_background, ignore_index,
                           truth=label_array if instances is not None else None, instances=instances),
        }


def score_volume(
    label: Side,
    prediction: Side,
    mode: str,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    tolerance: float = 1.0,
    include_background: bool = False,
    ignore_index: int | None = None,
    truth: Any = None,
    instances: Any = None,
) -> dict[str, Any]:
    """``{"classes": {id: {metric: value}}, ["instances": {metric: value}]}`` of one volume.

    Args:
        label, prediction: the two sides, as class ids (``mode`` ``"ids"``) or masks (``"masks"``).
        mode: ``"ids"`` or ``"masks"``.
        voxel_size, tolerance, include_background, ignore_index: as the command's flags.
        truth, instances: the instance ids of the label and of the prediction (arrays read by slices), for the
            instance metrics. Default None: none.
    """
    size = tuple(float(v) for v in voxel_size)
    label_where = label.where
    depth, height, width = label.spatial_shape
    rows = max(1, SLAB_VOXELS // max(1, height * width * max(prediction.channels or 1, label.channels or 1)))
    whole = (slice(None), slice(None))
    counts = ConfusionCounts(ignore_index=ignore_index)
    boxes = BoundingBoxes()
    tp = fp = fn = None
    objects = InstanceCounts() if instances is not None else None
    for zs in _slabs(depth, rows):
        region = (zs, *whole)
        lab, pred = label.read(region), prediction.read(region)
        if mode == "masks":
            both = (lab & pred).sum(axis=(1, 2, 3))
            tp = both if tp is None else tp + both
            fp = (pred.sum(axis=(1, 2, 3)) - both) if fp is None else fp + pred.sum(axis=(1, 2, 3)) - both
            fn = (lab.sum(axis=(1, 2, 3)) - both) if fn is None else fn + lab.sum(axis=(1, 2, 3)) - both
            for c in range(lab.shape[0]):
                boxes.add(c, lab[c] | pred[c], zs.start)
            continue
        try:
            counts.update(lab, pred)
        except ValueError as err:
            raise ConfigurationError(f"{label_where} against {prediction.where}: {err}") from None
        known = counts.known(lab)
        for c in np.union1d(np.unique(lab), np.unique(pred)).tolist():
            mask = (lab == c) | (pred == c)
            boxes.add(int(c), mask if known is None else mask & known, zs.start)
        if objects is not None:
            truth_block = _read_raw(truth, region, label_where)
            found_instances = _read_raw(instances, region, prediction.where)
            try:
                objects.update(truth_block, found_instances)
            except ValueError as err:
                raise ConfigurationError(f"{label_where} against {prediction.where}: {err}") from None
    classes: dict[str, dict[str, float]] = {}
    if mode == "masks":
        ids = list(range(label.channels or 0))
    else:
        ids = [c for c in counts.classes() if (include_background or c != 0) and c != ignore_index]
    for c in ids:
        if mode == "masks":
            dice, iou = overlap_scores(int(tp[c]), int(fp[c]), int(fn[c]))
        else:
            dice, iou = overlap_scores(*counts.tp_fp_fn(c))
        box = boxes.slices(c)
        if box is None:
            distances = distance_scores(np.zeros((1, 1, 1), bool), np.zeros((1, 1, 1), bool))
        else:
            lab_points, pred_points = _class_surfaces(label, prediction, box, c, mode, counts, rows)
            distances = surface_scores(pred_points, lab_points, size, tolerance)
        classes[str(c)] = {"dice": dice, "iou": iou, **distances}
    result: dict[str, Any] = {"classes": classes}
    if objects is not None:
        result["instances"] = instance_scores(objects)
    return result


def _class_surfaces(
    label: Side, prediction: Side, box: tuple[slice, slice, slice], c: int, mode: str, counts: ConfusionCounts,
    rows: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The surface voxels ``(n, 3)`` of class ``c`` in the label and in the prediction, found in ``box`` z-slab by
    z-slab, each slab read with one row of halo on both sides (outside the box the class is absent)."""
    depth = box[0].stop - box[0].start
    found: tuple[list, list] = ([], [])
    for zs in _slabs(depth, rows):
        z0, z1 = box[0].start + zs.start, box[0].start + zs.stop
        lo, hi = max(box[0].start, z0 - 1), min(box[0].stop, z1 + 1)
        lab, pred = label.read((slice(lo, hi), box[1], box[2])), prediction.read((slice(lo, hi), box[1], box[2]))
        if mode == "masks":
            masks = (lab[c], pred[c])
        else:
            known = counts.known(lab)
            masks = (lab == c, pred == c) if known is None else ((lab == c) & known, (pred == c) & known)
        offset = np.array([z0, box[1].start or 0, box[2].start or 0])
        for points, mask in zip(found, masks):
            points.append(surface_points(mask, slice(z0 - lo, z1 - lo), planar=label.spatial_shape[0] == 1) + offset)
    return tuple(np.concatenate(p) if p else np.zeros((0, 3), np.int64) for p in found)  # type: ignore[return-value]


def _read_raw(array: Any, region: tuple[slice, slice, slice], where: str) -> np.ndarray:
    from .data.io import READ_ERRORS, error_summary

    try:
        block = np.asarray(array[region])
    except READ_ERRORS as err:
        raise ConfigurationError(f"{where}: cannot be read ({error_summary(err)})") from None
    if np.issubdtype(block.dtype, np.floating):
        block = block.astype(np.int64)
    return block


def evaluate(pairs: Sequence[Pair], **settings: Any) -> dict[str, Any]:
    """The report of all ``pairs``: per volume (:func:`evaluate_pair`) and the mean over volumes per class and of the
    instance metrics (nan left out, see :func:`~unet3d_lightning.metrics.mean_scores`)."""
    volumes = {pair.name: evaluate_pair(pair, **settings) for pair in pairs}
    class_ids = sorted({c for v in volumes.values() for c in v["classes"]}, key=_class_order)
    mean: dict[str, Any] = {
        "classes": {c: mean_scores([v["classes"][c] for v in volumes.values() if c in v["classes"]], CLASS_METRICS)
                    for c in class_ids},
    }
    with_instances = [v["instances"] for v in volumes.values() if "instances" in v]
    if with_instances:
        mean["instances"] = mean_scores(with_instances, INSTANCE_METRICS)
    return {
        "metrics": {"classes": list(CLASS_METRICS), "instances": list(INSTANCE_METRICS)},
        "tolerance": settings.get("tolerance", 1.0),
        "volumes": volumes,
        "mean": mean,
    }


def _class_order(c: str) -> tuple[int, str]:
    return (int(c), c) if c.lstrip("-").isdigit() else (2**62, c)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return plain_number(value)


def report_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """The CSV rows: ``volume, class, <class metrics>, <instance metrics>``, one per volume and class (class
    ``instances`` for the instance metrics), then the means (volume ``mean``)."""
    rows = []
    sections = [(name, v) for name, v in report["volumes"].items()] + [("mean", report["mean"])]
    for name, section in sections:
        for c, values in section["classes"].items():
            rows.append({"volume": name, "class": c, **{m: _text(values[m]) for m in CLASS_METRICS}})
        if "instances" in section:
            rows.append({"volume": name, "class": "instances",
                         **{m: _text(section["instances"][m]) for m in INSTANCE_METRICS}})
    return rows


def _text(value: float) -> str:
    return format(float(value), ".10g")


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width table (what the command prints)."""
    columns = ["volume", "class", *CLASS_METRICS, *INSTANCE_METRICS]
    rows = [{k: (format(float(v), ".4g") if k in CLASS_METRICS + INSTANCE_METRICS else v) for k, v in row.items()}
            for row in report_rows(report)]
    used = [c for c in columns if any(c in row for row in rows)] or columns[:2]
    widths = {c: max([len(c)] + [len(row.get(c, "")) for row in rows]) for c in used}
    lines = ["  ".join(c.ljust(widths[c]) for c in used)]
    lines += ["  ".join(row.get(c, "").ljust(widths[c]) for c in used) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name in the same directory, renamed when complete."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_output(output: str) -> tuple[Path, Path]:
    """``(report.json, report.csv)`` for ``--output``, after checking that it names a JSON file in a directory that
    exists or can be made."""
    from .errors import nearest_existing

    path = Path(output).expanduser()
    if path.suffix.lower() != ".json":
        raise ConfigurationError(f"--output {output}: name the JSON report, e.g. report.json (the CSV is written "
                                 "beside it, report.csv)")
    if path.is_dir():
        raise ConfigurationError(f"--output {output} is a directory; name a file, e.g. {path / 'report.json'}")
    existing = nearest_existing(path.parent)
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigurationError(f"--output {output}: cannot write in {existing}; choose another place")
    return path, path.with_suffix(".csv")


def write_report(report: dict[str, Any], json_path: Path, csv_path: Path) -> None:
    """Write the report as JSON (nan as null, infinity as ``"inf"``) and as CSV."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _replace(json_path, json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["volume", "class", *CLASS_METRICS, *INSTANCE_METRICS],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(report_rows(report))
    _replace(csv_path, buffer.getvalue())


def _paths(values: list[str]) -> list[str]:
    """Paths as typed: ``'[a.h5, b.h5]'`` (a YAML list, as the other commands take them), or one or more words."""
    import yaml

    out: list[str] = []
    for value in values:
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = yaml.safe_load(text)
            except yaml.YAMLError:
                parsed = None
            if not isinstance(parsed, list):
                raise ConfigurationError(f"cannot read {value!r} as a list of paths; write '[a.h5, b.h5]'")
            out.extend(str(p) for p in parsed)
        else:
            out.append(value)
    return out


def _voxel_size(text: str | None) -> tuple[float, float, float] | None:
    import yaml

    if text is None:
        return None
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    values = parsed if isinstance(parsed, list) else [parsed]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) == 1:
        numbers *= 3
    if len(numbers) != 3 or not all(math.isfinite(v) and v > 0 for v in numbers):
        raise ConfigurationError(f"--voxel_size {text!r} must be one positive number or three, [z, y, x]")
    return tuple(numbers)  # type: ignore[return-value]


def _bool(text: str) -> bool:
    word = text.strip().lower()
    if word in ("true", "1", "yes"):
        return True
    if word in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unet3d evaluate",
        description="Whole-volume metrics (dice, iou, hd95, assd, surface_dice; with instances arand, ap50, map, "
        "precision, recall) of predictions against labels, per volume and class, and their means. Files pair by "
        "name: NAME_predictions.h5 with NAME.h5 or NAME_seg.h5 (any format).",
    )
    parser.add_argument("--prediction_paths", nargs="+", required=True,
                        help="prediction files, directories or glob patterns ('[a.h5, b.h5]' or several words)")
    parser.add_argument("--label_paths", nargs="+", required=True, help="label files, directories or patterns")
    parser.add_argument("--output", default=None,
                        help="write the report as JSON here (e.g. report.json) and as CSV beside it (report.csv)")
    parser.add_argument("--label_key", default="label", help="the labels' dataset (default: label)")
    parser.add_argument("--prediction_key", default=None,
                        help="the prediction's dataset (default: instances, else segmentation, else predictions)")
    parser.add_argument("--voxel_size", default=None,
                        help="[z, y, x] (or one number) for distances; default: the label file's, else 1")
    parser.add_argument("--tolerance", type=float, default=1.0,
                        help="surface Dice tolerance in voxel-size units (default 1.0)")
    parser.add_argument("--include_background", type=_bool, default=False,
                        help="also score class 0 (default false)")
    parser.add_argument("--ignore_index", type=int, default=None, help="label id whose voxels count nowhere")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="probability above which a voxel is foreground, for sigmoid predictions (default 0.5)")
    return parser


def main(args: list[str] | None = None) -> None:
    """``unet3d evaluate``; ``args`` replaces the arguments after the subcommand. Exit 2 with one ``error:`` line for a
    mistake in the arguments or the files."""
    parsed = build_parser().parse_args(args)
    try:
        if not (math.isfinite(parsed.tolerance) and parsed.tolerance >= 0):
            raise ConfigurationError(f"--tolerance {parsed.tolerance} must be a number >= 0")
        if not 0 < parsed.threshold < 1:
            raise ConfigurationError(f"--threshold {parsed.threshold} must lie in (0, 1)")
        require_scipy("unet3d evaluate")
        outputs = check_output(parsed.output) if parsed.output else None
        pairs = pair_paths(_paths(parsed.prediction_paths), _paths(parsed.label_paths))
        report = evaluate(
            pairs, label_key=parsed.label_key, prediction_key=parsed.prediction_key,
            voxel_size=_voxel_size(parsed.voxel_size), tolerance=parsed.tolerance,
            include_background=parsed.include_background, ignore_index=parsed.ignore_index,
            threshold=parsed.threshold,
        )
        print(format_table(report), flush=True)
        if outputs is not None:
            write_report(report, *outputs)
            print(f"wrote {outputs[0]} and {outputs[1]}", file=sys.stderr)
    except ConfigurationError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
