"""Volumes beyond HDF5: Zarr (v2, v3, OME-Zarr) and TIFF inputs, Zarr outputs.

The contract: a volume gives the same training patches and the same predictions whatever format stores it, the same
bad inputs end in the same one-line errors, inputs are never modified, and a Zarr output appears under its final name
only when complete. Files here are written with zarr, tifffile and h5py directly, not through the package.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import types
from pathlib import Path

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import tifffile
import torch
import zarr

from conftest import blob_volume, write_h5
from unet3d_lightning.data import io as volume_io
from unet3d_lightning.data.datamodule import VolumeDataModule
from unet3d_lightning.data.transforms import Augmentation
from unet3d_lightning.data.volumes import resolve_paths
from unet3d_lightning.errors import ConfigurationError
from unet3d_lightning.module import UNet3DModule
from unet3d_lightning.prediction.callback import PredictionWriter

SHAPE = (12, 16, 16)
PATCH = (8, 8, 8)
FORMATS = ["hdf5", "zarr2", "zarr3", "ome-zarr-0.4", "ome-zarr-0.5", "ome-zarr-tczyx-0.5", "tiff"]


# --------------------------------------------------------------------------------------------- writing the formats
def write_zarr(path: Path, zarr_format: int = 3, chunks=(4, 8, 8), **arrays: np.ndarray) -> Path:
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    for name, array in arrays.items():
        chunk = (1,) * (array.ndim - 3) + chunks if array.ndim >= 3 else array.shape
        group.create_array(name, shape=array.shape, dtype=array.dtype, chunks=chunk)[...] = array
    return path


def write_ome_zarr(path: Path, raw: np.ndarray, label: np.ndarray | None, version: str, tczyx: bool = False) -> Path:
    """An OME-Zarr image: levels '0' (full) and '1' (every 2nd voxel), and labels as the multiscale image
    'labels/cells'; NGFF 0.4 (Zarr v2, .zattrs) or 0.5 (Zarr v3, attributes under 'ome'); with ``tczyx`` the
    arrays are 5D with one time point and one channel, as many NGFF writers store them."""
    zarr_format = 2 if version == "0.4" else 3
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)

    def image(group, array):
        names = "tczyx" if tczyx else "zyx"
        kinds = {"t": "time", "c": "channel"}
        axes = [{"name": a, "type": kinds.get(a, "space")} for a in names]
        datasets = []
        for level, step in (("0", 1), ("1", 2)):
            level_array = array[::step, ::step, ::step]
            if tczyx:
                level_array = level_array[None, None]
            group.create_array(level, shape=level_array.shape, dtype=array.dtype,
                               chunks=(1,) * (level_array.ndim - 3) + (4, 8, 8))[...] = level_array
            scale = [1] * (len(names) - 3) + [step] * 3
            datasets.append({"path": level, "coordinateTransformations": [{"type": "scale", "scale": scale}]})
        multiscales = [{"axes": axes, "datasets": datasets, "name": "image"}]
        if version == "0.4":
            group.attrs["multiscales"] = [{"version": "0.4", **multiscales[0]}]
        else:
            group.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}

    image(root, raw)
    if label is not None:
        image(root.create_group("labels").create_group("cells"), label)
    return path


def store(tmp_path: Path, fmt: str, name: str, raw: np.ndarray, label: np.ndarray | None = None) -> dict:
    """Write raw (and label) in format ``fmt``; returns the datamodule arguments that read them."""
    if fmt == "hdf5":
        arrays = {"raw": raw} if label is None else {"raw": raw, "label": label}
        return {"paths": [str(write_h5(tmp_path / f"{name}.h5", **arrays))]}
    if fmt in ("zarr2", "zarr3"):
        arrays = {"raw": raw} if label is None else {"raw": raw, "label": label}
        return {"paths": [str(write_zarr(tmp_path / f"{name}.zarr", int(fmt[-1]), **arrays))]}
    if fmt.startswith("ome-zarr"):
        path = write_ome_zarr(tmp_path / f"{name}.ome.zarr", raw, label, fmt.rsplit("-", 1)[1], "tczyx" in fmt)
        return {"paths": [str(path)], "raw_internal_path": "0", "label_internal_path": "labels/cells"}
    assert fmt == "tiff"
    path = tmp_path / f"{name}.tif"
    tifffile.imwrite(path, raw, metadata={"axes": {4: "CZYX", 3: "ZYX", 2: "YX"}[raw.ndim]})
    args = {"paths": [str(path)]}
    if label is not None:
        tifffile.imwrite(tmp_path / f"{name}_label.tif", label)
        args["label_paths"] = [str(tmp_path / f"{name}_label.tif")]
    return args


def training(args: dict, **kwargs) -> VolumeDataModule:
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("train_patch_shape", PATCH)
    return VolumeDataModule(
        train_paths=args["paths"], val_paths=args["paths"], batch_size=2, seed=3,
        raw_internal_path=args.get("raw_internal_path", "raw"),
        label_internal_path=args.get("label_internal_path", "label"),
        label_paths={"train": args["label_paths"], "val": args["label_paths"]} if "label_paths" in args else None,
        **kwargs,
    )


def batches(dm: VolumeDataModule) -> list[dict]:
    dm.setup("fit")
    return list(dm.train_dataloader())


def attach_model(dm: VolumeDataModule, in_channels: int = 1, out_channels: int = 2) -> None:
    model = types.SimpleNamespace(in_channels=in_channels, out_channels=out_channels, ignore_index=None)
    dm.trainer = types.SimpleNamespace(lightning_module=model, world_size=1, global_rank=0)


# --------------------------------------------------------------------------------------------- same patches
@pytest.fixture(scope="module")
def reference_volume():
    raw, label = blob_volume(shape=SHAPE, seed=4)
    return raw * 40 + 300, label  # an offset and scale, so normalisation matters


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_training_patches_are_identical_whatever_the_format(tmp_path, reference_volume, fmt):
    raw, label = reference_volume
    expected = batches(training(store(tmp_path, "hdf5", "a", raw, label)))
    got = batches(training(store(tmp_path, fmt, "a", raw, label)))
    assert len(got) == len(expected) == 9  # 2 x 3 x 3 patches of 8^3 in 12 x 16 x 16, batches of 2
    for mine, theirs in zip(got, expected):
        assert torch.equal(mine["raw"], theirs["raw"]) and torch.equal(mine["label"], theirs["label"])
    # Independent check of one sample: the patch is the standardised volume at the first grid position (no
    # augmentation applied to that comparison, so use the validation set, which has none).
    dm = training(store(tmp_path, fmt, "a", raw, label))
    dm.setup("fit")
    first = dm.datasets["val"][0]
    x = raw.astype(np.float64)
    np.testing.assert_allclose(first["raw"][0].numpy(), ((x - x.mean()) / x.std())[:8, :8, :8], atol=1e-5)
    np.testing.assert_array_equal(first["label"].numpy(), label[:8, :8, :8])


def test_tiff_with_channels_by_its_axes_and_hdf5_labels(tmp_path):
    raw, label = blob_volume(shape=SHAPE, seed=5, channels=2)  # (2, D, H, W)
    reference = batches(training(store(tmp_path, "hdf5", "ref", raw, label)))
    # A (D, C, H, W) ImageJ hyperstack, labels in an HDF5 file of their own.
    tifffile.imwrite(tmp_path / "dc.tif", np.ascontiguousarray(raw.transpose(1, 0, 2, 3)), imagej=True,
                     metadata={"axes": "ZCYX"})
    labels = write_h5(tmp_path / "labels.h5", label=label)
    dm = training({"paths": [str(tmp_path / "dc.tif")], "label_paths": [str(labels)]})
    got = batches(dm)
    assert dm.volumes["train"][0].channels == 2 and dm.volumes["train"][0].label_path == labels
    for mine, theirs in zip(got, reference):
        assert torch.equal(mine["raw"], theirs["raw"]) and torch.equal(mine["label"], theirs["label"])


def test_zarr_and_tiff_workers_give_the_batches_of_the_main_process(tmp_path, reference_volume):
    raw, label = reference_volume
    for fmt in ("zarr3", "tiff"):
        args = store(tmp_path, fmt, "w", raw, label)
        serial = batches(training(args))
        parallel = batches(training(args, num_workers=2))
        assert all(torch.equal(a["raw"], b["raw"]) for a, b in zip(serial, parallel))


def test_inputs_are_opened_read_only_and_left_unchanged(tmp_path, reference_volume):
    raw, label = reference_volume
    zarr_args = store(tmp_path, "zarr3", "z", raw, label)
    tiff_args = store(tmp_path, "tiff", "t", raw, label)

    def digest(root: Path) -> str:
        files = sorted(p for p in [root, *root.rglob("*")] if p.is_file())
        return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()

    paths = [Path(zarr_args["paths"][0]), Path(tiff_args["paths"][0]), Path(tiff_args["label_paths"][0])]
    before = [digest(p) for p in paths]
    for args in (zarr_args, tiff_args):
        dm = training(args)
        batches(dm)
        volume = dm.volumes["train"][0]
        array = dm.datasets["train"]._files.dataset(volume, "raw")
        with pytest.raises(Exception):  # noqa: B017 - whichever error the library raises: no write goes through
            array[0:1] = 0
    assert [digest(p) for p in paths] == before


def test_in_memory_zarr_and_tiff(tmp_path, reference_volume):
    raw, label = reference_volume
    for fmt in ("zarr2", "tiff"):
        args = store(tmp_path, fmt, "m", raw, label)
        lazy = batches(training(args))
        dm = training(args, in_memory=True)
        held = batches(dm)
        np.testing.assert_array_equal(dm.volumes["train"][0].arrays["raw"], raw)
        assert all(torch.equal(a["raw"], b["raw"]) for a, b in zip(lazy, held))


# --------------------------------------------------------------------------------------------- same predictions
def tiny_model(seed: int = 0) -> UNet3DModule:
    torch.manual_seed(seed)
    model = UNet3DModule(in_channels=1, out_channels=2, f_maps=4, num_levels=2, num_groups=2)
    with torch.no_grad():
        for p in model.net.parameters():
            p.mul_(3.0)
    return model.eval()


def predict(model, args: dict, out: Path, fmt: str = "hdf5", **writer_kwargs) -> PredictionWriter:
    writer = PredictionWriter(str(out), format=fmt, **writer_kwargs)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, use_distributed_sampler=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[writer],
    )
    dm = VolumeDataModule(
        predict_paths=args["paths"], raw_internal_path=args.get("raw_internal_path", "raw"),
        predict_patch_shape=[8, 8, 8], predict_stride_shape=[4, 6, 6], batch_size=3, num_workers=0,
    )
    trainer.predict(model, datamodule=dm, return_predictions=False)
    return writer


def read_output(path: Path, name: str = "predictions") -> np.ndarray:
    if path.suffix == ".zarr":
        return zarr.open_group(str(path), mode="r")[name][...]
    with h5py.File(path, "r") as f:
        return f[name][()]


@pytest.fixture(scope="module")
def hdf5_prediction(tmp_path_factory, reference_volume):
    root = tmp_path_factory.mktemp("reference")
    raw, _ = reference_volume
    writer = predict(tiny_model(), store(root, "hdf5", "vol", raw), root / "out", save_segmentation=True)
    return read_output(writer.written[0]), read_output(writer.written[0], "segmentation")


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_predictions_are_the_same_whatever_the_input_format(tmp_path, reference_volume, hdf5_prediction, fmt):
    raw, _ = reference_volume
    writer = predict(tiny_model(), store(tmp_path, fmt, "vol", raw), tmp_path / "out")
    assert [p.name for p in writer.written] == ["vol_predictions.h5"]  # .ome.zarr / .tif dropped from the stem
    np.testing.assert_allclose(read_output(writer.written[0]), hdf5_prediction[0], atol=1e-6, rtol=0)


def test_zarr_output_equals_hdf5_output_chunked_and_compressed(tmp_path, reference_volume, hdf5_prediction):
    raw, _ = reference_volume
    writer = predict(tiny_model(), store(tmp_path, "zarr3", "vol", raw), tmp_path / "out", "zarr",
                     save_segmentation=True)
    final = tmp_path / "out" / "vol_predictions.zarr"
    assert writer.written == [final] and sorted(os.listdir(tmp_path / "out")) == ["vol_predictions.zarr"]
    group = zarr.open_group(str(final), mode="r")
    predictions = group["predictions"]
    assert predictions.shape == (2, *SHAPE) and predictions.dtype == np.float32
    assert predictions.chunks == (1, *SHAPE)  # one channel per chunk, the (16, 256, 256) chunk clipped to the volume
    (codec,) = predictions.compressors
    assert isinstance(codec, zarr.codecs.BloscCodec) and codec.cname.value == "zstd"
    np.testing.assert_allclose(predictions[...], hdf5_prediction[0], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(group["segmentation"][...], hdf5_prediction[1])
    np.testing.assert_array_equal(group["segmentation"][...], hdf5_prediction[0].argmax(0))


def test_zarr_output_in_several_chunk_rows_and_uint8(tmp_path, monkeypatch, reference_volume, hdf5_prediction):
    import unet3d_lightning.prediction.outputs.chunks as chunks_module

    monkeypatch.setattr(chunks_module, "CHUNK_ZYX", (5, 6, 7))  # rows of chunks end inside slabs, edge chunks
    raw, _ = reference_volume
    predict(tiny_model(), store(tmp_path, "hdf5", "vol", raw), tmp_path / "out", "zarr", dtype="uint8")
    predictions = zarr.open_group(str(tmp_path / "out" / "vol_predictions.zarr"), mode="r")["predictions"]
    assert predictions.chunks == (1, 5, 6, 7) and dict(predictions.attrs) == {"scale": 255.0}
    expected = np.clip(np.rint(hdf5_prediction[0] * 255), 0, 255)
    np.testing.assert_array_equal(predictions[...], expected)


class FailingModule(UNet3DModule):
    """Fails in the predict step of batch 4, after the first slabs of the volume were written."""

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 4:
            raise RuntimeError("simulated failure in the middle of a volume")
        return super().predict_step(batch, batch_idx, dataloader_idx)


def test_interrupted_zarr_output_leaves_nothing_under_the_final_name(tmp_path, monkeypatch, reference_volume):
    import unet3d_lightning.prediction.outputs.chunks as chunks_module

    monkeypatch.setattr(chunks_module, "CHUNK_ZYX", (2, 16, 16))  # every slab completes chunk rows: they are written
    written_rows = []
    original = chunks_module.ChunkRowDataset._write

    def spy(self, z0, rows):
        written_rows.append(z0)
        return original(self, z0, rows)

    monkeypatch.setattr(chunks_module.ChunkRowDataset, "_write", spy)
    raw, _ = reference_volume
    args = store(tmp_path, "hdf5", "vol", raw)
    out = tmp_path / "out"
    torch.manual_seed(0)
    failing = FailingModule(in_channels=1, out_channels=2, f_maps=4, num_levels=2, num_groups=2).eval()
    with pytest.raises(RuntimeError, match="simulated failure"):
        predict(failing, args, out, "zarr")
    assert written_rows  # the store had received chunks before the failure
    assert not out.exists()  # no store under the final name, no temporary one, nor the directory the run created
    # An earlier complete output under the final name is kept intact, then replaced by a successful run.
    predict(tiny_model(), args, out, "zarr")
    first = read_output(out / "vol_predictions.zarr")
    with pytest.raises(RuntimeError, match="simulated failure"):
        predict(failing, args, out, "zarr")
    assert os.listdir(out) == ["vol_predictions.zarr"]
    np.testing.assert_array_equal(read_output(out / "vol_predictions.zarr"), first)
    predict(tiny_model(seed=1), args, out, "zarr")
    assert os.listdir(out) == ["vol_predictions.zarr"]
    assert not np.array_equal(read_output(out / "vol_predictions.zarr"), first)


def test_zarr_output_options_are_checked(tmp_path):
    with pytest.raises(ConfigurationError, match="prediction.format 'n5' is not one of hdf5, zarr"):
        PredictionWriter(str(tmp_path), format="n5")
    with pytest.raises(ConfigurationError, match="lzf"):
        PredictionWriter(str(tmp_path), format="zarr", compression="lzf")


# --------------------------------------------------------------------------------------------- bad inputs
def setup_error(args: dict, model: dict | None = None, **kwargs) -> str:
    dm = training(args, **kwargs)
    attach_model(dm, **(model or {}))
    with pytest.raises(ConfigurationError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


BAD_FORMATS = ["zarr2", "zarr3", "tiff"]


def good(seed: int = 0, shape=(8, 12, 12)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32), rng.integers(0, 2, shape).astype(np.uint8)


@pytest.mark.parametrize("fmt", BAD_FORMATS)
def test_raw_label_spatial_shape_mismatch(tmp_path, fmt):
    raw, label = good()
    args = store(tmp_path, fmt, "a", raw, label[:, :, :11])
    message = setup_error(args)
    where = args.get("label_paths", args["paths"])[0]
    assert f"volume {where}:" in message and "'label'" in message and "(8, 12, 11)" in message
    assert "(8, 12, 12)" in message


@pytest.mark.parametrize("fmt", BAD_FORMATS)
def test_raw_channels_differ_from_model_in_channels(tmp_path, fmt):
    raw, label = good()
    args = store(tmp_path, fmt, "a", np.stack([raw, raw]), label)
    message = setup_error(args, model={"in_channels": 3})
    assert args["paths"][0] in message and "2 channel" in message and "in_channels=3" in message


@pytest.mark.parametrize("fmt", BAD_FORMATS)
def test_class_ids_outside_out_channels(tmp_path, fmt):
    raw, label = good()
    label[3, 4, 5] = 3
    args = store(tmp_path, fmt, "a", raw, label)
    message = setup_error(args, model={"out_channels": 3})
    where = args.get("label_paths", args["paths"])[0]
    assert f"volume {where}: dataset 'label'" in message and "class id 3" in message and "[0, 3)" in message


@pytest.mark.parametrize("fmt", BAD_FORMATS)
def test_nan_in_raw(tmp_path, fmt):
    raw, label = good()
    raw[6, 1, 2] = np.nan
    args = store(tmp_path, fmt, "a", raw, label)
    message = setup_error(args)
    assert f"volume {args['paths'][0]}: dataset 'raw'" in message and "1 NaN" in message


@pytest.mark.parametrize("name", ["absent.zarr", "absent.ome.zarr", "absent.tif"])
def test_missing_file(tmp_path, name):
    message = setup_error({"paths": [str(tmp_path / name)]})
    assert str(tmp_path / name) in message and "does not exist" in message


@pytest.mark.parametrize("fmt", BAD_FORMATS)
def test_inf_in_raw_and_volume_smaller_than_the_patch(tmp_path, fmt):
    raw, label = good()
    raw[1, 1, 2] = -np.inf
    args = store(tmp_path, fmt, "a", raw, label)
    message = setup_error(args)
    assert f"volume {args['paths'][0]}: dataset 'raw'" in message and "1 Inf" in message
    raw, label = good(shape=(8, 12, 6))
    args = store(tmp_path, fmt, "b", raw, label)
    message = setup_error(args)
    assert args["paths"][0] in message and "axis x" in message and "smaller than the patch" in message


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_negative_weights_in_zarr(tmp_path, zarr_format):
    raw, label = good()
    weight = np.ones(raw.shape, np.float32)
    weight[7, 11, 11] = -0.25
    path = write_zarr(tmp_path / "a.zarr", zarr_format, raw=raw, label=label, weight=weight)
    message = setup_error({"paths": [str(path)]}, weight_internal_path="weight")
    assert str(path) in message and "'weight'" in message and "1 negative" in message and "-0.25" in message


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_missing_zarr_array_lists_the_existing_ones(tmp_path, zarr_format):
    raw, label = good()
    path = write_zarr(tmp_path / "a.zarr", zarr_format, raw=raw, **{"seg/classes": label})
    message = setup_error({"paths": [str(path)]})
    assert str(path) in message and "'label'" in message and "does not exist" in message
    assert "'raw'" in message and "'seg/classes'" in message


def test_zarr_group_that_is_not_an_image(tmp_path):
    raw, label = good()
    path = write_zarr(tmp_path / "a.zarr", raw=raw, **{"label/inner": label})
    message = setup_error({"paths": [str(path)]})
    assert str(path) in message and "'label' is not a dataset" in message and "'label/inner'" in message


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_damaged_zarr_chunk_names_the_dataset(tmp_path, zarr_format):
    raw, label = good()
    path = write_zarr(tmp_path / "a.zarr", zarr_format, raw=raw, label=label)
    chunk = (path / "raw" / "1.0.0") if zarr_format == 2 else (path / "raw" / "c" / "1" / "0" / "0")
    assert chunk.is_file()
    chunk.write_bytes(b"\xff" * 64)
    message = setup_error({"paths": [str(path)]})
    assert str(path) in message and "'raw'" in message and "cannot be read" in message and "corrupt" in message


def test_damaged_zarr_metadata(tmp_path):
    raw, label = good()
    path = write_zarr(tmp_path / "a.zarr", raw=raw, label=label)
    (path / "zarr.json").write_text("{not json")
    message = setup_error({"paths": [str(path)]})
    assert str(path) in message and "cannot be read as a Zarr store" in message


def test_file_that_is_not_tiff_and_truncated_tiff(tmp_path):
    raw, label = good()
    bad = tmp_path / "notes.tif"
    bad.write_bytes(b"this is a text file, not TIFF\n" * 20)
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "notes.tif").write_bytes(bad.read_bytes())
    message = setup_error({"paths": [str(bad)], "label_paths": [str(labels / "notes.tif")]})
    assert str(bad) in message and "cannot be read as a TIFF file" in message

    args = store(tmp_path, "tiff", "t", raw, label)
    content = Path(args["paths"][0]).read_bytes()
    Path(args["paths"][0]).write_bytes(content[: len(content) // 2])
    message = setup_error(args)
    assert args["paths"][0] in message and ("cannot be read" in message or "shape" in message)


def test_tiff_without_label_file_and_label_count_mismatch(tmp_path):
    raw, label = good()
    args = store(tmp_path, "tiff", "a", raw, label)
    message = setup_error({"paths": args["paths"]})
    assert args["paths"][0] in message and "data.label_paths.train" in message
    other = tmp_path / "other_label.tif"
    tifffile.imwrite(other, label)
    message = setup_error({"paths": args["paths"], "label_paths": [*args["label_paths"], str(other)]})
    assert "data.label_paths.train expands to 2 file(s)" in message and "1 volume(s)" in message
    with pytest.raises(ConfigurationError, match=r"data.label_paths has the role\(s\) \['predict'\]"):
        VolumeDataModule(label_paths={"predict": ["x.tif"]})


def test_tiff_axes_that_are_not_a_stack(tmp_path):
    raw, label = good()
    path = tmp_path / "time.tif"
    tifffile.imwrite(path, np.stack([raw, raw, raw]), metadata={"axes": "TZYX"})
    message = setup_error({"paths": [str(path)], "label_paths": [str(write_h5(tmp_path / "l.h5", label=label))]})
    assert str(path) in message and "TZYX" in message and "(C, D, H, W)" in message


def test_tiff_read_whole_when_its_layout_has_no_zarr_view(tmp_path, monkeypatch, reference_volume):
    raw, label = reference_volume
    args = store(tmp_path, "tiff", "a", raw, label)
    expected = batches(training(args))

    def refuse(self, *a, **k):
        raise ValueError("layout not supported")

    monkeypatch.setattr(tifffile.TiffPageSeries, "aszarr", refuse)
    with pytest.warns(UserWarning, match=r"read whole into memory, 0 MiB") as record:
        got = batches(training(args))
    assert str(args["paths"][0]) in str(record[0].message)
    assert all(torch.equal(a["raw"], b["raw"]) for a, b in zip(got, expected))


def test_missing_formats_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    raw, label = good()
    path = write_zarr(tmp_path / "a.zarr", raw=raw, label=label)
    monkeypatch.setitem(sys.modules, "zarr", None)  # import zarr now raises ImportError
    message = setup_error({"paths": [str(path)]})
    assert str(path) in message and "'formats' extra" in message and "unet3d-lightning[formats]" in message
    with pytest.raises(ConfigurationError, match=r"prediction.format zarr needs zarr"):
        PredictionWriter(str(tmp_path), format="zarr")


# --------------------------------------------------------------------------------------------- paths
def test_paths_zarr_stores_are_volumes_and_directories_are_scanned_for_every_format(tmp_path):
    raw, label = good()
    folder = tmp_path / "volumes [1]"
    h5 = write_h5(folder / "b.h5", raw=raw)
    store_v3 = write_zarr(folder / "a.zarr", raw=raw)
    ome = write_ome_zarr(folder / "c.ome.zarr", raw, None, "0.4")
    tif = folder / "d.tif"
    tifffile.imwrite(tif, raw)
    (folder / "notes.txt").write_text("ignored")
    assert resolve_paths([folder], "train") == [store_v3, h5, ome, tif]
    assert resolve_paths([store_v3], "train") == [store_v3]  # a store given alone is a volume, not a folder
    pattern = str(folder).replace("[", "[[]") + "/*.zarr"
    assert resolve_paths([pattern], "train") == [store_v3, ome]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigurationError, match="holds no HDF5 file, Zarr store or TIFF file"):
        resolve_paths([empty], "train")
    assert [volume_io.volume_format(p) for p in (h5, store_v3, ome, tif)] == ["hdf5", "zarr", "zarr", "tiff"]
    assert volume_io.volume_stem(ome) == "c" and volume_io.volume_stem(tif) == "d"


# --------------------------------------------------------------------------------------------- CLI and DDP
def test_cli_predict_to_zarr_from_a_tiff(tmp_path, monkeypatch, reference_volume, hdf5_prediction):
    from unet3d_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["unet3d"])
    raw, label = reference_volume
    data = store(tmp_path, "hdf5", "train", raw, label)
    main(args=["fit", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.logger", "false",
               "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "runs"),
               "--model.out_channels", "2", "--model.f_maps", "4", "--model.num_levels", "2", "--model.num_groups", "2",
               "--data.train_paths", f"[{data['paths'][0]}]", "--data.val_paths", f"[{data['paths'][0]}]",
               "--data.train_patch_shape", "[8, 8, 8]", "--data.num_workers", "0",
               "--checkpoint.dirpath", str(tmp_path / "ckpt")])
    tiff = store(tmp_path, "tiff", "vol", raw)
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    for fmt in ("hdf5", "zarr"):
        main(args=["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", f"[{tiff['paths'][0]}]",
                   "--data.predict_patch_shape", "[8, 8, 8]", "--data.num_workers", "0", "--trainer.accelerator",
                   "cpu", "--trainer.enable_progress_bar", "false", "--prediction.output_dir", str(tmp_path / "out"),
                   "--prediction.format", fmt])
    zarr_output = read_output(tmp_path / "out" / "vol_predictions.zarr")
    assert zarr_output.shape == (2, *SHAPE)
    np.testing.assert_array_equal(zarr_output, read_output(tmp_path / "out" / "vol_predictions.h5"))


@pytest.mark.slow
def test_ddp_predict_to_zarr_equals_one_device(tmp_path, monkeypatch):
    from test_cli import subprocess_env, unet3d_command
    from unet3d_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["unet3d"])
    raw, label = blob_volume(shape=(8, 24, 24), seed=0)
    train = write_zarr(tmp_path / "train.zarr", zarr_format=2, raw=raw, label=label)
    main(args=["fit", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.logger", "false",
               "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "runs"),
               "--model.out_channels", "2", "--model.f_maps", "4", "--model.num_levels", "2", "--model.num_groups", "2",
               "--data.train_paths", f"[{train}]", "--data.val_paths", f"[{train}]",
               "--data.train_patch_shape", "[8, 12, 12]", "--data.num_workers", "0",
               "--checkpoint.dirpath", str(tmp_path / "ckpt")])
    volume_a = write_zarr(tmp_path / "a.zarr", raw=blob_volume(shape=(24, 20, 20), seed=7)[0])  # 3 patches: odd
    tifffile.imwrite(tmp_path / "b.tif", blob_volume(shape=(6, 20, 20), seed=8)[0])  # 1 patch: the second rank pads
    outputs = {}
    for devices in ("1", "2"):
        out = tmp_path / f"out_{devices}"
        result = subprocess.run(
            [*unet3d_command(), "predict", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
             "--data.predict_paths", f"[{volume_a}, {tmp_path / 'b.tif'}]", "--data.predict_patch_shape",
             "[16, 20, 20]", "--data.predict_stride_shape", "[4, 20, 20]", "--data.num_workers", "0",
             "--prediction.output_dir", str(out), "--prediction.format", "zarr", "--prediction.blend", "gaussian",
             "--prediction.save_segmentation", "true", "--trainer.accelerator", "cpu", "--trainer.devices", devices,
             "--trainer.strategy", "ddp"],
            capture_output=True, text=True, env=subprocess_env(), timeout=300,
        )
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        outputs[devices] = out
    for name, shape in (("a", (24, 20, 20)), ("b", (6, 20, 20))):
        single = read_output(outputs["1"] / f"{name}_predictions.zarr")
        double = read_output(outputs["2"] / f"{name}_predictions.zarr")
        assert single.shape == (2, *shape)
        np.testing.assert_allclose(double, single, atol=1e-5, rtol=0)
        np.testing.assert_allclose(single.sum(0), 1.0, atol=1e-5)
    assert sorted(os.listdir(outputs["2"])) == ["a_predictions.zarr", "b_predictions.zarr"]  # no temporaries


def test_2d_images_in_zarr_and_tiff_are_one_slice_volumes(tmp_path):
    raw, label = blob_volume(shape=(1, 16, 16), seed=9)
    raw, label = raw[0], label[0]
    common = {"train_patch_shape": (1, 8, 8), "augmentation": Augmentation(rotate90=False)}
    expected = batches(training(store(tmp_path, "hdf5", "image", raw, label), **common))
    for fmt in ("zarr2", "tiff"):
        args = store(tmp_path, fmt, "image", raw, label)
        dm = training(args, **common)
        got = batches(dm)
        assert dm.volumes["train"][0].spatial_shape == (1, 16, 16) and len(got) == len(expected) == 5
        for mine, theirs in zip(got, expected):
            assert torch.equal(mine["raw"], theirs["raw"]) and torch.equal(mine["label"], theirs["label"])


# --------------------------------------------------------------------------------------------- chunk cache
def test_cached_zarr_reads_equal_numpy_indexing_through_evictions(tmp_path):
    rng = np.random.default_rng(11)
    data = rng.normal(size=(2, 13, 17, 19)).astype(np.float32)
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="w")
    group.create_array("raw", shape=data.shape, dtype=data.dtype, chunks=(1, 4, 5, 6))[...] = data
    # room for about 12 chunks of 480 bytes: regions evict each other, and regions over half of it bypass the cache
    cached = volume_io.CachedChunks(group["raw"], max_bytes=12 * 480)
    assert cached.shape == data.shape and cached.chunks == (1, 4, 5, 6) and cached.dtype == np.float32
    for _ in range(300):
        index = []
        for n in data.shape:
            a, b = sorted(rng.integers(0, n + 1, 2))
            index.append(int(rng.integers(-n, n)) if rng.random() < 0.15 else slice(int(a), int(b) + 1))
        index = tuple(index)
        got = cached[index]
        np.testing.assert_array_equal(got, data[index])
        if got.size:
            got.flat[0] += 1  # a returned region is the caller's own: changing it changes no later read
    np.testing.assert_array_equal(cached[()], data)
    np.testing.assert_array_equal(cached[:, 2:9:3], data[:, 2:9:3])  # steps go to zarr directly
    assert cached._bytes <= cached.max_bytes and cached._cache


# --------------------------------------------------------------------------------------------- the io layer
def test_the_registry_tells_formats_and_volumes_apart(tmp_path):
    (tmp_path / "named.zarr").write_text("a file, not a store")  # a Zarr volume is a directory
    (tmp_path / "folder.h5").mkdir()  # an HDF5 volume is a file
    disguised = tmp_path / "store.h5"  # a directory holding a store's metadata is a store, whatever its name
    zarr.open_group(str(disguised), mode="w").create_array("raw", data=np.zeros((2, 3, 4), np.float32))
    (tmp_path / "README.txt").write_text("notes")
    (tmp_path / "scan.TIFF").write_bytes(b"")
    cases = {"named.zarr": ("zarr", False), "folder.h5": ("hdf5", False), "store.h5": ("zarr", True),
             "README.txt": ("hdf5", False), "scan.TIFF": ("tiff", True)}
    for name, (fmt, volume) in cases.items():
        assert volume_io.volume_format(tmp_path / name) == fmt, name
        assert volume_io.is_volume(tmp_path / name) is volume, name
    with volume_io.open_file(disguised, "train") as f:
        assert isinstance(f, volume_io.ZarrFile) and f.array("raw").shape == (2, 3, 4)
    assert [reader.format for reader in volume_io.READERS] == ["zarr", "tiff", "nifti", "hdf5"]


def test_the_io_layer_imports_nothing_above_it_and_defines_each_suffix_once():
    """volumes -> io, never the reverse: the readers import neither volumes nor the DataModule (the circle of the
    former readers and volumes modules), and the suffix constants are the readers' own."""
    import ast

    from unet3d_lightning.data import readers, volumes

    package = Path(volume_io.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                # ``from ..x`` would reach into data (volumes, the DataModule); only the package's errors module is
                # imported from above io
                assert node.level < 2 or node.level == 3 and node.module == "errors", (path.name, node.module)
                assert node.level or not (node.module or "").startswith("unet3d_lightning"), (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("unet3d_lightning") for a in node.names), path.name
    assert volumes.HDF5_SUFFIXES is volume_io.HDF5_SUFFIXES is volume_io.HDF5File.suffixes
    assert readers.open_file is volume_io.open_file and readers.volume_stem is volume_io.volume_stem
    assert volume_io.TIFF_SUFFIXES is volume_io.TiffFile.suffixes
