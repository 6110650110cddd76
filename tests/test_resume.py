"""Stopping and resuming training: ``fit --ckpt_path`` continues the run's own files (also from a relative root
dir, also without validation) or starts a new run when fine-tuning from another one; SIGTERM stops after a step
with a resumable ``last.ckpt``; a run killed with SIGKILL resumes from ``last.ckpt`` (slow, in a subprocess);
checkpoints are never half-written."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import (
    blob_volume,
    checkpoint_state,
    make_config,
    run_dir,
    scores,
    steps_per_epoch,
    subprocess_env,
    unet3d_command,
    write_h5,
)
from conftest import load_checkpoint_file as load
from unet3d_lightning.cli import main
from unet3d_lightning.module import UNet3DModule

pytestmark = pytest.mark.usefixtures("command_line")


def without_val_paths(config: Path) -> Path:
    cfg = yaml.safe_load(config.read_text())
    del cfg["data"]["val_paths"], cfg["data"]["val_patch_shape"]
    path = config.with_name("no_val.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------------ resuming in process
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


# ------------------------------------------------------------------------------------------ killed, in a subprocess
@pytest.fixture
def resume_config(tmp_path):
    data = tmp_path / "data"
    for name, seed in (("train_0", 0), ("val_0", 1)):
        raw, label = blob_volume(shape=(8, 32, 32), seed=seed)
        write_h5(data / f"{name}.h5", raw=raw, label=label)
    config = {
        "seed_everything": 3,
        "trainer": {"default_root_dir": str(tmp_path / "runs"), "accelerator": "cpu", "max_epochs": 1000,
                    "max_steps": 400, "val_check_interval": 2, "check_val_every_n_epoch": None,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"out_channels": 2, "f_maps": 4, "num_levels": 2, "num_groups": 2},
        "data": {"train_paths": [str(data / "train_0.h5")], "val_paths": [str(data / "val_0.h5")],
                 "train_patch_shape": [8, 16, 16], "train_stride_shape": [8, 8, 8], "val_patch_shape": [8, 32, 32],
                 "batch_size": 1, "num_workers": 0},
    }
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_continues_from_the_checkpoint(resume_config, tmp_path):
    last = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        [*unet3d_command(), "fit", "--config", str(resume_config)], env=subprocess_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if last.exists() and _global_step(last) >= 6 and _global_step(last) % 9 != 0:
                break  # at least three validations done, and the last one was not at an epoch boundary (9 steps)
            if process.poll() is not None:
                pytest.fail(f"training ended before it could be killed: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared in time")
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    saved = _global_step(last)  # loads: the file is complete despite the kill
    assert saved >= 6

    result = subprocess.run(
        [*unet3d_command(), "fit", "--config", str(resume_config), "--ckpt_path", str(last),
         "--trainer.max_steps", str(saved + 4)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"fit finished: {saved + 4} steps" in result.stdout
    assert "not resumable" not in result.stderr
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == saved + 4
    # the optimizer state came along: Adam's step counter continued from the checkpoint, not from zero
    adam_steps = {int(state["step"]) for state in checkpoint["optimizer_states"][0]["state"].values()}
    assert adam_steps == {saved + 4}
    # the resumed run logged into the same run directory, starting after the saved step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = last.parent.parent
    events = sorted(run.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    assert len(events) == 2
    resumed = EventAccumulator(str(events[-1]), size_guidance={"scalars": 0})
    resumed.Reload()
    steps = [event.step for event in resumed.Scalars("train/loss")]
    assert min(steps) >= saved and max(steps) < saved + 4


def test_an_interrupted_checkpoint_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    """Lightning writes checkpoints through an fsspec transaction (temporary file, then rename); a failure before
    the rename must leave the old checkpoint untouched. Guards the pinned versions against a regression."""
    import fsspec.implementations.local as local
    import lightning.pytorch as pl

    from unet3d_lightning import UNet3DModule

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, max_steps=0,
                         default_root_dir=str(tmp_path))
    model = UNet3DModule(f_maps=4, num_levels=2, num_groups=2)
    trainer.strategy.connect(model)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    def crash(self):
        raise OSError("disk full")

    monkeypatch.setattr(local.LocalFileOpener, "commit", crash)
    with torch.no_grad():
        model.net.final_conv.bias.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["last.ckpt"]
