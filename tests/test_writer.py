"""Tests of PredictionWriter through the real ``trainer.predict`` path, against references computed here.

Every expected output is computed in this file with plain torch: a whole-volume forward, or a brute-force stitcher
holding full-volume sum and weight arrays, fed by the same tiny model on the same (padded, normalised) patches.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from unet3d_lightning.data.datamodule import HDF5DataModule
from unet3d_lightning.errors import ConfigurationError
from unet3d_lightning.module import UNet3DModule
from unet3d_lightning.prediction.callback import PredictionWriter
from unet3d_lightning.prediction.outputs import chunks

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_h5  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------------------------------------------------
# Independent helpers
# ----------------------------------------------------------------------------------------------------------------------


def tiny_model(loss="ce", out_channels=2, seed=0, cls=UNet3DModule):
    torch.manual_seed(seed)
    model = cls(in_channels=1, out_channels=out_channels, f_maps=4, num_levels=2, num_groups=2, loss=loss)
    # Sharper logits than the initialisation gives, so that probabilities spread over [0, 1] and segmentations
    # are not all one class.
    with torch.no_grad():
        for p in model.net.parameters():
            p.mul_(3.0)
    return model.eval()


def random_volume(path, shape, seed):
    rng = np.random.default_rng(seed)
    raw = (rng.normal(5.0, 2.0, shape) + np.linspace(0, 3, shape[-1])).astype(np.float32)
    return write_h5(path, raw=raw), raw


def standardised(raw):
    """The datamodule's default rule written out: (x - mean) / std over the whole volume (population std)."""
    x = raw.astype(np.float64)
    return ((x - x.mean()) / x.std()).astype(np.float32)


def axis_starts(size, patch, stride):
    """0, s, 2s, ... while the patch fits, then the start snapped to the end; one start 0 if the axis is short."""
    if size <= patch:
        return [0], patch
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts, size


def gaussian_weights(patch):
    """exp(-sum_a (i_a - c_a)^2 / (2 sigma_a^2)) on a meshgrid, c_a = (p_a - 1) / 2, sigma_a = p_a / 8, max 1."""
    mesh = torch.meshgrid(*(torch.arange(p, dtype=torch.float64) for p in patch), indexing="ij")
    exponent = sum((m - (p - 1) / 2) ** 2 / (2 * (p / 8) ** 2) for m, p in zip(mesh, patch))
    g = torch.exp(-exponent)
    return g / g.max()


def probabilities_of(model, x):
    """Softmax over channels (ce) or per-channel sigmoid (bce) of the model's logits, float32."""
    with torch.no_grad():
        logits = model(x).float()
    return torch.softmax(logits, 1) if model.hparams.loss in ("ce", "wce") else torch.sigmoid(logits)


def flip_average(model, x):
    """Mean over the 8 flips of the spatial axes, each prediction flipped back first."""
    outs = []
    for dims in ([], [2], [3], [4], [2, 3], [2, 4], [3, 4], [2, 3, 4]):
        xf = torch.flip(x, dims) if dims else x
        p = probabilities_of(model, xf)
        outs.append(torch.flip(p, dims) if dims else p)
    return torch.stack(outs).mean(0)


def reference_stitch(model, raw, patch, stride, blend="average", halo=(0, 0, 0), predict=probabilities_of):
    """Brute force over full-volume float64 sum and weight arrays; zero padding after normalisation; halo cropped
    on interior faces only (faces on the padded border keep their voxels)."""
    x = standardised(raw)
    per_axis = [axis_starts(s, p, st) for s, p, st in zip(raw.shape, patch, stride)]
    padded = tuple(n for _, n in per_axis)
    xp = np.zeros(padded, np.float32)
    xp[: raw.shape[0], : raw.shape[1], : raw.shape[2]] = x
    w_map = gaussian_weights(patch) if blend == "gaussian" else torch.ones(patch, dtype=torch.float64)
    starts = [(z, y, x_) for z in per_axis[0][0] for y in per_axis[1][0] for x_ in per_axis[2][0]]
    inputs = torch.stack(
        [torch.from_numpy(xp[z : z + patch[0], y : y + patch[1], x_ : x_ + patch[2]]) for z, y, x_ in starts]
    )
    predictions = torch.cat([predict(model, inputs[i : i + 8, None]) for i in range(0, len(inputs), 8)])
    channels = predictions.shape[1]
    total = torch.zeros((channels, *padded), dtype=torch.float64)
    weight = torch.zeros(padded, dtype=torch.float64)
    for prediction, start in zip(predictions, starts):
        kept, local = [], []
        for a in range(3):
            lo = start[a] if start[a] == 0 else start[a] + halo[a]
            stop = start[a] + patch[a]
            hi = stop if stop == padded[a] else stop - halo[a]
            kept.append(slice(lo, hi))
            local.append(slice(lo - start[a], hi - start[a]))
        w = w_map[tuple(local)]
        total[(slice(None), *kept)] += prediction.double()[(slice(None), *local)] * w
        weight[tuple(kept)] += w
    d, h, w_ = raw.shape
    return (total / weight)[:, :d, :h, :w_].numpy()


def predict(model, paths, out_dir, patch, stride, batch_size=4, precision="32-true", accelerator="cpu",
            progress=False, **writer_kwargs):
    writer = PredictionWriter(str(out_dir), **writer_kwargs)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False, use_distributed_sampler=False,
        enable_progress_bar=progress, enable_model_summary=False, precision=precision, callbacks=[writer],
    )
    datamodule = HDF5DataModule(
        predict_paths=[str(p) for p in paths], predict_patch_shape=list(patch), predict_stride_shape=list(stride),
        batch_size=batch_size, num_workers=0,
    )
    trainer.predict(model, datamodule=datamodule, return_predictions=False)
    return writer


def read(path, name="predictions"):
    with h5py.File(path, "r") as f:
        return f[name][()]


def confident(reference, kind):
    """Voxels whose segmentation cannot flip under float32 rounding: top-2 gap (argmax) or |p - 0.5| (threshold)."""
    if kind == "argmax":
        top2 = np.sort(reference, axis=0)[-2:]
        return (top2[1] - top2[0]) > 1e-4
    return np.abs(reference - 0.5) > 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# Correctness against independent references
# ----------------------------------------------------------------------------------------------------------------------


def test_single_patch_equals_whole_volume_forward(tmp_path):
    path, raw = random_volume(tmp_path / "vol.h5", (8, 12, 10), seed=1)
    model = tiny_model()
    writer = predict(model, [path], tmp_path / "out", patch=(8, 12, 10), stride=(8, 12, 10))
    expected = probabilities_of(model, torch.from_numpy(standardised(raw))[None, None])[0].numpy()
    out = tmp_path / "out" / "vol_predictions.h5"
    assert writer.written == [out]
    got = read(out)
    assert got.dtype == np.float32 and got.shape == (2, 8, 12, 10)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "blend, halo, stride, batch_size",
    [("average", 0, (4, 6, 6), 4), ("gaussian", 0, (4, 6, 6), 5), ("average", 2, (4, 4, 4), 7),
     ("gaussian", (1, 2, 0), (4, 4, 6), 3)],
)
def test_several_patches_match_brute_force_stitching(tmp_path, blend, halo, stride, batch_size):
    path, raw = random_volume(tmp_path / "vol.h5", (13, 18, 20), seed=2)
    model = tiny_model()
    predict(model, [path], tmp_path / "out", (8, 8, 8), stride, batch_size=batch_size, blend=blend, halo=halo)
    halos = (halo,) * 3 if isinstance(halo, int) else halo
    expected = reference_stitch(model, raw, (8, 8, 8), stride, blend, halos)
    np.testing.assert_allclose(read(tmp_path / "out" / "vol_predictions.h5"), expected, atol=2e-5)


def test_several_volumes_with_batches_crossing_volume_boundaries(tmp_path):
    # The second volume is smaller than the patch along z (padded, then cropped), the third along x.
    shapes = [(12, 14, 16), (5, 12, 12), (10, 9, 6)]
    files = [random_volume(tmp_path / "in" / f"v{i}.h5", s, seed=10 + i) for i, s in enumerate(shapes)]
    model = tiny_model()
    patch, stride = (8, 8, 8), (5, 6, 6)
    writer = predict(model, [p for p, _ in files], tmp_path / "out", patch, stride, batch_size=5, blend="gaussian")
    assert writer.written == [tmp_path / "out" / f"v{i}_predictions.h5" for i in range(3)]
    for (path, raw), out in zip(files, writer.written):
        got = read(out)
        assert got.shape == (2, *raw.shape)
        np.testing.assert_allclose(got, reference_stitch(model, raw, patch, stride, "gaussian"), atol=2e-5)


def test_segmentation_is_argmax_for_softmax_models(tmp_path):
    path, raw = random_volume(tmp_path / "vol.h5", (10, 12, 12), seed=3)
    model = tiny_model(loss="ce", out_channels=3)
    predict(model, [path], tmp_path / "out", (8, 8, 8), (4, 4, 4), save_segmentation=True)
    reference = reference_stitch(model, raw, (8, 8, 8), (4, 4, 4))
    seg = read(tmp_path / "out" / "vol_predictions.h5", "segmentation")
    assert seg.shape == raw.shape and seg.dtype == np.uint8
    mask = confident(reference, "argmax")
    assert mask.mean() > 0.9 and len(np.unique(seg)) > 1
    np.testing.assert_array_equal(seg[mask], reference.argmax(0)[mask])


def test_segmentation_is_threshold_for_sigmoid_models(tmp_path):
    path, raw = random_volume(tmp_path / "vol.h5", (10, 12, 12), seed=4)
    model = tiny_model(loss="bce", out_channels=2)
    predict(model, [path], tmp_path / "out", (8, 8, 8), (4, 4, 4), blend="gaussian", save_segmentation=True)
    reference = reference_stitch(model, raw, (8, 8, 8), (4, 4, 4), "gaussian")
    out = tmp_path / "out" / "vol_predictions.h5"
    np.testing.assert_allclose(read(out), reference, atol=2e-5)
    seg = read(out, "segmentation")
    assert seg.shape == (2, *raw.shape) and seg.dtype == np.uint8
    mask = confident(reference, "threshold")
    assert mask.mean() > 0.9 and 0 < seg.mean() < 1
    np.testing.assert_array_equal(seg[mask], (reference > 0.5).astype(np.uint8)[mask])


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_reduced_storage_dtypes(tmp_path, dtype):
    path, raw = random_volume(tmp_path / "vol.h5", (10, 12, 12), seed=5)
    model = tiny_model()
    predict(model, [path], tmp_path / "out", (8, 8, 8), (4, 4, 4), dtype=dtype)
    reference = reference_stitch(model, raw, (8, 8, 8), (4, 4, 4))
    with h5py.File(tmp_path / "out" / "vol_predictions.h5", "r") as f:
        stored = f["predictions"][()]
        scale = float(f["predictions"].attrs["scale"])
    assert stored.dtype == np.dtype(dtype)
    if dtype == "uint8":
        assert scale == 255.0
        # Rounded to the nearest of 0/255 .. 255/255: at most half a step away.
        assert np.abs(stored.astype(np.float64) - reference * 255).max() <= 0.5 + 1e-3
    else:
        assert scale == 1.0
        np.testing.assert_allclose(stored.astype(np.float32), reference, atol=5e-4)


@pytest.mark.parametrize("compression", ["gzip", "lzf", "none"])
def test_datasets_are_chunked_and_compressed_as_asked(tmp_path, compression):
    path, raw = random_volume(tmp_path / "vol.h5", (20, 12, 12), seed=6)
    model = tiny_model()
    predict(model, [path], tmp_path / "out", (8, 8, 8), (6, 6, 6), compression=compression, save_segmentation=True)
    reference = reference_stitch(model, raw, (8, 8, 8), (6, 6, 6))
    with h5py.File(tmp_path / "out" / "vol_predictions.h5", "r") as f:
        for name in ("predictions", "segmentation"):
            assert f[name].chunks is not None
            assert f[name].compression == (None if compression == "none" else compression)
        np.testing.assert_allclose(f["predictions"][()], reference, atol=2e-5)


@pytest.mark.parametrize("compression, dtype", [("gzip", "float32"), ("gzip", "uint8"), ("lzf", "float16"),
                                               ("none", "float32")])
def test_edge_chunks_in_every_axis_read_back_exactly(tmp_path, monkeypatch, compression, dtype):
    # Chunks of 3 x 5 x 7 voxels on a 13 x 18 x 20 volume: partial chunks along z, y and x, and slabs (z-stride 4)
    # that end inside chunk rows.
    monkeypatch.setattr(chunks, "CHUNK_ZYX", (3, 5, 7))
    path, raw = random_volume(tmp_path / "vol.h5", (13, 18, 20), seed=17)
    model = tiny_model(loss="bce", out_channels=2)
    predict(model, [path], tmp_path / "out", (8, 8, 8), (4, 6, 6), save_segmentation=True, dtype=dtype,
            compression=compression)
    reference = reference_stitch(model, raw, (8, 8, 8), (4, 6, 6))
    with h5py.File(tmp_path / "out" / "vol_predictions.h5", "r") as f:
        stored, seg = f["predictions"], f["segmentation"]
        assert stored.chunks == (1, 3, 5, 7) and seg.chunks == (1, 3, 5, 7)
        assert stored.compression == (None if compression == "none" else compression)
        assert stored.shuffle == (compression != "none")
        values = stored[()].astype(np.float64) / float(stored.attrs["scale"])
        mask = confident(reference, "threshold")
        np.testing.assert_array_equal(seg[()][mask], (reference > 0.5)[mask])
    tolerance = {"float32": 2e-5, "float16": 5e-4, "uint8": 0.5 / 255 + 1e-5}[dtype]
    np.testing.assert_allclose(values, reference, atol=tolerance)


def test_write_error_in_the_background_surfaces_and_cleans_up(tmp_path, monkeypatch):
    def failing_write(self, z0, rows):
        raise OSError("simulated disk full")

    monkeypatch.setattr(chunks.ChunkRowDataset, "_write", failing_write)
    path, _ = random_volume(tmp_path / "vol.h5", (24, 8, 8), seed=18)
    with pytest.raises(OSError, match="simulated disk full"):
        predict(tiny_model(), [path], tmp_path / "out", (8, 8, 8), (4, 8, 8), batch_size=1)
    assert not (tmp_path / "out").exists()  # no temporary file, and the directory the run created is gone


def test_flip_tta_equals_average_of_eight_flipped_forwards(tmp_path):
    path, raw = random_volume(tmp_path / "vol.h5", (10, 12, 12), seed=7)
    model = tiny_model()
    predict(model, [path], tmp_path / "out", (8, 8, 8), (4, 4, 4), batch_size=3, tta=True)
    expected = reference_stitch(model, raw, (8, 8, 8), (4, 4, 4), predict=flip_average)
    np.testing.assert_allclose(read(tmp_path / "out" / "vol_predictions.h5"), expected, atol=2e-5)
    # The same volume without TTA differs: the flips did something.
    plain = reference_stitch(model, raw, (8, 8, 8), (4, 4, 4))
    assert np.abs(plain - expected).max() > 1e-3
    assert model.predict_tta is False  # switched off again after predict


def bf16_probabilities(model, x):
    """The forward under CPU bf16 autocast, then the activation in float32 (as predict_step does)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            logits = model(x)
    return torch.softmax(logits.float(), 1)


def test_bf16_mixed_on_cpu_writes_float32_close_to_fp32(tmp_path):
    path, raw = random_volume(tmp_path / "vol.h5", (10, 12, 12), seed=8)
    model = tiny_model()
    predict(model, [path], tmp_path / "out", (8, 8, 8), (4, 4, 4), precision="bf16-mixed", blend="gaussian")
    got = read(tmp_path / "out" / "vol_predictions.h5")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)  # softmax and blending ran in float32
    fp32 = reference_stitch(model, raw, (8, 8, 8), (4, 4, 4), "gaussian")
    bf16 = reference_stitch(model, raw, (8, 8, 8), (4, 4, 4), "gaussian", predict=bf16_probabilities)
    # The network really ran in bf16 (it differs from fp32), the blending added no error of its own.
    assert np.abs(bf16 - fp32).max() > 1e-3
    np.testing.assert_allclose(got, bf16, atol=1e-4)
    assert np.abs(got - fp32).mean() < 0.01 and np.abs(got - fp32).max() < 0.2


# ----------------------------------------------------------------------------------------------------------------------
# Failures: no partial file under the final name, no temporary left behind, earlier outputs untouched
# ----------------------------------------------------------------------------------------------------------------------


class FailingModule(UNet3DModule):
    """Raises in the predict step of batch ``fail_at`` (after earlier batches were stitched and slabs written)."""

    fail_at = 3

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.fail_at:
            raise RuntimeError("simulated failure in the middle of a volume")
        return super().predict_step(batch, batch_idx, dataloader_idx)


def previous_output(path):
    """An earlier output of the writer (a 'predictions' dataset with its 'scale'), marked to tell it apart."""
    with h5py.File(path, "w") as f:
        f["predictions"] = np.full((1, 2, 2, 2), 7.0, np.float32)
        f["predictions"].attrs["scale"] = 1.0
        f.attrs["marker"] = "previous"
    return path.read_bytes()


def test_interrupted_volume_leaves_no_file_and_keeps_previous_output(tmp_path):
    path, raw = random_volume(tmp_path / "vol.h5", (24, 16, 16), seed=9)
    out = tmp_path / "out"
    out.mkdir()
    final = out / "vol_predictions.h5"
    before = previous_output(final)
    model = tiny_model(cls=FailingModule)
    # 5 z-starts x 9 patches, 9 per batch: batch 3 fails after three bands were final and written.
    with pytest.raises(RuntimeError, match="simulated failure"):
        predict(model, [path], out, (8, 8, 8), (4, 4, 4), batch_size=9)
    assert sorted(os.listdir(out)) == ["vol_predictions.h5"]  # no temporary file left
    assert final.read_bytes() == before
    # A successful run then replaces it.
    predict(tiny_model(), [path], out, (8, 8, 8), (4, 4, 4), batch_size=9)
    assert sorted(os.listdir(out)) == ["vol_predictions.h5"]
    with h5py.File(final, "r") as f:
        assert "marker" not in f.attrs and f["predictions"].shape == (2, *raw.shape)


def test_failure_in_second_volume_keeps_the_completed_first(tmp_path):
    first, raw1 = random_volume(tmp_path / "a.h5", (8, 8, 8), seed=10)  # one patch: batch 0
    second, _ = random_volume(tmp_path / "b.h5", (16, 8, 8), seed=11)  # z-starts 0, 4, 8: batches 1, 2, 3
    model = tiny_model(cls=FailingModule)
    with pytest.raises(RuntimeError, match="simulated failure"):
        predict(model, [first, second], tmp_path / "out", (8, 8, 8), (4, 8, 8), batch_size=1)
    assert sorted(os.listdir(tmp_path / "out")) == ["a_predictions.h5"]
    expected = probabilities_of(model, torch.from_numpy(standardised(raw1))[None, None])[0].numpy()
    np.testing.assert_allclose(read(tmp_path / "out" / "a_predictions.h5"), expected, atol=1e-5)


class FailingRead(UNet3DModule):
    """Fails in the batch hook of batch 2: the failure happens outside predict_step, as a bad read would."""

    def on_predict_batch_start(self, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 2:
            raise OSError("simulated read error")


def test_failure_outside_the_step_also_cleans_up(tmp_path):
    path, _ = random_volume(tmp_path / "vol.h5", (16, 8, 8), seed=12)
    with pytest.raises(OSError, match="simulated read error"):
        predict(tiny_model(cls=FailingRead), [path], tmp_path / "out", (8, 8, 8), (4, 8, 8), batch_size=1)
    assert not (tmp_path / "out").exists()  # nothing written, and the directory the run created is gone


# ----------------------------------------------------------------------------------------------------------------------
# Configuration errors
# ----------------------------------------------------------------------------------------------------------------------


def test_unwritable_output_dir_is_a_configuration_error_naming_it(tmp_path):
    path, _ = random_volume(tmp_path / "vol.h5", (8, 8, 8), seed=13)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the output directory should go")
    with pytest.raises(ConfigurationError, match="not_a_dir"):
        predict(tiny_model(), [path], blocker / "out", (8, 8, 8), (8, 8, 8))


def test_two_inputs_with_the_same_stem_are_rejected_before_writing(tmp_path):
    a, _ = random_volume(tmp_path / "one" / "vol.h5", (8, 8, 8), seed=14)
    b, _ = random_volume(tmp_path / "two" / "vol.h5", (8, 8, 8), seed=15)
    with pytest.raises(ConfigurationError, match="vol_predictions.h5"):
        predict(tiny_model(), [a, b], tmp_path / "out", (8, 8, 8), (8, 8, 8))
    assert not (tmp_path / "out").exists()  # nothing written, and the directory the run created is gone


def test_halo_too_large_for_the_patch_is_rejected_before_predicting(tmp_path):
    path, _ = random_volume(tmp_path / "vol.h5", (16, 8, 8), seed=16)
    model = tiny_model(cls=FailingModule)
    model.fail_at = 0  # any predict step would raise a RuntimeError instead
    with pytest.raises(ConfigurationError, match="prediction.halo"):
        predict(model, [path], tmp_path / "out", (8, 8, 8), (4, 8, 8), halo=3)
    assert not (tmp_path / "out").exists()  # nothing written, and the directory the run created is gone


@pytest.mark.parametrize(
    "kwargs, name",
    [({"blend": "median"}, "prediction.blend"), ({"dtype": "int16"}, "prediction.dtype"),
     ({"compression": "zstd"}, "prediction.compression"), ({"halo": -1}, "prediction.halo")],
)
def test_invalid_writer_arguments_name_the_option(kwargs, name):
    with pytest.raises(ConfigurationError, match=name):
        PredictionWriter("out", **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------------------------------


def test_one_progress_bar_per_volume(tmp_path, capsys):
    files = [random_volume(tmp_path / f"v{i}.h5", (12, 8, 8), seed=20 + i)[0] for i in range(2)]
    predict(tiny_model(), files, tmp_path / "out", (8, 8, 8), (4, 8, 8), batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "v0.h5 (1/2)" in err and "v1.h5 (2/2)" in err
    assert "2/2" in err  # each volume has 2 patches (z-starts 0 and 4)


# ----------------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a device)
# ----------------------------------------------------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("blend, halo", [("average", 0), ("gaussian", 1)])
def test_cuda_stitching_matches_reference(tmp_path, blend, halo):
    shapes = [(20, 18, 16), (5, 12, 12)]
    files = [random_volume(tmp_path / f"v{i}.h5", s, seed=30 + i) for i, s in enumerate(shapes)]
    model = tiny_model()
    writer = predict(model, [p for p, _ in files], tmp_path / "out", (8, 8, 8), (4, 6, 6), batch_size=5,
                     accelerator="gpu", blend=blend, halo=halo, save_segmentation=True)
    model.cpu()
    for (_, raw), out in zip(files, writer.written):
        expected = reference_stitch(model, raw, (8, 8, 8), (4, 6, 6), blend, (halo,) * 3)
        # cuDNN convolutions differ from the CPU ones by float32 rounding.
        np.testing.assert_allclose(read(out), expected, atol=1e-4)
        mask = confident(expected, "argmax")
        np.testing.assert_array_equal(read(out, "segmentation")[mask], expected.argmax(0)[mask])


@CUDA
def test_cuda_bf16_mixed_is_close_to_fp32(tmp_path):
    path, raw = random_volume(tmp_path / "vol.h5", (20, 18, 16), seed=40)
    model = tiny_model()
    predict(model, [path], tmp_path / "out", (8, 8, 8), (4, 6, 6), accelerator="gpu", precision="bf16-mixed",
            blend="gaussian")
    model.cpu()
    got = read(tmp_path / "out" / "vol_predictions.h5")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)
    expected = reference_stitch(model, raw, (8, 8, 8), (4, 6, 6), "gaussian")
    assert np.abs(got - expected).mean() < 0.01 and np.abs(got - expected).max() < 0.2
