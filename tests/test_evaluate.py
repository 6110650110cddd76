"""``unet3d evaluate`` end to end (in-process): pairing by name, the JSON and CSV reports with their metric names, the
values against MONAI and scikit-image, and the one-line errors."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import cli_error_line, write_h5

from unet3d_lightning.cli import main

from monai import metrics as monai_metrics  # noqa: E402 - the oracle (dev extra)

CLASS_METRICS = ["dice", "iou", "hd95", "assd", "surface_dice"]
INSTANCE_METRICS = ["arand", "ap50", "map", "precision", "recall"]


def classes_volume(shape, seed):
    from scipy import ndimage

    field = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
    return np.digitize(field, np.quantile(field, [0.4, 0.75])).astype(np.uint8)


def monai_scores(prediction, label, classes, voxel_size, tolerance):
    P = torch.as_tensor(np.stack([prediction == c for c in range(classes)])[None]).float()
    G = torch.as_tensor(np.stack([label == c for c in range(classes)])[None]).float()
    spacing = list(voxel_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = {
            "dice": monai_metrics.compute_dice(P, G, include_background=False),
            "iou": monai_metrics.compute_iou(P, G, include_background=False),
            "hd95": monai_metrics.compute_hausdorff_distance(P, G, percentile=95, spacing=spacing),
            "assd": monai_metrics.compute_average_surface_distance(P, G, symmetric=True, spacing=spacing),
            "surface_dice": monai_metrics.compute_surface_dice(P, G, [tolerance] * (classes - 1), spacing=spacing),
        }
    return {str(c): {k: float(v[0, c - 1]) for k, v in values.items()} for c in range(1, classes)}


@pytest.fixture
def two_cases(tmp_path):
    """case_a: softmax-like ``predictions`` (argmax), case_b: a ``segmentation``; labels as case_a.h5, case_b_seg.h5."""
    shape = (12, 20, 22)
    rng = np.random.default_rng(0)
    labels, predicted = {}, {}
    for name, seed in (("case_a", 1), ("case_b", 2)):
        labels[name] = classes_volume(shape, seed)
        noisy = labels[name].copy()
        flip = rng.random(shape) < 0.08
        noisy[flip] = rng.integers(0, 3, flip.sum())
        predicted[name] = noisy
    probabilities = np.eye(3, dtype=np.float32)[predicted["case_a"]].transpose(3, 0, 1, 2) * 0.7 + 0.1
    write_h5(tmp_path / "out" / "case_a_predictions.h5", predictions=probabilities)
    write_h5(tmp_path / "out" / "case_b_predictions.h5", segmentation=predicted["case_b"],
             predictions=np.zeros((3, *shape), np.float32))  # the segmentation is preferred
    write_h5(tmp_path / "labels" / "case_a.h5", label=labels["case_a"], raw=np.zeros(shape, np.float32))
    write_h5(tmp_path / "labels" / "case_b_seg.h5", label=labels["case_b"])
    return tmp_path, labels, predicted


def test_report_json_and_csv_hold_the_metrics_of_monai(two_cases, capsys, monkeypatch):
    monkeypatch.setattr("unet3d_lightning.evaluate.SLAB_VOXELS", 3 * 20 * 22 * 3)  # z-slabs of 3 rows: 4 slabs
    root, labels, predicted = two_cases
    report = root / "results" / "report.json"
    main(["evaluate", "--prediction_paths", str(root / "out"), "--label_paths", f"[{root / 'labels'}]",
          "--voxel_size", "[2.0, 0.5, 1.0]", "--tolerance", "1.5", "--output", str(report)])
    printed = capsys.readouterr().out
    data = json.loads(report.read_text())
    assert sorted(data["volumes"]) == ["case_a", "case_b"]
    means = {}
    for name in ("case_a", "case_b"):
        volume = data["volumes"][name]
        assert volume["voxel_size"] == [2.0, 0.5, 1.0]
        assert sorted(volume["classes"]) == ["1", "2"]  # background left out by default
        expected = monai_scores(predicted[name], labels[name], 3, (2.0, 0.5, 1.0), 1.5)
        for c, metrics in volume["classes"].items():
            assert list(metrics) == CLASS_METRICS
            for metric, value in metrics.items():
                assert value == pytest.approx(expected[c][metric], rel=1e-5), (name, c, metric)
                means.setdefault((c, metric), []).append(value)
        assert "instances" not in volume
    for (c, metric), values in means.items():
        assert data["mean"]["classes"][c][metric] == pytest.approx(np.mean(values))
    rows = list(csv.DictReader((root / "results" / "report.csv").open()))
    assert list(rows[0]) == ["volume", "class", *CLASS_METRICS, *INSTANCE_METRICS]
    assert [(r["volume"], r["class"]) for r in rows] == [
        ("case_a", "1"), ("case_a", "2"), ("case_b", "1"), ("case_b", "2"), ("mean", "1"), ("mean", "2")]
    assert float(rows[3]["hd95"]) == pytest.approx(data["volumes"]["case_b"]["classes"]["2"]["hd95"], rel=1e-9)
    assert "case_b" in printed and "surface_dice" in printed and "mean" in printed


def test_instances_are_scored_with_arand_and_ap(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("unet3d_lightning.evaluate.SLAB_VOXELS", 2 * 16 * 16)  # z-slabs of 2 rows
    from skimage.metrics import adapted_rand_error

    truth = np.zeros((6, 16, 16), np.int32)
    truth[:, :8, :8], truth[:, :8, 8:], truth[:, 8:, :] = 1, 2, 3
    found = truth.copy()
    found[:, 8:, 8:] = 4  # object 3 split in halves: IoU 0.5 with each
    found[:, :8, :] = np.where(truth[:, :8, :] > 0, 5, 0)  # objects 1 and 2 merged
    found[0, 0, 0] = 9  # a one-voxel instance inside object 1
    maps = np.zeros((1, *truth.shape), np.float32)
    write_h5(tmp_path / "p" / "cells_predictions.h5", predictions=maps, instances=found.astype(np.uint32))
    write_h5(tmp_path / "l" / "cells.h5", label=truth)
    main(["evaluate", "--prediction_paths", str(tmp_path / "p" / "cells_predictions.h5"),
          "--label_paths", str(tmp_path / "l"), "--output", str(tmp_path / "r.json")])
    data = json.loads((tmp_path / "r.json").read_text())
    scores = data["volumes"]["cells"]["instances"]
    assert list(scores) == INSTANCE_METRICS
    assert scores["arand"] == pytest.approx(adapted_rand_error(truth, found)[0], rel=1e-9)
    # 3 truth objects, 4 instances: the merge of 1 and 2 (767 voxels: IoU 384/767 with 2, 383/768 with 1, which
    # lost a voxel to the one-voxel instance), 3's halves (IoU 0.5 each), the voxel. At IoU 0.5: 2 with the merge, 3
    # with one half: TP 2, FP 2, FN 1; at 0.55 and above nothing matches.
    assert scores["ap50"] == pytest.approx(2 / 5)
    assert scores["precision"] == pytest.approx(2 / 4) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["map"] == pytest.approx(2 / 5 / 10)
    assert data["volumes"]["cells"]["classes"]["1"]["dice"] == pytest.approx(1.0)  # foreground: all of it
    assert data["mean"]["instances"]["ap50"] == pytest.approx(2 / 5)


def test_empty_classes_write_null_and_inf(tmp_path, capsys):
    label = np.zeros((4, 8, 8), np.uint8)
    label[1:3, 2:5, 2:5] = 1
    prediction = np.zeros_like(label)
    prediction[0, 0, 0] = 2  # class 2 only predicted; class 1 missed entirely
    write_h5(tmp_path / "v_predictions.h5", segmentation=prediction)
    write_h5(tmp_path / "v.h5", label=label)
    main(["evaluate", "--prediction_paths", str(tmp_path / "v_predictions.h5"), "--label_paths",
          str(tmp_path / "v.h5"), "--output", str(tmp_path / "r.json"), "--include_background", "true"])
    text = (tmp_path / "r.json").read_text()
    classes = json.loads(text)["volumes"]["v"]["classes"]
    assert classes["1"] == {"dice": 0.0, "iou": 0.0, "hd95": "inf", "assd": "inf", "surface_dice": 0.0}
    assert classes["2"]["hd95"] == "inf" and classes["0"]["dice"] > 0.9
    assert "NaN" not in text and "Infinity" not in text


def test_mask_labels_against_thresholded_probabilities(tmp_path, capsys):
    label = np.zeros((2, 6, 10, 10), np.uint8)
    label[0, 1:5, 2:8, 2:8] = 1
    label[1, 2:4, 3:6, 3:9] = 1
    probabilities = np.where(label > 0, 0.9, 0.2).astype(np.float32)
    probabilities[1, 2:4, 3:6, 3:5] = 0.4  # a third of channel 1's mask falls below 0.5
    stored = np.round(probabilities * 255).astype(np.uint8)  # prediction.dtype uint8 (scale 255)
    write_h5(tmp_path / "p" / "m_predictions.h5", predictions=stored)
    write_h5(tmp_path / "m.h5", label=label)
    main(["evaluate", "--prediction_paths", str(tmp_path / "p"), "--label_paths", str(tmp_path / "m.h5")])
    out = capsys.readouterr().out.splitlines()
    row = {line.split()[1]: line.split() for line in out[1:] if line.startswith("m ")}
    assert float(row["0"][2]) == pytest.approx(1.0)  # dice of channel 0
    assert float(row["1"][2]) == pytest.approx(2 * 24 / (24 + 36))  # 24 of 36 voxels found


def test_unpaired_files_are_one_error_naming_them(two_cases, capsys):
    root, _, _ = two_cases
    write_h5(root / "labels" / "case_c.h5", label=np.zeros((12, 20, 22), np.uint8))
    line = cli_error_line(capsys, ["evaluate", "--prediction_paths", str(root / "out"), "--label_paths",
                                   str(root / "labels")])
    assert "label(s) without a prediction" in line and "case_c.h5" in line
    line = cli_error_line(capsys, ["evaluate", "--prediction_paths", f"{root / 'out'}/*.h5", "--label_paths",
                                   str(root / "labels" / "case_a.h5"), str(root / "labels" / "case_c.h5")])
    assert "prediction(s) without a label" in line and "case_b_predictions.h5" in line


def test_two_labels_of_one_name_and_mismatched_shapes_are_errors(two_cases, capsys):
    root, labels, _ = two_cases
    write_h5(root / "labels" / "case_a_gt.h5", label=labels["case_a"][:, :10])
    line = cli_error_line(capsys, ["evaluate", "--prediction_paths", str(root / "out"), "--label_paths",
                                   str(root / "labels" / "case_b_seg.h5"), str(root / "labels" / "case_a_gt.h5"),
                                   str(root / "labels" / "case_a.h5")])
    assert "label(s) without a prediction" in line and "case_a_gt.h5" in line  # the exact name wins
    line = cli_error_line(capsys, ["evaluate", "--prediction_paths", str(root / "out" / "case_a_predictions.h5"),
                                   "--label_paths", str(root / "labels" / "case_a_gt.h5")])
    assert "(12, 20, 22)" in line and "(12, 10, 22)" in line and "do not belong together" in line
    (root / "labels" / "case_a_gt.h5").unlink()
    line = cli_error_line(capsys, ["evaluate", "--prediction_paths", str(root / "out"), "--label_paths",
                                   str(root / "labels"), "--label_key", "seg"])
    assert "dataset 'seg' does not exist" in line
    line = cli_error_line(capsys, ["evaluate", "--prediction_paths", str(root / "out"), "--label_paths",
                                   str(root / "labels"), "--output", str(root / "report.csv")])
    assert "name the JSON report" in line


def test_evaluate_is_listed_by_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "--prediction_paths" in capsys.readouterr().out


def test_the_command_starts_evaluate_without_torch_or_lightning(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import sys\nsys.argv = ['unet3d', 'evaluate', '--help']\nfrom unet3d_lightning.launcher import run\n"
            "def command():\n    try:\n        run()\n    except SystemExit:\n        pass\ncommand()\n"
            "print('loaded', 'torch' in sys.modules, 'lightning' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(),
                          timeout=120)
    assert "--prediction_paths" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "loaded False False"
