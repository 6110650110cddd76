"""Crash-safe training: a run killed with SIGKILL resumes from last.ckpt; checkpoints are never half-written."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import blob_volume, write_h5
from test_cli import subprocess_env, unet3d_command


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
