"""``validate --whole_volume true``: the metrics of the stitched validation volume equal MONAI's on the segmentation
``unet3d predict`` writes for the same grid."""

from __future__ import annotations

import sys
import warnings

import h5py
import numpy as np
import pytest
import torch
from conftest import cli_error_line

from unet3d_lightning.cli import main

from monai import metrics as monai_metrics  # noqa: E402 - the oracle (dev extra)


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


def test_whole_volume_validation_equals_monai_on_the_predicted_volume(one_step_fit, tmp_path, capsys):
    root, ckpt = one_step_fit
    # Other weights than one training step's, so that the prediction mixes both classes.
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    generator = torch.Generator().manual_seed(0)
    checkpoint["state_dict"] = {k: v + 0.5 * torch.randn(v.shape, generator=generator) if v.dim() > 1 else v
                                for k, v in checkpoint["state_dict"].items()}
    mixed = tmp_path / "mixed.ckpt"
    torch.save(checkpoint, mixed)
    volume = root / "data" / "train.h5"
    capsys.readouterr()
    main(["validate", "--config", str(root / "fit.yaml"), "--ckpt_path", str(mixed), "--whole_volume", "true",
          "--trainer.default_root_dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert "val/whole/dice" in out and "val/whole/hd95_class1" in out
    table = out[out.index("whole-volume metrics (val):"):].splitlines()
    header = table[1].split()
    row = next(line.split() for line in table[2:] if line.startswith("0:train.h5"))
    ours = dict(zip(header, row))
    assert ours["class"] == "1"
    # The same grid (validation's: patch 8^3, stride 4^3), stitched and written by predict.
    main(["predict", "--ckpt_path", str(mixed), "--data.predict_paths", f"[{volume}]", "--data.predict_patch_shape",
          "[8, 8, 8]", "--data.predict_stride_shape", "[4, 4, 4]", "--data.num_workers", "0",
          "--prediction.save_segmentation", "true", "--prediction.output_dir", str(tmp_path / "p"),
          "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"])
    with h5py.File(tmp_path / "p" / "train_predictions.h5", "r") as f:
        segmentation = f["segmentation"][()]
    with h5py.File(volume, "r") as f:
        label = f["label"][()]
    assert 0 < (segmentation == 1).mean() < 1
    P = torch.as_tensor(np.stack([segmentation == c for c in (0, 1)])[None]).float()
    G = torch.as_tensor(np.stack([label == c for c in (0, 1)])[None]).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = {
            "dice": float(monai_metrics.compute_dice(P, G, include_background=False)[0, 0]),
            "iou": float(monai_metrics.compute_iou(P, G, include_background=False)[0, 0]),
            "hd95": float(monai_metrics.compute_hausdorff_distance(P, G, percentile=95)[0, 0]),
            "assd": float(monai_metrics.compute_average_surface_distance(P, G, symmetric=True)[0, 0]),
            "surface_dice": float(monai_metrics.compute_surface_dice(P, G, [1.0])[0, 0]),
        }
    for metric, value in expected.items():
        assert float(ours[metric]) == pytest.approx(value, rel=1e-3, abs=1e-4), metric


def test_whole_volume_is_refused_outside_validate_and_test(one_step_fit, capsys):
    root, _ = one_step_fit
    line = cli_error_line(capsys, ["fit", "--config", str(root / "fit.yaml"), "--whole_volume", "true"])
    assert "whole_volume is a setting of validate and test, not of fit" in line


def test_whole_volume_instances_of_a_boundary_model_equal_scikit_image(tmp_path, capsys):
    import yaml
    from skimage.metrics import adapted_rand_error

    from unet3d_lightning.data.demo_cells import cells_volume
    from unet3d_lightning.instances import boundary_evidence, components_instances

    raw, cells = cells_volume((8, 24, 24), np.random.default_rng(0), cell_size=8.0, noise=0.1)
    label = np.unique(cells, return_inverse=True)[1].reshape(cells.shape).astype(np.int64) + 1  # ids 1..n
    with h5py.File(tmp_path / "cells.h5", "w") as f:
        f["raw"], f["label"] = raw, label
    config = {
        "trainer": {"default_root_dir": str(tmp_path / "runs"), "accelerator": "cpu", "max_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"out_channels": 1, "f_maps": 4, "num_levels": 2, "num_groups": 2, "loss": "bce_dice"},
        "data": {"train_paths": [str(tmp_path / "cells.h5")], "val_paths": [str(tmp_path / "cells.h5")],
                 "label_transform": "boundaries", "train_patch_shape": [8, 16, 16], "val_patch_shape": [8, 16, 16],
                 "num_workers": 0},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "fit.yaml")])
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    capsys.readouterr()
    main(["validate", "--config", str(tmp_path / "fit.yaml"), "--ckpt_path", str(ckpt), "--whole_volume", "true"])
    out = capsys.readouterr().out
    assert "val/whole/arand" in out and "val/whole/ap50" in out
    table = out[out.index("whole-volume metrics (val):"):].splitlines()
    tokens = next(line.split() for line in table[2:] if line.split()[1:2] == ["instances"])
    row = dict(zip(["arand", "ap50", "map", "precision", "recall"], tokens[2:]))  # its class-metric cells are blank
    # The same grid (patch 8x16x16, stride = patch) through predict; validation's instances of its maps.
    main(["predict", "--ckpt_path", str(ckpt), "--data.predict_paths", f"[{tmp_path / 'cells.h5'}]",
          "--data.predict_patch_shape", "[8, 16, 16]", "--data.predict_stride_shape", "[8, 16, 16]",
          "--data.num_workers", "0", "--prediction.output_dir", str(tmp_path / "p"), "--trainer.accelerator", "cpu",
          "--trainer.enable_progress_bar", "false"])
    with h5py.File(tmp_path / "p" / "cells_predictions.h5", "r") as f:
        maps = f["predictions"][()]
    instances = components_instances(*boundary_evidence(maps, {"kind": "boundaries", "foreground_channel": False}))
    singletons = instances.astype(np.int64)
    zeros = (singletons == 0) & (label > 0)
    singletons[zeros] = singletons.max() + 1 + np.arange(zeros.sum())
    expected = adapted_rand_error(label, singletons)[0]
    assert float(row["arand"]) == pytest.approx(expected, rel=1e-3, abs=1e-4)
