"""``--prediction.rescale``: a volume at half the model's resolution is predicted on the model's grid and written
back on its own, equal to an independent computation: torch's ``interpolate`` on the whole tiny volume, prediction
of that volume without rescaling, torch's ``interpolate`` of the probabilities back."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from conftest import blob_volume, write_h5  # noqa: E402

from unet3d_lightning.data.datamodule import VolumeDataModule  # noqa: E402
from unet3d_lightning.data.resample import BackResampler, Resampling, linear_weights  # noqa: E402
from unet3d_lightning.data.spacing import VoxelSize  # noqa: E402
from unet3d_lightning.errors import ConfigurationError  # noqa: E402
from unet3d_lightning.module import UNet3DModule  # noqa: E402
from unet3d_lightning.prediction.callback import PredictionWriter  # noqa: E402

MODEL_SIZE = VoxelSize((2.0, 0.5, 0.5), "micrometer")


def tiny_model() -> UNet3DModule:
    torch.manual_seed(0)
    model = UNet3DModule(in_channels=1, out_channels=2, f_maps=4, num_levels=2, num_groups=2)
    with torch.no_grad():
        for p in model.net.parameters():
            p.mul_(3.0)
    model.voxel_size = MODEL_SIZE  # what a checkpoint of data at that voxel size gives the model
    return model.eval()


def predict(path: Path, out: Path, *, rescale: bool, normalization: str = "standardize", model=None,
            **data) -> Path:
    writer = PredictionWriter(str(out), rescale=rescale, save_segmentation=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[writer])
    dm = VolumeDataModule(predict_paths=[str(path)], predict_patch_shape=[8, 8, 8], predict_stride_shape=[4, 6, 6],
                          batch_size=2, num_workers=0, normalization=normalization, **data)
    trainer.predict(model or tiny_model(), datamodule=dm, return_predictions=False)
    return writer.written[0]


def test_rescale_equals_resample_predict_resample_back(tmp_path):
    raw, _ = blob_volume((7, 9, 10), seed=3)
    raw = raw * 30 + 200
    source = write_h5(tmp_path / "coarse.h5", raw=raw)
    with h5py.File(source, "r+") as f:
        f["raw"].attrs["element_size_um"] = [4.0, 1.0, 1.0]  # half the model's resolution on every axis
    written = predict(source, tmp_path / "out", rescale=True)
    with h5py.File(written, "r") as f:
        got, segmentation = f["predictions"][()], f["segmentation"][()]
    assert got.shape == (2, 7, 9, 10)  # the input's grid

    # the independent route: normalise (population std), resample with torch, predict as is, resample back
    x = raw.astype(np.float64)
    normalised = ((x - x.mean()) / x.std()).astype(np.float32)
    fine = F.interpolate(torch.from_numpy(normalised)[None, None], size=(14, 18, 20), mode="trilinear",
                         align_corners=False)[0, 0].numpy()
    fine_path = write_h5(tmp_path / "fine.h5", raw=fine)
    fine_written = predict(fine_path, tmp_path / "fine_out", rescale=False, normalization="none")
    with h5py.File(fine_written, "r") as f:
        fine_predictions = f["predictions"][()]
    assert fine_predictions.shape == (2, 14, 18, 20)
    expected = F.interpolate(torch.from_numpy(fine_predictions)[None], size=(7, 9, 10), mode="trilinear",
                             align_corners=False)[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(segmentation, got.argmax(0))
    assert not np.allclose(got, got.mean())  # not a constant map


def test_the_back_resampler_streams_and_equals_torch_on_the_whole_volume():
    rng = np.random.default_rng(0)
    fine = rng.random((3, 11, 6, 7), dtype=np.float32)
    resampling = Resampling((5, 4, 3), (11, 6, 7), VoxelSize((2, 1, 1)), VoxelSize((1, 1, 1)))
    back = BackResampler(resampling)
    pieces = []
    for z0, z1 in ((0, 2), (2, 3), (3, 7), (7, 11)):
        pieces += back.push([(z0, z1, torch.from_numpy(fine[:, z0:z1]))])
        assert back._buffer.shape[1] <= 4 + 2  # at most the last slab and the rows before it that are still needed
    assert [p[0] for p in pieces] == sorted(p[0] for p in pieces) and pieces[-1][1] == 5
    got = torch.cat([p[2] for p in pieces], dim=1).numpy()
    expected = F.interpolate(torch.from_numpy(fine)[None], size=(5, 4, 3), mode="trilinear",
                             align_corners=False)[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # the input side: a region of the model's grid read from its window of the input equals torch on the whole
    coarse = rng.random((1, 5, 4, 3), dtype=np.float32)
    up = Resampling((5, 4, 3), (11, 6, 7), VoxelSize((1, 1, 1)), VoxelSize((0.5, 0.7, 0.45)))
    region = (slice(3, 9), slice(1, 6), slice(2, 7))
    window, local = up.source_window(region)
    got = up.interpolate(coarse[(slice(None), *window)], local)
    whole = F.interpolate(torch.from_numpy(coarse)[None], size=(11, 6, 7), mode="trilinear",
                          align_corners=False)[0].numpy()
    np.testing.assert_allclose(got, whole[(slice(None), *region)], atol=1e-6)
    i0, i1, w = linear_weights(5, 11)
    assert i0.min() == 0 and i1.max() == 4 and w.min() >= 0 and w.max() < 1


def test_rescale_needs_both_voxel_sizes(tmp_path):
    raw, _ = blob_volume((6, 8, 8), seed=1)
    plain = write_h5(tmp_path / "plain.h5", raw=raw)
    with pytest.raises(ConfigurationError, match=r"plain.h5: dataset 'raw': prediction.rescale needs the volume's "
                                                 r"voxel size.*set data.voxel_size"):
        predict(plain, tmp_path / "out", rescale=True)
    model = tiny_model()
    model.voxel_size = None
    with pytest.raises(ConfigurationError, match="prediction.rescale: the model's checkpoint records no voxel size"):
        predict(plain, tmp_path / "out", rescale=True, model=model, voxel_size=[1, 1, 1])
    # the same grid (within rounding): predicted as it is, equal to a run without rescale
    same = predict(plain, tmp_path / "same", rescale=True, voxel_size=[2.0, 0.5, 0.5])
    reference = predict(plain, tmp_path / "ref", rescale=False)
    with h5py.File(same, "r") as a, h5py.File(reference, "r") as b:
        np.testing.assert_array_equal(a["predictions"][()], b["predictions"][()])


def test_cli_predict_with_rescale_writes_the_input_grid_without_a_voxel_size_warning(tmp_path, command_line):
    import warnings

    from unet3d_lightning.cli import main
    from unet3d_lightning.data.datamodule import VoxelSizeWarning

    raw, label = blob_volume((8, 16, 16), seed=0)
    train = write_h5(tmp_path / "train.h5", raw=raw, label=label)
    with h5py.File(train, "r+") as f:
        f["raw"].attrs["element_size_um"] = [2.0, 0.5, 0.5]
    main(["fit", "--model.out_channels", "2", "--model.f_maps", "4", "--model.num_levels", "2",
          "--model.num_groups", "2", "--data.train_paths", f"[{train}]", "--data.train_patch_shape", "[8, 8, 8]",
          "--data.num_workers", "0", "--trainer.max_steps", "1", "--trainer.accelerator", "cpu",
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--checkpoint.dirpath", str(tmp_path / "ckpt"),
          "--trainer.default_root_dir", str(tmp_path / "runs")])
    coarse = write_h5(tmp_path / "coarse.h5", raw=raw[::2, ::2, ::2])
    with h5py.File(coarse, "r+") as f:
        f["raw"].attrs["element_size_um"] = [4.0, 1.0, 1.0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["predict", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--data.predict_paths", str(coarse),
              "--data.predict_patch_shape", "[8, 16, 16]", "--data.num_workers", "0", "--prediction.rescale", "true",
              "--prediction.output_dir", str(tmp_path / "out"), "--trainer.accelerator", "cpu"])
    assert not [w for w in caught if issubclass(w.category, VoxelSizeWarning)]
    with h5py.File(tmp_path / "out" / "coarse_predictions.h5", "r") as f:
        assert f["predictions"].shape == (2, 4, 8, 8)
