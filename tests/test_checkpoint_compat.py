"""Checkpoints written by earlier versions load and predict the same: one fixture per architecture, written by
``unet3d fit`` of the version before the networks were unified into one family (``tests/fixtures/``), and the
checkpoint of the version before ``model.architecture`` existed (``tests/data/unet_checkpoint_v0``)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from unet3d_lightning.cli import main
from unet3d_lightning.module import UNet3DModule
from unet3d_lightning.networks import build_network
from unet3d_lightning.prediction.engine import onednn_convolutions

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
OLD = Path(__file__).parent / "data" / "unet_checkpoint_v0"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
# name -> (architecture, spatial_dims, variant) the fixture was written with (tests/fixtures/make_checkpoints.py)
WRITTEN_AS = {
    "unet_gcr_deconv": ("unet", 3, "native"),
    "unet_interpolate": ("unet", 3, "native"),
    "residual_se_unet_bce": ("residual_se_unet", 3, "native"),
    "residual_unet_batchnorm": ("residual_unet", 3, "native"),
    "unet_2d": ("unet", 2, "native"),
    "pytorch3dunet_unet_deconv": ("unet", 3, "pytorch3dunet"),
    "pytorch3dunet_residual_unet_2d": ("residual_unet", 2, "pytorch3dunet"),
}
NETWORK_ARGS = ("in_channels", "out_channels", "f_maps", "num_levels", "layer_order", "num_groups", "upsample")
# The stored logits were computed with oneDNN's CPU convolutions, as that version always used them; a network run
# on PyTorch's own kernel choice (im2col for batch-1 3D convolutions) agrees up to float32 rounding (logits reach 15
# here, measured differences 6e-6).
OTHER_KERNEL = {"atol": 1e-5, "rtol": 0}


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


def test_every_fixture_is_checked():
    assert CASES == sorted(WRITTEN_AS)


def _expected(case: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / case / "expected.pt", map_location="cpu", weights_only=True)


def _net_input(case: str, x: torch.Tensor) -> torch.Tensor:
    return x[:, :, 3] if WRITTEN_AS[case][1] == 2 else x  # a 2D network saw the middle slice


@pytest.mark.parametrize("case", CASES)
def test_module_checkpoint_loads_and_computes_the_same(case):
    checkpoint = torch.load(FIXTURES / case / "model.ckpt", map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert (hparams["architecture"], hparams["spatial_dims"], hparams["variant"]) == WRITTEN_AS[case]
    assert checkpoint["optimizer_states"] and checkpoint["loops"]  # the whole layout unet3d fit writes
    # The double-convolution U-Net of that version named its decoder blocks "conv" (now "block"): loading renames.
    old_names = [k for k in checkpoint["state_dict"] if re.match(r"net\.decoders\.\d+\.conv\.", k)]
    assert bool(old_names) == (WRITTEN_AS[case][0] == "unet" and WRITTEN_AS[case][2] == "native")

    expected = _expected(case)
    module = UNet3DModule.load_from_checkpoint(FIXTURES / case / "model.ckpt", map_location="cpu").eval()
    with torch.no_grad():
        probabilities = module.predict_step({"raw": expected["input"].clone()}, 0)["probabilities"]
        with onednn_convolutions(module.net):
            logits = module.net(_net_input(case, expected["input"]).clone())
        plain_logits = module.net(_net_input(case, expected["input"]).clone())
    torch.testing.assert_close(probabilities, expected["probabilities"], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, expected["logits"], atol=1e-6, rtol=0)
    torch.testing.assert_close(plain_logits, expected["logits"], **OTHER_KERNEL)


@pytest.mark.parametrize("case", CASES)
def test_plain_network_loads_the_old_weights(case):
    """The weights alone (``net.`` prefix dropped), strictly loaded into a network built from the hyperparameters."""
    checkpoint = torch.load(FIXTURES / case / "model.ckpt", map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    architecture, spatial_dims, variant = WRITTEN_AS[case]
    net = build_network(architecture, *(hparams[k] for k in NETWORK_ARGS), spatial_dims, variant).eval()
    weights = {k[len("net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(weights)
    expected = _expected(case)
    with torch.no_grad():
        plain_logits = net(_net_input(case, expected["input"]).clone())
        with onednn_convolutions(net):
            logits = net(_net_input(case, expected["input"]).clone())
    torch.testing.assert_close(logits, expected["logits"], atol=1e-6, rtol=0)
    torch.testing.assert_close(plain_logits, expected["logits"], **OTHER_KERNEL)


@pytest.mark.parametrize("case", CASES)
def test_predict_command_writes_what_the_old_version_wrote(case, tmp_path, monkeypatch):
    patch = "[1,12,12]" if WRITTEN_AS[case][1] == 2 else "[8,12,12]"
    shutil.copy(FIXTURES / case / "model.ckpt", tmp_path / "model.ckpt")
    shutil.copy(FIXTURES / "volume.h5", tmp_path / "volume.h5")
    monkeypatch.chdir(tmp_path)
    main(args=["predict", "--ckpt_path", "model.ckpt", "--data.predict_paths", "[volume.h5]",
               "--data.predict_patch_shape", patch, "--data.num_workers", "0", "--prediction.output_dir", "pred",
               "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"])
    with h5py.File(tmp_path / "pred" / "volume_predictions.h5", "r") as now, \
            h5py.File(FIXTURES / case / "predictions.h5", "r") as before:
        assert now["predictions"].shape == before["predictions"].shape
        np.testing.assert_allclose(now["predictions"][()], before["predictions"][()], rtol=0, atol=1e-6)


def test_checkpoint_from_before_architectures_loads_and_predicts_the_same(tmp_path, monkeypatch):
    from unet3d_lightning import UNet3D

    checkpoint = torch.load(OLD / "model.ckpt", map_location="cpu", weights_only=True)
    assert "architecture" not in checkpoint["hyper_parameters"]
    assert "spatial_dims" not in checkpoint["hyper_parameters"]
    model = UNet3DModule.load_from_checkpoint(OLD / "model.ckpt", map_location="cpu")
    assert type(model.net) is UNet3D and model.hparams.architecture == "unet"

    for name in ("model.ckpt", "volume.h5"):
        shutil.copy(OLD / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    main(args=["predict", "--ckpt_path", "model.ckpt", "--data.predict_paths", "[volume.h5]",
               "--data.predict_patch_shape", "[8,12,12]", "--data.num_workers", "0",
               "--prediction.output_dir", "pred", "--trainer.enable_progress_bar", "false"])
    with h5py.File(tmp_path / "pred" / "volume_predictions.h5", "r") as now, \
            h5py.File(OLD / "expected_predictions.h5", "r") as before:
        np.testing.assert_allclose(now["predictions"][()], before["predictions"][()], rtol=0, atol=1e-6)
