"""``--prediction.ensemble``: the written probabilities are the mean of what each member writes alone; TTA combines
with it; members that disagree with the --ckpt_path model are one error line."""

from __future__ import annotations

import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import blob_volume, cli_error_line, write_h5

from unet3d_lightning.cli import main


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])  # the command line is main's args, not pytest's


def member(source, target, seed, **hparams):
    """A copy of the checkpoint ``source`` with other weights (drawn with ``seed``) and, optionally, other settings."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    generator = torch.Generator().manual_seed(seed)
    checkpoint["state_dict"] = {
        k: (v + 0.3 * torch.randn(v.shape, generator=generator) if v.is_floating_point() and v.dim() > 1 else v)
        for k, v in checkpoint["state_dict"].items()
    }
    checkpoint["hyper_parameters"].update(hparams)
    for key, value in list(hparams.items()):
        if key.startswith("data."):
            checkpoint["datamodule_hyper_parameters"][key[5:]] = value
            del checkpoint["hyper_parameters"][key]
    torch.save(checkpoint, target)
    return target


@pytest.fixture(scope="module")
def members(one_step_fit, tmp_path_factory):
    root, ckpt = one_step_fit
    where = tmp_path_factory.mktemp("members")
    raw, _ = blob_volume(shape=(10, 16, 16), seed=5)
    volume = write_h5(where / "vol.h5", raw=raw)
    return ckpt, member(ckpt, where / "b.ckpt", 1), member(ckpt, where / "c.ckpt", 2), volume, where


def predict(ckpt, volume, out, *extra):
    main(["predict", "--ckpt_path", str(ckpt), "--data.predict_paths", f"[{volume}]",
          "--data.predict_patch_shape", "[8, 8, 8]", "--data.predict_stride_shape", "[4, 8, 8]",
          "--data.num_workers", "0", "--prediction.output_dir", str(out), "--trainer.accelerator", "cpu",
          "--trainer.enable_progress_bar", "false", *extra])
    with h5py.File(out / "vol_predictions.h5", "r") as f:
        return f["predictions"][()]


def test_ensemble_output_is_the_mean_of_the_members_outputs(members):
    a, b, c, volume, where = members
    alone = [predict(ckpt, volume, where / f"alone_{i}") for i, ckpt in enumerate((a, b, c))]
    together = predict(a, volume, where / "ensemble", "--prediction.ensemble", f"[{b}, {c}]")
    assert not np.allclose(alone[0], alone[1], atol=1e-3)  # the members really differ
    np.testing.assert_allclose(together, np.mean(alone, axis=0), atol=1e-5, rtol=0)


def test_tta_is_each_members_flip_average_then_the_mean(members):
    from unet3d_lightning.module import UNet3DModule
    from unet3d_lightning.prediction.ensemble import load_members

    a, b, c, _, _ = members
    model = UNet3DModule.load_from_checkpoint(a, map_location="cpu").eval()
    model.predict_members = load_members([str(b), str(c)], model)
    model.predict_tta = True
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        ours = model.predict_step({"raw": x, "volume": torch.zeros(2), "start": torch.zeros(2, 3)}, 0)["probabilities"]
        expected = torch.zeros_like(ours)
        for m in (model, *model.predict_members):
            for dims in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]:
                flipped = torch.flip(x, dims) if dims else x
                out = torch.softmax(m.net(flipped), 1)
                expected += (torch.flip(out, dims) if dims else out) / 8 / 3
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_members_that_disagree_are_one_error_line(members, capsys):
    a, _, _, volume, where = members
    args = ["predict", "--ckpt_path", str(a), "--data.predict_paths", f"[{volume}]", "--data.predict_patch_shape",
            "[8, 8, 8]", "--data.num_workers", "0", "--trainer.accelerator", "cpu"]
    wide = member(a, where / "wide.ckpt", 3, out_channels=3)
    line = cli_error_line(capsys, [*args, "--prediction.output_dir", str(where / "x"),
                                   "--prediction.ensemble", f"[{wide}]"])
    assert "prediction.ensemble member" in line and "wide.ckpt" in line and "model.out_channels=3" in line
    sigmoid = member(a, where / "sigmoid.ckpt", 4, multiclass=False)
    line = cli_error_line(capsys, [*args, "--prediction.output_dir", str(where / "y"),
                                   "--prediction.ensemble", f"[{sigmoid}]"])
    assert "sigmoid.ckpt" in line and "model.multiclass=False" in line
    other = member(a, where / "percentile.ckpt", 5, **{"data.normalization": "percentile"})
    line = cli_error_line(capsys, [*args, "--prediction.output_dir", str(where / "z"),
                                   "--prediction.ensemble", f"[{other}]"])
    assert "percentile.ckpt" in line and "data.normalization='percentile'" in line
    line = cli_error_line(capsys, [*args, "--prediction.output_dir", str(where / "w"),
                                   "--prediction.ensemble", f"[{where / 'missing.ckpt'}]"])
    assert line.startswith("error: prediction.ensemble: ") and "missing.ckpt" in line
    line = cli_error_line(capsys, [*args, "--prediction.output_dir", str(where / "v"), "--prediction.ensemble", str(a)])
    assert "is the --ckpt_path model" in line  # one file, without brackets, is a list of one
    assert not (where / "x" / "vol_predictions.h5").exists()
