"""``unet3d import-pytorch3dunet``: each mistake ends in one ``error:`` line naming the file, the setting and the fix;
the checkpoint it writes gets the mode an ordinary file gets; the command it suggests afterwards works as printed."""

from __future__ import annotations

import os
import shlex
import stat
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import blob_volume, write_h5
from unet3d_lightning.cli import main

pytest.importorskip("pytorch3dunet.unet3d.model", reason="the pytorch3dunet test dependency (make install)")
from test_import_pytorch3dunet import CASES, save_like_their_trainer, their_model, write_config  # noqa: E402


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


@pytest.fixture
def their_files(tmp_path):
    """pytorch-3dunet's checkpoint of a small UNet3D and its training config."""
    model, config = their_model("UNet3D")
    return save_like_their_trainer(model, tmp_path / "p3d"), write_config(tmp_path / "train_config.yml", config)


def import_args(model_path, config, output, *extra):
    return ["import-pytorch3dunet", "--model_path", str(model_path), "--config", str(config), "--output",
            str(output), *extra]


def error_line(capsys, args) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args=args)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_an_output_that_is_a_directory(tmp_path, capsys, their_files, overwrite):
    directory = tmp_path / "models"
    directory.mkdir()
    (directory / "keep.txt").write_text("mine")
    line = error_line(capsys, import_args(*their_files, directory, *overwrite))
    assert line == (f"error: output {directory} is a directory; give the checkpoint file to write, e.g. "
                    f"{directory / 'model.ckpt'}")
    assert os.listdir(directory) == ["keep.txt"] and leftovers(tmp_path) == []


@pytest.mark.parametrize("key, value, expected", [
    ("num_levels", "two", "model.num_levels must be a positive integer, got 'two'"),
    ("num_levels", 0, "model.num_levels must be a positive integer, got 0"),
    ("f_maps", "eight", "model.f_maps must be a positive integer or a list of them, one per level, got 'eight'"),
    ("f_maps", [4, "x", 16], "model.f_maps must be a positive integer, got 'x'"),
    ("num_groups", "four", "model.num_groups must be a positive integer or null, got 'four'"),
    ("final_sigmoid", "false", "model.final_sigmoid must be true or false, got 'false'"),
    ("in_channels", True, "model.in_channels must be a positive integer, got True"),
])
def test_a_setting_of_the_wrong_type(tmp_path, capsys, their_files, key, value, expected):
    model_path, _ = their_files
    config = write_config(tmp_path / "bad.yml", {"name": "UNet3D", **CASES["UNet3D"], key: value})
    line = error_line(capsys, import_args(model_path, config, tmp_path / "out.ckpt"))
    assert line == f"error: config {config}: {expected}"
    assert not (tmp_path / "out.ckpt").exists()


def test_a_key_given_twice_in_their_config(tmp_path, capsys, their_files):
    model_path, good = their_files
    text = good.read_text().replace("  f_maps: 8\n", "  f_maps: 8\n  f_maps: 16\n")
    assert text.count("f_maps") == 2
    config = tmp_path / "twice.yml"
    config.write_text(text)
    first = text.splitlines().index("  f_maps: 8") + 1
    line = error_line(capsys, import_args(model_path, config, tmp_path / "out.ckpt"))
    assert line == (f"error: config {config}: line {first + 1}: key 'f_maps' is given twice (lines {first} and "
                    f"{first + 1}); keep one")
    assert not (tmp_path / "out.ckpt").exists()


def test_a_yaml_file_given_as_the_model_path(tmp_path, capsys, their_files):
    _, config = their_files
    line = error_line(capsys, import_args(config, config, tmp_path / "out.ckpt"))
    assert f"model_path {config}: is a YAML file (a config?), not a PyTorch checkpoint" in line
    assert "--config" in line and "weights_only" not in line


def test_the_checkpoint_given_as_the_config(tmp_path, capsys, their_files):
    model_path, _ = their_files
    line = error_line(capsys, import_args(model_path, model_path, tmp_path / "out.ckpt"))
    assert f"config {model_path}: is not a text (YAML) file" in line and "--model_path" in line


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_checkpoint_has_the_mode_of_an_ordinary_file(tmp_path, their_files, umask):
    previous = os.umask(umask)
    try:
        plain = tmp_path / "plain"
        with open(plain, "w"):
            pass
        main(args=import_args(*their_files, tmp_path / "model.ckpt"))
        main(args=import_args(*their_files, tmp_path / "model.ckpt", "--overwrite"))
    finally:
        os.umask(previous)
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert expected == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "model.ckpt").stat().st_mode) == expected
    assert leftovers(tmp_path) == []


def test_the_suggested_predict_command_works_as_printed(tmp_path, capsys, monkeypatch, their_files):
    monkeypatch.chdir(tmp_path)
    main(args=import_args(*their_files, "model.ckpt"))
    err = capsys.readouterr().err
    command = err.split("predict with: ", 1)[1].strip()
    assert "--data.predict_paths '[VOLUME.h5]'" in command
    # What a user does with it: put in their volume and patch shape, and paste it into a shell.
    raw, _ = blob_volume((8, 16, 16), seed=2)
    write_h5(tmp_path / "VOLUME.h5", raw=raw)
    words = shlex.split(command.replace("Z,Y,X", "8,16,16"))
    assert words[:2] == ["unet3d", "predict"]
    main(args=[*words[1:], "--prediction.output_dir", "out", "--trainer.accelerator", "cpu",
               "--data.num_workers", "0", "--trainer.enable_progress_bar", "false"])
    with h5py.File(tmp_path / "out" / "VOLUME_predictions.h5", "r") as f:
        predictions = f["predictions"][()]
    assert predictions.shape == (1, 8, 16, 16) and np.isfinite(predictions).all()
