"""The command's configuration and checkpoint handling: training without validation, --print_config of runs from a
checkpoint, environment variables in paths, YAML merge keys, edited, cut-short and foreign checkpoints, the
subcommand list, fast_dev_run, and DDP with too few patches. In-process runs through main(args=...), one DDP run in
a subprocess (slow)."""

import copy
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from conftest import blob_volume, write_h5
from test_cli import subprocess_env, unet3d_command
from test_hardening_cli import error_line, make_config
from unet3d_lightning.cli import main
from unet3d_lightning.data.datamodule import HDF5DataModule


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


def steps_per_epoch(config: Path) -> int:
    """Training batches per epoch of a make_config config: one volume (8, 16, 16) in (8, 8, 8) patches, stride 8."""
    cfg = yaml.safe_load(config.read_text())
    patches = len(cfg["data"]["train_paths"]) * (16 // 8) * (16 // 8)
    return -(-patches // cfg["data"]["batch_size"])


def without_val_paths(config: Path) -> Path:
    cfg = yaml.safe_load(config.read_text())
    del cfg["data"]["val_paths"], cfg["data"]["val_patch_shape"]
    path = config.with_name("no_val.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_dir(root: Path) -> Path:
    versions = sorted((root / "lightning_logs").glob("version_*"))
    assert len(versions) == 1, versions
    return versions[0]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def percentile_checkpoint(tmp_path_factory):
    """A checkpoint trained with a non-default normalisation (percentiles 2..98): (root, config, last.ckpt)."""
    root = tmp_path_factory.mktemp("percentile")
    config = make_config(root, str(root / "runs"), max_epochs=1)
    sys.argv = ["unet3d"]
    main(["fit", "--config", str(config), "--data.normalization", "percentile", "--data.percentiles", "[2, 98]"])
    return root, config, run_dir(root / "runs") / "checkpoints" / "last.ckpt"


def predict_args(root: Path, out: Path) -> list[str]:
    return ["--data.predict_paths", f"[{root / 'data' / 'val_0.h5'}]", "--data.predict_patch_shape", "[8, 16, 16]",
            "--prediction.output_dir", str(out), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
            "false", "--data.num_workers", "0"]


def probabilities(out: Path) -> np.ndarray:
    with h5py.File(out / "val_0_predictions.h5") as f:
        return f["predictions"][()]


# ------------------------------------------------------------------------------------------ training without validation
def test_fit_with_limit_val_batches_0_keeps_checkpoints_by_training_loss(tmp_path, capsys):
    config = make_config(tmp_path, str(tmp_path / "runs"), max_epochs=3)
    main(["fit", "--config", str(config), "--trainer.limit_val_batches", "0"])
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("note: no validation")]
    assert notes == ["note: no validation (trainer.limit_val_batches is 0): best.ckpt is chosen by train/loss_epoch, "
                     "early stopping is off"]
    checkpoints = run_dir(tmp_path / "runs") / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    last = load(checkpoints / "last.ckpt")
    assert last["global_step"] == 3 * steps_per_epoch(config)
    assert not any(key.startswith("EarlyStopping") for key in last["callbacks"])
    state = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert state["monitor"] == "train/loss_epoch"
    assert f"best checkpoint: {checkpoints / 'best.ckpt'} (train/loss_epoch = " in captured.out


def test_fit_without_val_paths_runs_and_resumes_as_if_never_stopped(tmp_path, capsys):
    config = without_val_paths(make_config(tmp_path, str(tmp_path / "runs"), max_epochs=2))
    main(["fit", "--config", str(config)])
    assert "note: no validation (data.val_paths is empty)" in capsys.readouterr().err
    last = run_dir(tmp_path / "runs") / "checkpoints" / "last.ckpt"
    assert load(last)["global_step"] == 2 * steps_per_epoch(config)
    main(["fit", "--config", str(config), "--ckpt_path", str(last), "--trainer.max_epochs", "4"])
    assert "fit finished: 8 steps, 4 epochs" in capsys.readouterr().out
    main(["fit", "--config", str(config), "--trainer.max_epochs", "4", "--trainer.default_root_dir",
          str(tmp_path / "whole")])
    resumed, whole = load(last), load(run_dir(tmp_path / "whole") / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == whole["global_step"] == 4 * steps_per_epoch(config)
    for key, value in whole["state_dict"].items():  # the same batches in the same order: the same weights
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0)


def test_a_validation_monitor_set_explicitly_is_still_checked(tmp_path, capsys):
    config = make_config(tmp_path, str(tmp_path / "runs"))
    line = error_line(capsys, ["fit", "--config", str(config), "--trainer.limit_val_batches", "0",
                               "--early_stopping.monitor", "val/dice"])
    assert "early_stopping.monitor 'val/dice' is not a metric this model logs without validation " \
           "(trainer.limit_val_batches is 0)" in line and "train/loss_epoch" in line
    assert not (tmp_path / "runs").exists()


def test_last_checkpoint_is_the_latest_state_when_the_score_stops_improving(tmp_path):
    config = make_config(tmp_path, str(tmp_path / "runs"), max_epochs=3)
    # lr 0: the validation loss never improves on the first one, so best.ckpt stays at the first epoch
    main(["fit", "--config", str(config), "--model.learning_rate", "0.0"])
    checkpoints = run_dir(tmp_path / "runs") / "checkpoints"
    assert load(checkpoints / "best.ckpt")["global_step"] == steps_per_epoch(config)
    assert load(checkpoints / "last.ckpt")["global_step"] == 3 * steps_per_epoch(config)


# ------------------------------------------------------------------------------------------ --print_config
def test_print_config_of_a_prediction_holds_the_checkpoints_settings_and_repeats_it(percentile_checkpoint, tmp_path,
                                                                                   capsys):
    root, _, checkpoint = percentile_checkpoint
    direct = tmp_path / "direct"
    main(["predict", "--ckpt_path", str(checkpoint), *predict_args(root, direct)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt_path", str(checkpoint), *predict_args(root, tmp_path / "printed"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    trained = load(checkpoint)
    for key in ("f_maps", "num_levels", "num_groups", "out_channels", "learning_rate"):
        assert config["model"][key] == trained["hyper_parameters"][key]
    assert config["model"]["f_maps"] == 4  # not the parser's default 64
    assert config["data"]["normalization"] == "percentile" and config["data"]["percentiles"] == [2.0, 98.0]
    assert config["ckpt_path"] == str(checkpoint)
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    main(["predict", "--config", str(path)])
    np.testing.assert_array_equal(probabilities(tmp_path / "printed"), probabilities(direct))
    # the normalisation matters here: the parser's default would predict something else
    main(["predict", "--ckpt_path", str(checkpoint), *predict_args(root, tmp_path / "standardized"),
          "--data.normalization", "standardize"])
    assert np.abs(probabilities(tmp_path / "standardized") - probabilities(direct)).max() > 0.01


@pytest.mark.parametrize("subcommand", ["validate", "fit"])
def test_printed_config_of_other_runs_from_a_checkpoint_runs_back(percentile_checkpoint, tmp_path, capsys,
                                                                  subcommand):
    root, config, checkpoint = percentile_checkpoint
    cfg = yaml.safe_load(config.read_text())
    del cfg["model"]  # the model comes from the checkpoint alone
    cfg["trainer"].update(default_root_dir=str(tmp_path / "runs"), max_epochs=2)
    config = tmp_path / "data_only.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        main([subcommand, "--config", str(config), "--ckpt_path", str(checkpoint), "--print_config"])
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["model"]["f_maps"] == 4
    if subcommand == "validate":
        assert yaml.safe_load(printed)["data"]["normalization"] == "percentile"
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    main([subcommand, "--config", str(path)])  # every printed model key equals the checkpoint's: no contradiction
    assert "error:" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ environment variables
def test_environment_variables_in_paths_are_expanded_for_every_part_of_the_run(tmp_path, monkeypatch, capsys):
    config = make_config(tmp_path, "${RUNROOT}/run", max_epochs=1)
    text = config.read_text().replace(str(tmp_path / "data"), "$DATADIR")
    assert "default_root_dir: ${RUNROOT}/run" in text and "$DATADIR/train_0.h5" in text  # block style YAML
    config.write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNROOT", str(tmp_path / "expanded"))
    monkeypatch.setenv("DATADIR", str(tmp_path / "data"))
    main(["fit", "--config", str(config)])
    run = run_dir(tmp_path / "expanded" / "run")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "expanded", "run.yaml"]  # no literal ${RUNROOT}

    monkeypatch.delenv("RUNROOT")
    line = error_line(capsys, ["fit", "--config", str(config), "--trainer.max_epochs", "2"])
    assert line == "error: trainer.default_root_dir '${RUNROOT}/run': the environment variable RUNROOT is not set; " \
                   "set it (export RUNROOT=...) or write the path out"
    line = error_line(capsys, ["predict", "--ckpt_path", "~/$NO_SUCH_VARIABLE_X/last.ckpt",
                               *predict_args(tmp_path, tmp_path / "out")])
    assert "ckpt_path '~/$NO_SUCH_VARIABLE_X/last.ckpt': the environment variable NO_SUCH_VARIABLE_X" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ YAML
def test_yaml_merge_keys_are_read_as_yaml_defines_them(tmp_path, capsys):
    config = make_config(tmp_path, str(tmp_path / "runs"), max_epochs=50)
    merged = tmp_path / "merged.yaml"
    merged.write_text("trainer:\n  <<: {max_steps: 3}\n")
    main(["fit", "--config", str(config), "--config", str(merged), "--trainer.default_root_dir", str(tmp_path / "a")])
    assert load(run_dir(tmp_path / "a") / "checkpoints" / "last.ckpt")["global_step"] == 3
    # keys merged from an anchor, one of them overridden by an explicit key: not a key given twice
    anchored = tmp_path / "anchored.yaml"
    anchored.write_text("trainer:\n  max_steps: 2\n"
                        "checkpoint: &monitoring\n  monitor: val/dice\n  mode: max\n"
                        "early_stopping:\n  <<: *monitoring\n  monitor: val/loss\n")
    main(["fit", "--config", str(config), "--config", str(anchored), "--trainer.default_root_dir", str(tmp_path / "b")])
    callbacks = load(run_dir(tmp_path / "b") / "checkpoints" / "last.ckpt")["callbacks"]
    assert "ModelCheckpoint{'monitor': 'val/dice', 'mode': 'max'" in "".join(callbacks)
    assert "EarlyStopping{'monitor': 'val/loss', 'mode': 'max'}" in callbacks  # mode merged, monitor overridden
    twice = tmp_path / "twice.yaml"
    twice.write_text("trainer:\n  <<: {max_steps: 3}\n  max_steps: 4\n  max_steps: 5\n")
    line = error_line(capsys, ["fit", "--config", str(config), "--config", str(twice)])
    assert f"config {twice}: line 4: key 'max_steps' is given twice (lines 3 and 4); keep one" in line


def test_nested_values_follow_the_same_yaml_rules():
    from unet3d_lightning.cli import _unique_key_yaml_load

    text = "base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 5\n"
    assert _unique_key_yaml_load(text) == yaml.safe_load(text) == {"base": {"x": 1, "y": 2}, "c": {"x": 5, "y": 2}}
    with pytest.raises(yaml.YAMLError, match="key 'x' is given twice"):
        _unique_key_yaml_load("c:\n  <<: {x: 1, x: 2}\n")


# ------------------------------------------------------------------------------------------ checkpoints
def edited(checkpoint: Path, path: Path, edit) -> Path:
    state = copy.deepcopy(load(checkpoint))
    edit(state)
    torch.save(state, path)
    return path


def test_edited_checkpoint_settings_fail_before_any_volume_is_read(percentile_checkpoint, tmp_path, capsys,
                                                                   monkeypatch):
    root, config, checkpoint = percentile_checkpoint
    checked = []
    monkeypatch.setattr(HDF5DataModule, "check", lambda self, stage, model=None: checked.append(stage))
    out_channels = edited(checkpoint, tmp_path / "out_channels.ckpt",
                          lambda c: c["hyper_parameters"].update(out_channels=3))
    normalization = edited(checkpoint, tmp_path / "normalization.ckpt",
                           lambda c: c["datamodule_hyper_parameters"].update(normalization="bogus"))
    percentiles = edited(checkpoint, tmp_path / "percentiles.ckpt",
                         lambda c: c["datamodule_hyper_parameters"].update(percentiles=[99, 1]))
    as_list = edited(checkpoint, tmp_path / "list.ckpt", lambda c: c.update(hyper_parameters=[1, 2]))
    wrong_type = edited(checkpoint, tmp_path / "type.ckpt", lambda c: c["hyper_parameters"].update(f_maps="many"))
    expected = {
        out_channels: f"error: ckpt_path {out_channels}: hyper_parameters out_channels=3 but its weights have 2 output "
                      "channels; the file was edited or is damaged: give a .ckpt as unet3d fit wrote it",
        normalization: f"error: ckpt_path {normalization}: its datamodule_hyper_parameters normalization 'bogus' is "
                       "not one of standardize, percentile, none; the file was edited or is damaged: give the "
                       "normalization the model was trained with, e.g. --data.normalization standardize",
        percentiles: f"ckpt_path {percentiles}: its datamodule_hyper_parameters percentiles [99, 1] is not two numbers "
                     "low < high in [0, 100]",
        as_list: f"error: ckpt_path {as_list}: hyper_parameters is a list, not a mapping of settings; the file was "
                 "edited or is damaged: give a .ckpt as unet3d fit wrote it",
        wrong_type: f"ckpt_path {wrong_type}: its hyper_parameters do not make a model (",
    }
    # the data and trainer settings of the run, without model settings (given ones would contradict the edits)
    cfg = yaml.safe_load(config.read_text())
    del cfg["model"]
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "runs")
    data_only = tmp_path / "data_only.yaml"
    data_only.write_text(yaml.safe_dump(cfg))
    for path, message in expected.items():
        for subcommand in ("predict", "validate"):
            args = predict_args(root, tmp_path / "out") if subcommand == "predict" else ["--config", str(data_only)]
            line = error_line(capsys, [subcommand, "--ckpt_path", str(path), *args])
            assert message in line, line
            if path == wrong_type:
                assert "f_maps" in line
    edited_in_fit = error_line(capsys, ["fit", "--config", str(data_only), "--ckpt_path", str(out_channels)])
    assert "hyper_parameters out_channels=3 but its weights have 2 output channels" in edited_in_fit
    assert checked == []  # each one stopped before the data checks
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_a_checkpoint_cut_short_is_named_so(percentile_checkpoint, tmp_path, capsys):
    root, _, checkpoint = percentile_checkpoint
    data = checkpoint.read_bytes()
    for length in (10, 1000, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1):
        cut = tmp_path / f"cut_{length}.ckpt"
        cut.write_bytes(data[:length])
        line = error_line(capsys, ["predict", "--ckpt_path", str(cut), *predict_args(root, tmp_path / "out")])
        assert line.startswith(f"error: ckpt_path {cut}: truncated, not a complete checkpoint ({length} bytes"), line
    assert checkpoint.read_bytes() == data


def test_another_models_checkpoint_is_named_in_one_line(percentile_checkpoint, tmp_path, capsys):
    root, _, checkpoint = percentile_checkpoint
    foreign = edited(checkpoint, tmp_path / "foreign.ckpt", lambda c: c.update(
        hyper_parameters={"hidden": 32, "lr": 0.1, "_instantiator": "lightning.pytorch.cli.instantiate_module"}))
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt_path", str(foreign), *predict_args(root, tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: ckpt_path {foreign}: written by another model or program, not by unet3d fit; its "
                       "hyper_parameters hold hidden, lr, which UNet3DModule does not have; give a .ckpt written by "
                       "unet3d fit")
    assert not any("does not accept" in line or "while reading" in line for line in err)


# ------------------------------------------------------------------------------------------ other settings
def test_a_mistyped_subcommand_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fitt"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "invalid choice: 'fitt'" in line
    for name in ("fit", "validate", "test", "predict", "import-pytorch3dunet"):
        assert f"'{name}'" in line


@pytest.mark.parametrize("logger", ["true", "false"])
def test_fast_dev_run_writes_no_checkpoints(tmp_path, capsys, logger):
    config = make_config(tmp_path, str(tmp_path / "runs"))
    for _ in range(2):
        main(["fit", "--config", str(config), "--trainer.fast_dev_run", "true", "--trainer.logger", logger])
    assert "checkpoints:     none (fast_dev_run saves none)" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


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
