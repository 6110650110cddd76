"""The unet3d command's runs: fit, validate, test, the saved and printed configs, seeds, the example configs,
training without validation, fast_dev_run, and the monitored metrics of checkpointing, early stopping and the
learning-rate scheduler. In-process runs through main(args=...), plus one real subprocess run (slow)."""

import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_checkpoint_file as load
from conftest import (  # noqa: F401 - other test files import subprocess_env and unet3d_command from here
    checkpoint_state,
    make_config,
    run_dir,
    scores,
    steps_per_epoch,
    subprocess_env,
    unet3d_command,
    version_dir,
)
from unet3d_lightning import UNet3DModule
from unet3d_lightning.cli import main
from unet3d_lightning.module import metric_mode

pytestmark = pytest.mark.usefixtures("command_line")


# ------------------------------------------------------------------------------------------ fit, validate, test
def test_fit_writes_checkpoints_config_and_a_summary(run_config, tmp_path, capsys):
    main(["fit", "--config", str(run_config)])
    run = version_dir(tmp_path / "runs")
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    out = capsys.readouterr().out
    assert "fit finished: 8 steps, 2 epochs" in out
    assert f"best checkpoint: {run / 'checkpoints' / 'best.ckpt'} (val/loss = " in out
    assert f"last checkpoint: {run / 'checkpoints' / 'last.ckpt'}" in out
    assert f"logs:            {run}" in out
    model = UNet3DModule.load_from_checkpoint(run / "checkpoints" / "best.ckpt")
    assert model.hparams.f_maps == 4 and model.multiclass is True


def test_validate_reproduces_the_best_score_and_test_reads_test_paths(run_config, tmp_path, capsys):
    main(["fit", "--config", str(run_config)])
    best = version_dir(tmp_path / "runs") / "checkpoints" / "best.ckpt"
    state = torch.load(best, weights_only=True)["callbacks"]
    best_score = next(v["best_model_score"] for k, v in state.items() if k.startswith("ModelCheckpoint"))
    capsys.readouterr()

    def printed(metric: str) -> float:
        # Lightning prints the results as a plain table, or with rich's box characters when rich is installed
        # (bioimageio.spec, of the export extra, brings it in).
        rows = [line.translate(str.maketrans("│┃║|", "    ")).split() for line in capsys.readouterr().out.splitlines()]
        return float(next(row for row in rows if row[:1] == [metric])[1])

    main(["validate", "--config", str(run_config), "--ckpt_path", str(best)])
    # the same weights on the same (unaugmented) validation patches give the score the checkpoint was chosen by
    assert printed("val/loss") == pytest.approx(float(best_score), rel=1e-5)
    val_volume = yaml.safe_load(run_config.read_text())["data"]["val_paths"][0]
    main(["test", "--config", str(run_config), "--ckpt_path", str(best), "--data.test_paths", f"[{val_volume}]"])
    assert printed("test/loss") == pytest.approx(float(best_score), rel=1e-5)


def test_checkpoint_can_monitor_a_metric(run_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(["fit", "--config", str(run_config), "--trainer.max_epochs", "3", "--checkpoint.monitor", "val/dice_class1",
          "--checkpoint.mode", "max"])
    run = version_dir(tmp_path / "runs")
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["callbacks"]
    best_score = next(v["best_model_score"] for k, v in state.items() if k.startswith("ModelCheckpoint"))
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    logged = [event.value for event in events.Scalars("val/dice_class1")]
    assert len(logged) == 3
    assert float(best_score) == pytest.approx(max(logged), rel=1e-6)


def test_saved_config_repeats_the_run(run_config, tmp_path):
    main(["fit", "--config", str(run_config), "--trainer.max_epochs", "1"])
    saved = version_dir(tmp_path / "runs") / "config.yaml"
    assert yaml.safe_load(saved.read_text())["seed_everything"] == 7
    main(["fit", "--config", str(saved), "--trainer.default_root_dir", str(tmp_path / "again")])
    assert (version_dir(tmp_path / "again") / "checkpoints" / "last.ckpt").is_file()
    first = torch.load(version_dir(tmp_path / "runs") / "checkpoints" / "last.ckpt", weights_only=True)
    second = torch.load(version_dir(tmp_path / "again") / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in first["state_dict"].items():
        torch.testing.assert_close(second["state_dict"][key], value)  # same seed, same data: the same model


def test_default_seed_is_fresh_and_recorded(run_config, tmp_path, monkeypatch):
    seeds = []
    for run in range(2):
        monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # a new command starts without it
        root = tmp_path / f"seeded{run}"
        main(["fit", "--config", str(run_config), "--seed_everything", "true", "--trainer.max_steps", "1",
              "--trainer.default_root_dir", str(root)])
        seeds.append(yaml.safe_load((version_dir(root) / "config.yaml").read_text())["seed_everything"])
    assert all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds)
    assert seeds[0] != seeds[1]  # not Lightning's fallback 0 every time


def test_print_config_is_complete_and_reusable(run_config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(run_config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    for group in ("seed_everything", "trainer", "model", "data", "checkpoint", "early_stopping", "image_logger",
                  "prediction"):
        assert group in config
    for key in ("in_channels", "out_channels", "f_maps", "num_levels", "layer_order", "num_groups", "upsample",
                "loss", "loss_weight", "ignore_index", "learning_rate", "weight_decay", "optimizer", "lr_scheduler"):
        assert key in config["model"]
    assert config["early_stopping"]["patience"] == 20 and config["checkpoint"]["monitor"] == "val/loss"
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    main(["fit", "--config", str(path), "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "p")])
    assert (version_dir(tmp_path / "p") / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("config, loss", [("random_label3D_ce.yaml", "ce"), ("random_label4D_bce.yaml", "bce")])
def test_original_example_configs_run(config, loss, tmp_path, monkeypatch):
    """The translated examples of the original tool, on the generated example files, for 5 steps.

    The configs' f_maps=64 model is shrunk to keep the test fast on CPU; everything else is the config's.
    """
    from unet3d_lightning.data.demo import generate

    repo = Path(__file__).resolve().parents[1]
    generate(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # the configs use relative data/ and runs/ paths
    main(["fit", "--config", str(repo / "configs" / config), "--trainer.max_steps", "5", "--model.f_maps", "4",
          "--model.num_groups", "2", "--data.num_workers", "0", "--trainer.enable_progress_bar", "false",
          "--trainer.num_sanity_val_steps", "0"])
    run = version_dir(tmp_path / "runs" / "_".join(config.split("_")[:2]))
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 5
    assert checkpoint["hyper_parameters"]["loss"] == loss
    assert checkpoint["hyper_parameters"]["upsample"] == "interpolate"


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


def test_last_checkpoint_is_the_latest_state_when_the_score_stops_improving(tmp_path):
    config = make_config(tmp_path, str(tmp_path / "runs"), max_epochs=3)
    # lr 0: the validation loss never improves on the first one, so best.ckpt stays at the first epoch
    main(["fit", "--config", str(config), "--model.learning_rate", "0.0"])
    checkpoints = run_dir(tmp_path / "runs") / "checkpoints"
    assert load(checkpoints / "best.ckpt")["global_step"] == steps_per_epoch(config)
    assert load(checkpoints / "last.ckpt")["global_step"] == 3 * steps_per_epoch(config)


@pytest.mark.parametrize("logger", ["true", "false"])
def test_fast_dev_run_writes_no_checkpoints(tmp_path, capsys, logger):
    config = make_config(tmp_path, str(tmp_path / "runs"))
    for _ in range(2):
        main(["fit", "--config", str(config), "--trainer.fast_dev_run", "true", "--trainer.logger", logger])
    assert "checkpoints:     none (fast_dev_run saves none)" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


# ------------------------------------------------------------------------------------------ monitored metrics
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


@pytest.mark.slow
def test_real_command_fits_quietly_and_checkpoint_loads(run_config, tmp_path):
    result = subprocess.run(
        [*unet3d_command(), "fit", "--config", str(run_config), "--trainer.max_epochs", "1"],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "fit finished:" in result.stdout and "best checkpoint:" in result.stdout
    assert "Tip:" not in output
    assert "deprecated" not in output.lower()
    assert "Warning" not in output, output
    run = version_dir(tmp_path / "runs")
    model = UNet3DModule.load_from_checkpoint(run / "checkpoints" / "best.ckpt").eval()
    x = torch.randn(1, 1, 8, 16, 16)
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    rebuilt = UNet3DModule(out_channels=2, f_maps=4, num_levels=2, num_groups=2).eval()
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), rebuilt(x))
