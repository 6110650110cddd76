"""``unet3d predict`` end to end: a real ``fit`` then ``predict`` in subprocesses, and the command's error lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from unet3d_lightning.cli import main
from unet3d_lightning.module import UNet3DModule

sys.path.insert(0, str(Path(__file__).parent))
from conftest import blob_volume, write_h5  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


def unet3d(args, cwd):
    """Run ``unet3d ARGS`` as a user would, in a fresh interpreter, and return the completed process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    result = subprocess.run(
        [sys.executable, "-m", "unet3d_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"unet3d {args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def standardised(raw):
    x = raw.astype(np.float64)
    return ((x - x.mean()) / x.std()).astype(np.float32)


@pytest.mark.slow
def test_fit_then_predict_with_only_data_and_output_flags(tmp_path):
    for name, seed in (("train_0", 0), ("train_1", 1), ("val_0", 2)):
        raw, label = blob_volume(seed=seed)  # (16, 24, 24)
        write_h5(tmp_path / "data" / f"{name}.h5", raw=raw, label=label)
    unet3d(
        ["fit", "--seed_everything", "0", "--model.f_maps", "4", "--model.num_levels", "2", "--model.num_groups", "2",
         "--model.loss", "ce", "--data.train_paths", "[data/train_0.h5, data/train_1.h5]",
         "--data.val_paths", "[data/val_0.h5]", "--data.train_patch_shape", "[8, 16, 16]", "--data.batch_size", "4",
         "--data.num_workers", "0", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
         "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--checkpoint.dirpath", "ckpt", "--trainer.default_root_dir", "runs"],
        cwd=tmp_path,
    )
    checkpoint = tmp_path / "ckpt" / "best.ckpt"
    assert checkpoint.is_file()

    # Two volumes to predict: one needing several overlapping patches, one exactly one patch large.
    big, _ = blob_volume((16, 24, 24), seed=5)
    small, _ = blob_volume((8, 16, 16), seed=6)
    write_h5(tmp_path / "pred" / "big.h5", raw=big)
    write_h5(tmp_path / "pred" / "small.h5", raw=small)
    result = unet3d(
        ["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", "[pred/big.h5, pred/small.h5]",
         "--data.predict_patch_shape", "[8, 16, 16]", "--data.predict_stride_shape", "[6, 12, 12]",
         "--prediction.output_dir", "out/", "--trainer.accelerator", "cpu", "--data.num_workers", "0"],
        cwd=tmp_path,
    )
    # the end-of-predict summary: files written, throughput, wall time
    summary = re.search(r"predict finished: 2 volume\(s\), ([\d,]+) voxels/s, ([\d.]+) s", result.stdout)
    assert summary and int(summary.group(1).replace(",", "")) > 0
    assert f"wrote {Path('out') / 'big_predictions.h5'}" in result.stdout
    assert f"wrote {Path('out') / 'small_predictions.h5'}" in result.stdout
    assert "Tip:" not in result.stdout + result.stderr

    with h5py.File(tmp_path / "out" / "big_predictions.h5", "r") as f:
        assert "segmentation" not in f
        probabilities = f["predictions"][()]
    assert probabilities.shape == (2, 16, 24, 24) and probabilities.dtype == np.float32
    assert np.isfinite(probabilities).all() and probabilities.min() >= 0 and probabilities.max() <= 1
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)  # softmax, from the checkpoint's loss

    # The one-patch volume equals the trained network's softmax on the standardised volume, computed here from the
    # checkpoint: the command rebuilt the architecture and loaded the trained weights without being told.
    model = UNet3DModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(standardised(small))[None, None]), 1)[0].numpy()
    with h5py.File(tmp_path / "out" / "small_predictions.h5", "r") as f:
        np.testing.assert_allclose(f["predictions"][()], expected, atol=1e-5)
    assert sorted(os.listdir(tmp_path / "out")) == ["big_predictions.h5", "small_predictions.h5"]


# ----------------------------------------------------------------------------------------------------------------------
# Errors: exit status 2 and one `error:` line naming the problem, before any model or data is loaded
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def predict_inputs(tmp_path):
    """A volume and a loadable checkpoint file (no weights: every error here comes before the model is built)."""
    raw, _ = blob_volume((8, 16, 16), seed=7)
    volume = write_h5(tmp_path / "vol.h5", raw=raw)
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, checkpoint)
    return volume, checkpoint


def predict_args(volume, output_dir, ckpt=None):
    args = ["predict"]
    if ckpt is not None:
        args += ["--ckpt_path", str(ckpt)]
    return args + ["--data.predict_paths", f"[{volume}]", "--data.predict_patch_shape", "[8, 16, 16]",
                   "--prediction.output_dir", str(output_dir), "--trainer.accelerator", "cpu",
                   "--data.num_workers", "0"]


def error_line(capsys, monkeypatch, args):
    monkeypatch.setattr(sys, "argv", ["unet3d"])  # pytest's own arguments are not the command's
    with pytest.raises(SystemExit) as exit_info:
        main(args=args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


def test_missing_ckpt_path(tmp_path, capsys, monkeypatch, predict_inputs):
    volume, _ = predict_inputs
    line = error_line(capsys, monkeypatch, predict_args(volume, tmp_path / "out"))
    assert "--ckpt_path" in line


def test_nonexistent_ckpt_file(tmp_path, capsys, monkeypatch, predict_inputs):
    volume, _ = predict_inputs
    missing = tmp_path / "nowhere" / "best.ckpt"
    line = error_line(capsys, monkeypatch, predict_args(volume, tmp_path / "out", ckpt=missing))
    assert "nowhere/best.ckpt" in line and "does not exist" in line


def test_unreadable_ckpt_file(tmp_path, capsys, monkeypatch, predict_inputs):
    volume, _ = predict_inputs
    fake = tmp_path / "model.ckpt"
    fake.write_bytes(b"not a checkpoint")
    line = error_line(capsys, monkeypatch, predict_args(volume, tmp_path / "out", ckpt=fake))
    assert "model.ckpt" in line and "checkpoint" in line


def test_nonexistent_predict_path(tmp_path, capsys, monkeypatch, predict_inputs):
    _, fake = predict_inputs
    line = error_line(capsys, monkeypatch, predict_args(tmp_path / "missing_volume.h5", tmp_path / "out", ckpt=fake))
    assert "missing_volume.h5" in line and "does not exist" in line


def test_unwritable_output_dir(tmp_path, capsys, monkeypatch, predict_inputs):
    volume, fake = predict_inputs
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so no directory can be created below it")
    line = error_line(capsys, monkeypatch, predict_args(volume, blocker / "out", ckpt=fake))
    assert "prediction.output_dir" in line and "blocker/out" in line
