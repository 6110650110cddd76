"""The poly learning-rate schedule of nnU-Net as the README writes it (``PolynomialLR``, power 0.9, stepped every
optimizer step): the README's config block parses and, in a real ``fit``, the learning rate after ``k`` steps is
``lr0 * (1 - k / total_iters) ** 0.9`` (the formula of Isensee et al. 2021, computed here by hand)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import blob_volume, write_h5

README = Path(__file__).resolve().parents[1] / "README.md"


def _poly_block() -> dict:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    poly = [b for b in blocks if "PolynomialLR" in b and "lr_scheduler_interval: step" in b]
    assert poly, "the README shows no PolynomialLR block stepped per step"
    return yaml.safe_load(poly[0])


def test_readme_poly_schedule_steps_every_optimizer_step(tmp_path, monkeypatch):
    from unet3d_lightning.cli import main

    block = _poly_block()
    scheduler = block["model"]["lr_scheduler"]
    assert scheduler["class_path"] == "torch.optim.lr_scheduler.PolynomialLR"
    assert scheduler["init_args"]["power"] == 0.9
    scheduler["init_args"]["total_iters"] = 10  # the README's 100000 steps, shortened
    monkeypatch.setattr(sys, "argv", ["unet3d"])
    raw, label = blob_volume(shape=(8, 16, 16), seed=0)
    volume = write_h5(tmp_path / "train.h5", raw=raw, label=label)
    config = {
        "trainer": {"default_root_dir": str(tmp_path / "runs"), "accelerator": "cpu", "max_steps": 3,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"out_channels": 2, "f_maps": 4, "num_levels": 2, "num_groups": 2, "learning_rate": 0.01,
                  **block["model"]},
        "data": {"train_paths": [str(volume)], "train_patch_shape": [8, 8, 8], "num_workers": 0},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "fit.yaml")])
    checkpoint = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3
    (state,) = checkpoint["lr_schedulers"]
    assert state["last_epoch"] == 3  # per optimizer step: the 3 steps lie in the first epoch (9 patches)
    lr = checkpoint["optimizer_states"][0]["param_groups"][0]["lr"]
    assert lr == pytest.approx(0.01 * (1 - 3 / 10) ** 0.9, rel=1e-9)
