"""The U-Net family (``unet3d_lightning.networks``): one class for every ``model.architecture`` ×
``model.spatial_dims`` × ``upsample`` × layer order and both variants. It builds, keeps odd input sizes, learns one
patch by heart, holds only standard torch modules, and loads the parameter names of earlier versions."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from unet3d_lightning import UNet3D
from unet3d_lightning.cli import main
from unet3d_lightning.errors import ConfigurationError
from unet3d_lightning.module import UNet3DModule
from unet3d_lightning.networks import (
    ARCHITECTURE_BUILDERS,
    ARCHITECTURES,
    ResidualBlock,
    SqueezeExcitation,
    UNet,
    build_network,
    level_channels,
    parse_layer_order,
    slice_wise,
)

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


ORDERS = ["crg", "gcr", "cbl", "ce"]


def tiny(architecture, spatial_dims, upsample, layer_order, variant="native"):
    return build_network(architecture, in_channels=2, out_channels=3, f_maps=4, num_levels=3,
                         layer_order=layer_order, num_groups=2, upsample=upsample, spatial_dims=spatial_dims,
                         variant=variant)


# ----------------------------------------------------------------------------------------------- the 3D U-Net
@pytest.mark.parametrize("upsample", ["deconv", "interpolate"])
@pytest.mark.parametrize("layer_order", ["crg", "gcr", "cbr", "cl", "ecg"])
@pytest.mark.parametrize("num_levels", [1, 2, 3])
def test_output_has_input_spatial_size(upsample, layer_order, num_levels):
    net = UNet3D(2, 3, f_maps=8, num_levels=num_levels, layer_order=layer_order, num_groups=4, upsample=upsample)
    for shape in [(8, 8, 8), (5, 7, 9), (1, 3, 2), (17, 12, 3)]:
        out = net(torch.randn(2, 2, *shape))
        assert out.shape == (2, 3, *shape)


def test_four_levels_odd_sizes_and_logits():
    net = UNet3D(1, 2, f_maps=4, num_levels=4, num_groups=2)
    out = net(torch.randn(1, 1, 13, 21, 9))
    assert out.shape == (1, 2, 13, 21, 9)
    # logits, not probabilities: nothing squashes them into [0, 1] summing to one
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))


def test_channels_per_level():
    assert level_channels(8, 3) == [8, 16, 32]
    assert level_channels([4, 12, 20]) == [4, 12, 20]
    net = UNet3D(1, 1, f_maps=[4, 12, 20], num_groups=2)
    assert [e[1].conv.out_channels for e in net.encoders] == [4, 12, 20]
    # the first encoder conv goes to half the level's channels, never below the input's (Çiçek et al.)
    assert net.encoders[0][0].conv.out_channels == 2
    with pytest.raises(ValueError, match="num_levels"):
        UNet3D(1, 1, f_maps=[4, 8], num_levels=3)


@pytest.mark.parametrize("bad", ["xcr", "cc", "rg", "crr", "clr", "cgb", ""])
def test_invalid_layer_order_lists_valid_letters(bad):
    with pytest.raises(ValueError) as info:
        UNet3D(1, 2, f_maps=8, layer_order=bad)
    message = str(info.value)
    assert repr(bad) in message
    if bad in ("xcr", ""):
        for letter in "crlegb":
            assert f"'{letter}'" in message


def test_layer_order_builds_that_order():
    net = UNet3D(1, 2, f_maps=8, num_levels=2, layer_order="gcr", num_groups=4)
    block = net.encoders[1][0]
    assert [type(m).__name__ for m in block] == ["GroupNorm", "Conv3d", "ReLU"]
    # a norm after the conv makes the conv's bias redundant; a norm before it does not
    assert net.encoders[1][0].conv.bias is not None
    assert UNet3D(1, 2, f_maps=8, layer_order="crg", num_groups=4).encoders[0][0].conv.bias is None
    assert parse_layer_order("CBR") == "cbr"


def test_group_norm_divisibility_error():
    with pytest.raises(ValueError, match="num_groups=3"):
        UNet3D(1, 2, f_maps=8, layer_order="crg", num_groups=3)
    # a GroupNorm seeing fewer channels than groups (the raw input before the first conv) uses one group
    net = UNet3D(1, 2, f_maps=8, layer_order="gcr", num_groups=4)
    assert net.encoders[0][0].groupnorm.num_groups == 1


def test_rejects_bad_upsample_and_input_rank():
    with pytest.raises(ValueError, match="upsample"):
        UNet3D(1, 2, upsample="bilinear")
    with pytest.raises(ValueError, match="5D input"):
        UNet3D(1, 2, f_maps=4, num_levels=2, num_groups=2)(torch.zeros(1, 8, 8, 8))


def test_overfits_one_patch_3d_unet():
    """An honest learning test: the loss on one small patch must fall by at least 90 %."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 12, 12, 12)
    target = (F.avg_pool3d(x, 3, stride=1, padding=1) > 0).long()[:, 0]
    net = UNet3D(1, 2, f_maps=8, num_levels=2, num_groups=4)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), target)
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    assert loss.item() <= 0.1 * first, (first, loss.item())


# ----------------------------------------------------------------------------------------------- architectures
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
    # The default architecture is the public UNet3D, so old checkpoints' numbers are unchanged.
    net = build_network("unet", 1, 2, f_maps=4, num_levels=2, num_groups=2)
    assert type(net) is UNet3D
    assert type(build_network("residual_unet", 1, 2, f_maps=4, num_levels=2, num_groups=2)) is UNet


@pytest.mark.parametrize("variant", ["native", "pytorch3dunet"])
@pytest.mark.parametrize("spatial_dims", [3, 2])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_one_class_builds_every_architecture(architecture, spatial_dims, variant):
    """One U-Net class family: UNet3D is another name of UNet, which every architecture and variant builds."""
    from unet3d_lightning import architectures, model

    assert UNet3D is UNet and model.UNet3D is UNet and architectures.UNet is UNet
    net = tiny(architecture, spatial_dims, "deconv", "gcr", variant)
    assert type(net) is UNet
    assert (net.spatial_dims, net.variant) == (spatial_dims, variant)
    assert set(ARCHITECTURE_BUILDERS) == set(ARCHITECTURES) == {"unet", "residual_unet", "residual_se_unet"}


@pytest.mark.parametrize("spatial_dims", [3, 2])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_network_holds_only_standard_torch_modules(architecture, spatial_dims):
    """Every layer that computes (a leaf module) is torch's own class, not a subclass with its own kernel choice."""
    net = tiny(architecture, spatial_dims, "deconv", "gcr")
    leaves = [m for m in net.modules() if next(m.children(), None) is None]
    assert leaves and all(type(m).__module__.startswith("torch.nn.modules.") for m in leaves), \
        sorted({f"{type(m).__module__}.{type(m).__name__}" for m in leaves})
    assert any(type(m) is (nn.Conv3d if spatial_dims == 3 else nn.Conv2d) for m in leaves)


def test_decoder_upsampling_channels_per_block_and_variant():
    # Çiçek et al. (native): the transposed convolution keeps the deeper level's 8 channels, concatenated to 4 + 8.
    native = UNet(1, 2, f_maps=[4, 8], num_groups=2, upsample="deconv", block="double_conv")
    assert native.decoders[0].up.out_channels == 8 and native.decoders[0].up.bias is not None
    assert native.decoders[0].block[0].conv.in_channels == 12
    # pytorch-3dunet's UNet3D: bias-free, to the skip connection's 4 channels, concatenated to 4 + 4.
    theirs = UNet(1, 2, f_maps=[4, 8], num_groups=2, upsample="deconv", block="double_conv", variant="pytorch3dunet")
    assert theirs.decoders[0].up.out_channels == 4 and theirs.decoders[0].up.bias is None
    assert theirs.decoders[0].block[0].conv.in_channels == 8
    with pytest.raises(ValueError, match="variant 'keras'"):
        UNet(1, 2, variant="keras")
    with pytest.raises(ValueError, match="joining 'max'"):
        UNet(1, 2, joining="max")


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


# ----------------------------------------------------------------------------------------------- parameter names
def _old_names(state_dict, prefix=""):
    """The names the double-convolution U-Net of earlier versions gave its parameters: decoder blocks ``conv``."""
    pattern = re.compile(rf"^{re.escape(prefix)}decoders\.(\d+)\.block\.")
    return {pattern.sub(rf"{prefix}decoders.\1.conv.", key): value for key, value in state_dict.items()}


def test_old_parameter_names_load_strictly():
    torch.manual_seed(0)
    old = UNet3D(1, 2, f_maps=4, num_levels=3, layer_order="gcr", num_groups=2)
    for parameter in old.parameters():
        parameter.data.normal_()
    state = _old_names(old.state_dict())
    assert "decoders.0.conv.0.conv.weight" in state and "decoders.0.up.weight" in state
    assert not any(".block." in key for key in state)
    new = UNet3D(1, 2, f_maps=4, num_levels=3, layer_order="gcr", num_groups=2)
    new.load_state_dict(state)  # strict
    x = torch.randn(1, 1, 6, 9, 7)
    with torch.no_grad():
        assert torch.equal(new.eval()(x), old.eval()(x))
    assert "decoders.0.conv.0.conv.weight" in state  # the caller's dict is left as it was

    # Inside the module (prefix "net."), as Lightning loads a checkpoint.
    module = UNet3DModule(f_maps=4, num_levels=3, layer_order="gcr", num_groups=2)
    module_state = _old_names(module.state_dict(), prefix="net.")
    assert "net.decoders.1.conv.1.conv.weight" in module_state
    module.load_state_dict(module_state)
    # Today's names load as they are; the importer's output (pytorch-3dunet's weights) uses them too.
    new.load_state_dict(old.state_dict())


def test_resumed_optimizer_state_keeps_its_parameters():
    """Optimizer state is saved by parameter position: the unified network registers its parameters in the order the
    old double-convolution U-Net did (encoders, then each decoder's up-convolution and block, then the last conv)."""
    net = UNet3D(1, 2, f_maps=4, num_levels=3, num_groups=2)
    names = [name for name, _ in net.named_parameters()]
    decoder_0 = [n for n in names if n.startswith("decoders.0.")]
    assert decoder_0[:2] == ["decoders.0.up.weight", "decoders.0.up.bias"]
    assert names[0].startswith("encoders.0.") and names[-1] == "final_conv.bias"
    assert names.index("encoders.2.1.conv.weight") < names.index("decoders.0.up.weight")


# ----------------------------------------------------------------------------------------------- through the module
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
    assert loaded.net.block == "residual_se"
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
