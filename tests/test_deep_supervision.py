"""Deep supervision (``model.deep_supervision``): heads only in training, the network and its predictions unchanged,
the loss weights and downsampled targets (checked against torch's own interpolation and pooling and a loss summed
by hand from the decoder outputs), and checkpoints with heads that fit and predict."""

from __future__ import annotations

import sys

import h5py
import pytest
import torch
import torch.nn.functional as F
import yaml

from unet3d_lightning.errors import ConfigurationError
from unet3d_lightning.module import UNet3DModule
from unet3d_lightning.networks.deep_supervision import downsample_target, level_weights

from conftest import blob_volume, write_h5

TINY = dict(in_channels=1, out_channels=3, f_maps=4, num_levels=3, num_groups=2, loss="dice_ce")


def test_level_weights_halve_and_sum_to_one():
    assert level_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert level_weights(1) == [1.0]


def test_downsampled_targets_match_torch_nearest_and_max_pool():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2, 8, 12, 10), generator=g)
    labels[0, 0] = 255
    down = downsample_target(labels, (4, 6, 5), binary=False)
    expected = F.interpolate(labels[:, None].float(), size=(4, 6, 5), mode="nearest")[:, 0].long()
    assert torch.equal(down, expected) and down.dtype == torch.int64
    odd = downsample_target(labels, (3, 5, 4), binary=False)
    assert torch.equal(odd, F.interpolate(labels[:, None].float(), size=(3, 5, 4), mode="nearest")[:, 0].long())
    masks = (torch.rand(2, 2, 8, 12, 10, generator=g) > 0.8).float()
    assert torch.equal(downsample_target(masks, (4, 6, 5), binary=True), F.max_pool3d(masks, 2))
    masks[0, 0, 0, 0, 0] = -1  # an ignored voxel makes its coarse voxel ignored
    pooled = downsample_target(masks, (4, 6, 5), binary=True, ignore_index=-1)
    assert pooled[0, 0, 0, 0, 0] == -1 and (pooled[:, :, 1:] >= 0).all()


def _batch(seed=0, shape=(8, 12, 12)):
    g = torch.Generator().manual_seed(seed)
    return {"raw": torch.randn(2, 1, *shape, generator=g), "label": torch.randint(0, 3, (2, *shape), generator=g)}


def test_heads_exist_only_in_the_module_and_the_network_is_unchanged():
    torch.manual_seed(0)
    plain = UNet3DModule(**TINY)
    supervised = UNet3DModule(**TINY, deep_supervision=True)
    assert len(supervised.deep_supervision.heads) == 1 and plain.deep_supervision is None
    assert list(supervised.net.state_dict()) == list(plain.net.state_dict())
    extra = set(supervised.state_dict()) - set(plain.state_dict())
    assert extra == {"deep_supervision.heads.0.weight", "deep_supervision.heads.0.bias"}
    supervised.net.load_state_dict(plain.net.state_dict())
    supervised.use_memory_format("cpu")
    plain.use_memory_format("cpu")
    calls = []
    supervised.deep_supervision.heads[0].register_forward_hook(lambda *a: calls.append(1))
    batch = _batch()
    plain.eval(), supervised.eval()
    with torch.no_grad():
        a = plain.predict_step({"raw": batch["raw"]}, 0)["probabilities"]
        b = supervised.predict_step({"raw": batch["raw"]}, 0)["probabilities"]
    assert torch.equal(a, b) and calls == []  # the heads take no part in prediction
    supervised.train()
    supervised._training_loss(batch)
    assert calls == [1]  # once per training step
    assert not any(d._forward_hooks for d in supervised.net.decoders)  # hooks gone after the step


def test_training_loss_is_the_weighted_sum_over_levels():
    torch.manual_seed(1)
    module = UNet3DModule(**{**TINY, "num_levels": 4}, deep_supervision=True)
    module.use_memory_format("cpu")
    batch = _batch(shape=(8, 16, 16))
    # The decoder outputs caught independently, the heads applied and the targets downsampled by hand.
    outputs = {}
    handles = [d.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
               for i, d in enumerate(module.net.decoders)]
    logits = module(batch["raw"])
    for h in handles:
        h.remove()
    loss_fn = module.loss_fn
    expected = 4 / 7 * loss_fn(logits, batch["label"])
    for weight, level, head in ((2 / 7, 1, module.deep_supervision.heads[0]), (1 / 7, 0,
                                                                                module.deep_supervision.heads[1])):
        aux = head(outputs[level])
        target = F.interpolate(batch["label"][:, None].float(), size=aux.shape[2:], mode="nearest")[:, 0].long()
        assert aux.shape[2:] == (8 // 2 ** (2 - level), 16 // 2 ** (2 - level), 16 // 2 ** (2 - level))
        expected = expected + weight * loss_fn(aux, target)
    torch.testing.assert_close(module._training_loss(batch), expected, rtol=1e-5, atol=1e-6)
    module._training_loss(batch).backward()
    assert module.deep_supervision.heads[1].weight.grad.abs().sum() > 0


def test_2d_network_and_binary_masks():
    module = UNet3DModule(in_channels=1, out_channels=2, f_maps=4, num_levels=3, num_groups=2, loss="bce_dice",
                          spatial_dims=2, deep_supervision=True)
    g = torch.Generator().manual_seed(2)
    batch = {"raw": torch.randn(2, 1, 1, 16, 16, generator=g),
             "label": (torch.rand(2, 2, 1, 16, 16, generator=g) > 0.5).float()}
    loss = module._training_loss(batch)
    assert torch.isfinite(loss) and loss > 0


def test_too_shallow_network_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="model.deep_supervision: .*at least 3 levels"):
        UNet3DModule(**{**TINY, "num_levels": 2}, deep_supervision=True)


def test_fit_with_heads_then_predict_and_load_without_them(tmp_path, monkeypatch):
    from unet3d_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["unet3d"])
    raw, label = blob_volume(shape=(8, 16, 16), seed=0)
    volume = write_h5(tmp_path / "train.h5", raw=raw, label=label)
    config = {
        "trainer": {"default_root_dir": str(tmp_path / "runs"), "accelerator": "cpu", "max_steps": 2,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"out_channels": 2, "f_maps": 4, "num_levels": 3, "num_groups": 2, "loss": "dice_ce",
                  "deep_supervision": True},
        "data": {"train_paths": [str(volume)], "val_paths": [str(volume)], "train_patch_shape": [8, 16, 16],
                 "num_workers": 0},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "fit.yaml")])
    checkpoint = next((tmp_path / "runs").rglob("last.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("deep_supervision.heads.") for k in state)
    main(["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", f"[{volume}]",
          "--data.predict_patch_shape", "[8, 16, 16]", "--prediction.output_dir", str(tmp_path / "out"),
          "--trainer.accelerator", "cpu", "--data.num_workers", "0"])
    with h5py.File(tmp_path / "out" / "train_predictions.h5", "r") as f:
        predicted = torch.from_numpy(f["predictions"][()])
    # The plain network with the checkpoint's weights, heads dropped, gives the same probabilities.
    plain = UNet3DModule.load_from_checkpoint(checkpoint, deep_supervision=False, map_location="cpu")
    assert plain.deep_supervision is None
    plain.eval()
    x = torch.from_numpy((raw - raw.mean()) / raw.std())[None, None].float()
    with torch.no_grad():
        expected = plain.final_activation(plain(x))[0]
    torch.testing.assert_close(predicted, expected, atol=1e-4, rtol=1e-4)


def test_anisotropic_pooling_targets_follow_each_level():
    # Per-axis pooling (z pooled only at the second pooling): each head's logits have its level's size, and the
    # target is brought to exactly that size.
    module = UNet3DModule(**TINY, pool_kernel_size=[[1, 2, 2], [2, 2, 2]], deep_supervision=True)
    outputs = []
    handle = module.deep_supervision.heads[0].register_forward_hook(lambda m, a, out: outputs.append(out))
    batch = _batch(shape=(4, 16, 16))
    loss = module._training_loss(batch)
    handle.remove()
    assert torch.isfinite(loss)
    assert tuple(outputs[0].shape[2:]) == (4, 8, 8)  # the level below full resolution: y and x halved, z not


def test_regression_targets_are_taken_at_the_nearest_voxel_not_max_pooled():
    torch.manual_seed(2)
    module = UNet3DModule(in_channels=1, out_channels=1, f_maps=4, num_levels=3, num_groups=2, loss="mse",
                          deep_supervision=True)
    module.use_memory_format("cpu")
    raw = torch.randn(2, 1, 8, 16, 16)
    target = torch.randn(2, 1, 8, 16, 16)  # float values: a max-pool would bias every coarse target upwards
    outputs = {}
    handles = [d.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
               for i, d in enumerate(module.net.decoders)]
    prediction = module(raw)
    for h in handles:
        h.remove()
    expected = 2 / 3 * F.mse_loss(prediction, target)
    aux = module.deep_supervision.heads[0](outputs[0])
    expected = expected + 1 / 3 * F.mse_loss(aux, F.interpolate(target, size=aux.shape[2:], mode="nearest"))
    torch.testing.assert_close(module._training_loss({"raw": raw, "label": target}), expected, rtol=1e-5, atol=1e-6)
