"""TIFF outputs (``--prediction.format tiff``): ImageJ hyperstacks read back with tifffile."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import blob_volume, cli_error_line, write_h5

tifffile = pytest.importorskip("tifffile")

SHAPE = (8, 24, 20)


def predict_args(checkpoint, inputs, output_dir, *extra):
    return ["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", f"[{inputs}]",
            "--data.predict_patch_shape", "[8, 16, 16]", "--prediction.output_dir", str(output_dir),
            "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            *extra]


def run(args):
    from unet3d_lightning.cli import main

    main(args)


def test_tiff_output_is_an_imagej_hyperstack_with_the_hdf5_data(one_step_fit, command_line, tmp_path):
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    volume = write_h5(tmp_path / "in" / "x.h5", raw=raw)
    run(predict_args(checkpoint, volume, tmp_path / "h5", "--prediction.save_segmentation", "true"))
    run(predict_args(checkpoint, volume, tmp_path / "tif", "--prediction.save_segmentation", "true",
                     "--prediction.format", "tiff"))
    with h5py.File(tmp_path / "h5" / "x_predictions.h5", "r") as f:
        expected, segmentation = f["predictions"][...], f["segmentation"][...]
    with tifffile.TiffFile(tmp_path / "tif" / "x_predictions.tif") as tif:
        assert tif.is_imagej and not tif.is_bigtiff
        series = tif.series[0]
        assert series.axes == "ZCYX" and series.shape == (8, 2, 24, 20)
        data = series.asarray()
        metadata = tif.imagej_metadata
        page = tif.pages[0]
        assert data.dtype == np.float32
        assert metadata["slices"] == 8 and metadata["channels"] == 2 and metadata["spacing"] == 1.0
        assert page.tags["XResolution"].value == (1, 1) and page.tags["YResolution"].value == (1, 1)
    np.testing.assert_array_equal(np.moveaxis(data, 1, 0), expected)
    with tifffile.TiffFile(tmp_path / "tif" / "x_segmentation.tif") as tif:
        assert tif.is_imagej and tif.series[0].axes == "ZYX"
        np.testing.assert_array_equal(tif.series[0].asarray(), segmentation)
    assert sorted(p.name for p in (tmp_path / "tif").iterdir()) == ["x_predictions.tif", "x_segmentation.tif"]


def test_voxel_size_gives_the_imagej_spacing_and_resolution(tmp_path):
    """Written through VolumeOutput with a known voxel size; uint8 predictions keep their scale in the description."""
    from unet3d_lightning.prediction.outputs import VolumeOutput

    final = tmp_path / "v_predictions.tif"
    values = np.random.default_rng(0).random((3, 5, 12, 10), dtype=np.float32)
    output = VolumeOutput(final, (5, 12, 10), 3, "uint8", "threshold", "gzip", None, "tiff",
                          voxel_size=(2.5, 0.25, 0.5), unit="micrometer")
    output.write(0, 2, values[:, :2], None)
    output.write(2, 5, values[:, 2:], None)
    output.commit()
    with tifffile.TiffFile(final) as tif:
        metadata = tif.imagej_metadata
        assert metadata["spacing"] == 2.5 and metadata["unit"] == "um" and metadata["scale"] == 255.0
        page = tif.pages[0]
        x = page.tags["XResolution"].value
        y = page.tags["YResolution"].value
        assert x[0] / x[1] == pytest.approx(1 / 0.5) and y[0] / y[1] == pytest.approx(1 / 0.25)
        data = tif.series[0].asarray()
    assert data.dtype == np.uint8
    np.testing.assert_array_equal(np.moveaxis(data, 1, 0), np.clip(np.rint(values * 255), 0, 255).astype(np.uint8))
    with tifffile.TiffFile(tmp_path / "v_segmentation.tif") as tif:
        assert tif.series[0].axes == "ZCYX" and tif.imagej_metadata["spacing"] == 2.5
        np.testing.assert_array_equal(np.moveaxis(tif.series[0].asarray(), 1, 0), (values > 0.5).astype(np.uint8))


def test_above_4_gb_the_file_is_a_bigtiff_with_the_imagej_description(tmp_path, monkeypatch):
    """The threshold, lowered so that a small file crosses it: BigTIFF, every plane a page, the ImageJ metadata."""
    from unet3d_lightning.prediction.outputs import VolumeOutput, tiff

    monkeypatch.setattr(tiff, "BIGTIFF_ABOVE", 1000)
    final = tmp_path / "v_predictions.tif"
    values = np.random.default_rng(2).random((2, 4, 16, 16), dtype=np.float32)
    output = VolumeOutput(final, (4, 16, 16), 2, "float32", None, None, None, "tiff", voxel_size=(3.0, 1.0, 1.0),
                          unit="um")
    output.write(0, 4, values, None)
    output.commit()
    with tifffile.TiffFile(final) as tif:
        assert tif.is_bigtiff and tif.is_imagej and len(tif.pages) == 8
        assert tif.imagej_metadata["spacing"] == 3.0
        np.testing.assert_array_equal(np.moveaxis(tif.series[0].asarray(), 1, 0), values)


def test_interrupted_prediction_leaves_nothing(one_step_fit, command_line, tmp_path, monkeypatch):
    from unet3d_lightning.module import UNet3DModule

    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    volume = write_h5(tmp_path / "in" / "x.h5", raw=raw)
    step = UNet3DModule.predict_step
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the device fell over")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(UNet3DModule, "predict_step", failing)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises((RuntimeError, SystemExit)):
        run(predict_args(checkpoint, volume, out, "--prediction.format", "tiff", "--data.batch_size", "1",
                         "--prediction.save_segmentation", "true", "--prediction.preview", "true"))
    assert len(calls) == 3
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_second_run_replaces_ours_and_foreign_tiffs_are_refused(one_step_fit, command_line, tmp_path, capsys):
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    write_h5(tmp_path / "in" / "x.h5", raw=raw)
    out = tmp_path / "out"
    args = predict_args(checkpoint, tmp_path / "in", out, "--prediction.format", "tiff",
                        "--prediction.save_segmentation", "true")
    run(args)
    first = tifffile.imread(out / "x_predictions.tif")
    inode = (out / "x_predictions.tif").stat().st_ino
    run(args)
    assert (out / "x_predictions.tif").stat().st_ino != inode  # a new file renamed into place
    np.testing.assert_array_equal(tifffile.imread(out / "x_predictions.tif"), first)
    assert sorted(p.name for p in out.iterdir()) == ["x_predictions.tif", "x_segmentation.tif"]
    # A user's own TIFF at the segmentation's name (a label file beside its image, say): refused, untouched.
    tifffile.imwrite(out / "x_segmentation.tif", np.ones((4, 4, 4), np.uint8), imagej=True)
    before = (out / "x_segmentation.tif").read_bytes()
    last = cli_error_line(capsys, args)
    assert f"prediction output {out / 'x_segmentation.tif'}" in last and "not written by unet3d" in last, last
    assert (out / "x_segmentation.tif").read_bytes() == before
    # ... and one at the predictions' name.
    (out / "x_segmentation.tif").unlink()
    (out / "x_predictions.tif").write_bytes(b"not a tiff")
    last = cli_error_line(capsys, args)
    assert f"prediction output {out / 'x_predictions.tif'}" in last and "cannot be read as TIFF" in last, last


def test_float16_is_refused_for_tiff(one_step_fit, command_line, tmp_path, capsys):
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    volume = write_h5(tmp_path / "x.h5", raw=raw)
    last = cli_error_line(capsys, predict_args(checkpoint, volume, tmp_path / "out", "--prediction.format", "tiff",
                                               "--prediction.dtype", "float16"))
    assert "prediction.dtype float16" in last and "float32 or uint8" in last, last


def test_instance_ids_beyond_uint16_are_a_plain_uint32_tiff(tmp_path):
    """ImageJ has no uint32: instance ids go into a plain multi-page TIFF with the same spacing and resolution."""
    from unet3d_lightning.prediction.outputs import ChunkRowDataset, TiffStore

    final = tmp_path / "v_predictions.tif"
    from unet3d_lightning.prediction.paths import temporary_path

    store = TiffStore(temporary_path(final), None, voxel_size=(2.0, 0.5, 0.5), unit="um")
    ids = np.arange(3 * 6 * 5, dtype=np.uint32).reshape(3, 6, 5) + 70_000
    dataset = ChunkRowDataset(store, "instances", ids.shape, "uint32", None)
    dataset.add(0, 3, ids)
    dataset.close()
    predictions = ChunkRowDataset(store, "predictions", (1, 3, 6, 5), "float32", None)
    predictions.add(0, 3, np.zeros((1, 3, 6, 5), np.float32))
    predictions.close()
    store.close()
    store.replace(temporary_path(final), final)
    with tifffile.TiffFile(tmp_path / "v_instances.tif") as tif:
        assert not tif.is_imagej and tif.series[0].axes == "ZYX"
        assert tif.shaped_metadata[0]["spacing"] == 2.0
        assert tif.pages[0].tags["XResolution"].value == (2, 1)
        np.testing.assert_array_equal(tif.series[0].asarray(), ids)


def test_the_inputs_voxel_size_is_the_imagej_spacing(one_step_fit, command_line, tmp_path):
    """Through the command: an HDF5 raw with PlantSeg's ``element_size_um`` gives the spacing and resolution."""
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    volume = write_h5(tmp_path / "in" / "x.h5", raw=raw)
    with h5py.File(volume, "r+") as f:
        f["raw"].attrs["element_size_um"] = [2.0, 0.25, 0.5]
    run(predict_args(checkpoint, volume, tmp_path / "tif", "--prediction.format", "tiff"))
    with tifffile.TiffFile(tmp_path / "tif" / "x_predictions.tif") as tif:
        assert tif.imagej_metadata["spacing"] == 2.0 and tif.imagej_metadata["unit"] == "um"
        x = tif.pages[0].tags["XResolution"].value
        y = tif.pages[0].tags["YResolution"].value
        assert x[0] / x[1] == pytest.approx(2.0) and y[0] / y[1] == pytest.approx(4.0)


def test_a_segmentation_file_that_is_an_input_is_never_written(one_step_fit, command_line, tmp_path, capsys):
    """Predicting a folder that holds x.tif and our own earlier x_segmentation.tif into itself: the second is an
    input now, and the prediction of x would replace it."""
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    folder = tmp_path / "data"
    folder.mkdir()
    tifffile.imwrite(folder / "x.tif", raw)
    run(predict_args(checkpoint, folder / "x.tif", folder, "--prediction.format", "tiff",
                     "--prediction.save_segmentation", "true"))
    (folder / "x_predictions.tif").unlink()
    before = (folder / "x_segmentation.tif").read_bytes()
    last = cli_error_line(capsys, predict_args(checkpoint, folder, folder, "--prediction.format", "tiff"))
    assert f"would write {folder / 'x_segmentation.tif'}, which is the input" in last, last
    assert (folder / "x_segmentation.tif").read_bytes() == before


def test_instances_read_the_complete_tiff_back_and_equal_the_hdf5_outputs(tmp_path):
    """The watershed reads the finished predictions file back; its ids land in <stem>_instances.tif."""
    from unet3d_lightning.instances import WatershedOptions
    from unet3d_lightning.prediction.outputs import VolumeOutput

    maps = np.zeros((2, 4, 16, 16), np.float32)
    maps[1, :, 2:14, 2:14] = 1.0  # foreground
    maps[0, :, :, 7:9] = 1.0  # a boundary between two objects
    spec = {"kind": "boundaries", "foreground_channel": True}
    for fmt, name in (("hdf5", "v_predictions.h5"), ("tiff", "v_predictions.tif")):
        output = VolumeOutput(tmp_path / name, (4, 16, 16), 2, "float32", None, "gzip", None, fmt,
                              instances=(spec, WatershedOptions(min_size=1)))
        output.write(0, 1, maps[:, :1], None)
        output.write(1, 4, maps[:, 1:], None)
        output.commit()
    with h5py.File(tmp_path / "v_predictions.h5", "r") as f:
        expected = f["instances"][...]
    assert len(np.unique(expected)) == 3
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "v_instances.tif"), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v_instances.tif", "v_predictions.h5", "v_predictions.tif"]


def test_temporaries_of_a_killed_tiff_or_preview_writer_are_removed(tmp_path):
    """The files beside a TIFF output, and the preview, are unfinished outputs like the others once their process
    has ended."""
    import subprocess
    import sys

    from unet3d_lightning.prediction.paths import remove_stale_temporaries, temporary_path

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    names = []
    for final in ("x_predictions.tif", "x_segmentation.tif", "x_instances.tif", "x_preview.png",
                  "x_predictions.ome.zarr"):
        ours = temporary_path(tmp_path / final)
        stale = ours.with_name(ours.name.rsplit("-", 1)[0] + f"-{process.pid}")
        stale.write_bytes(b"half a file")
        names.append(stale.name)
    (tmp_path / "x_segmentation.tif.tmp-notes").write_text("mine")  # not of the writer's scheme
    notes = remove_stale_temporaries(tmp_path)
    assert len(notes) == 5 and all("which has ended" in note for note in notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_segmentation.tif.tmp-notes"]
