"""User mistakes the command can see, each ending with exit status 2, one last `error:` line saying what is wrong
(file, dataset, setting, problem) and nothing written — no run directory, no prediction file: a table of bad inputs
for fit and predict, then the Trainer settings, monitors, subcommands and root directories. In-process runs through
main(args=...), two in a subprocess (slow)."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import blob_volume, error_line, make_config, subprocess_env, unet3d_command, write_h5
from unet3d_lightning.cli import main

pytestmark = pytest.mark.usefixtures("command_line")


# ------------------------------------------------------------------------------------------ bad inputs, table-driven
@pytest.fixture
def workspace(tmp_path):
    """Good inputs, a fit config for them, and a trained checkpoint for the prediction rows."""
    data = tmp_path / "data"
    raw, label = blob_volume(shape=(8, 16, 16), seed=0)
    write_h5(data / "train.h5", raw=raw, label=label)
    write_h5(data / "val.h5", raw=raw, label=label)
    config = {
        "trainer": {"default_root_dir": str(tmp_path / "runs"), "accelerator": "cpu", "max_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"out_channels": 2, "f_maps": 4, "num_levels": 2, "num_groups": 2},
        "data": {"train_paths": [str(data / "train.h5")], "val_paths": [str(data / "val.h5")],
                 "train_patch_shape": [8, 8, 8], "num_workers": 0},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def bad_file(root: Path, kind: str) -> Path:
    """Write one broken volume of the given kind and return its path."""
    raw, label = blob_volume(shape=(8, 16, 16), seed=1)
    path = root / "data" / f"bad_{kind}.h5"
    if kind == "no_label":
        return write_h5(path, raw=raw, mask=label)
    if kind == "shape":
        return write_h5(path, raw=raw, label=label[:, :12])
    if kind == "channels":
        return write_h5(path, raw=np.stack([raw, raw, raw]), label=label)
    if kind == "classes":
        return write_h5(path, raw=raw, label=(label * 3).astype(np.uint8))
    if kind == "masks3":
        return write_h5(path, raw=raw, label=np.stack([label, label, 1 - label]))
    if kind == "nonbinary":
        return write_h5(path, raw=raw, label=np.stack([label * 255, 1 - label]))
    if kind == "nan":
        raw = raw.copy()
        raw[3, 4, 5] = np.nan
        return write_h5(path, raw=raw, label=label)
    if kind == "small":
        return write_h5(path, raw=raw[:, :6], label=label[:, :6])
    if kind == "weighted":
        return write_h5(path, raw=raw, label=label, weight=np.ones_like(raw))
    if kind == "corrupt":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"this is not an HDF5 file" * 100)
        return path
    raise ValueError(kind)


# (id, extra command-line arguments (with {root} / {bad} placeholders), bad file kind or None, expected pieces)
FIT_ROWS = [
    ("unknown config key", ["--model.out_chanels", "3"], None, ["unrecognized arguments: --model.out_chanels"]),
    ("missing file", ["--data.train_paths", "[{root}/data/nope.h5]"], None,
     ["train volume {root}/data/nope.h5: file does not exist"]),
    ("empty glob", ["--data.train_paths", "[{root}/data/*.hdf9]"], None, ["matched no file"]),
    ("missing dataset", ["--data.train_paths", "[{bad}]"], "no_label",
     ["{bad}", "dataset 'label' does not exist", "raw", "mask"]),
    ("shape mismatch", ["--data.train_paths", "[{bad}]"], "shape", ["{bad}", "'label'", "(8, 12, 16)", "(8, 16, 16)"]),
    ("channels vs in_channels", ["--data.train_paths", "[{bad}]"], "channels",
     ["{bad}", "'raw'", "3 channel(s)", "in_channels=1"]),
    ("class ids vs out_channels", ["--data.train_paths", "[{bad}]"], "classes",
     ["{bad}", "'label'", "class id 3", "out_channels=2"]),
    ("4D label channels vs out_channels", ["--data.train_paths", "[{bad}]", "--data.val_paths", "[{bad}]",
                                           "--model.loss", "bce"], "masks3",
     ["{bad}", "'label'", "3 channels", "out_channels=2"]),
    ("non-binary masks", ["--data.train_paths", "[{bad}]", "--data.val_paths", "[{bad}]", "--model.loss", "bce"],
     "nonbinary", ["{bad}", "'label'", "255", "binary"]),
    ("loss does not fit the labels", ["--model.loss", "bce"], None,
     ["loss 'bce'", "3D class-id labels", "use loss ce, wce or dice"]),
    ("NaN in raw", ["--data.train_paths", "[{bad}]"], "nan", ["{bad}", "'raw'", "NaN"]),
    ("corrupt file", ["--data.train_paths", "[{bad}]"], "corrupt", ["{bad}", "HDF5"]),
    ("patch larger than the volume", ["--data.train_paths", "[{bad}]"], "small",
     ["{bad}", "'raw'", "smaller than the patch", "along axis y"]),
    ("loss_weight length", ["--model.loss_weight", "[1.0, 2.0, 3.0]"], None,
     ["weight has 3 entries but out_channels=2"]),
    ("GroupNorm groups", ["--model.num_groups", "3"], None, ["GroupNorm cannot split", "num_groups=3"]),
    ("layer order", ["--model.layer_order", "cxr"], None, ["layer_order 'cxr'", "valid letters"]),
    ("per-voxel weights with dice", ["--data.train_paths", "[{bad}]", "--data.val_paths", "[{bad}]",
                                     "--data.weight_internal_path", "weight", "--model.loss", "dice"], "weighted",
     ["loss 'dice' takes no per-voxel weights"]),
]


def _fill(text: str, root: Path, bad: Path | None) -> str:
    return text.replace("{root}", str(root)).replace("{bad}", str(bad))


@pytest.mark.parametrize("name, args, kind, expected", FIT_ROWS, ids=[row[0] for row in FIT_ROWS])
def test_fit_mistakes(workspace, capsys, name, args, kind, expected):
    bad = bad_file(workspace, kind) if kind else None
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(workspace / "fit.yaml"), *[_fill(a, workspace, bad) for a in args]])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for piece in expected:
        assert _fill(piece, workspace, bad) in last, last
    assert not (workspace / "runs").exists()  # nothing written


@pytest.fixture
def checkpoint(workspace):
    main(["fit", "--config", str(workspace / "fit.yaml"), "--trainer.default_root_dir", str(workspace / "trained")])
    path = next((workspace / "trained").rglob("last.ckpt"))
    return path


PREDICT_ROWS = [
    ("no checkpoint", ["--ckpt_path", None], ["predict needs --ckpt_path"]),
    ("missing checkpoint", ["--ckpt_path", "{root}/nope.ckpt"], ["ckpt_path {root}/nope.ckpt: file does not exist"]),
    ("missing predict path", ["--data.predict_paths", "[{root}/data/missing.h5]"],
     ["predict volume {root}/data/missing.h5: file does not exist"]),
    ("output dir not writable", ["--prediction.output_dir", "{root}/data/val.h5/out"],
     ["prediction.output_dir {root}/data/val.h5/out: not writable"]),
    ("no patch shape", ["--data.predict_patch_shape", "null"], ["data.predict_patch_shape is required"]),
    ("halo too large", ["--prediction.halo", "3", "--data.predict_stride_shape", "[8, 8, 8]"], ["prediction.halo"]),
]


@pytest.mark.parametrize("name, args, expected", PREDICT_ROWS, ids=[row[0] for row in PREDICT_ROWS])
def test_predict_mistakes(workspace, checkpoint, capsys, name, args, expected):
    out = workspace / "out"
    base = {"--ckpt_path": str(checkpoint), "--data.predict_paths": f"[{workspace / 'data' / 'val.h5'}]",
            "--data.predict_patch_shape": "[8, 8, 8]", "--prediction.output_dir": str(out),
            "--data.num_workers": "0", "--trainer.accelerator": "cpu"}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = None if value is None else _fill(value, workspace, None)
    argv = [item for key, value in base.items() if value is not None for item in (key, value)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *argv])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for piece in expected:
        assert _fill(piece, workspace, None) in last, last
    assert not out.exists() or not any(out.iterdir())  # no prediction (nor temporary) file
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 1  # the checkpoint is untouched


# ------------------------------------------------------------------------------------------ one line, nothing written
def test_configuration_errors_end_with_one_error_line(run_config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(run_config), "--data.train_paths", f"[{tmp_path / 'missing.h5'}]"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: train volume {tmp_path / 'missing.h5'}: file does not exist"
    assert not (tmp_path / "runs").exists()  # nothing written


def test_error_lines_carry_no_terminal_escape_codes(trained, tmp_path, capsys):
    cfg = yaml.safe_load(trained[0].read_text())
    cfg["data"]["train_paths"] = [str(tmp_path / "\x1b[31mred\x1b[0m.h5")]
    config = tmp_path / "escape.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "red" in line and ".h5" in line


# ------------------------------------------------------------------------------------------ settings
def test_gpu_accelerator_without_a_gpu(trained, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = error_line(capsys, ["fit", "--config", str(trained[0]), "--trainer.accelerator", "gpu"])
    assert "trainer.accelerator gpu: no CUDA GPU is visible" in line and "--trainer.accelerator cpu" in line


def test_root_dir_under_a_regular_file(trained, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    line = error_line(capsys, ["fit", "--config", str(trained[0]), "--trainer.default_root_dir",
                               str(tmp_path / "notes.txt" / "runs")])
    assert f"trainer.default_root_dir {tmp_path / 'notes.txt' / 'runs'}: {tmp_path / 'notes.txt'} is a file" in line


@pytest.mark.parametrize("flag, monitor, expected", [
    ("--checkpoint.monitor", "val/dsc", "checkpoint.monitor 'val/dsc' is not a metric this model logs; did you mean "
                                        "val/dice?"),
    ("--early_stopping.monitor", "val/dice_clas1", "early_stopping.monitor 'val/dice_clas1' is not a metric this "
                                                   "model logs; did you mean val/dice_class1?"),
])
def test_a_mistyped_monitor_fails_before_training(tmp_path, capsys, flag, monitor, expected):
    config = make_config(tmp_path, str(tmp_path / "runs"))
    line = error_line(capsys, ["fit", "--config", str(config), flag, monitor])
    assert expected in line and "val/loss" in line
    assert not (tmp_path / "runs").exists()


def test_a_validation_monitor_set_explicitly_is_still_checked(tmp_path, capsys):
    config = make_config(tmp_path, str(tmp_path / "runs"))
    line = error_line(capsys, ["fit", "--config", str(config), "--trainer.limit_val_batches", "0",
                               "--early_stopping.monitor", "val/dice"])
    assert "early_stopping.monitor 'val/dice' is not a metric this model logs without validation " \
           "(trainer.limit_val_batches is 0)" in line and "train/loss_epoch" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_evaluating_without_a_checkpoint_is_an_error(trained, capsys, subcommand):
    line = error_line(capsys, [subcommand, "--config", str(trained[0])])
    assert f"{subcommand} needs --ckpt_path" in line and "random weights" in line


def test_a_second_run_without_a_logger_into_the_same_root_dir(tmp_path, capsys):
    config = make_config(tmp_path, str(tmp_path / "runs"), max_epochs=1, logger=False)
    main(["fit", "--config", str(config)])
    assert (tmp_path / "runs" / "config.yaml").is_file()
    before = (tmp_path / "runs" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    line = error_line(capsys, ["fit", "--config", str(config)])
    assert "already holds a run without a logger" in line and "--ckpt_path" in line
    assert (tmp_path / "runs" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == before


def test_a_mistyped_subcommand_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fitt"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "invalid choice: 'fitt'" in line
    for name in ("fit", "validate", "test", "predict", "import-pytorch3dunet"):
        assert f"'{name}'" in line


# ------------------------------------------------------------------------------------------ in a subprocess
@pytest.mark.slow
def test_real_command_reports_bad_input_in_one_line(run_config, tmp_path):
    result = subprocess.run(
        [*unet3d_command(), "fit", "--config", str(run_config), "--model.in_channels", "2"],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train volume ") and "has 1 channel(s) but the model has in_channels=2" in last
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_ddp_with_fewer_patches_than_devices_fails_once_before_anything_is_written(tmp_path):
    config = make_config(tmp_path, str(tmp_path / "runs"))
    result = subprocess.run(
        [*unet3d_command(), "fit", "--config", str(config), "--data.train_patch_shape", "[8, 16, 16]",
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: only 1 training patches for 2 devices; use smaller strides or fewer devices"]
    assert not (tmp_path / "runs").exists()
