"""``unet3d import-pytorch3dunet`` of networks with dropout and kernel settings, against pytorch-3dunet 1.9.6 itself:
``dropout_prob`` and the ``d``/``D`` letters are kept (the same dropout layers, active in training only), and
``conv_kernel_size``/``pool_kernel_size``, which its network constructors swallow, change nothing, as there."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml
from torch import nn

from unet3d_lightning.cli import main
from unet3d_lightning.module import UNet3DModule

p3d_model = pytest.importorskip("pytorch3dunet.unet3d.model", reason="the pytorch3dunet test dependency (make install)")
p3d_utils = pytest.importorskip("pytorch3dunet.unet3d.utils")
# pytorch-3dunet's Dropout2d warns on 5D features (where it computes the channel dropout of Dropout3d).
pytestmark = pytest.mark.filterwarnings("ignore:dropout2d. Received a 5-D input")


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


def dropouts(net):
    return sorted((type(m).__name__, m.p) for m in net.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d,
                                                                                     nn.Dropout3d)))


def import_theirs(tmp_path, capsys, config):
    torch.manual_seed(0)
    theirs = p3d_model.get_model(dict(config))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    p3d_utils.save_checkpoint({"model_state_dict": theirs.state_dict()}, is_best=True,
                              checkpoint_dir=str(tmp_path / "p3d"))
    (tmp_path / "train_config.yml").write_text(yaml.safe_dump({"model": config}))
    capsys.readouterr()
    main(args=["import-pytorch3dunet", "--model_path", str(tmp_path / "p3d" / "best_checkpoint.pytorch"),
               "--config", str(tmp_path / "train_config.yml"), "--output", str(tmp_path / "model.ckpt")])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    ours = UNet3DModule.load_from_checkpoint(tmp_path / "model.ckpt", map_location="cpu")
    return theirs, ours, notes


@pytest.mark.parametrize("name, order, levels", [("UNet3D", "gcrD", 3), ("ResidualUNet3D", "cgrd", 3)])
def test_dropout_and_swallowed_kernels_import_as_pytorch3dunet_builds_them(tmp_path, capsys, name, order, levels):
    config = {"name": name, "in_channels": 1, "out_channels": 2, "f_maps": 8, "num_levels": levels,
              "layer_order": order, "num_groups": 4, "dropout_prob": 0.3, "conv_kernel_size": 5,
              "pool_kernel_size": [1, 2, 2]}
    theirs, ours, notes = import_theirs(tmp_path, capsys, config)
    # pytorch-3dunet built 3x3x3 convolutions and 2x2x2 pooling whatever the config said; so did the import
    assert {m.kernel_size for m in theirs.modules() if isinstance(m, nn.Conv3d)} <= {(3, 3, 3), (1, 1, 1)}
    assert ours.hparams.get("pool_kernel_size", 2) == 2 and ours.hparams.get("conv_kernel_size", 3) == 3
    swallowed = [n for n in notes if "conv_kernel_size" in n]
    assert len(swallowed) == 1 and "pool_kernel_size" in swallowed[0] and "**kwargs" in swallowed[0]
    # the same dropout layers with the same probabilities (a residual network's are 0.1 there, whatever
    # dropout_prob says); Dropout2d on 5D features is the channel dropout Dropout3d computes
    expected = {"Dropout2d": "Dropout3d"}
    assert [(expected.get(kind, kind), p) for kind, p in dropouts(theirs)] == dropouts(ours.net)
    assert {p for _, p in dropouts(ours.net)} == ({0.3} if name == "UNet3D" else {0.1})
    assert ours.hparams.layer_order == order
    x = torch.randn(2, 1, 8, 12, 10, generator=torch.Generator().manual_seed(1))
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        _, logits = theirs(x, return_logits=True)
        assert (ours(x) - logits).abs().max().item() <= 1e-5
    # and it trains with the same dropout: in training mode, from the same random state, the same masks fall
    ours.train()
    theirs.train()
    torch.manual_seed(5)
    with torch.no_grad():
        _, their_logits = theirs(x, return_logits=True)
    torch.manual_seed(5)
    with torch.no_grad():
        mine = ours(x)
    assert (mine - their_logits).abs().max().item() <= 1e-5
    assert (mine - logits).abs().max().item() > 1e-3  # dropout did change them


def test_dropout_prob_pair_and_dropout_without_letters(tmp_path, capsys):
    config = {"name": "UNet3D", "in_channels": 1, "out_channels": 1, "f_maps": 4, "num_levels": 2,
              "layer_order": "crd", "dropout_prob": [0.2, 0.4]}
    theirs, ours, _ = import_theirs(tmp_path, capsys, config)
    assert ours.hparams.dropout == [0.2, 0.4]
    assert [p for _, p in dropouts(theirs)] == [p for _, p in dropouts(ours.net)] == [0.2, 0.2, 0.2, 0.4, 0.4, 0.4]
    no_letters = {**config, "layer_order": "cr"}
    (tmp_path / "b").mkdir()
    theirs, ours, notes = import_theirs(tmp_path / "b", capsys, no_letters)
    assert dropouts(theirs) == dropouts(ours.net) == [] and ours.hparams.get("dropout") is None
    assert any("dropout_prob ignored" in n for n in notes)
