"""The unet3d command: in-process runs through main(args=...), plus a few real subprocess runs (marked slow)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import blob_volume, write_h5
from unet3d_lightning import UNet3DModule
from unet3d_lightning.cli import main

TINY_MODEL = ["--model.f_maps", "4", "--model.num_levels", "2", "--model.num_groups", "2"]


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    """main(args=...) stands for the command line: pytest's own arguments must not be visible beside it."""
    monkeypatch.setattr(sys, "argv", ["unet3d"])


def unet3d_command() -> list[str]:
    """The installed console script next to this Python, else the module (same entry point)."""
    script = Path(sys.executable).parent / "unet3d"
    return [str(script)] if script.exists() else [sys.executable, "-m", "unet3d_lightning"]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "default"  # show every warning the run raises, so the test sees them
    return env


@pytest.fixture
def run_config(tmp_path):
    """A small fit config on blob volumes; returns its path."""
    data = tmp_path / "data"
    for name, seed in (("train_0", 0), ("train_1", 1), ("val_0", 2)):
        raw, label = blob_volume(shape=(8, 16, 16), seed=seed)
        write_h5(data / f"{name}.h5", raw=raw, label=label)
    config = {
        "seed_everything": 7,
        "trainer": {"default_root_dir": str(tmp_path / "runs"), "accelerator": "cpu", "max_epochs": 2,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"out_channels": 2, "f_maps": 4, "num_levels": 2, "num_groups": 2, "learning_rate": 0.01},
        "data": {"train_paths": [str(data / "train_*.h5")], "val_paths": [str(data / "val_0.h5")],
                 "train_patch_shape": [8, 8, 8], "train_stride_shape": [8, 8, 8], "val_patch_shape": [8, 16, 16], "batch_size": 2,
                 "num_workers": 0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def version_dir(root: Path) -> Path:
    versions = sorted((root / "lightning_logs").glob("version_*"))
    assert versions, f"no run under {root}"
    return versions[-1]


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
        line = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == [metric])
        return float(line.split()[1])

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


def test_configuration_errors_end_with_one_error_line(run_config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(run_config), "--data.train_paths", f"[{tmp_path / 'missing.h5'}]"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: train volume {tmp_path / 'missing.h5'}: file does not exist"
    assert not (tmp_path / "runs").exists()  # nothing written


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
