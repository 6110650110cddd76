"""2D networks on 3D data: training on one-slice patches and predicting a volume slice by slice through the command,
the patch-shape check, augmentations of one-slice patches, and 2D ``(H, W)`` datasets read as one-slice volumes."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from unet3d_lightning.cli import main
from unet3d_lightning.data.datamodule import HDF5DataModule
from unet3d_lightning.data.transforms import Augmentation, ElasticDeformation, RandomFlip
from unet3d_lightning.module import UNet3DModule

sys.path.insert(0, str(Path(__file__).parent))
from conftest import blob_volume, write_h5  # noqa: E402

MODEL_2D = ["--model.spatial_dims", "2", "--model.f_maps", "4", "--model.num_levels", "2", "--model.num_groups", "2"]


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


def standardised(raw: np.ndarray) -> np.ndarray:
    x = raw.astype(np.float64)
    return ((x - x.mean()) / x.std()).astype(np.float32)


def starts(size, patch, stride):
    out = list(range(0, size - patch + 1, stride))
    return out if out[-1] == size - patch else out + [size - patch]


def error_line(capsys, args) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_train_on_slices_then_predict_a_volume_slice_by_slice(tmp_path, monkeypatch, architecture="residual_unet"):
    raw, label = blob_volume(shape=(6, 24, 24), seed=0)
    write_h5(tmp_path / "train.h5", raw=raw, label=label)
    volume, _ = blob_volume(shape=(5, 20, 22), seed=3)
    write_h5(tmp_path / "pred" / "vol.h5", raw=volume)
    monkeypatch.chdir(tmp_path)
    main(["fit", *MODEL_2D, "--model.architecture", architecture, "--model.learning_rate", "0.01",
          "--data.train_paths", "[train.h5]", "--data.val_paths", "[train.h5]",
          "--data.train_patch_shape", "[1,16,16]", "--data.train_stride_shape", "[1,8,8]",
          "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.max_epochs", "1",
          "--trainer.logger", "false", "--checkpoint.dirpath", "ckpt", "--trainer.enable_progress_bar", "false",
          "--seed_everything", "1"])
    model = UNet3DModule.load_from_checkpoint(tmp_path / "ckpt" / "best.ckpt", map_location="cpu").eval()
    assert model.hparams.spatial_dims == 2 and model.net.spatial_dims == 2
    assert all(not isinstance(m, torch.nn.Conv3d) for m in model.net.modules())

    patch, stride = [1, 12, 12], [1, 8, 6]
    main(["predict", "--ckpt_path", "ckpt/best.ckpt", "--data.predict_paths", "[pred/vol.h5]",
          "--data.predict_patch_shape", str(patch), "--data.predict_stride_shape", str(stride),
          "--data.num_workers", "0", "--prediction.output_dir", "out", "--trainer.enable_progress_bar", "false"])
    with h5py.File(tmp_path / "out" / "vol_predictions.h5", "r") as f:
        predicted = f["predictions"][()]

    # The 2D network itself on each (y, x) patch of each slice, overlaps averaged.
    x = standardised(volume)
    total = np.zeros((2, *volume.shape))
    count = np.zeros(volume.shape)
    for z, y, x0 in itertools.product(*(starts(n, p, s) for n, p, s in zip(volume.shape, patch, stride))):
        image = torch.from_numpy(x[z, y:y + 12, x0:x0 + 12])[None, None]
        with torch.no_grad():
            total[:, z, y:y + 12, x0:x0 + 12] += model.net(image)[0].softmax(0).numpy()
        count[z, y:y + 12, x0:x0 + 12] += 1
    np.testing.assert_allclose(predicted, total / count, rtol=0, atol=1e-5)


def test_patch_with_more_than_one_slice_is_one_error_line(tmp_path, capsys, monkeypatch):
    raw, label = blob_volume(shape=(6, 16, 16), seed=0)
    write_h5(tmp_path / "train.h5", raw=raw, label=label)
    monkeypatch.chdir(tmp_path)
    line = error_line(capsys, ["fit", *MODEL_2D, "--data.train_paths", "[train.h5]", "--data.val_paths",
                               "[train.h5]", "--data.train_patch_shape", "[4,16,16]", "--data.num_workers", "0",
                               "--trainer.logger", "false"])
    assert "data.train_patch_shape [4, 16, 16]" in line and "[1, 16, 16]" in line and "spatial_dims=2" in line
    assert not (tmp_path / "runs").exists()


def test_predict_patch_with_more_than_one_slice_is_one_error_line(tmp_path, capsys, monkeypatch):
    module = UNet3DModule(f_maps=4, num_levels=2, num_groups=2, spatial_dims=2)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.0"}, tmp_path / "m.ckpt")
    raw, _ = blob_volume(shape=(4, 16, 16), seed=0)
    write_h5(tmp_path / "v.h5", raw=raw)
    monkeypatch.chdir(tmp_path)
    line = error_line(capsys, ["predict", "--ckpt_path", "m.ckpt", "--data.predict_paths", "[v.h5]",
                               "--data.predict_patch_shape", "[4,16,16]", "--data.num_workers", "0"])
    assert "data.predict_patch_shape" in line and "[1, 16, 16]" in line


def test_one_slice_augmentations_stay_in_the_slice():
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(1, 1, 9, 8)
    label = torch.randint(0, 3, (1, 9, 8))
    sample = {"raw": raw, "label": label}
    flipped = RandomFlip(p=1.0)(sample, generator)  # z is skipped: the slice is mirrored in y and x only
    torch.testing.assert_close(flipped["raw"], raw.flip(-1, -2))
    for seed in range(5):
        out = Augmentation(elastic=True).build()(sample, torch.Generator().manual_seed(seed))
        assert out["raw"].shape == (1, 1, 9, 8) and torch.isfinite(out["raw"]).all()
        assert set(out["label"].unique().tolist()) <= set(label.unique().tolist())
    # an elastic warp of one slice with no in-plane displacement leaves it as it is (z has nowhere to move)
    still = ElasticDeformation(magnitude=0.0, z_magnitude=5.0, p=1.0)(sample, generator)
    torch.testing.assert_close(still["raw"], raw)
    torch.testing.assert_close(still["label"], label)


def test_2d_image_datasets_are_one_slice_volumes(tmp_path, monkeypatch):
    raw, label = blob_volume(shape=(1, 20, 18), seed=4)
    image = write_h5(tmp_path / "image.h5", raw=raw[0], label=label[0])  # (H, W) datasets
    dm = HDF5DataModule(train_paths=[str(image)], val_paths=[str(image)], train_patch_shape=(1, 12, 12),
                        num_workers=0, augmentation=Augmentation(flip=False, rotate90=False, intensity=False,
                                                                 noise_sigma=0.0))
    dm.setup("fit")
    volume = dm.volumes["train"][0]
    assert volume.spatial_shape == (1, 20, 18) and volume.label_kind == "class_ids"
    sample = dm.datasets["train"][0]
    assert sample["raw"].shape == (1, 1, 12, 12) and sample["label"].shape == (1, 12, 12)
    s = dm.datasets["train"].locations[0][1]
    np.testing.assert_array_equal(sample["label"].numpy(), label[s])
    np.testing.assert_allclose(sample["raw"][0].numpy(), standardised(raw)[s], atol=1e-5)
    in_memory = HDF5DataModule(train_paths=[str(image)], val_paths=[str(image)], train_patch_shape=(1, 12, 12),
                               num_workers=0, in_memory=True)
    in_memory.setup("fit")
    np.testing.assert_array_equal(in_memory.volumes["train"][0].arrays["label"], label)

    # predicted as a one-slice volume: the output is (C, 1, H, W)
    module = UNet3DModule(f_maps=4, num_levels=2, num_groups=2, spatial_dims=2)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.0"}, tmp_path / "m.ckpt")
    monkeypatch.chdir(tmp_path)
    main(["predict", "--ckpt_path", "m.ckpt", "--data.predict_paths", "[image.h5]", "--data.predict_patch_shape",
          "[1,20,18]", "--data.num_workers", "0", "--prediction.output_dir", "out",
          "--trainer.enable_progress_bar", "false"])
    with h5py.File(tmp_path / "out" / "image_predictions.h5", "r") as f:
        predicted = f["predictions"][()]
    with torch.no_grad():
        expected = module.eval().net(torch.from_numpy(standardised(raw[0]))[None, None]).softmax(1)[0]
    np.testing.assert_allclose(predicted[:, 0], expected.numpy(), rtol=0, atol=1e-5)


def test_flip_tta_of_one_slice_patches_uses_the_four_in_plane_flips():
    from unet3d_lightning.module import flip_tta

    torch.manual_seed(0)
    module = UNet3DModule(f_maps=4, num_levels=2, num_groups=2, spatial_dims=2).eval()
    x = torch.randn(2, 1, 1, 10, 9)
    calls = []

    def predict(batch):
        calls.append(batch)
        return module.final_activation(module(batch))

    with torch.no_grad():
        averaged = flip_tta(predict, x)
        net = module.net
        expected = sum(net(x[:, :, 0].flip(d) if d else x[:, :, 0]).softmax(1).flip(d) if d else
                       net(x[:, :, 0]).softmax(1) for d in [(), (2,), (3,), (2, 3)]) / 4
    assert len(calls) == 4
    torch.testing.assert_close(averaged[:, :, 0], expected, atol=1e-6, rtol=0)
