"""Real processes stopped by signals: `unet3d fit` saves a resumable last.ckpt and exits 143 on SIGTERM; `unet3d
predict` stops within seconds, leaves no temporary file and exits 143; under SLURM, Lightning's auto-requeue saves
and requeues on the requeue signal and the requeued job continues the same run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from conftest import blob_volume, write_h5
from test_cli import subprocess_env, unet3d_command
from unet3d_lightning.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


@pytest.fixture
def long_fit(tmp_path):
    """A fit config that would train for long: validation (and last.ckpt) every 2 steps."""
    data = tmp_path / "data"
    for name, seed in (("train_0", 0), ("val_0", 1)):
        raw, label = blob_volume(shape=(8, 16, 16), seed=seed)
        write_h5(data / f"{name}.h5", raw=raw, label=label)
    config = {
        "seed_everything": 3,
        "trainer": {"default_root_dir": str(tmp_path / "runs"), "accelerator": "cpu", "max_epochs": 100000,
                    "max_steps": 100000, "val_check_interval": 2, "check_val_every_n_epoch": None,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"out_channels": 2, "f_maps": 4, "num_levels": 2, "num_groups": 2},
        "data": {"train_paths": [str(data / "train_0.h5")], "val_paths": [str(data / "val_0.h5")],
                 "train_patch_shape": [8, 16, 16], "train_stride_shape": [8, 8, 8], "val_patch_shape": [8, 16, 16],
                 "batch_size": 1, "num_workers": 0},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def wait_for(condition, process, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the command ended before {what}: {process.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} in time")
        time.sleep(0.1)


def start(args, env=None):
    return subprocess.Popen([*unet3d_command(), *args], env=env or subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_sigterm_stops_fit_with_a_resumable_checkpoint(long_fit, tmp_path, capsys):
    last = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    process = start(["fit", "--config", str(long_fit)])
    wait_for(lambda: last.exists() and global_step(last) >= 2, process, "first checkpoint")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    err = err.decode()
    assert process.returncode == 143, err[-3000:]
    stopped = int(err.split("fit stopped by SIGTERM at step ")[1].split()[0])
    assert global_step(last) == stopped  # the steps up to the signal are all in the checkpoint
    assert f"resumable checkpoint: {last}  (step {stopped})" in err
    assert "Traceback" not in err

    target = stopped + 2 + stopped % 2  # the next validation but one, where last.ckpt is written again
    main(["fit", "--config", str(last.parent.parent / "config.yaml"), "--ckpt_path", str(last),
          "--trainer.max_steps", str(target)])
    assert f"fit finished: {target} steps" in capsys.readouterr().out
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == target
    assert {int(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()} == {target}


def test_sigterm_stops_predict_without_temporary_files(long_fit, tmp_path):
    main(["fit", "--config", str(long_fit), "--trainer.max_steps", "2"])
    checkpoint = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    volume = tmp_path / "big.h5"
    with h5py.File(volume, "w") as f:
        f["raw"] = np.random.default_rng(0).random((48, 160, 160), dtype=np.float32)
    out = tmp_path / "out"
    process = start(["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", f"[{volume}]",
                     "--data.predict_patch_shape", "[16, 32, 32]", "--data.num_workers", "1",
                     "--prediction.output_dir", str(out), "--trainer.accelerator", "cpu"])
    wait_for(lambda: out.is_dir() and any(".tmp-" in p.name for p in out.iterdir()), process, "temporary file")
    time.sleep(0.5)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    err = err.decode()
    assert process.returncode == 143, err[-3000:]
    assert time.monotonic() - sent < 30
    assert "predict stopped by SIGTERM" in err and "Traceback" not in err
    assert not out.exists()  # no temporary file, and the directory the run created is removed again


def test_slurm_requeue_saves_requeues_and_the_requeued_job_continues(long_fit, tmp_path, monkeypatch, capsys):
    """Lightning's SLURMEnvironment (detected from the SLURM variables, auto_requeue on) saves hpc_ckpt_N.ckpt and
    calls `scontrol requeue JOB` on SIGUSR1; the requeued job (the same command) continues the same run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "unet3d-train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    env = {**subprocess_env(), **slurm, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    root = tmp_path / "runs"
    run = root / "lightning_logs" / "version_4242"  # under SLURM, Lightning names the run after the job
    process = start(["fit", "--config", str(long_fit)], env=env)
    wait_for(lambda: (run / "checkpoints" / "last.ckpt").exists(), process, "first checkpoint")
    process.send_signal(signal.SIGUSR1)
    wait_for(lambda: (root / "hpc_ckpt_1.ckpt").exists() and calls.exists(), process, "requeue")
    process.send_signal(signal.SIGTERM)  # what SLURM sends when the time limit comes
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err.decode()[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    saved = max(global_step(root / "hpc_ckpt_1.ckpt"), global_step(run / "checkpoints" / "last.ckpt"))

    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    target = saved + 2 + saved % 2
    main(["fit", "--config", str(long_fit), "--trainer.max_steps", str(target)])  # the requeued job's command
    captured = capsys.readouterr()
    assert "SLURM job 4242 requeued: resuming from" in captured.err
    assert f"fit finished: {target} steps" in captured.out
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_4242"]  # the same run continued
    assert global_step(run / "checkpoints" / "last.ckpt") == target
