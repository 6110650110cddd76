"""The architectures of ``model.architecture`` × ``model.spatial_dims`` × ``upsample`` × layer orders: they build, keep
odd input sizes, learn one patch by heart, and old checkpoints (written before architectures existed) still predict
the same."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from unet3d_lightning.architectures import (
    ARCHITECTURES,
    ResidualBlock,
    SqueezeExcitation,
    UNet,
    build_network,
    slice_wise,
)
from unet3d_lightning.cli import main
from unet3d_lightning.errors import ConfigurationError
from unet3d_lightning.model import UNet3D
from unet3d_lightning.module import UNet3DModule

OLD = Path(__file__).parent / "data" / "unet_checkpoint_v0"
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])
ORDERS = ["crg", "gcr", "cbl", "ce"]


def tiny(architecture, spatial_dims, upsample, layer_order, variant="native"):
    return build_network(architecture, in_channels=2, out_channels=3, f_maps=4, num_levels=3,
                         layer_order=layer_order, num_groups=2, upsample=upsample, spatial_dims=spatial_dims,
                         variant=variant)


@pytest.mark.parametrize("layer_order", ORDERS)
@pytest.mark.parametrize("upsample", ["deconv", "interpolate"])
@pytest.mark.parametrize("spatial_dims", [3, 2])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_builds_and_keeps_odd_sizes(architecture, spatial_dims, upsample, layer_order):
    net = tiny(architecture, spatial_dims, upsample, layer_order)
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    assert all(not isinstance(m, (nn.Conv3d, nn.Conv2d)) or isinstance(m, conv) for m in net.modules())
    if "b" in layer_order:
        norm = nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d
        assert any(isinstance(m, norm) for m in net.modules())
    shapes = [(5, 7, 9), (1, 3, 2), (8, 8, 8)] if spatial_dims == 3 else [(7, 9), (3, 2), (16, 16)]
    for shape in shapes:
        out = net(torch.randn(2, 2, *shape))
        assert out.shape == (2, 3, *shape)
        assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=f"{spatial_dims + 2}D input"):
        net(torch.randn(2, 2, *([6] * (5 - spatial_dims))))


def overfit(net, spatial_dims, steps=100):
    """Train on one patch; return (first loss, last loss, accuracy of the last prediction)."""
    generator = torch.Generator().manual_seed(0)
    shape = (6, 10, 9) if spatial_dims == 3 else (12, 11)
    label = (torch.rand(1, *shape, generator=generator) > 0.5).long()
    raw = torch.stack([label.float(), torch.randn(1, *shape, generator=generator) * 0.3], dim=1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        logits = net(raw)
        loss = F.cross_entropy(logits[:, :2], label)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        accuracy = (net(raw)[:, :2].argmax(1) == label).float().mean().item()
    return losses[0], losses[-1], accuracy


@pytest.mark.parametrize("upsample", ["deconv", "interpolate"])
@pytest.mark.parametrize("spatial_dims", [3, 2])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_overfits_one_patch(architecture, spatial_dims, upsample):
    torch.manual_seed(0)
    order = ORDERS[(ARCHITECTURES.index(architecture) + spatial_dims) % len(ORDERS)]
    net = tiny(architecture, spatial_dims, upsample, order)
    first, last, accuracy = overfit(net, spatial_dims)
    assert last < 0.2 * first, (first, last)
    assert accuracy > 0.95


@pytest.mark.parametrize("architecture", ["unet", "residual_unet", "residual_se_unet"])
def test_pytorch3dunet_variant_overfits_too(architecture):
    # Imported models are fine-tuned in this variant.
    torch.manual_seed(0)
    upsample = "interpolate" if architecture == "unet" else "deconv"
    net = tiny(architecture, 3, upsample, "gcr", variant="pytorch3dunet")
    first, last, accuracy = overfit(net, 3)
    assert last < 0.2 * first and accuracy > 0.95


def test_native_unet_is_the_original_network():
    # The default architecture is today's class, so old checkpoints' parameter names and numbers are unchanged.
    net = build_network("unet", 1, 2, f_maps=4, num_levels=2, num_groups=2)
    assert type(net) is UNet3D
    assert type(build_network("residual_unet", 1, 2, f_maps=4, num_levels=2, num_groups=2)) is UNet


def test_residual_block_by_hand():
    """y = relu(p + conv2(relu(conv1(p)))), p = 1x1 projection, checked with plain torch ops on the block's weights."""
    torch.manual_seed(0)
    block = ResidualBlock(2, 3, layer_order="cr", spatial_dims=2)
    x = torch.randn(1, 2, 5, 6)
    p = F.conv2d(x, block.project.weight, block.project.bias)
    h = F.relu(F.conv2d(p, block.conv1.conv.weight, block.conv1.conv.bias, padding=1))
    h = F.conv2d(h, block.conv2.conv.weight, block.conv2.conv.bias, padding=1)
    torch.testing.assert_close(block(x), F.relu(p + h))
    assert not any(isinstance(m, nn.ReLU) for m in block.conv2)  # the activation follows the sum instead
    same = ResidualBlock(3, 3, layer_order="gcr", num_groups=1)
    assert isinstance(same.project, nn.Identity)


def test_squeeze_excitation_by_hand():
    """scSE: max(x * sigmoid(fc2(relu(fc1(mean_c(x))))), x * sigmoid(conv1x1(x)))."""
    torch.manual_seed(0)
    se = SqueezeExcitation(3, spatial_dims=3)
    x = torch.randn(2, 3, 4, 5, 6)
    mean = x.mean(dim=(2, 3, 4))
    channel = torch.sigmoid(F.linear(F.relu(F.linear(mean, se.fc1.weight, se.fc1.bias)), se.fc2.weight, se.fc2.bias))
    spatial = torch.sigmoid(F.conv3d(x, se.spatial.weight, se.spatial.bias))
    expected = torch.maximum(x * channel[:, :, None, None, None], x * spatial)
    torch.testing.assert_close(se(x), expected)


def test_residual_unet_joins_by_sum_after_deconv_and_by_concat_after_interpolation():
    deconv = UNet(1, 2, f_maps=[4, 8], num_groups=2, upsample="deconv", block="residual")
    assert deconv.decoders[0].joining == "sum" and deconv.decoders[0].up.out_channels == 4
    assert deconv.decoders[0].block.conv1.conv.in_channels == 4
    nearest = UNet(1, 2, f_maps=[4, 8], num_groups=2, upsample="interpolate", block="residual")
    assert nearest.decoders[0].joining == "concat" and nearest.decoders[0].block.project.in_channels == 12


def test_slice_wise_applies_the_2d_network_to_each_slice():
    torch.manual_seed(0)
    net = build_network("unet", 1, 2, f_maps=4, num_levels=2, num_groups=2, spatial_dims=2).eval()
    x = torch.randn(2, 1, 3, 9, 7)
    out = slice_wise(net, x)
    assert out.shape == (2, 2, 3, 9, 7)
    for z in range(3):
        torch.testing.assert_close(out[:, :, z], net(x[:, :, z]))


def test_module_errors_are_one_line():
    with pytest.raises(ConfigurationError, match="spatial_dims 4"):
        UNet3DModule(spatial_dims=4)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="architecture 'vnet'"):
        UNet3DModule(architecture="vnet")  # type: ignore[arg-type]


def test_module_saves_architecture_and_rebuilds_it(tmp_path):
    module = UNet3DModule(in_channels=1, out_channels=2, f_maps=4, num_levels=2, num_groups=2,
                          architecture="residual_se_unet", spatial_dims=2)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.0"}, tmp_path / "m.ckpt")
    loaded = UNet3DModule.load_from_checkpoint(tmp_path / "m.ckpt", map_location="cpu").eval()
    assert isinstance(loaded.net, UNet) and loaded.net.spatial_dims == 2
    x = torch.randn(1, 1, 1, 10, 9)
    torch.testing.assert_close(loaded(x), module.eval()(x))


def test_single_mask_model_scores_with_binary_metrics():
    module = UNet3DModule(out_channels=1, loss="bce", f_maps=4, num_levels=2, num_groups=2)
    probabilities = torch.tensor([0.9, 0.8, 0.2, 0.6]).view(1, 1, 1, 2, 2)
    target = torch.tensor([1, 0, 0, 1]).view(1, 1, 1, 2, 2)
    module.val_metrics.update(probabilities, target)
    values = module.val_metrics.compute()
    # mask (0.5 threshold) 1 1 0 1 against 1 0 0 1: TP 2, FP 1, FN 0 -> Dice 4 / 5, IoU 2 / 3
    assert values["val/dice"].item() == pytest.approx(0.8)
    assert values["val/iou"].item() == pytest.approx(2 / 3)


def test_single_mask_model_trains(tmp_path, monkeypatch):
    from conftest import blob_volume, write_h5

    raw, label = blob_volume(shape=(8, 16, 16), seed=0)
    write_h5(tmp_path / "a.h5", raw=raw, label=label[None])  # one binary mask, (1, D, H, W)
    monkeypatch.chdir(tmp_path)
    main(["fit", "--model.out_channels", "1", "--model.loss", "bce", "--model.architecture", "residual_unet",
          "--model.f_maps", "4", "--model.num_levels", "2", "--model.num_groups", "2", "--data.train_paths", "[a.h5]",
          "--data.val_paths", "[a.h5]", "--data.train_patch_shape", "[8,16,16]", "--data.num_workers", "0",
          "--trainer.max_epochs", "1", "--trainer.logger", "false", "--checkpoint.dirpath", "ckpt",
          "--trainer.enable_progress_bar", "false"])
    assert (tmp_path / "ckpt" / "best.ckpt").is_file()


# ----------------------------------------------------------------------------------------------- old checkpoints
def test_checkpoint_from_before_architectures_loads_and_predicts_the_same(tmp_path, monkeypatch):
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


@pytest.mark.parametrize("config, architecture, spatial_dims", [
    ("residual_unet.yaml", "residual_unet", 3), ("residual_se_unet.yaml", "residual_se_unet", 3),
    ("demo_2d.yaml", "unet", 2),
])
def test_example_configs_run(tmp_path, monkeypatch, config, architecture, spatial_dims):
    """Each architecture's example config trains (3 steps, on small stand-ins for the demo volumes it names)."""
    from conftest import blob_volume, write_h5

    for name, seed in (("train_0", 0), ("train_1", 1), ("val_0", 2)):
        raw, label = blob_volume(shape=(8, 16, 16), seed=seed)
        write_h5(tmp_path / "data" / "demo" / f"{name}.h5", raw=raw, label=label)
    monkeypatch.chdir(tmp_path)  # the configs use relative data/ and runs/ paths
    repo = Path(__file__).resolve().parents[1]
    patch = "[8,16,16]" if spatial_dims == 3 else "[1,16,16]"
    main(["fit", "--config", str(repo / "configs" / config), "--trainer.max_steps", "3", "--model.f_maps", "4",
          "--data.train_patch_shape", patch, "--data.train_stride_shape", patch, "--data.val_patch_shape", patch,
          "--data.val_stride_shape", patch, "--trainer.enable_progress_bar", "false"])
    checkpoint = next((tmp_path / "runs").glob("*/lightning_logs/version_0/checkpoints/last.ckpt"))
    hparams = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert (hparams["architecture"], hparams["spatial_dims"]) == (architecture, spatial_dims)
