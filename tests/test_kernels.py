"""Per-level, per-axis kernels (``model.pool_kernel_size``, ``model.conv_kernel_size``), the patch-size rule they
imply, and dropout (``model.dropout`` with the ``d``/``D`` layer letters): the kernel forms, every architecture ×
spatial_dims × form building, keeping sizes and learning one patch, the receptive field along z checked by
perturbing one slice, a 2-slice anisotropic model through the command, the one-line errors, and dropout in
training only."""

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

from unet3d_lightning.cli import main
from unet3d_lightning.errors import ConfigurationError
from unet3d_lightning.module import UNet3DModule
from unet3d_lightning.networks import ARCHITECTURES, UNet, build_network
from unet3d_lightning.networks.kernels import (
    activation_scale,
    conv_kernels,
    patch_divisor,
    pool_kernels,
    receptive_field,
)
from unet3d_lightning.prediction.memory import estimate_predict_memory, network_scale

sys.path.insert(0, str(Path(__file__).parent))
from conftest import blob_volume, error_line, write_h5  # noqa: E402


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


# The three forms of each setting, for a 3-level network: int, one per-axis list, one per level.
FORMS = {
    3: {
        "int": dict(pool_kernel_size=2, conv_kernel_size=3),
        "axes": dict(pool_kernel_size=[1, 2, 2], conv_kernel_size=[1, 3, 3]),
        "levels": dict(pool_kernel_size=[[1, 2, 2], [2, 2, 2]], conv_kernel_size=[[1, 3, 3], [3, 3, 3], [3, 5, 5]]),
    },
    2: {
        "int": dict(pool_kernel_size=2, conv_kernel_size=3),
        "axes": dict(pool_kernel_size=[2, 1], conv_kernel_size=[3, 5]),
        "levels": dict(pool_kernel_size=[[2, 2], [1, 2]], conv_kernel_size=[[3, 3], [1, 3], [5, 3]]),
    },
}


# ------------------------------------------------------------------------------------------------ pure helpers
def test_forms_normalise_to_one_kernel_per_level_and_axis():
    assert pool_kernels(2, 3) == ((2, 2, 2), (2, 2, 2))
    assert pool_kernels([1, 2, 2], 4) == ((1, 2, 2),) * 3
    assert pool_kernels([[1, 2, 2], [2, 2, 2]], 3) == ((1, 2, 2), (2, 2, 2))
    assert conv_kernels([3, 5], 2, spatial_dims=2) == ((3, 5), (3, 5))
    assert conv_kernels([[1, 3, 3], [3, 3, 3]], 2) == ((1, 3, 3), (3, 3, 3))
    # per axis, the product of that axis' factors; 2D networks' patches have z = 1
    assert patch_divisor(2, 4) == (8, 8, 8)
    assert patch_divisor([[1, 2, 2], [1, 2, 2], [2, 2, 2]], 4) == (2, 8, 8)
    assert patch_divisor([[2, 3], [1, 2]], 3, spatial_dims=2) == (1, 2, 6)
    assert patch_divisor(2, 1) == (1, 1, 1)
    # the network says the same of itself, on its own axes
    net = UNet(f_maps=4, num_levels=4, num_groups=2, pool_kernel_size=[[1, 2, 2], [1, 2, 2], [2, 2, 2]])
    assert net.patch_divisor == (2, 8, 8)
    net = UNet(f_maps=4, num_levels=3, num_groups=2, spatial_dims=2, pool_kernel_size=[[2, 3], [1, 2]])
    assert net.patch_divisor == (2, 6)


@pytest.mark.parametrize("setting, levels, words", [
    ([[1, 2, 2]], 3, ["lists 1 entries", "needs 2, one per pooling"]),
    ([1, 2], 3, ["[1, 2] has 2 value(s)", "[z, y, x]"]),
    (0, 3, ["below 1"]),
    ([1, -2, 2], 3, ["below 1"]),
    ([[1, 2, 2], [2, 2]], 3, ["entry [2, 2]"]),
    (True, 3, ["is not an int"]),
    ("2", 3, ["is not an int"]),
])
def test_bad_pool_kernels_are_one_line_errors(setting, levels, words):
    with pytest.raises(ValueError) as info:
        pool_kernels(setting, levels)
    message = str(info.value)
    assert "\n" not in message and message.startswith("pool_kernel_size")
    for word in words:
        assert word in message, message


def test_even_conv_kernels_are_refused():
    with pytest.raises(ValueError, match="even size"):
        conv_kernels([1, 4, 3], 2)
    with pytest.raises(ValueError, match="needs 3, one per level"):
        conv_kernels([[3, 3, 3]] * 2, 3)


@pytest.mark.parametrize("kwargs, words", [
    (dict(pool_kernel_size=[[1, 2, 2]]), ["model.pool_kernel_size", "needs 2"]),
    (dict(conv_kernel_size=4), ["model.conv_kernel_size", "even"]),
    (dict(pool_kernel_size=[1, 2, 2], spatial_dims=2), ["model.pool_kernel_size", "2D network", "[y, x]"]),
    (dict(dropout=0.3), ["model.dropout", "no dropout layer", "'crgd'"]),
    (dict(dropout=1.5, layer_order="crgd"), ["model.dropout", "[0, 1]"]),
])
def test_module_refuses_bad_settings_in_one_line(kwargs, words):
    with pytest.raises(ConfigurationError) as info:
        UNet3DModule(f_maps=4, num_levels=3, num_groups=2, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_receptive_field_by_hand():
    # Classic 2 levels, kernel 3: 1 + 2*2 (level-0 convs) + 1 (pool) + 2*2*2 (level-1 convs, jump 2)
    # + 2 (deconv reads two level-1 voxels) + 2*2 (decoder level-0 convs) = 20 on each axis.
    assert receptive_field(3, 2, num_levels=2) == (20, 20, 20)
    # Interpolation reads one coarse voxel: 2 fewer.
    assert receptive_field(3, 2, num_levels=2, upsample="interpolate") == (18, 18, 18)
    # [1, 3, 3] convolutions and [1, 2, 2] pooling never look at another slice.
    assert receptive_field([1, 3, 3], [1, 2, 2], num_levels=3)[0] == 1
    assert receptive_field(3, 2, num_levels=2, spatial_dims=2) == (1, 20, 20)


def test_memory_estimate_follows_the_pooling():
    # Levels of 4, 8, 16 channels count as 16 each (oneDNN's blocks). Classic pooling: 16 + 16/8 + 16/64 = 18.25;
    # [1, 2, 2] pooling keeps four times fewer voxels per level instead of eight: 16 + 16/4 + 16/16 = 21.
    assert activation_scale([4, 8, 16], 2) == 1.0
    assert activation_scale([4, 8, 16], [1, 2, 2]) == pytest.approx(21 / 18.25)
    hp = {"f_maps": 4, "num_levels": 3, "pool_kernel_size": [1, 2, 2], "spatial_dims": 3}
    assert network_scale(hp) == pytest.approx(21 / 18.25)
    assert network_scale({"f_maps": 4, "num_levels": 3}) == 1.0  # checkpoints from before: unchanged estimate
    args = ((16, 64, 64), (32, 256, 256), 1, 1, 2, 4)
    classic = estimate_predict_memory(*args)
    scaled = estimate_predict_memory(*args, network_scale=21 / 18.25)
    assert classic["network"] == 4 * 16 * 64 * 64 * 16 * 12  # B x P x max(f_maps, 16) x 12 values, float32
    assert scaled["network"] == -(-classic["network"] * 21 // 18.25)  # rounded up
    assert {k: v for k, v in scaled.items() if k != "network"} == {k: v for k, v in classic.items() if k != "network"}


# ------------------------------------------------------------------------------------------------ the networks
def tiny(architecture, spatial_dims, form, **kwargs):
    kwargs = {"layer_order": "crg", **kwargs}
    return build_network(architecture, 2, 2, f_maps=4, num_levels=3, num_groups=2, spatial_dims=spatial_dims,
                         **FORMS[spatial_dims][form], **kwargs)


def upsampling_strides(net):
    return [tuple(decoder.up.stride) for decoder in net.decoders if decoder.up is not None]


@pytest.mark.parametrize("form", ["int", "axes", "levels"])
@pytest.mark.parametrize("spatial_dims", [3, 2])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_shapes_and_one_patch_learned(architecture, spatial_dims, form):
    torch.manual_seed(0)
    upsample = "interpolate" if form == "axes" and architecture == "unet" else "deconv"
    net = tiny(architecture, spatial_dims, form, upsample=upsample)
    # The decoders undo each level's pooling: transposed convolutions of that stride, deepest first.
    pools = pool_kernels(FORMS[spatial_dims][form]["pool_kernel_size"], 3, spatial_dims)
    if upsample == "deconv":
        assert upsampling_strides(net) == list(reversed(pools))
    # Every convolution of a level has its kernel, encoder and decoder alike.
    convs = conv_kernels(FORMS[spatial_dims][form]["conv_kernel_size"], 3, spatial_dims)
    for level, encoder in enumerate(net.encoders):
        assert {m.kernel_size for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))
                and m.kernel_size != (1,) * spatial_dims} <= {convs[level]}
    for level, decoder in zip((1, 0), net.decoders):
        assert {m.kernel_size for m in decoder.block.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))
                and m.kernel_size != (1,) * spatial_dims} == {convs[level]}
    # Sizes that are no multiple of the divisor keep their size.
    for shape in ((5, 13, 10), (7, 9, 11)) if spatial_dims == 3 else ((13, 10), (9, 11)):
        assert net(torch.zeros(2, 2, *shape)).shape == (2, 2, *shape)

    generator = torch.Generator().manual_seed(0)
    shape = (5, 12, 10) if spatial_dims == 3 else (12, 10)
    label = (torch.rand(1, *shape, generator=generator) > 0.5).long()
    raw = torch.stack([label.float(), torch.randn(1, *shape, generator=generator) * 0.3], dim=1)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-2)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(raw), label)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        accuracy = (net(raw).argmax(1) == label).float().mean().item()
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    assert accuracy > 0.95


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_default_kernels_in_every_form_build_the_network_of_before(architecture, spatial_dims):
    """The defaults add no module and reshape no weight: spelled out in any form they build the very same network,
    and with the same weights it computes the same numbers bit for bit."""
    dims = spatial_dims
    torch.manual_seed(3)
    plain = build_network(architecture, 1, 2, f_maps=4, num_levels=3, num_groups=2, spatial_dims=dims)
    for pool, conv in ((2, 3), ([2] * dims, [3] * dims), ([[2] * dims] * 2, [[3] * dims] * 3)):
        spelled = build_network(architecture, 1, 2, f_maps=4, num_levels=3, num_groups=2, spatial_dims=dims,
                                pool_kernel_size=pool, conv_kernel_size=conv)
        assert str(spelled) == str(plain)
        shapes = {k: v.shape for k, v in plain.state_dict().items()}
        assert {k: v.shape for k, v in spelled.state_dict().items()} == shapes
        spelled.load_state_dict(plain.state_dict())
        x = torch.randn(1, 1, *([7, 10, 9][-dims:]))
        with torch.no_grad():
            assert torch.equal(spelled(x), plain(x))
    # and the transposed convolutions are those of before: kernel 3, stride 2, padding 1
    for decoder in plain.decoders:
        up = decoder.up
        assert (up.kernel_size, up.stride, up.padding) == ((3,) * dims, (2,) * dims, (1,) * dims)


@pytest.mark.parametrize("architecture, upsample", [
    ("unet", "deconv"), ("unet", "interpolate"), ("residual_unet", "deconv"),
])
def test_in_plane_kernels_never_mix_slices(architecture, upsample):
    """[1, 3, 3] convolutions with [1, 2, 2] pooling: a change in one slice moves no output in another slice (the
    receptive field along z is one slice), while classic kernels do spread it. Eval mode and no GroupNorm, whose
    statistics would mix the slices by design."""
    torch.manual_seed(0)

    def changed_slices(net):
        net.eval()
        x = torch.randn(1, 1, 6, 16, 16)
        y = x.clone()
        y[:, :, 2] += torch.randn(16, 16)
        with torch.no_grad():
            diff = (net(y) - net(x)).abs().amax(dim=(0, 1, 3, 4))
        return [z for z in range(6) if diff[z] > 0]

    flat = build_network(architecture, 1, 2, f_maps=4, num_levels=3, layer_order="cbr", upsample=upsample,
                         pool_kernel_size=[1, 2, 2], conv_kernel_size=[1, 3, 3])
    assert changed_slices(flat) == [2]
    classic = build_network(architecture, 1, 2, f_maps=4, num_levels=3, layer_order="cbr", upsample=upsample)
    assert len(changed_slices(classic)) > 1


def test_lean_inference_path_equals_the_modules_for_new_kernels():
    """Without gradients the decoders run layer by layer; with per-level kernels and dropout letters that is still
    what calling the modules computes."""
    torch.manual_seed(0)
    net = build_network("unet", 1, 2, f_maps=4, num_levels=3, num_groups=2, layer_order="crgD", dropout=0.4,
                        pool_kernel_size=[[1, 2, 2], [2, 2, 2]], conv_kernel_size=[[1, 3, 3], [3, 3, 3], [3, 5, 5]])
    net.eval()
    x = torch.randn(1, 1, 6, 14, 13)
    with torch.no_grad():
        lean = net(x)
    hooked = net.decoders[0].register_forward_hook(lambda *args: None)  # forces the plain module calls
    with torch.no_grad():
        plain = net(x)
    hooked.remove()
    assert torch.equal(lean, plain)


# --------------------------------------------------------------------------------------------------- dropout
def dropout_layers(net):
    return [m for m in net.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d, nn.Dropout3d))]


@pytest.mark.parametrize("letter, kind", [("d", nn.Dropout), ("D", nn.Dropout3d)])
def test_dropout_in_training_only(letter, kind):
    torch.manual_seed(0)
    net = build_network("unet", 1, 2, f_maps=8, num_levels=2, num_groups=2, layer_order="crg" + letter, dropout=0.5)
    layers = dropout_layers(net)
    assert len(layers) == 2 * 2 + 2 * 1 and all(type(m) is kind and m.p == 0.5 for m in layers)
    seen = []
    layers[0].register_forward_hook(lambda m, inputs, output: seen.append((inputs[0].detach(), output.detach())))
    x = torch.randn(2, 1, 6, 8, 8)
    net.train()
    assert not torch.equal(net(x), net(x))  # a fresh mask each time
    before, after = seen[-1]
    kept = after != 0
    # kept values are scaled by 1 / (1 - p), the others zeroed, about half of them
    torch.testing.assert_close(after[kept], before[kept] * 2)
    if letter == "d":
        assert 0.35 < 1 - kept.float().mean().item() < 0.65
    else:  # whole feature maps: every (sample, channel) is kept or dropped entirely
        per_map = kept.flatten(2).float().mean(-1)
        assert set(per_map.unique().tolist()) <= {0.0, 1.0} and 0 < per_map.mean() < 1
    net.eval()
    with torch.no_grad():
        first, second = net(x), net(x)
    assert torch.equal(first, second)
    # in eval mode it is the network without dropout layers, same weights (dropout has none)
    bare = build_network("unet", 1, 2, f_maps=8, num_levels=2, num_groups=2, layer_order="crg")
    bare.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(bare.eval()(x), first)


def test_dropout_pair_and_residual_blocks():
    net = build_network("residual_unet", 1, 2, f_maps=4, num_levels=2, num_groups=2, layer_order="cgrd",
                        dropout=[0.2, 0.3])
    # each residual block: both convolutions keep the order's dropout (the second drops only the activation)
    assert [m.p for m in dropout_layers(net)] == [0.2, 0.3] * 3
    assert UNet3DModule(f_maps=4, num_levels=2, num_groups=2, layer_order="gcrD").net is not None  # default 0.1
    assert {m.p for m in dropout_layers(UNet3DModule(f_maps=4, num_levels=2, num_groups=2,
                                                     layer_order="gcrD").net)} == {0.1}


# -------------------------------------------------------------------------------------------------- the command
def fit_args(root: Path, patch: str, **model) -> list[str]:
    args = ["fit", "--trainer.default_root_dir", str(root / "runs"), "--trainer.accelerator", "cpu",
            "--trainer.max_steps", "6", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
            "--data.train_paths", f"[{root / 'train.h5'}]", "--data.val_paths", f"[{root / 'train.h5'}]",
            "--data.train_patch_shape", patch, "--data.num_workers", "0",
            "--model.f_maps", "4", "--model.num_levels", "3", "--model.num_groups", "2",
            "--model.learning_rate", "0.01"]
    for key, value in model.items():
        args += [f"--model.{key}", value]
    return args


def test_two_slice_patches_train_and_predict_with_in_plane_pooling(tmp_path, capsys):
    """A 3-level model pooling [1, 2, 2] trains on [2, 32, 32] patches; its checkpoint records the kernels, and it
    predicts a volume at the volume's own shape, equal to the network's softmax on the standardised volume."""
    raw, label = blob_volume(shape=(4, 32, 32), seed=0)
    write_h5(tmp_path / "train.h5", raw=raw, label=label)
    main(fit_args(tmp_path, "[2, 32, 32]", pool_kernel_size="[1, 2, 2]",
                  conv_kernel_size="[[1, 3, 3], [3, 3, 3], [3, 3, 3]]"))
    checkpoint = next((tmp_path / "runs").rglob("last.ckpt"))
    hparams = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert hparams["pool_kernel_size"] == [1, 2, 2]
    assert hparams["conv_kernel_size"] == [[1, 3, 3], [3, 3, 3], [3, 3, 3]]

    volume = np.random.default_rng(1).normal(100, 20, (3, 40, 36)).astype(np.float32)
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f["raw"] = volume
    main(["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", f"[{tmp_path / 'vol.h5'}]",
          "--data.predict_patch_shape", "[3, 40, 36]", "--data.num_workers", "0",
          "--prediction.output_dir", str(tmp_path / "pred"), "--trainer.accelerator", "cpu",
          "--trainer.enable_progress_bar", "false"])
    with h5py.File(tmp_path / "pred" / "vol_predictions.h5", "r") as f:
        predicted = f["predictions"][()]
    assert predicted.shape == (2, 3, 40, 36)

    model = UNet3DModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    assert model.net.pool_kernels == ((1, 2, 2), (1, 2, 2))
    x = volume.astype(np.float64)
    x = torch.from_numpy(((x - x.mean()) / x.std()).astype(np.float32))[None, None]
    with torch.no_grad():
        expected = torch.softmax(model.net(x), dim=1)[0].numpy()
    np.testing.assert_allclose(predicted, expected, rtol=0, atol=1e-5)
    # a prediction patch shorter than the trained network's divisor [1, 4, 4]: named, with no advice to re-pool
    line = error_line(capsys, ["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths",
                               f"[{tmp_path / 'vol.h5'}]", "--data.predict_patch_shape", "[3, 2, 36]",
                               "--data.num_workers", "0", "--prediction.output_dir", str(tmp_path / "pred2"),
                               "--trainer.accelerator", "cpu"])
    assert "data.predict_patch_shape [3, 2, 36]" in line and "smallest valid patch is [3, 4, 36]" in line
    assert "pool z less" not in line and not (tmp_path / "pred2" / "vol_predictions.h5").exists()


def test_patch_shorter_than_the_divisor_names_the_smallest_valid_one(tmp_path, capsys):
    raw, label = blob_volume(shape=(4, 32, 32), seed=0)
    write_h5(tmp_path / "train.h5", raw=raw, label=label)
    line = error_line(capsys, fit_args(tmp_path, "[2, 32, 32]"))
    assert "data.train_patch_shape [2, 32, 32]" in line and "along z" in line
    assert "[4, 4, 4]" in line and "smallest valid patch is [4, 32, 32]" in line
    assert "model.pool_kernel_size" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))
    # per-level pooling: z pooled by 2 once, y and x twice (divisor [2, 4, 4])
    line = error_line(capsys, fit_args(tmp_path, "[1, 2, 32]", pool_kernel_size="[[1, 2, 2], [2, 2, 2]]"))
    assert "along z, y" in line and "[2, 4, 4]" in line and "smallest valid patch is [2, 4, 32]" in line


def test_kernel_flags_against_a_checkpoint_from_before_the_kernels(tmp_path, capsys):
    """A checkpoint written before these settings has the classic kernels: the same in another form is accepted,
    other kernels are named as a contradiction (not as a damaged file)."""
    fixture = Path(__file__).parent / "fixtures" / "checkpoints" / "unet_gcr_deconv" / "model.ckpt"
    assert "pool_kernel_size" not in torch.load(fixture, weights_only=True)["hyper_parameters"]
    raw, _ = blob_volume(shape=(4, 16, 16), seed=0)
    write_h5(tmp_path / "v.h5", raw=raw)
    args = ["predict", "--ckpt_path", str(fixture), "--data.predict_paths", f"[{tmp_path / 'v.h5'}]",
            "--data.predict_patch_shape", "[4, 16, 16]", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
            "--prediction.output_dir", str(tmp_path / "pred"), "--trainer.enable_progress_bar", "false"]
    line = error_line(capsys, [*args, "--model.pool_kernel_size", "[1, 2, 2]"])
    assert "model.pool_kernel_size=[1, 2, 2] contradicts the checkpoint" in line and "pool_kernel_size=2" in line
    main([*args, "--model.pool_kernel_size", "[2, 2, 2]", "--model.conv_kernel_size", "[[3, 3, 3], [3, 3, 3]]"])
    assert (tmp_path / "pred" / "v_predictions.h5").is_file()


@pytest.mark.parametrize("upsample", ["deconv", "interpolate"])
@pytest.mark.parametrize("kernels", [
    dict(pool_kernel_size=2, conv_kernel_size=3),
    dict(pool_kernel_size=[1, 2, 3], conv_kernel_size=[[1, 3, 3], [3, 5, 3]]),
])
def test_receptive_field_is_what_a_perturbation_reaches(upsample, kernels):
    """The receptive field measured: a linear network with positive weights and no biases maps a zero volume to
    exactly zero, and a single positive voxel to outputs that are positive exactly where that voxel is read (no sum
    can cancel, and every max-pooling window holding it passes it on), so the voxels along an axis whose unit
    impulse reaches an output voxel are its receptive field; the widest over neighbouring output voxels (every phase
    of the pooling grid) is the formula's."""
    torch.manual_seed(0)
    net = build_network("unet", 1, 1, f_maps=2, num_levels=2, layer_order="c", upsample=upsample, **kernels)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.zero_() if name.endswith("bias") else p.abs_().add_(0.01)
    net.eval()
    expected = receptive_field(kernels["conv_kernel_size"], kernels["pool_kernel_size"], 2, upsample=upsample)
    divisor = patch_divisor(kernels["pool_kernel_size"], 2)
    size = tuple(e + 2 * d + 2 for e, d in zip(expected, divisor))
    base = torch.zeros(1, 1, *size)
    with torch.no_grad():
        assert not net(base).any()
        for axis in range(3):
            n = size[axis]
            batch = base.repeat(n, 1, 1, 1, 1)
            for i in range(n):
                index = [i, 0] + [s // 2 for s in size]
                index[2 + axis] = i
                batch[tuple(index)] = 1.0
            moved = (net(batch)[:, 0] != 0).flatten(1)  # (impulse position, output voxel)
            widest = 0
            for shift in range(divisor[axis]):
                centre = [s // 2 for s in size]
                centre[axis] += shift
                reached = moved[:, np.ravel_multi_index(centre, size)].nonzero().flatten()
                widest = max(widest, int(reached.max() - reached.min() + 1) if len(reached) else 0)
            assert widest == expected[axis], (axis, widest, expected)


KERNEL_FIXTURE = Path(__file__).parent / "fixtures" / "kernels" / "anisotropic_unet_dropout"


def test_checkpoint_with_kernels_and_dropout_loads_and_predicts_as_when_written(tmp_path, monkeypatch):
    """tests/fixtures/make_kernel_checkpoint.py's checkpoint (a per-level-kernel U-Net with dropout, written by the
    first version with kernels): the settings it records rebuild its network, which loads its weights strictly and
    computes, and ``unet3d predict`` writes, what that version did."""
    checkpoint = torch.load(KERNEL_FIXTURE / "model.ckpt", map_location="cpu", weights_only=True)
    hp = checkpoint["hyper_parameters"]
    assert hp["pool_kernel_size"] == [[1, 2, 2], [2, 2, 2]] and hp["dropout"] == 0.2
    net = build_network("unet", 1, 2, f_maps=4, num_levels=3, layer_order="gcrd", num_groups=2,
                        pool_kernel_size=hp["pool_kernel_size"], conv_kernel_size=hp["conv_kernel_size"],
                        dropout=0.2).eval()
    net.load_state_dict({k[len("net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")})
    expected = torch.load(KERNEL_FIXTURE / "expected.pt", map_location="cpu", weights_only=True)
    module = UNet3DModule.load_from_checkpoint(KERNEL_FIXTURE / "model.ckpt", map_location="cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(net(expected["input"].clone()), expected["logits"], atol=1e-5, rtol=0)
        probabilities = module.predict_step({"raw": expected["input"].clone()}, 0)["probabilities"]
    torch.testing.assert_close(probabilities, expected["probabilities"], atol=1e-6, rtol=0)
    shutil.copy(KERNEL_FIXTURE / "model.ckpt", tmp_path / "model.ckpt")
    shutil.copy(KERNEL_FIXTURE.parents[1] / "checkpoints" / "volume.h5", tmp_path / "volume.h5")
    monkeypatch.chdir(tmp_path)
    main(["predict", "--ckpt_path", "model.ckpt", "--data.predict_paths", "[volume.h5]",
          "--data.predict_patch_shape", "[4,12,12]", "--data.num_workers", "0", "--prediction.output_dir", "pred",
          "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"])
    with h5py.File("pred/volume_predictions.h5", "r") as now, h5py.File(KERNEL_FIXTURE / "predictions.h5") as then:
        np.testing.assert_allclose(now["predictions"][()], then["predictions"][()], rtol=0, atol=1e-6)
