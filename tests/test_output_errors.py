"""Prediction outputs that used to be handled silently or badly: each case ends in one `error:` line (exit 2) naming
the file, and leaves inputs unchanged and nothing behind.

Covers: an output that would replace an input (same directory, symlinked directory, hard link, a Zarr store), a full
disk while writing predictions, a prediction too large for memory, and output directories left behind by failed
runs.
"""

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import unet3d_lightning.prediction.memory as memory_module
import unet3d_lightning.prediction.outputs.chunks as chunks_module
import unet3d_lightning.prediction.outputs.hdf5 as hdf5_module
from conftest import blob_volume, cli_error_line, write_h5
from unet3d_lightning.cli import main
from unet3d_lightning.data.datamodule import VolumeDataModule
from unet3d_lightning.errors import ConfigurationError
from unet3d_lightning.module import UNet3DModule
from unet3d_lightning.prediction.callback import PredictionWriter

SHAPE = (8, 16, 16)


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


def predict_args(checkpoint, inputs, output_dir, patch=(8, 8, 8)):
    return ["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", f"[{inputs}]",
            "--data.predict_patch_shape", str(list(patch)), "--prediction.output_dir", str(output_dir),
            "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ inputs vs outputs
@pytest.mark.parametrize("layout", ["same directory", "symlinked directory", "hard link"])
def test_predict_never_writes_over_an_input(one_step_fit, capsys, tmp_path, layout):
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    clash = tmp_path / "clash"
    x = write_h5(clash / "x.h5", raw=raw)
    if layout == "hard link":
        # The output directory is elsewhere, but the file the prediction of x would replace is a second name of the
        # input y.h5.
        y = write_h5(clash / "y.h5", raw=raw * 2)
        output_dir = tmp_path / "out"
        output_dir.mkdir()
        os.link(y, output_dir / "x_predictions.h5")
        inputs, protected = f"{x},{y}", y
    else:
        protected = write_h5(clash / "x_predictions.h5", raw=raw * 2)
        output_dir = clash
        if layout == "symlinked directory":
            output_dir = tmp_path / "link"
            output_dir.symlink_to(clash)
        inputs = str(clash)
    before = digest(protected)
    last = cli_error_line(capsys, predict_args(checkpoint, inputs, output_dir))
    assert f"{output_dir / 'x_predictions.h5'}, which is the input {protected}" in last, last
    assert "choose another prediction.output_dir" in last
    assert digest(protected) == before
    assert not list(clash.glob(".*tmp*")) and not list(output_dir.glob(".*tmp*"))


def test_output_dir_that_is_an_input_file(one_step_fit, capsys):
    root, checkpoint = one_step_fit
    volume = root / "data" / "train.h5"
    before = digest(volume)
    last = cli_error_line(capsys, predict_args(checkpoint, volume, volume))
    assert f"prediction.output_dir {volume} is or lies inside the input {volume}" in last
    assert digest(volume) == before


@pytest.mark.parametrize("where", ["inside the store", "over the store"])
def test_zarr_store_inputs_are_never_written_to(one_step_fit, capsys, tmp_path, where):
    """A Zarr input is a directory: an output directory inside it, or a Zarr output replacing it, would change it."""
    zarr = pytest.importorskip("zarr")
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=3)
    inputs = []
    for name in ("x.zarr", "x_predictions.zarr"):
        group = zarr.open_group(str(tmp_path / name), mode="w")
        group.create_array("raw", data=raw, chunks=(4, 8, 8))
        inputs.append(tmp_path / name)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    if where == "inside the store":
        args = predict_args(checkpoint, inputs[0], inputs[0] / "out")
        expected = f"prediction.output_dir {inputs[0] / 'out'} is or lies inside the input {inputs[0]}"
    else:
        args = [*predict_args(checkpoint, tmp_path, tmp_path), "--prediction.format", "zarr"]
        expected = f"{tmp_path / 'x_predictions.zarr'}, which is the input {inputs[1]}"
    last = cli_error_line(capsys, args)
    assert expected in last, last
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_writer_alone_refuses_an_output_that_is_an_input(tmp_path):
    """The check also holds for users of the Python API (a Trainer with the PredictionWriter)."""
    raw, _ = blob_volume(shape=SHAPE, seed=4)
    write_h5(tmp_path / "v.h5", raw=raw)
    victim = write_h5(tmp_path / "v_predictions.h5", raw=raw)
    before = digest(victim)
    torch.manual_seed(0)
    model = UNet3DModule(in_channels=1, out_channels=2, f_maps=4, num_levels=2, num_groups=2)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[PredictionWriter(str(tmp_path))])
    datamodule = VolumeDataModule(predict_paths=[str(tmp_path / "v.h5"), str(victim)], predict_patch_shape=[8, 8, 8],
                                  num_workers=0)
    with pytest.raises(ConfigurationError, match="which is the input"):
        trainer.predict(model, datamodule=datamodule, return_predictions=False)
    assert digest(victim) == before


# ------------------------------------------------------------------------------------------------ writing
def test_disk_full_during_predict(one_step_fit, capsys, tmp_path, monkeypatch):
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=11)
    volume = write_h5(tmp_path / "data" / "v.h5", raw=raw)

    def full_disk(self, z0, rows):
        raise OSError(errno.ENOSPC, "Can't write data (file write failed: errno = 28, error message = 'No space "
                                    "left on device')")

    class FullDiskFile(h5py.File):
        """Flushing the temporary file on close fails too, as it does on a full disk."""

        def close(self):
            super().close()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(chunks_module.ChunkRowDataset, "_write", full_disk)
    monkeypatch.setattr(hdf5_module, "h5py", types.SimpleNamespace(File=FullDiskFile))
    output_dir = tmp_path / "new" / "out"
    last = cli_error_line(capsys, predict_args(checkpoint, volume, output_dir))
    assert f"error: prediction output {output_dir / 'v_predictions.h5'}: the disk is full" in last
    assert "prediction.output_dir" in last
    assert not (tmp_path / "new").exists()  # temporary file removed, and the directories the run created


def test_failed_predict_leaves_no_directory(one_step_fit, capsys, tmp_path):
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=12)
    raw[1, 1, 1] = np.nan
    volume = write_h5(tmp_path / "data" / "nan.h5", raw=raw)
    last = cli_error_line(capsys, predict_args(checkpoint, volume, tmp_path / "a" / "b"))
    assert "NaN" in last
    assert not (tmp_path / "a").exists()
    # An existing directory is kept, and nothing is written into it.
    (tmp_path / "kept").mkdir()
    cli_error_line(capsys, predict_args(checkpoint, volume, tmp_path / "kept" / "sub"))
    assert list((tmp_path / "kept").iterdir()) == []


# ------------------------------------------------------------------------------------------------ memory
def test_memory_estimate_formula():
    # Hand-worked: patch 4 x 8 x 8 (P = 256), plane 10 x 12 = 120, B = 2, C_in = 1, C = 3, f_maps = 4.
    parts = memory_module.estimate_predict_memory((4, 8, 8), (20, 10, 12), 2, 1, 3, 4)
    assert parts["stitcher"] == 4 * (4 * 4 * 120 + 2 * 4 * 256 + 3 * 4 * 120)  # band, staging, one slab
    assert parts["patches"] == 4 * 2 * 256 * (1 + 6)  # input, logits, probabilities
    assert parts["network"] == 4 * 2 * 256 * 16 * 12  # f_maps counted as at least 16 (oneDNN's channel blocks)
    assert parts["writer"] == 3 * 120 * (16 * 4 + 3 * 4 * 4)
    with_tta = memory_module.estimate_predict_memory((4, 8, 8), (20, 10, 12), 2, 1, 3, 4, tta=True)
    assert with_tta["patches"] == 2 * parts["patches"]


@pytest.mark.slow
def test_network_activations_stay_within_the_estimate():
    """The activation term bounds the real peak: the resident memory one prediction forward pass adds, measured in a
    fresh process after a small warm-up forward (which pages in the kernels' code)."""
    script = textwrap.dedent("""
        import torch
        from unet3d_lightning.module import UNet3DModule
        from unet3d_lightning.prediction.engine import inference_context

        def status(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

        torch.set_num_threads(1)
        model = UNet3DModule(in_channels=1, out_channels=2, f_maps=8, num_levels=3, num_groups=4).eval()
        # The forward pass as predict runs it (the CPU kernel choice of the inference engine, which the estimate
        # is calibrated for).
        with torch.no_grad(), inference_context("cpu", model.net):
            model(torch.randn(1, 1, 8, 16, 16))
            x = torch.randn(1, 1, 32, 64, 64)
            before = status("VmRSS:")
            # Reset the peak (VmHWM) to the current size: the high-water mark of the imports may lie above
            # everything that follows, which would hide the forward pass's peak.
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            model(x)
        print(status("VmHWM:") - before)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak = int(result.stdout.split()[-1])
    parts = memory_module.estimate_predict_memory((32, 64, 64), (32, 64, 64), 1, 1, 2, 8)
    bound = parts["network"] + parts["patches"]
    assert 0 < peak <= bound, (peak, bound)
    assert peak > bound / 4, (peak, bound)  # and not so loose that it refuses runs that fit


def test_predict_too_large_for_memory_is_refused_before_it_starts(one_step_fit, capsys, tmp_path):
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=13)
    volume = write_h5(tmp_path / "v.h5", raw=raw)
    # 2048^3 voxels per patch: terabytes of activations on any machine this runs on.
    last = cli_error_line(capsys, predict_args(checkpoint, volume, tmp_path / "out", patch=(2048, 2048, 2048)))
    assert "predicting patches of data.predict_patch_shape [2048, 2048, 2048] in batches of data.batch_size 1" in last
    assert "use a smaller data.predict_patch_shape or data.batch_size" in last
    assert not (tmp_path / "out").exists()


def test_memory_check_compares_with_what_is_available(one_step_fit, capsys, tmp_path, monkeypatch):
    _, checkpoint = one_step_fit
    raw, _ = blob_volume(shape=SHAPE, seed=13)
    volume = write_h5(tmp_path / "v.h5", raw=raw)
    need = sum(memory_module.estimate_predict_memory((8, 8, 8), (8, 16, 16), 1, 1, 2, 4).values())
    monkeypatch.setattr(memory_module, "available_memory", lambda device: need - 1)
    last = cli_error_line(capsys, predict_args(checkpoint, volume, tmp_path / "out"))
    assert "of cpu memory" in last and "is available" in last
    monkeypatch.setattr(memory_module, "available_memory", lambda device: need)
    main(predict_args(checkpoint, volume, tmp_path / "out"))
    assert (tmp_path / "out" / "v_predictions.h5").is_file()
