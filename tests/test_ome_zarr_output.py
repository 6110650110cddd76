"""OME-Zarr outputs (``--prediction.format ome-zarr``): read back with ome-zarr-py, the oracle of the NGFF format."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import blob_volume, cli_error_line, write_h5

pytest.importorskip("ome_zarr")
from ome_zarr.io import parse_url  # noqa: E402
from ome_zarr.reader import Reader  # noqa: E402

SHAPE = (8, 32, 32)


def predict_args(checkpoint, inputs, output_dir, *extra):
    return ["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", f"[{inputs}]",
            "--data.predict_patch_shape", "[8, 16, 16]", "--prediction.output_dir", str(output_dir),
            "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            *extra]


def run(args):
    from unet3d_lightning.cli import main

    main(args)


@pytest.fixture
def small_pyramid(monkeypatch):
    """Levels below 8 voxels in-plane instead of 256, so that a small volume has a pyramid."""
    from unet3d_lightning.prediction.outputs import ome_zarr

    monkeypatch.setattr(ome_zarr, "PYRAMID_MIN_SIZE", 8)


def nodes_of(path: Path) -> dict[str, object]:
    """The ome-zarr-py reader's nodes of a store, by their path relative to it."""
    nodes = {}
    for node in Reader(parse_url(str(path)))():
        nodes[str(Path(node.zarr.path).relative_to(path.resolve())) if Path(node.zarr.path).resolve() != path.resolve()
              else "."] = node
    return nodes


def block_mean(array: np.ndarray, factors) -> np.ndarray:
    """Mean-pool the last three axes by ``factors`` with numpy reshapes (shapes divisible by the factors)."""
    d, h, w = array.shape[-3:]
    fz, fy, fx = factors
    shape = (*array.shape[:-3], d // fz, fz, h // fy, fy, w // fx, fx)
    return array.astype(np.float64).reshape(shape).mean(axis=tuple(array.ndim - 3 + a for a in (1, 3, 5)))


def test_ome_zarr_output_reads_back_as_a_multiscale_image_with_labels(one_step_fit, command_line, tmp_path,
                                                                       small_pyramid):
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    volume = write_h5(tmp_path / "in" / "x.h5", raw=raw)
    run(predict_args(checkpoint, volume, tmp_path / "h5", "--prediction.save_segmentation", "true"))
    run(predict_args(checkpoint, volume, tmp_path / "ome", "--prediction.save_segmentation", "true",
                     "--prediction.format", "ome-zarr"))
    with h5py.File(tmp_path / "h5" / "x_predictions.h5", "r") as f:
        expected, segmentation = f["predictions"][...], f["segmentation"][...]
    store = tmp_path / "ome" / "x_predictions.ome.zarr"
    nodes = nodes_of(store)
    image = nodes["."]
    axes = image.metadata["axes"]
    assert [a["name"] for a in axes] == ["c", "z", "y", "x"]
    assert [a["type"] for a in axes] == ["channel", "space", "space", "space"]
    assert all("unit" not in a for a in axes)  # an HDF5 raw without a voxel size: unit voxels, no unit
    transforms = image.metadata["coordinateTransformations"]
    assert transforms[0] == [{"type": "scale", "scale": [1.0, 1.0, 1.0, 1.0]}]
    levels = [np.asarray(level) for level in image.data]
    # (8, 32, 32) with unit voxels: isotropic, so every level halves z too; 32 -> 16 -> 8 in-plane, then stop.
    assert [level.shape for level in levels] == [(2, 8, 32, 32), (2, 4, 16, 16), (2, 2, 8, 8)]
    np.testing.assert_allclose(levels[0], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(levels[1], block_mean(levels[0], (2, 2, 2)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(levels[2], block_mean(levels[0], (4, 4, 4)), rtol=0, atol=1e-6)
    assert transforms[1][0] == {"type": "scale", "scale": [1.0, 2.0, 2.0, 2.0]}
    # The voxel centre of a mean over 2 voxels lies half a level-0 voxel further.
    assert transforms[1][1] == {"type": "translation", "translation": [0.0, 0.5, 0.5, 0.5]}
    label = nodes["labels/segmentation"]
    assert "image-label" in label.zarr.root_attrs
    assert [a["name"] for a in label.metadata["axes"]] == ["z", "y", "x"]
    label_levels = [np.asarray(level) for level in label.data]
    np.testing.assert_array_equal(label_levels[0], segmentation)
    np.testing.assert_array_equal(label_levels[1], segmentation[::2, ::2, ::2])
    np.testing.assert_array_equal(label_levels[2], segmentation[::4, ::4, ::4])
    assert json.loads((store / "labels" / ".zattrs").read_text())["labels"] == ["segmentation"]


def test_voxel_size_sets_the_scale_and_keeps_anisotropic_z(tmp_path, small_pyramid):
    """Written through VolumeOutput with a known voxel size: level 0's scale is it, the unit is NGFF's name for it,
    and z is halved only once the levels are near-isotropic."""
    from unet3d_lightning.prediction.outputs import VolumeOutput

    final = tmp_path / "v_predictions.ome.zarr"
    rng = np.random.default_rng(0)
    values = rng.random((1, 8, 64, 48), dtype=np.float32)
    output = VolumeOutput(final, (8, 64, 48), 1, "float32", None, "gzip", None, "ome-zarr",
                          voxel_size=(2.0, 0.5, 0.5), unit="µm")
    for z0 in range(0, 8, 3):
        output.write(z0, min(z0 + 3, 8), values[:, z0 : z0 + 3], None)
    output.commit()
    image = nodes_of(final)["."]
    assert [a.get("unit") for a in image.metadata["axes"]] == [None, "micrometer", "micrometer", "micrometer"]
    scales = [t[0]["scale"] for t in image.metadata["coordinateTransformations"]]
    # z / yx = 4, then 2, then 1 (<= sqrt 2): z is kept twice, then halved with y and x.
    assert scales == [[1.0, 2.0, 0.5, 0.5], [1.0, 2.0, 1.0, 1.0], [1.0, 2.0, 2.0, 2.0], [1.0, 4.0, 4.0, 4.0]]
    levels = [np.asarray(level) for level in image.data]
    assert [level.shape for level in levels] == [(1, 8, 64, 48), (1, 8, 32, 24), (1, 8, 16, 12), (1, 4, 8, 6)]
    np.testing.assert_array_equal(levels[0], values)
    np.testing.assert_allclose(levels[3], block_mean(values, (2, 8, 8)), rtol=0, atol=1e-6)


def test_edge_blocks_are_the_mean_of_the_voxels_they_hold(tmp_path, small_pyramid):
    """A level of an odd size: the last block averages the voxels it has (no zeros padded in); uint8 rounds."""
    from unet3d_lightning.prediction.outputs import VolumeOutput

    final = tmp_path / "v_predictions.ome.zarr"
    values = np.random.default_rng(1).random((1, 3, 9, 11), dtype=np.float32)
    output = VolumeOutput(final, (3, 9, 11), 1, "uint8", None, None, None, "ome-zarr")
    output.write(0, 3, values, None)
    output.commit()
    levels = [np.asarray(level) for level in nodes_of(final)["."].data]
    stored = levels[0].astype(np.float64)
    assert levels[1].shape == (1, 2, 5, 6)
    expected = np.empty((1, 2, 5, 6))
    for z in range(2):
        for y in range(5):
            for x in range(6):
                expected[0, z, y, x] = stored[0, 2 * z : 2 * z + 2, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2].mean()
    np.testing.assert_array_equal(levels[1], np.rint(expected).astype(np.uint8))


def test_no_pyramid_below_the_size_and_a_default_sized_volume_gets_one():
    from unet3d_lightning.prediction.outputs.ome_zarr import pyramid_factors

    assert pyramid_factors((8, 256, 256), (1.0, 1.0, 1.0)) == []
    assert pyramid_factors((100, 1024, 300), (1.0, 1.0, 1.0)) == [(2, 2, 2), (2, 2, 2)]
    assert pyramid_factors((100, 1024, 1024), (5.0, 1.0, 1.0)) == [(1, 2, 2), (1, 2, 2)]
    assert pyramid_factors((1, 4096, 4096), (1.0, 1.0, 1.0)) == [(1, 2, 2)] * 4  # at most 5 levels


def test_interrupted_prediction_leaves_nothing(one_step_fit, command_line, tmp_path, monkeypatch, capsys):
    """A failure mid-volume (the third batch) leaves neither the final name nor a temporary."""
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
        run(predict_args(checkpoint, volume, out, "--prediction.format", "ome-zarr", "--data.batch_size", "1",
                         "--prediction.save_segmentation", "true"))
    assert len(calls) == 3
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_second_run_replaces_ours_and_a_foreign_store_is_refused(one_step_fit, command_line, tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    write_h5(tmp_path / "in" / "x.h5", raw=raw)
    write_h5(tmp_path / "in" / "y.h5", raw=raw[:, ::-1].copy())
    out = tmp_path / "out"
    args = predict_args(checkpoint, tmp_path / "in", out, "--prediction.format", "ome-zarr")
    run(args)
    first = np.asarray(zarr.open_group(str(out / "x_predictions.ome.zarr"), mode="r")["0"][...])
    marker = out / "x_predictions.ome.zarr" / "0" / ".zattrs"
    before = marker.stat().st_mtime_ns
    run(args)
    assert marker.stat().st_mtime_ns != before  # written again, not left
    np.testing.assert_array_equal(zarr.open_group(str(out / "x_predictions.ome.zarr"), mode="r")["0"][...], first)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # A user's own OME-Zarr image at the name (no unet3d entry): refused, in one line, before any work; untouched.
    foreign = out / "y_predictions.ome.zarr"
    import shutil

    shutil.rmtree(foreign)
    group = zarr.open_group(str(foreign), mode="w", zarr_format=2)
    group.create_array("0", shape=(4, 4), dtype="uint8")
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}]}]
    listing = sorted(str(p.relative_to(foreign)) for p in foreign.rglob("*"))
    last = cli_error_line(capsys, args)
    assert f"prediction output {foreign}" in last and "is not an earlier output of unet3d" in last, last
    assert sorted(str(p.relative_to(foreign)) for p in foreign.rglob("*")) == listing
    # Ours with something added inside: no longer only ours.
    (out / "x_predictions.ome.zarr" / "notes.txt").write_text("mine")
    shutil.rmtree(foreign)
    last = cli_error_line(capsys, args)
    assert "notes.txt" in last, last


def test_lzf_is_refused_for_ome_zarr(one_step_fit, command_line, tmp_path, capsys):
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    volume = write_h5(tmp_path / "x.h5", raw=raw)
    last = cli_error_line(capsys, predict_args(checkpoint, volume, tmp_path / "out", "--prediction.format", "ome-zarr",
                                               "--prediction.compression", "lzf"))
    assert "prediction.compression lzf" in last and "OME-Zarr" in last, last


def test_the_inputs_voxel_size_is_level_0s_scale(one_step_fit, command_line, tmp_path, small_pyramid):
    """Through the command: an HDF5 raw with PlantSeg's ``element_size_um`` gives level 0's scale and its unit."""
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    volume = write_h5(tmp_path / "in" / "x.h5", raw=raw)
    with h5py.File(volume, "r+") as f:
        f["raw"].attrs["element_size_um"] = [2.0, 0.5, 0.5]
    run(predict_args(checkpoint, volume, tmp_path / "ome", "--prediction.format", "ome-zarr",
                     "--prediction.instances", "false"))
    image = nodes_of(tmp_path / "ome" / "x_predictions.ome.zarr")["."]
    assert [a.get("unit") for a in image.metadata["axes"]] == [None, "micrometer", "micrometer", "micrometer"]
    scales = [t[0]["scale"] for t in image.metadata["coordinateTransformations"]]
    # z / yx = 4, then 2: z is kept while y and x halve (32 -> 16 -> 8).
    assert scales == [[1.0, 2.0, 0.5, 0.5], [1.0, 2.0, 1.0, 1.0], [1.0, 2.0, 2.0, 2.0]]
    assert [np.asarray(level).shape for level in image.data] == [(2, 8, 32, 32), (2, 8, 16, 16), (2, 8, 8, 8)]


def test_instances_become_a_label_image_equal_to_the_hdf5_outputs(tmp_path, small_pyramid):
    """The watershed's ids, written when the maps are complete, land under labels/instances with their pyramid."""
    from unet3d_lightning.instances import WatershedOptions
    from unet3d_lightning.prediction.outputs import VolumeOutput

    maps = np.zeros((2, 4, 16, 16), np.float32)
    maps[1, :, 2:14, 2:14] = 1.0  # foreground
    maps[0, :, :, 7:9] = 1.0  # a boundary between two objects
    spec = {"kind": "boundaries", "foreground_channel": True}
    written = {}
    for fmt, name in (("hdf5", "v_predictions.h5"), ("ome-zarr", "v_predictions.ome.zarr")):
        output = VolumeOutput(tmp_path / name, (4, 16, 16), 2, "float32", None, "gzip", None, fmt,
                              instances=(spec, WatershedOptions(min_size=1)))
        output.write(0, 4, maps, None)
        output.commit()
        written[fmt] = tmp_path / name
    with h5py.File(written["hdf5"], "r") as f:
        expected = f["instances"][...]
    assert len(np.unique(expected)) == 3  # background and two objects: the comparison means something
    label = nodes_of(written["ome-zarr"])["labels/instances"]
    levels = [np.asarray(level) for level in label.data]
    np.testing.assert_array_equal(levels[0], expected)
    np.testing.assert_array_equal(levels[1], expected[::2, ::2, ::2])


def test_outputs_read_back_as_inputs_with_their_voxel_size(tmp_path):
    """An OME-Zarr or TIFF output given to a later run (as raw, or its segmentation as labels) has the voxel size of
    the volume it was predicted from."""
    from unet3d_lightning.data.io import open_file
    from unet3d_lightning.prediction.outputs import VolumeOutput

    values = np.random.default_rng(4).random((2, 4, 8, 8), dtype=np.float32)
    for name, keys in (("v_predictions.ome.zarr", ("0", "labels/segmentation")), ("v_predictions.tif", ("",))):
        fmt = "ome-zarr" if name.endswith("zarr") else "tiff"
        output = VolumeOutput(tmp_path / name, (4, 8, 8), 2, "float32", "argmax", "gzip", None, fmt,
                              voxel_size=(2.0, 0.5, 0.5), unit="micrometer")
        output.write(0, 4, values, None)
        output.commit()
        files = [tmp_path / name] + ([tmp_path / "v_segmentation.tif"] if fmt == "tiff" else [])
        for path in files:
            with open_file(path, "predict") as file:
                for key in keys:
                    size = file.voxel_size(key)
                    assert size.zyx == (2.0, 0.5, 0.5) and size.unit == "micrometer", (path, key)
        with open_file(tmp_path / name, "predict") as file:
            np.testing.assert_array_equal(np.asarray(file.array(keys[0])[...]), values)
