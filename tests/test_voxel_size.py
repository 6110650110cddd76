"""Voxel size: read from every format's own metadata (files written here with h5py, zarr, ome-zarr-py, tifffile and
nibabel, with known values), overridden by ``data.voxel_size``, recorded by training in the checkpoint, and compared
with each prediction volume's (one warning line naming both)."""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr

sys.path.insert(0, str(Path(__file__).parent))
from conftest import blob_volume, load_checkpoint_file, write_h5  # noqa: E402

from unet3d_lightning.data import io as volume_io  # noqa: E402
from unet3d_lightning.data.datamodule import VolumeDataModule, VoxelSizeWarning  # noqa: E402
from unet3d_lightning.data.spacing import (  # noqa: E402
    VoxelSize,
    common_voxel_size,
    describe,
    differs,
    mismatch_warning,
    scale_factors,
    unit_name,
)
from unet3d_lightning.data.volumes import open_volume  # noqa: E402
from unet3d_lightning.errors import ConfigurationError  # noqa: E402

RAW = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)


def read(path: Path, key: str = "raw") -> VoxelSize | None:
    return open_volume(path, "predict", key).voxel_size


# ----------------------------------------------------------------------------------------------- the pure helpers
def test_units_formatting_and_the_ten_percent_rule():
    assert unit_name("micron") == unit_name("µm") == unit_name("um") == unit_name("\\u00B5m") == "micrometer"
    assert unit_name("mm") == "millimeter" and unit_name("pixel") is None and unit_name(None) is None
    size = VoxelSize((4, 1, 1), "micron")
    assert size.zyx == (4.0, 1.0, 1.0) and size.unit == "micrometer"
    assert describe(size) == "(4.0, 1.0, 1.0) µm" and str(VoxelSize((2, 0.5, 0.5), "micrometer")) == \
        "(2.0, 0.5, 0.5) µm"
    assert describe(VoxelSize((1, 2, 3))) == "(1.0, 2.0, 3.0)" and describe(None) == "unknown"
    # 10 % on any axis: 1.1 is not more than 10 % above 1.0, 1.11 is
    assert not differs(VoxelSize((1.0, 1, 1)), VoxelSize((1.1 - 1e-9, 1, 1)))
    assert differs(VoxelSize((1, 1, 1.11)), VoxelSize((1, 1, 1)))
    assert not differs(None, VoxelSize((1, 1, 1)))
    # units are converted before comparing: 1000 nm is 1 µm
    assert not differs(VoxelSize((1000, 500, 500), "nanometer"), VoxelSize((1, 0.5, 0.5), "micrometer"))
    assert scale_factors(VoxelSize((4, 1, 1), "um"), VoxelSize((2, 0.5, 0.5), "um")) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError):
        VoxelSize((1, 0, 1))
    assert VoxelSize.from_dict(VoxelSize((3, 2, 1), "mm").as_dict()) == VoxelSize((3, 2, 1), "millimeter")
    message = mismatch_warning("predict volume a.h5", VoxelSize((4, 1, 1), "um"), VoxelSize((2, 0.5, 0.5), "um"))
    assert message.startswith("predict volume a.h5: voxel size (4.0, 1.0, 1.0) µm differs from the model's "
                              "(2.0, 0.5, 0.5) µm")
    assert "\n" not in message
    common, warning = common_voxel_size([("a", VoxelSize((1, 1, 1))), ("b", None), ("c", VoxelSize((1, 1, 2)))])
    assert common == VoxelSize((1, 1, 1)) and warning.startswith("c has voxel size (1.0, 1.0, 2.0) but a has")


# ----------------------------------------------------------------------------------------------- every format
def test_hdf5_element_size_um_and_resolution(tmp_path):
    path = write_h5(tmp_path / "plantseg.h5", raw=RAW, other=RAW, **{"group/inner": RAW})
    with h5py.File(path, "r+") as f:
        f["raw"].attrs["element_size_um"] = [0.235, 0.075, 0.075]  # PlantSeg's attribute, (z, y, x) in µm
        f["other"].attrs["resolution"] = [40, 4, 4]  # CREMI's, in nm
        f["other"].attrs["unit"] = "nm"
        f["group"].attrs["element_size_um"] = [1, 1, 4, 4]  # ilastik's, with a channel entry
    assert read(path) == VoxelSize((0.235, 0.075, 0.075), "micrometer")
    assert read(path, "other") == VoxelSize((40, 4, 4), "nanometer")
    assert read(path, "group/inner") == VoxelSize((1, 4, 4), "micrometer")  # from the group above the dataset
    plain = write_h5(tmp_path / "plain.h5", raw=RAW)
    assert read(plain) is None


def test_zarr_attribute_and_ome_zarr_scale(tmp_path):
    group = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    group.create_array("raw", data=RAW).attrs["element_size_um"] = [2.0, 0.5, 0.25]
    assert read(tmp_path / "a.zarr") == VoxelSize((2.0, 0.5, 0.25), "micrometer")

    # OME-Zarr written by ome-zarr-py (the reference implementation of NGFF), two levels of known scales
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    store = parse_url(str(tmp_path / "img.ome.zarr"), mode="w").store
    root = zarr.group(store=store)
    data = np.random.default_rng(0).random((1, 8, 16, 16), dtype=np.float32)
    write_image(data, root, axes="czyx", scale={"z": 2.0, "y": 0.5, "x": 0.5}, scale_factors=[2],
                axes_units={"z": "micrometer", "y": "micrometer", "x": "micrometer"})
    assert read(tmp_path / "img.ome.zarr", "") == VoxelSize((2.0, 0.5, 0.5), "micrometer")
    assert read(tmp_path / "img.ome.zarr", "s0") == VoxelSize((2.0, 0.5, 0.5), "micrometer")
    assert read(tmp_path / "img.ome.zarr", "s1") == VoxelSize((2.0, 1.0, 1.0), "micrometer")


def test_imagej_and_ome_tiff(tmp_path):
    path = tmp_path / "fiji.tif"
    # ImageJ hyperstack: XResolution/YResolution in pixels per unit, spacing = z step
    tifffile.imwrite(path, RAW, imagej=True, resolution=(1 / 0.25, 1 / 0.5),
                     metadata={"spacing": 3.0, "unit": "micron", "axes": "ZYX"})
    assert read(path) == VoxelSize((3.0, 0.5, 0.25), "micrometer")
    ome = tmp_path / "scope.ome.tif"
    tifffile.imwrite(ome, RAW, ome=True, photometric="minisblack", metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.3, "PhysicalSizeZ": 1.5,
        "PhysicalSizeZUnit": "µm", "PhysicalSizeYUnit": "nm", "PhysicalSizeXUnit": "µm"})
    size = read(ome)
    assert size.unit == "micrometer" and np.allclose(size.zyx, (1.5, 0.0003, 0.2))
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, RAW, metadata={"axes": "ZYX"})
    assert read(plain) is None


# ----------------------------------------------------------------------------------------------- settings and runs
def test_data_voxel_size_overrides_the_file_and_keeps_its_unit(tmp_path):
    path = write_h5(tmp_path / "a.h5", raw=RAW, label=(RAW > 90).astype(np.uint8))
    with h5py.File(path, "r+") as f:
        f["raw"].attrs["element_size_um"] = [1, 1, 1]
    dm = VolumeDataModule(train_paths=[str(path)], train_patch_shape=(4, 6, 8), num_workers=0, voxel_size=[3, 2, 2])
    dm.setup("fit")
    assert dm.volumes["train"][0].voxel_size == VoxelSize((3, 2, 2), "micrometer")
    assert dm.training_voxel_size == VoxelSize((3, 2, 2), "micrometer")
    with pytest.raises(ConfigurationError, match=r"data.voxel_size \[1, 0, 1\] must be three positive numbers"):
        VolumeDataModule(voxel_size=[1, 0, 1])


def test_training_volumes_of_different_voxel_sizes_get_one_warning(tmp_path):
    paths = []
    for name, size in (("a", [1, 1, 1]), ("b", [1.05, 1, 1]), ("c", [2, 1, 1])):
        raw, label = blob_volume((8, 12, 12), seed=len(paths))
        path = write_h5(tmp_path / f"{name}.h5", raw=raw, label=label)
        with h5py.File(path, "r+") as f:
            f["raw"].attrs["element_size_um"] = size
        paths.append(str(path))
    dm = VolumeDataModule(train_paths=paths, train_patch_shape=(8, 8, 8), num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.check("fit")
        dm.setup("fit")  # checks again: no second warning
    messages = [str(w.message) for w in caught if issubclass(w.category, VoxelSizeWarning)]
    assert len(messages) == 1, messages
    assert f"train volume {paths[2]} has voxel size (2.0, 1.0, 1.0) µm but train volume {paths[0]} has " \
           "(1.0, 1.0, 1.0) µm" in messages[0]


def test_fit_records_the_voxel_size_and_predict_warns_once_naming_both(tmp_path, capsys, command_line):
    from unet3d_lightning.cli import main

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
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    assert load_checkpoint_file(checkpoint)["voxel_size"] == {"zyx": [2.0, 0.5, 0.5], "unit": "micrometer"}

    coarse = write_h5(tmp_path / "coarse.h5", raw=raw)
    with h5py.File(coarse, "r+") as f:
        f["raw"].attrs["element_size_um"] = [4.0, 1.0, 1.0]
    same = write_h5(tmp_path / "same.h5", raw=raw)
    with h5py.File(same, "r+") as f:
        f["raw"].attrs["element_size_um"] = [2.1, 0.5, 0.5]  # within 10 %
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", f"[{coarse}, {same}]",
              "--data.predict_patch_shape", "[8, 16, 16]", "--data.num_workers", "0",
              "--prediction.output_dir", str(tmp_path / "out"), "--trainer.accelerator", "cpu"])
    messages = [str(w.message) for w in caught if issubclass(w.category, VoxelSizeWarning)]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"predict volume {coarse}: voxel size (4.0, 1.0, 1.0) µm differs from the "
                                  "model's (2.0, 0.5, 0.5) µm")
    assert (tmp_path / "out" / "coarse_predictions.h5").is_file()  # a warning, not an error


def test_a_checkpoint_without_a_voxel_size_and_a_volume_without_one_warn_nothing(tmp_path):
    path = write_h5(tmp_path / "a.h5", raw=RAW)
    dm = VolumeDataModule(predict_paths=[str(path)], predict_patch_shape=(4, 6, 8), num_workers=0)
    model = types.SimpleNamespace(in_channels=1, out_channels=2, ignore_index=None, spatial_dims=3,
                                  voxel_size=VoxelSize((1, 1, 1), "micrometer"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", VoxelSizeWarning)
        dm.check("predict", model)  # the volume records none: nothing to compare
        model.voxel_size = None
        dm.check("predict", model)
    assert volume_io.volume_format(path) == "hdf5"
