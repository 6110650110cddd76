"""Hard-to-misuse command line: the direction of monitored metrics, resuming in the same files, settings given beside
--ckpt_path, and one `error:` line (exit 2) for each mistake a user can make with a checkpoint, a config file or the
Trainer settings. In-process runs through main(args=...)."""

import os
import pickle
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import blob_volume, write_h5
from unet3d_lightning.cli import main
from unet3d_lightning.data.datamodule import HDF5DataModule
from unet3d_lightning.module import UNet3DModule, metric_mode


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


def make_config(root: Path, default_root_dir: str, **trainer) -> Path:
    data = root / "data"
    for name, seed in (("train_0", 0), ("val_0", 2)):
        if not (data / f"{name}.h5").exists():
            raw, label = blob_volume(shape=(8, 16, 16), seed=seed)
            write_h5(data / f"{name}.h5", raw=raw, label=label)
    config = {
        "seed_everything": 7,
        "trainer": {"default_root_dir": default_root_dir, "accelerator": "cpu", "max_epochs": 2,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False, **trainer},
        "model": {"out_channels": 2, "f_maps": 4, "num_levels": 2, "num_groups": 2, "learning_rate": 0.01},
        "data": {"train_paths": [str(data / "train_0.h5")], "val_paths": [str(data / "val_0.h5")],
                 "train_patch_shape": [8, 8, 8], "train_stride_shape": [8, 8, 8], "val_patch_shape": [8, 16, 16],
                 "batch_size": 2, "num_workers": 0},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run, shared by the tests that only need a checkpoint: (config, run directory)."""
    root = tmp_path_factory.mktemp("trained")
    config = make_config(root, str(root / "runs"), max_epochs=1)
    main(["fit", "--config", str(config)])
    return config, root / "runs" / "lightning_logs" / "version_0"


def error_line(capsys, args) -> str:
    """Run the command, expect exit status 2, and return its single `error:` line (the last line of stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: "), err[-2000:]
    assert sum(line.startswith("error:") for line in lines) == 1
    assert "Traceback" not in err
    return lines[-1]


def scores(run: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(run.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        values += [e.value for e in accumulator.Scalars(tag)] if tag in accumulator.Tags()["scalars"] else []
    return values


def checkpoint_state(path: Path) -> dict:
    callbacks = torch.load(path, weights_only=True)["callbacks"]
    return next(v for k, v in callbacks.items() if k.startswith("ModelCheckpoint"))


# ------------------------------------------------------------------------------------------------ item 2: resume
def test_resume_with_a_relative_root_dir_continues_the_same_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = make_config(tmp_path, "runs/rel", max_epochs=2)
    main(["fit", "--config", str(config)])
    run = tmp_path / "runs" / "rel" / "lightning_logs" / "version_0"
    first_best = float(checkpoint_state(run / "checkpoints" / "last.ckpt")["best_model_score"])

    main(["fit", "--config", str(config), "--ckpt_path", "runs/rel/lightning_logs/version_0/checkpoints/last.ckpt",
          "--trainer.max_epochs", "4"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8  # 2 batches per epoch
    # best-score tracking continued over both parts: the best of all four validations, not of the last two
    val_loss = scores(run, "val/loss")
    assert len(val_loss) == 4
    state = checkpoint_state(run / "checkpoints" / "last.ckpt")
    assert float(state["best_model_score"]) == pytest.approx(min(val_loss), rel=1e-6)
    assert float(state["best_model_score"]) <= first_best
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["global_step"] == 2 * (1 + val_loss.index(min(val_loss)))


def test_fine_tuning_from_another_run_writes_under_its_own_root_dir(trained, tmp_path, capsys):
    config, other_run = trained
    before = {p.name: p.stat().st_mtime_ns for p in [other_run / "config.yaml", *(other_run / "checkpoints").iterdir()]}
    main(["fit", "--config", str(config), "--ckpt_path", str(other_run / "checkpoints" / "best.ckpt"),
          "--trainer.default_root_dir", str(tmp_path / "finetune"), "--trainer.max_epochs", "2"])
    new_run = tmp_path / "finetune" / "lightning_logs" / "version_0"
    assert (new_run / "config.yaml").is_file()
    assert sorted(p.name for p in (new_run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    after = {p.name: p.stat().st_mtime_ns for p in [other_run / "config.yaml", *(other_run / "checkpoints").iterdir()]}
    assert after == before  # the other run is left untouched
    out = capsys.readouterr().out
    assert f"best checkpoint: {new_run / 'checkpoints' / 'best.ckpt'}" in out


# ------------------------------------------------------------------------------------------------ item 3: signals
def test_sigterm_during_fit_saves_last_checkpoint_and_exits_143(tmp_path, capsys, monkeypatch):
    """In process: the signal arrives during the third training step; the run stops after that step, the checkpoint
    holds it, and resuming continues from it."""
    original_step = UNet3DModule.training_step

    def step(self, batch, batch_idx):
        if self.trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(UNet3DModule, "training_step", step)
    config = make_config(tmp_path, str(tmp_path / "runs"), max_epochs=50, val_check_interval=5,
                         check_val_every_n_epoch=None)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["train_stride_shape"] = [8, 4, 4]  # 9 patches: 5 batches per epoch, no validation before step 5
    config.write_text(yaml.safe_dump(cfg))
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is handler_before
    last = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    err = capsys.readouterr().err
    assert "fit stopped by SIGTERM at step 3" in err
    assert f"resume with: unet3d fit --config {last.parent.parent / 'config.yaml'} --ckpt_path {last}" in err

    monkeypatch.setattr(UNet3DModule, "training_step", original_step)
    main(["fit", "--config", str(config), "--ckpt_path", str(last), "--trainer.max_steps", "10"])
    resumed = torch.load(last, weights_only=True)  # rewritten at the validation of step 10
    assert resumed["global_step"] == 10
    assert {int(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()} == {10}  # Adam continued
    assert "fit finished: 10 steps" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ item 4: monitors
@pytest.mark.parametrize("name, mode", [
    ("val/loss", "min"), ("train/loss_epoch", "min"), ("val/arand", "min"), ("val/error_rate", "min"),
    ("val/dice", "max"), ("val/dice_class1", "max"), ("val/iou", "max"), ("val/ap", "max"), ("val/f1", "max"),
    ("val/accuracy", "max"), ("val/map", None), ("val/something", None), ("lr-Adam", None),
])
def test_metric_direction_follows_the_name(name, mode):
    assert metric_mode(name) == mode


def test_monitoring_dice_keeps_the_highest_dice(tmp_path):
    config = make_config(tmp_path, str(tmp_path / "runs"), max_epochs=4)
    main(["fit", "--config", str(config), "--checkpoint.monitor", "val/dice", "--early_stopping.monitor", "val/dice"])
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    dice = scores(run, "val/dice")
    assert len(dice) == 4
    state = checkpoint_state(run / "checkpoints" / "best.ckpt")
    assert float(state["best_model_score"]) == pytest.approx(max(dice), rel=1e-6)
    assert torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["global_step"] == 2 * (1 + dice.index(max(dice)))
    callbacks = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    early = next(v for k, v in callbacks.items() if k.startswith("EarlyStopping"))
    assert float(early["best_score"]) == pytest.approx(max(dice), rel=1e-6)
    assert yaml.safe_load((run / "config.yaml").read_text())["checkpoint"]["mode"] == "max"


def test_an_explicit_mode_is_kept(tmp_path):
    config = make_config(tmp_path, str(tmp_path / "runs"), max_epochs=3)
    main(["fit", "--config", str(config), "--checkpoint.monitor", "val/dice", "--checkpoint.mode", "min"])
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert float(checkpoint_state(run / "checkpoints" / "best.ckpt")["best_model_score"]) == pytest.approx(
        min(scores(run, "val/dice")), rel=1e-6)


def test_plateau_scheduler_direction_follows_its_monitor(trained, tmp_path):
    config, _ = trained
    plateau = ["--model.lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau",
               "--model.lr_scheduler_monitor", "val/dice", "--trainer.max_steps", "1"]
    for root, extra, mode in (("a", [], "max"), ("b", ["--model.lr_scheduler.mode", "min"], "min")):
        main(["fit", "--config", str(config), *plateau, *extra, "--trainer.default_root_dir", str(tmp_path / root)])
        last = tmp_path / root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
        assert torch.load(last, weights_only=True)["lr_schedulers"][0]["mode"] == mode


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


# ------------------------------------------------------------------------------------------------ item 6: one line
def test_gpu_accelerator_without_a_gpu(trained, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = error_line(capsys, ["fit", "--config", str(trained[0]), "--trainer.accelerator", "gpu"])
    assert "trainer.accelerator gpu: no CUDA GPU is visible" in line and "--trainer.accelerator cpu" in line


def test_root_dir_under_a_regular_file(trained, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    line = error_line(capsys, ["fit", "--config", str(trained[0]), "--trainer.default_root_dir",
                               str(tmp_path / "notes.txt" / "runs")])
    assert f"trainer.default_root_dir {tmp_path / 'notes.txt' / 'runs'}: {tmp_path / 'notes.txt'} is a file" in line


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_foreign_checkpoints_are_named_with_the_fix(trained, tmp_path, capsys, subcommand):
    config, run = trained
    weights = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    state_dict = tmp_path / "weights.pt"
    torch.save(weights, state_dict)
    pytorch3dunet = tmp_path / "best_checkpoint.pytorch"
    torch.save({"num_epochs": 3, "num_iterations": 120, "best_eval_score": 0.7,
                "model_state_dict": {k.removeprefix("net."): v for k, v in weights.items()},
                "optimizer_state_dict": {"state": {}, "param_groups": []}}, pytorch3dunet)
    extra = []
    if subcommand == "predict":
        val = yaml.safe_load(config.read_text())["data"]["val_paths"][0]
        extra = ["--data.predict_paths", f"[{val}]", "--data.predict_patch_shape", "[8, 16, 16]",
                 "--prediction.output_dir", str(tmp_path / "out")]
    line = error_line(capsys, [subcommand, "--config", str(config), "--ckpt_path", str(pytorch3dunet), *extra])
    assert f"ckpt_path {pytorch3dunet}: a pytorch-3dunet checkpoint" in line
    assert f"unet3d import-pytorch3dunet --model_path {pytorch3dunet} --config train_config.yml --output model.ckpt" \
        in line
    line = error_line(capsys, [subcommand, "--config", str(config), "--ckpt_path", str(state_dict), *extra])
    assert f"ckpt_path {state_dict}: holds only weights" in line


# ------------------------------------------------------------------------------------------------ item 7: settings
def test_model_flags_that_contradict_the_checkpoint_are_errors(trained, capsys):
    config, run = trained
    last = run / "checkpoints" / "last.ckpt"
    line = error_line(capsys, ["fit", "--config", str(config), "--ckpt_path", str(last), "--model.f_maps", "8"])
    assert f"model.f_maps=8 contradicts the checkpoint {last} (f_maps=4)" in line and "drop --model.f_maps" in line
    # in the config file too: the default value given explicitly is still an explicit setting
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["loss"] = "dice"
    other = config.with_name("other.yaml")
    other.write_text(yaml.safe_dump(cfg))
    line = error_line(capsys, ["validate", "--config", str(other), "--ckpt_path", str(last)])
    assert "model.loss='dice' contradicts the checkpoint" in line and "(loss='ce')" in line
    # the checkpoint's own values, repeated, are fine
    main(["validate", "--config", str(config), "--ckpt_path", str(last), "--model.f_maps", "4"])


def test_explicit_normalization_is_not_replaced_by_the_checkpoints(trained, tmp_path, monkeypatch, capsys):
    config, _ = trained
    main(["fit", "--config", str(config), "--data.normalization", "percentile", "--trainer.max_steps", "1",
          "--trainer.default_root_dir", str(tmp_path / "runs")])
    checkpoint = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    used = []
    original = HDF5DataModule.check

    def record(self, stage, model=None):
        used.append(self.normalization)
        return original(self, stage, model)

    monkeypatch.setattr(HDF5DataModule, "check", record)
    val = yaml.safe_load(config.read_text())["data"]["val_paths"][0]
    predict = ["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", f"[{val}]",
               "--data.predict_patch_shape", "[8, 16, 16]", "--prediction.output_dir", str(tmp_path / "out"),
               "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--data.num_workers", "0"]
    main([*predict, "--prediction.output_dir", str(tmp_path / "a")])
    assert set(used) == {"percentile"}  # taken from the checkpoint
    used.clear()
    main([*predict, "--prediction.output_dir", str(tmp_path / "b"), "--data.normalization", "standardize"])
    assert set(used) == {"standardize"}  # given: kept, although it is the default


# ------------------------------------------------------------------------------------------------ item 8: messages
def test_a_pickle_that_is_not_a_checkpoint_gets_no_weights_only_advice(trained, tmp_path, capsys):
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"model": UNet3DModule}))
    line = error_line(capsys, ["validate", "--config", str(trained[0]), "--ckpt_path", str(path)])
    assert f"ckpt_path {path}: not a checkpoint unet3d can load" in line
    assert "weights_only" not in line
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    assert "not a PyTorch checkpoint file" in error_line(
        capsys, ["validate", "--config", str(trained[0]), "--ckpt_path", str(text)])


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


def test_a_key_given_twice_in_a_config_file(trained, tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text("model:\n  f_maps: 8\n  num_levels: 2\n  f_maps: 4\n")
    line = error_line(capsys, ["fit", "--config", str(trained[0]), "--config", str(config)])
    assert f"config {config}: line 4: key 'f_maps' is given twice (lines 2 and 4); keep one" in line


def test_an_empty_config_file(tmp_path, capsys):
    config = tmp_path / "empty.yaml"
    config.write_text("# nothing yet\n")
    line = error_line(capsys, ["fit", "--config", str(config)])
    assert f"config {config} is empty" in line


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
