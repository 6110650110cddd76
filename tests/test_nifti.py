"""NIfTI in and out: ``.nii``/``.nii.gz`` volumes read as (z, y, x) (files written here with nibabel, the oracle),
labels in files of their own, the bad-input checks of the other formats, and ``--prediction.format nifti`` outputs
with the input's affine and header, equal to the HDF5 route, written atomically."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import h5py
import lightning.pytorch as pl
import nibabel
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import blob_volume, write_h5  # noqa: E402

from unet3d_lightning.data.datamodule import VolumeDataModule  # noqa: E402
from unet3d_lightning.data.volumes import open_volume  # noqa: E402
from unet3d_lightning.errors import ConfigurationError  # noqa: E402
from unet3d_lightning.module import UNet3DModule  # noqa: E402
from unet3d_lightning.prediction.callback import PredictionWriter  # noqa: E402

AFFINE = np.array([[-0.8, 0, 0, 10.0], [0, 0.9, 0, -5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])


def write_nifti(path: Path, zyx: np.ndarray, affine=AFFINE, qform_code=1, sform_code=4) -> Path:
    """Write a (z, y, x) or (c, z, y, x) array as NIfTI's (x, y, z[, c]), with an oblique-free affine whose qform
    and sform codes differ, so that keeping them is visible."""
    image = nibabel.Nifti1Image(np.ascontiguousarray(zyx.T), affine)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    image.header.set_xyzt_units("mm")
    nibabel.save(image, path)
    return path


def tiny_model(seed: int = 0) -> UNet3DModule:
    torch.manual_seed(seed)
    model = UNet3DModule(in_channels=1, out_channels=2, f_maps=4, num_levels=2, num_groups=2)
    with torch.no_grad():
        for p in model.net.parameters():
            p.mul_(3.0)
    return model.eval()


def predict(model, path: Path, out: Path, fmt: str, **writer_kwargs) -> PredictionWriter:
    writer = PredictionWriter(str(out), format=fmt, **writer_kwargs)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[writer])
    dm = VolumeDataModule(predict_paths=[str(path)], predict_patch_shape=[8, 8, 8], predict_stride_shape=[4, 6, 6],
                          batch_size=3, num_workers=0)
    trainer.predict(model, datamodule=dm, return_predictions=False)
    return writer


# --------------------------------------------------------------------------------------------- reading
def test_read_as_zyx_and_4d_as_czyx(tmp_path):
    raw = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    from unet3d_lightning.data.io import open_file

    with open_file(write_nifti(tmp_path / "a.nii", raw)) as f:
        view = f.array("ignored")
        assert view.shape == (5, 6, 7)
        np.testing.assert_array_equal(view[1:3, :, 2:5], raw[1:3, :, 2:5])
    four = np.stack([raw, raw * 2, raw * 3])  # (c, z, y, x)
    with open_file(write_nifti(tmp_path / "b.nii.gz", four)) as f:
        view = f.array("raw")
        assert view.shape == (3, 5, 6, 7)
        np.testing.assert_array_equal(view[:, 2:4], four[:, 2:4])
    assert nibabel.load(tmp_path / "b.nii.gz").shape == (7, 6, 5, 3)  # what the file holds: (x, y, z, c)
    volume = open_volume(tmp_path / "b.nii.gz", "predict", "raw")
    assert volume.channels == 3 and volume.spatial_shape == (5, 6, 7) and volume.raw_is_4d


def test_uncompressed_nifti_is_read_by_regions_compressed_read_once_with_a_note(tmp_path, monkeypatch, capsys):
    raw, label = blob_volume((8, 12, 12), seed=1)
    image = write_nifti(tmp_path / "case.nii", raw)
    seg = write_nifti(tmp_path / "case_seg.nii", label)

    whole_reads = []
    original = nibabel.arrayproxy.ArrayProxy.__array__

    def spy(self, *args, **kwargs):
        whole_reads.append(self.file_like)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nibabel.arrayproxy.ArrayProxy, "__array__", spy)
    dm = VolumeDataModule(train_paths=[str(image)], label_paths={"train": [str(seg)]}, train_patch_shape=(8, 8, 8),
                          num_workers=0, seed=0)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert whole_reads == []  # every read, the setup scan's and the patches', was a region of the memory map
    assert "note:" not in capsys.readouterr().err

    gz = write_nifti(tmp_path / "case.nii.gz", raw)
    gz_seg = write_nifti(tmp_path / "case_seg.nii.gz", label)
    dm = VolumeDataModule(train_paths=[str(gz)], label_paths={"train": [str(gz_seg)]}, train_patch_shape=(8, 8, 8),
                          num_workers=0, seed=0)
    dm.setup("fit")
    again = list(dm.train_dataloader())
    err = capsys.readouterr().err
    assert f"note: train volume {gz}: a compressed NIfTI file cannot be read piece by piece; it is read whole into " \
           "memory, 0 MiB" in err
    assert err.count(f"note: train volume {gz}:") == 1  # once per file and process
    assert all(torch.equal(a["raw"], b["raw"]) and torch.equal(a["label"], b["label"])
               for a, b in zip(batches, again))


# --------------------------------------------------------------------------------------------- bad inputs
def fit_error(tmp_path, raw_path, label_path=None, model=None, **kwargs) -> str:
    dm = VolumeDataModule(train_paths=[str(raw_path)], train_patch_shape=(8, 8, 8), num_workers=0,
                          label_paths=None if label_path is None else {"train": [str(label_path)]}, **kwargs)
    spec = {"in_channels": 1, "out_channels": 2, "ignore_index": None, **(model or {})}
    dm.trainer = types.SimpleNamespace(lightning_module=types.SimpleNamespace(**spec), world_size=1, global_rank=0)
    with pytest.raises(ConfigurationError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message and message == message.strip()
    return message


def good(shape=(8, 12, 12)):
    rng = np.random.default_rng(0)
    return rng.normal(size=shape).astype(np.float32), rng.integers(0, 2, shape).astype(np.uint8)


def test_bad_nifti_inputs_each_end_in_one_line(tmp_path):
    raw, label = good()
    image = write_nifti(tmp_path / "a.nii.gz", raw)
    seg = write_nifti(tmp_path / "a_seg.nii.gz", label[:, :, :11])
    message = fit_error(tmp_path, image, seg)
    assert f"volume {seg}: dataset 'label' has shape (8, 12, 11)" in message and "(8, 12, 12)" in message

    message = fit_error(tmp_path, image)  # labels must be in a file of their own
    assert f"train volume {image}: a NIfTI file holds one image" in message and "data.label_paths.train" in message

    seg = write_nifti(tmp_path / "b_seg.nii.gz", label)
    two = write_nifti(tmp_path / "two.nii.gz", np.stack([raw, raw]))
    message = fit_error(tmp_path, two, seg, model={"in_channels": 3})
    assert str(two) in message and "2 channel" in message and "in_channels=3" in message

    bad_label = label.copy()
    bad_label[3, 4, 5] = 3
    message = fit_error(tmp_path, image, write_nifti(tmp_path / "c_seg.nii.gz", bad_label))
    assert "dataset 'label'" in message and "class id 3" in message and "[0, 2)" in message

    for value, word in ((np.nan, "1 NaN"), (np.inf, "1 Inf")):
        bad = raw.copy()
        bad[6, 1, 2] = value
        path = write_nifti(tmp_path / f"bad_{word[2:]}.nii", bad)
        message = fit_error(tmp_path, path, seg)
        assert f"train volume {path}: dataset 'raw'" in message and word in message

    small = write_nifti(tmp_path / "small.nii.gz", raw[:, :, :6])
    message = fit_error(tmp_path, small, write_nifti(tmp_path / "small_seg.nii.gz", label[:, :, :6]))
    assert str(small) in message and "axis x" in message and "smaller than the patch" in message

    five = tmp_path / "five.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((12, 12, 8, 2, 3), np.float32), np.eye(4)), five)
    message = fit_error(tmp_path, five, seg)
    assert str(five) in message and "(12, 12, 8, 2, 3)" in message and "expected 3D (x, y, z) or 4D" in message

    text = tmp_path / "notes.nii"
    text.write_bytes(b"not a nifti file\n" * 40)
    message = fit_error(tmp_path, text, seg)
    assert str(text) in message and "cannot be read as a NIfTI file" in message

    content = write_nifti(tmp_path / "cut.nii", raw).read_bytes()
    (tmp_path / "cut.nii").write_bytes(content[: len(content) // 2])
    message = fit_error(tmp_path, tmp_path / "cut.nii", seg)
    assert str(tmp_path / "cut.nii") in message and "truncated NIfTI file" in message

    content = write_nifti(tmp_path / "cut.nii.gz", np.random.default_rng(1).normal(size=(8, 64, 64))).read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(content[: len(content) * 2 // 3])
    message = fit_error(tmp_path, tmp_path / "cut.nii.gz", write_nifti(tmp_path / "cut_seg.nii.gz",
                                                                        np.zeros((8, 64, 64), np.uint8)))
    assert str(tmp_path / "cut.nii.gz") in message and "cannot be read" in message

    message = fit_error(tmp_path, image, seg, weight_internal_path="weight")
    assert f"{seg}: a NIfTI label file holds only the labels" in message

    message = fit_error(tmp_path, tmp_path / "absent.nii.gz", seg)
    assert "absent.nii.gz" in message and "does not exist" in message


# --------------------------------------------------------------------------------------------- writing
@pytest.fixture(scope="module")
def volume():
    raw, _ = blob_volume((12, 16, 16), seed=4)
    return raw * 40 + 300


def read_nifti_zyx(path: Path) -> tuple[np.ndarray, nibabel.Nifti1Image]:
    image = nibabel.load(path)
    return np.asarray(image.dataobj).T, image  # (x, y, z[, C]) -> ([C,] z, y, x)


def test_nifti_output_has_the_input_affine_header_and_the_hdf5_values(tmp_path, volume):
    source = write_nifti(tmp_path / "case.nii.gz", volume)
    h5 = write_h5(tmp_path / "h5" / "case.h5", raw=volume)
    reference = predict(tiny_model(), h5, tmp_path / "ref", "hdf5", save_segmentation=True)
    with h5py.File(reference.written[0], "r") as f:
        expected, expected_seg = f["predictions"][()], f["segmentation"][()]

    writer = predict(tiny_model(), source, tmp_path / "out", "nifti", save_segmentation=True)
    final = tmp_path / "out" / "case_predictions.nii.gz"
    assert writer.written == [final]
    assert sorted(os.listdir(tmp_path / "out")) == ["case_predictions.nii.gz", "case_segmentation.nii.gz"]
    probabilities, image = read_nifti_zyx(final)
    assert image.shape == (16, 16, 12, 2) and image.get_data_dtype() == np.float32
    np.testing.assert_allclose(probabilities, expected, atol=1e-5, rtol=0)
    source_image = nibabel.load(source)
    np.testing.assert_array_equal(image.affine, source_image.affine)
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 4
    assert image.header.get_xyzt_units()[0] == "mm"
    segmentation, seg_image = read_nifti_zyx(tmp_path / "out" / "case_segmentation.nii.gz")
    assert seg_image.shape == (16, 16, 12) and seg_image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(segmentation, expected_seg)
    np.testing.assert_array_equal(seg_image.affine, source_image.affine)

    # a second run into the same directory replaces our earlier outputs; a foreign NIfTI file there is refused
    predict(tiny_model(), source, tmp_path / "out", "nifti", dtype="uint8")
    # the earlier segmentation, which the new predictions would not match, is gone with the earlier output
    assert sorted(os.listdir(tmp_path / "out")) == ["case_predictions.nii.gz"]
    image = nibabel.load(final)
    assert image.dataobj.get_unscaled().dtype == np.uint8  # 0..255 with scl_slope 1/255: readers see probabilities
    assert image.dataobj.slope == pytest.approx(1 / 255)
    np.testing.assert_allclose(image.get_fdata().T, expected, atol=1 / 255 / 2 + 1e-6)
    write_nifti(tmp_path / "out" / "case_segmentation.nii.gz", volume)  # another tool's file at our name
    with pytest.raises(ConfigurationError, match=r"case_segmentation.nii.gz is a NIfTI file that the writer did not "
                                                 r"write"):
        predict(tiny_model(), source, tmp_path / "out", "nifti", save_segmentation=True)


def test_nifti_output_of_a_non_nifti_input_has_the_affine_of_its_voxel_size(tmp_path, volume):
    path = write_h5(tmp_path / "cells.h5", raw=volume)
    with h5py.File(path, "r+") as f:
        f["raw"].attrs["element_size_um"] = [2.0, 0.5, 0.25]
    predict(tiny_model(), path, tmp_path / "out", "nifti")
    image = nibabel.load(tmp_path / "out" / "cells_predictions.nii.gz")
    np.testing.assert_array_equal(image.affine, np.diag([0.25, 0.5, 2.0, 1.0]))
    assert image.header.get_xyzt_units()[0] == "micron" and image.header.get_zooms()[:3] == (0.25, 0.5, 2.0)


class FailingModule(UNet3DModule):
    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 4:
            raise RuntimeError("simulated failure in the middle of a volume")
        return super().predict_step(batch, batch_idx, dataloader_idx)


def test_interrupted_nifti_output_leaves_nothing_under_the_final_names(tmp_path, volume, monkeypatch):
    source = write_nifti(tmp_path / "case.nii.gz", volume)
    torch.manual_seed(0)
    model = FailingModule(in_channels=1, out_channels=2, f_maps=4, num_levels=2, num_groups=2).eval()
    (tmp_path / "out").mkdir()  # made by the user: it stays, and must stay empty
    with pytest.raises(RuntimeError, match="simulated failure"):
        predict(model, source, tmp_path / "out", "nifti", save_segmentation=True)
    assert os.listdir(tmp_path / "out") == []

    # a failure while the finished files are written (the disk fills during the final pass)
    from unet3d_lightning.prediction.outputs import nifti as nifti_output

    def fail(self, dataset, target):
        target.write_bytes(b"partial")
        raise OSError("simulated failure while writing the NIfTI file")

    monkeypatch.setattr(nifti_output.NiftiStore, "_write", fail)
    with pytest.raises(OSError, match="simulated failure while writing"):
        predict(tiny_model(), source, tmp_path / "out", "nifti", save_segmentation=True)
    assert os.listdir(tmp_path / "out") == []


def test_fit_and_predict_through_the_cli_with_labels_in_their_own_nifti_files(tmp_path, command_line):
    from unet3d_lightning.cli import main

    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (tmp_path / folder).mkdir()
    for name, seed in (("case_00", 0), ("case_01", 1)):  # the nnU-Net layout: images and labels in two folders
        raw, label = blob_volume((8, 16, 16), seed=seed)
        write_nifti(tmp_path / "imagesTr" / f"{name}.nii.gz", raw)
        write_nifti(tmp_path / "labelsTr" / f"{name}.nii.gz", label)
    main(["fit", "--model.out_channels", "2", "--model.f_maps", "4", "--model.num_levels", "2",
          "--model.num_groups", "2", "--data.train_paths", str(tmp_path / "imagesTr"),
          "--data.label_paths", f"{{train: {tmp_path / 'labelsTr'}}}", "--data.train_patch_shape", "[8, 8, 8]",
          "--data.num_workers", "0", "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--checkpoint.dirpath", str(tmp_path / "ckpt"),
          "--trainer.default_root_dir", str(tmp_path / "runs")])
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    raw, _ = blob_volume((8, 16, 16), seed=5)
    test_case = write_nifti(tmp_path / "imagesTs" / "case_09.nii.gz", raw)
    write_h5(tmp_path / "h5" / "case_09.h5", raw=raw)
    common = ["--ckpt_path", str(checkpoint), "--data.predict_patch_shape", "[8, 16, 16]", "--data.num_workers", "0",
              "--trainer.accelerator", "cpu", "--prediction.save_segmentation", "true"]
    main(["predict", *common, "--data.predict_paths", str(test_case), "--prediction.format", "nifti",
          "--prediction.output_dir", str(tmp_path / "out")])
    main(["predict", *common, "--data.predict_paths", str(tmp_path / "h5" / "case_09.h5"),
          "--prediction.output_dir", str(tmp_path / "ref")])
    probabilities, image = read_nifti_zyx(tmp_path / "out" / "case_09_predictions.nii.gz")
    np.testing.assert_array_equal(image.affine, nibabel.load(test_case).affine)
    with h5py.File(tmp_path / "ref" / "case_09_predictions.h5", "r") as f:
        np.testing.assert_allclose(probabilities, f["predictions"][()], atol=1e-5, rtol=0)
        segmentation, _ = read_nifti_zyx(tmp_path / "out" / "case_09_segmentation.nii.gz")
        np.testing.assert_array_equal(segmentation, f["segmentation"][()])
