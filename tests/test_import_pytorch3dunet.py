"""``unet3d import-pytorch3dunet`` against the real pytorch-3dunet (the pinned ``pytorch3dunet`` test dependency):
its networks with random weights, saved the way its trainer saves them, imported, give the same logits, and
``unet3d predict`` on the imported checkpoint gives its outputs blended as the plain patch mean."""

from __future__ import annotations

import itertools
import sys

import h5py
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from unet3d_lightning.cli import main
from unet3d_lightning.importers import convert_state_dict
from unet3d_lightning.module import UNet3DModule

p3d_model = pytest.importorskip("pytorch3dunet.unet3d.model", reason="the pytorch3dunet test dependency (make install)")
p3d_utils = pytest.importorskip("pytorch3dunet.unet3d.utils")



@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


CASES = {
    # one sigmoid mask, as boundary models (PlantSeg's, for one) have
    "UNet3D": dict(in_channels=1, out_channels=1, f_maps=8, num_levels=3, layer_order="gcr", num_groups=4),
    "UNet3D-deconv-softmax": dict(in_channels=2, out_channels=3, f_maps=4, num_levels=3, layer_order="cbl",
                                  upsample="deconv", final_sigmoid=False),
    "ResidualUNet3D": dict(in_channels=1, out_channels=2, f_maps=[4, 8, 16], layer_order="gcr", num_groups=4),
    "ResidualUNetSE3D": dict(in_channels=1, out_channels=2, f_maps=8, num_levels=3, layer_order="cge", num_groups=4),
    "UNet2D": dict(in_channels=1, out_channels=2, f_maps=8, num_levels=3, layer_order="bcr"),
    "ResidualUNet2D": dict(in_channels=1, out_channels=3, f_maps=8, num_levels=3, layer_order="cgl", num_groups=4,
                           final_sigmoid=False),
}


def their_model(case: str, seed: int = 0) -> tuple[nn.Module, dict]:
    """pytorch-3dunet's network for ``case`` with random, non-trivial weights and BatchNorm statistics."""
    config = {"name": case.split("-")[0], **CASES[case]}
    torch.manual_seed(seed)
    model = p3d_model.get_model(dict(config))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval(), config


def save_like_their_trainer(model: nn.Module, directory, data_parallel: bool = False):
    """What pytorch-3dunet's ``UNetTrainer._save_checkpoint`` writes, through its own ``save_checkpoint``."""
    state_dict = nn.DataParallel(model).state_dict() if data_parallel else model.state_dict()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    p3d_utils.save_checkpoint(
        {"num_epochs": 3, "num_iterations": 120, "model_state_dict": state_dict, "best_eval_score": 0.75,
         "optimizer_state_dict": optimizer.state_dict()},
        is_best=True, checkpoint_dir=str(directory),
    )
    return directory / "best_checkpoint.pytorch"


def write_config(path, model_config):
    path.write_text(yaml.safe_dump({"model": model_config, "trainer": {"checkpoint_dir": "x"}}))
    return path


def import_model(tmp_path, case, data_parallel=False):
    model, config = their_model(case)
    checkpoint = save_like_their_trainer(model, tmp_path / "p3d", data_parallel)
    config_path = write_config(tmp_path / "train_config.yml", config)
    output = tmp_path / "model.ckpt"
    main(args=["import-pytorch3dunet", "--model_path", str(checkpoint), "--config", str(config_path),
               "--output", str(output)])
    return model, config, output


@pytest.mark.parametrize("case", list(CASES))
def test_imported_logits_equal_theirs(tmp_path, case):
    model, config, output = import_model(tmp_path, case, data_parallel=case == "ResidualUNet3D")
    ours = UNet3DModule.load_from_checkpoint(output, map_location="cpu").eval()
    assert ours.hparams.variant == "pytorch3dunet"
    two_d = "2D" in case
    shape = (2, config["in_channels"]) + ((13, 11) if two_d else (9, 13, 11))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probabilities, logits = model(x, return_logits=True)
        # a 2D network sees (B, C, 1, H, W) patches in our module, one z-slice each
        mine = ours(x[:, :, None])[:, :, 0] if two_d else ours(x)
        mine_probabilities = ours.final_activation(mine)
    assert (mine - logits).abs().max().item() <= 1e-5
    assert (mine_probabilities - probabilities).abs().max().item() <= 1e-5
    # the final activation follows final_sigmoid: sigmoid masks ('bce') or a softmax over classes ('ce')
    assert ours.hparams.loss == ("bce" if config.get("final_sigmoid", True) else "ce")


def test_state_dict_names_map_one_to_one():
    names = convert_state_dict({
        "module.encoders.0.basic_module.SingleConv1.groupnorm.weight": torch.zeros(1),
        "encoders.1.basic_module.SingleConv2.conv.weight": torch.zeros(1),
        "decoders.0.basic_module.SingleConv1.conv.weight": torch.zeros(1),
        "decoders.0.upsampling.upsample.conv_transposed.weight": torch.zeros(1),
        "decoders.1.upsampling.upsample.weight": torch.zeros(1),  # releases before 1.9
        "encoders.0.basic_module.conv1.weight": torch.zeros(1),
        "encoders.0.basic_module.conv1.bias": torch.zeros(1),
        "encoders.0.basic_module.conv2.groupnorm.bias": torch.zeros(1),
        "encoders.0.basic_module.conv3.conv.weight": torch.zeros(1),
        "decoders.2.basic_module.se_module.cSE.fc1.weight": torch.zeros(1),
        "decoders.2.basic_module.se_module.cSE.fc2.bias": torch.zeros(1),
        "decoders.2.basic_module.se_module.sSE.conv.weight": torch.zeros(1),
        "final_conv.bias": torch.zeros(1),
    })
    assert list(names) == [
        "encoders.0.0.groupnorm.weight",
        "encoders.1.1.conv.weight",
        "decoders.0.block.0.conv.weight",
        "decoders.0.up.weight",
        "decoders.1.up.weight",
        "encoders.0.project.weight",
        "encoders.0.project.bias",
        "encoders.0.conv1.groupnorm.bias",
        "encoders.0.conv2.conv.weight",
        "decoders.2.block.se.fc1.weight",
        "decoders.2.block.se.fc2.bias",
        "decoders.2.block.se.spatial.weight",
        "final_conv.bias",
    ]


def standardised(raw: np.ndarray) -> np.ndarray:
    x = raw.astype(np.float64)
    return ((x - x.mean()) / x.std()).astype(np.float32)


def starts(size, patch, stride):
    """Patch starts along one axis: 0, s, 2s, ... with the last one moved back to end at the border."""
    out = list(range(0, size - patch + 1, stride))
    return out if out[-1] == size - patch else out + [size - patch]


@pytest.mark.parametrize("case", ["UNet3D", "ResidualUNetSE3D", "UNet2D"])
def test_predict_on_imported_checkpoint_equals_their_blended_output(tmp_path, monkeypatch, case):
    model, config, output = import_model(tmp_path, case)
    rng = np.random.default_rng(3)
    two_d = case == "UNet2D"
    volume = rng.normal(200, 30, (3, 20, 18) if two_d else (8, 20, 18))
    volume = volume.astype(np.float32)
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f["raw"] = volume
    patch, stride = ([1, 12, 12], [1, 8, 6]) if two_d else ([6, 12, 12], [2, 8, 6])
    monkeypatch.chdir(tmp_path)
    main(args=["predict", "--ckpt_path", "model.ckpt", "--data.predict_paths", "[vol.h5]",
               "--data.predict_patch_shape", str(patch), "--data.predict_stride_shape", str(stride),
               "--data.num_workers", "0", "--prediction.output_dir", "pred",
               "--trainer.enable_progress_bar", "false"])
    with h5py.File(tmp_path / "pred" / "vol_predictions.h5", "r") as f:
        predicted = f["predictions"][()]

    # Their network on every patch of the grid, averaged where patches overlap (pytorch-3dunet's own blending).
    x = standardised(volume)
    total = np.zeros((config["out_channels"], *volume.shape), np.float64)
    count = np.zeros(volume.shape, np.float64)
    for z, y, x0 in itertools.product(*(starts(n, p, s) for n, p, s in zip(volume.shape, patch, stride))):
        region = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x0, x0 + patch[2]))
        data = torch.from_numpy(x[region])
        with torch.no_grad():
            out = model(data[None] if two_d else data[None, None])  # UNet2D: the slice as (1, 1, H, W)
        total[(slice(None), *region)] += out[0, :, None].numpy() if two_d else out[0].numpy()
        count[region] += 1
    expected = total / count
    assert predicted.shape == expected.shape
    np.testing.assert_allclose(predicted, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- user mistakes
def run_import(capsys, tmp_path, model_config=None, model_path=None, output=None):
    if model_path is None:
        model, _ = their_model("UNet3D")
        model_path = save_like_their_trainer(model, tmp_path / "p3d")
    config = write_config(tmp_path / "cfg.yml", model_config or {"name": "UNet3D", **CASES["UNet3D"]})
    with pytest.raises(SystemExit) as info:
        main(args=["import-pytorch3dunet", "--model_path", str(model_path), "--config", str(config),
                   "--output", str(output or tmp_path / "out.ckpt")])
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not (tmp_path / "out.ckpt").exists() or output is not None
    return lines[0]


@pytest.mark.parametrize("change, words", [
    ({"name": "UNETR"}, ["model.name 'UNETR'", "ResidualUNetSE3D"]),
    ({"upsample": "trilinear"}, ["model.upsample='trilinear'"]),
    ({"conv_padding": 0}, ["conv_padding=0"]),
    ({"f_maps": 16}, ["do not fit", "size mismatch"]),
    ({"out_channels": "two"}, ["out_channels"]),
    ({"layer_order": "cxr"}, ["layer_order 'cxr'"]),
])
def test_unsupported_settings_end_in_one_error_line(tmp_path, capsys, change, words):
    line = run_import(capsys, tmp_path, {"name": "UNet3D", **CASES["UNet3D"], **change})
    for word in words:
        assert word in line, line


def test_wrong_files_end_in_one_error_line(tmp_path, capsys):
    assert "does not exist" in run_import(capsys, tmp_path, model_path=tmp_path / "missing.pytorch")
    junk = tmp_path / "junk.pytorch"
    junk.write_bytes(b"not a checkpoint")
    assert "cannot be read" in run_import(capsys, tmp_path, model_path=junk)
    other = tmp_path / "other.pytorch"
    torch.save({"epoch": 3}, other)
    assert "model_state_dict" in run_import(capsys, tmp_path, model_path=other)
    existing = tmp_path / "exists.ckpt"
    existing.write_bytes(b"keep me")
    assert "already exists" in run_import(capsys, tmp_path, output=existing)
    assert existing.read_bytes() == b"keep me"


def test_dropout_in_layer_order_and_unknown_keys_are_dropped_with_a_note(tmp_path, capsys):
    config = {"name": "UNet3D", **CASES["UNet3D"], "layer_order": "gcrd", "dropout_prob": 0.2, "testing": False}
    model = p3d_model.get_model(dict(config)).eval()
    checkpoint = save_like_their_trainer(model, tmp_path / "p3d")
    main(args=["import-pytorch3dunet", "--model_path", str(checkpoint), "--config",
               str(write_config(tmp_path / "c.yml", config)), "--output", str(tmp_path / "m.ckpt")])
    err = capsys.readouterr().err
    assert "dropout" in err and "['testing'] ignored" in err
    ours = UNet3DModule.load_from_checkpoint(tmp_path / "m.ckpt", map_location="cpu").eval()
    x = torch.randn(1, 1, 8, 9, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x, return_logits=True)[1], atol=1e-5, rtol=0)


def test_help_mentions_the_import(capsys):
    with pytest.raises(SystemExit):
        main(args=["--help"])
    assert "import-pytorch3dunet" in capsys.readouterr().out
