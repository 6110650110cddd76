"""``--prediction.preview true``: ``<stem>_preview.png``, three central planes with the overlay, opened with Pillow."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import blob_volume, cli_error_line, write_h5

Image = pytest.importorskip("PIL.Image")

SHAPE = (8, 24, 20)
GAP = 4  # the documented gap between the planes


def predict_args(checkpoint, inputs, output_dir, *extra):
    return ["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", f"[{inputs}]",
            "--data.predict_patch_shape", "[8, 16, 16]", "--prediction.output_dir", str(output_dir),
            "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--prediction.preview", "true", *extra]


def run(args):
    from unet3d_lightning.cli import main

    main(args)


def coloured(pixels: np.ndarray) -> np.ndarray:
    """Pixels that are not grey (R, G, B not all equal)."""
    return (pixels[..., 0] != pixels[..., 1]) | (pixels[..., 1] != pixels[..., 2])


def test_preview_shows_the_three_central_planes_with_the_segmentation(one_step_fit, command_line, tmp_path):
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    volume = write_h5(tmp_path / "in" / "x.h5", raw=raw)
    out = tmp_path / "out"
    run(predict_args(checkpoint, volume, out, "--prediction.save_segmentation", "true"))
    with h5py.File(out / "x_predictions.h5", "r") as f:
        segmentation = f["segmentation"][...]
    with Image.open(out / "x_preview.png") as image:
        assert image.format == "PNG" and image.mode == "RGB"
        pixels = np.asarray(image)
    d, h, w = SHAPE
    # Orthogonal views, unit voxels (one pixel per voxel): (y, x) at z = D/2 top left, (z, x) at y = H/2 below it,
    # (z, y) at x = W/2 transposed to (y, z) on its right.
    assert pixels.shape == (h + GAP + d, w + GAP + d, 3)
    planes = {(0, 0): segmentation[d // 2], (h + GAP, 0): segmentation[:, h // 2, :],
              (0, w + GAP): segmentation[:, :, w // 2].T}
    assert 0 < np.mean(np.concatenate([p.ravel() for p in planes.values()])) < 1  # both classes: the test can tell
    for (y, x), plane in planes.items():
        region = pixels[y : y + plane.shape[0], x : x + plane.shape[1]]
        np.testing.assert_array_equal(coloured(region), plane > 0)
    grey = pixels[: h, :w][segmentation[d // 2] == 0, 0]
    assert grey.std() > 10  # the raw shows: not a blank image
    assert not pixels[:, w : w + GAP].any() and not pixels[h + GAP :, w:].any()  # the gaps and the corner are black


def test_a_second_run_replaces_the_preview_and_a_foreign_png_is_refused(one_step_fit, command_line, tmp_path, capsys):
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    volume = write_h5(tmp_path / "in" / "x.h5", raw=raw)
    out = tmp_path / "out"
    args = predict_args(checkpoint, volume, out, "--prediction.format", "ome-zarr")
    run(args)
    inode = (out / "x_preview.png").stat().st_ino
    run(args)
    assert (out / "x_preview.png").stat().st_ino != inode
    assert sorted(p.name for p in out.iterdir()) == ["x_predictions.ome.zarr", "x_preview.png"]
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(out / "x_preview.png")  # the user's own image
    before = (out / "x_preview.png").read_bytes()
    last = cli_error_line(capsys, args)
    assert f"prediction output {out / 'x_preview.png'}" in last and "not written by unet3d" in last, last
    assert (out / "x_preview.png").read_bytes() == before


def test_anisotropic_voxels_stretch_the_planes_to_their_physical_aspect():
    from unet3d_lightning.prediction.preview import compose

    d, h, w = 4, 8, 6
    rng = np.random.default_rng(0)
    raws = [rng.random((h, w)), rng.random((d, w)), rng.random((d, h))]
    labels = [np.zeros((h, w), int), np.zeros((d, w), int), np.zeros((d, h), int)]
    labels[1][1, 2] = 1  # one voxel of class 1 in the (z, x) plane
    image = compose(raws, labels, "labels", (4.0, 1.0, 1.0))
    # z is 4 times the in-plane voxel size: the (z, x) plane is 16 pixels high, the (y, z) plane 16 wide.
    assert image.shape == (h + GAP + 16, w + GAP + 16, 3)
    zx = image[h + GAP :, :w]
    np.testing.assert_array_equal(coloured(zx), np.kron(labels[1] > 0, np.ones((4, 1), bool)))
    for z in range(d):  # each z-row is repeated 4 times
        assert (zx[4 * z : 4 * z + 4] == zx[4 * z]).all()
    assert not coloured(image[:h, :w]).any()  # the (y, x) plane has no label: all grey


def test_without_a_segmentation_the_foreground_probability_is_overlaid_in_red():
    from unet3d_lightning.prediction.preview import compose, overlay_map

    probabilities = np.zeros((2, 2, 4, 4), np.float32)
    probabilities[0] = 1.0
    probabilities[:, :, 1:3, 1:3] = [[[[0.0]]], [[[1.0]]]]  # a square where class 1 is certain
    foreground, kind = overlay_map(probabilities, None, "softmax")
    assert kind == "probability"
    np.testing.assert_array_equal(foreground, 1 - probabilities[0])
    raws = [np.full((4, 4), 0.5), np.full((2, 4), 0.5), np.full((2, 4), 0.5)]
    raws[0][0, 0] = 1.0  # some contrast
    image = compose(raws, [foreground[1], foreground[:, 2, :], foreground[:, :, 2]], kind, None)
    plane = image[:4, :4].astype(int)
    red = plane[..., 0] - plane[..., 1] > 50
    np.testing.assert_array_equal(red, foreground[1] > 0.5)


def test_the_inputs_voxel_size_sets_the_aspect(one_step_fit, command_line, tmp_path):
    """Through the command: z voxels 4 times the in-plane size make the (z, x) and (z, y) planes 4 D pixels high."""
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    volume = write_h5(tmp_path / "in" / "x.h5", raw=raw)
    with h5py.File(volume, "r+") as f:
        f["raw"].attrs["element_size_um"] = [4.0, 1.0, 1.0]
    run(predict_args(checkpoint, volume, tmp_path / "out", "--prediction.format", "tiff"))
    with Image.open(tmp_path / "out" / "x_preview.png") as image:
        pixels = np.asarray(image)
    d, h, w = SHAPE
    assert pixels.shape == (h + GAP + 4 * d, w + GAP + 4 * d, 3)
    assert coloured(pixels).any()  # the foreground probability is overlaid


def test_without_pillow_the_preview_is_refused_in_one_line(one_step_fit, command_line, tmp_path, capsys,
                                                           monkeypatch):
    import sys

    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    volume = write_h5(tmp_path / "x.h5", raw=raw)
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL raises ImportError
    last = cli_error_line(capsys, predict_args(checkpoint, volume, tmp_path / "out"))
    assert "prediction.preview needs Pillow" in last and "unet3d-lightning[formats]" in last, last
    assert not (tmp_path / "out").exists()
