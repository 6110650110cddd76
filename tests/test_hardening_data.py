"""Inputs and outputs that used to be handled silently or badly: each case ends in one `error:` line (exit 2) naming the
file or dataset, or is now read as the user meant it.

Covers: an output that would replace an input (same directory, symlinked directory, hard link), file names with
glob characters, values beyond float32, complex raw, virtual datasets and external links whose targets are missing,
a file locked by a writer, a full disk while writing predictions, a prediction too large for memory, and output
directories left behind by failed runs.
"""

import errno
import fcntl
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
import yaml

import unet3d_lightning.prediction.writer as writer_module
from conftest import blob_volume, write_h5
from unet3d_lightning.cli import main
from unet3d_lightning.data.datamodule import HDF5DataModule
from unet3d_lightning.data.volumes import open_volume, resolve_paths
from unet3d_lightning.errors import ConfigurationError
from unet3d_lightning.module import UNet3DModule
from unet3d_lightning.prediction.writer import PredictionWriter

SHAPE = (8, 16, 16)


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A fit config on good data and the checkpoint of one training step."""
    root = tmp_path_factory.mktemp("trained")
    raw, label = blob_volume(shape=SHAPE, seed=0)
    write_h5(root / "data" / "train.h5", raw=raw, label=label)
    config = {
        "trainer": {"default_root_dir": str(root / "runs"), "accelerator": "cpu", "max_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"out_channels": 2, "f_maps": 4, "num_levels": 2, "num_groups": 2},
        "data": {"train_paths": [str(root / "data" / "train.h5")], "val_paths": [str(root / "data" / "train.h5")],
                 "train_patch_shape": [8, 8, 8], "num_workers": 0},
    }
    (root / "fit.yaml").write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["unet3d"])
        main(["fit", "--config", str(root / "fit.yaml")])
    return root, next((root / "runs").rglob("last.ckpt"))


def run_error(capsys, args) -> str:
    """Run the command, expect exit status 2, and return its last stderr line (which must be the `error:` line)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    return last


def predict_args(checkpoint, inputs, output_dir, patch=(8, 8, 8)):
    return ["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", f"[{inputs}]",
            "--data.predict_patch_shape", str(list(patch)), "--prediction.output_dir", str(output_dir),
            "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fit_error(capsys, trained, path) -> str:
    root, _ = trained
    return run_error(capsys, ["fit", "--config", str(root / "fit.yaml"), "--data.train_paths", f"[{path}]",
                              "--trainer.default_root_dir", str(path.parent / "runs")])


# ------------------------------------------------------------------------------------------------ inputs vs outputs
@pytest.mark.parametrize("layout", ["same directory", "symlinked directory", "hard link"])
def test_predict_never_writes_over_an_input(trained, capsys, tmp_path, layout):
    _, checkpoint = trained
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
    last = run_error(capsys, predict_args(checkpoint, inputs, output_dir))
    assert f"{output_dir / 'x_predictions.h5'}, which is the input {protected}" in last, last
    assert "choose another prediction.output_dir" in last
    assert digest(protected) == before
    assert not list(clash.glob(".*tmp*")) and not list(output_dir.glob(".*tmp*"))


def test_output_dir_that_is_an_input_file(trained, capsys):
    root, checkpoint = trained
    volume = root / "data" / "train.h5"
    before = digest(volume)
    last = run_error(capsys, predict_args(checkpoint, volume, volume))
    assert f"prediction.output_dir {volume} is or lies inside the input {volume}" in last
    assert digest(volume) == before


@pytest.mark.parametrize("where", ["inside the store", "over the store"])
def test_zarr_store_inputs_are_never_written_to(trained, capsys, tmp_path, where):
    """A Zarr input is a directory: an output directory inside it, or a Zarr output replacing it, would change it."""
    zarr = pytest.importorskip("zarr")
    _, checkpoint = trained
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
    last = run_error(capsys, args)
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
    datamodule = HDF5DataModule(predict_paths=[str(tmp_path / "v.h5"), str(victim)], predict_patch_shape=[8, 8, 8],
                                num_workers=0)
    with pytest.raises(ConfigurationError, match="which is the input"):
        trainer.predict(model, datamodule=datamodule, return_predictions=False)
    assert digest(victim) == before


# ------------------------------------------------------------------------------------------------ names
def test_a_file_name_with_glob_characters_is_that_file(tmp_path):
    raw, _ = blob_volume(shape=SHAPE, seed=5)
    literal = write_h5(tmp_path / "scan[1].h5", raw=raw)
    other = write_h5(tmp_path / "scan1.h5", raw=raw)  # what the pattern scan[1].h5 matches
    star = write_h5(tmp_path / "a*b.h5", raw=raw)
    write_h5(tmp_path / "aXb.h5", raw=raw)
    assert resolve_paths([str(literal)], "train") == [literal]
    assert resolve_paths([str(star)], "train") == [star]
    # A name that does not exist is still a pattern.
    assert resolve_paths([str(tmp_path / "scan[12].h5")], "train") == [other]


# ------------------------------------------------------------------------------------------------ values and dtypes
def test_values_beyond_float32_stop_training(trained, capsys, tmp_path):
    raw, label = blob_volume(shape=SHAPE, seed=6)
    raw = raw.astype(np.float64)
    raw[2, 3, 4] = 1e39  # finite in float64, Inf once cast to the float32 the network computes in
    path = write_h5(tmp_path / "huge.h5", raw=raw, label=label)
    last = fit_error(capsys, trained, path)
    assert f"train volume {path}: dataset 'raw' holds values up to 1e+39" in last
    assert "float32" in last and "rescale" in last
    assert not (tmp_path / "runs").exists()


def test_values_beyond_float32_in_weights(tmp_path):
    raw, label = blob_volume(shape=SHAPE, seed=6)
    weight = np.ones(SHAPE, np.float64)
    weight[0, 0, 0] = -3e40
    path = write_h5(tmp_path / "w.h5", raw=raw, label=label, weight=weight)
    datamodule = HDF5DataModule(train_paths=[str(path)], val_paths=[str(path)], train_patch_shape=[8, 8, 8],
                                weight_internal_path="weight", num_workers=0)
    with pytest.raises(ConfigurationError, match=r"dataset 'weight' holds values up to 3e\+40 in z rows 0-7"):
        datamodule.check("fit")


def test_complex_raw_is_refused(trained, capsys, tmp_path):
    raw, label = blob_volume(shape=SHAPE, seed=7)
    path = write_h5(tmp_path / "complex.h5", raw=raw + 1j * raw, label=label)
    last = fit_error(capsys, trained, path)
    assert f"train volume {path}: dataset 'raw' has complex dtype complex64" in last
    assert "imaginary part" in last


# ------------------------------------------------------------------------------------------------ HDF5 structure
def virtual_volume(tmp_path, source_dataset="raw"):
    """vds.h5 whose 'raw' is a virtual dataset over src.h5's 'raw'; its label is stored in the file itself."""
    raw, label = blob_volume(shape=SHAPE, seed=8)
    write_h5(tmp_path / "src.h5", raw=raw)
    layout = h5py.VirtualLayout(SHAPE, np.float32)
    layout[:] = h5py.VirtualSource("src.h5", source_dataset, shape=SHAPE)
    with h5py.File(tmp_path / "vds.h5", "w") as f:
        f.create_virtual_dataset("raw", layout, fillvalue=0)
        f["label"] = label
    return tmp_path / "vds.h5", raw


def test_virtual_dataset_with_a_missing_source_file(trained, capsys, tmp_path):
    path, raw = virtual_volume(tmp_path)
    volume = open_volume(path, "train", "raw", "label")  # intact: accepted, and reads the source's values
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["raw"][()], raw)
    assert volume.spatial_shape == SHAPE
    (tmp_path / "src.h5").rename(tmp_path / "moved.h5")
    last = fit_error(capsys, trained, path)
    assert f"train volume {path}: dataset 'raw' is a virtual dataset whose source file src.h5 does not exist" in last
    assert not (tmp_path / "runs").exists()


def test_virtual_dataset_with_a_missing_source_dataset(tmp_path):
    path, _ = virtual_volume(tmp_path, source_dataset="volume")
    with pytest.raises(ConfigurationError, match=r"source file .*src.h5 has no dataset 'volume'"):
        open_volume(path, "train", "raw", "label")


def test_broken_external_link_names_its_target(trained, capsys, tmp_path):
    raw, label = blob_volume(shape=SHAPE, seed=9)
    write_h5(tmp_path / "images.h5", image=raw)
    path = write_h5(tmp_path / "linked.h5", label=label)
    with h5py.File(path, "a") as f:
        f["raw"] = h5py.ExternalLink("images.h5", "/image")
    assert open_volume(path, "train", "raw", "label").spatial_shape == SHAPE  # the link works
    (tmp_path / "images.h5").unlink()
    last = fit_error(capsys, trained, path)
    assert f"train volume {path}: 'raw' is an external link to '/image' in images.h5" in last
    assert "that file does not exist" in last
    write_h5(tmp_path / "images.h5", other=raw)
    with pytest.raises(ConfigurationError, match=r"has no object '/image'"):
        open_volume(path, "train", "raw", "label")


def test_file_locked_by_a_writer(tmp_path):
    """HDF5 writers hold an exclusive flock on the file; taking one here is what another process's writer does."""
    raw, label = blob_volume(shape=SHAPE, seed=10)
    path = write_h5(tmp_path / "busy.h5", raw=raw, label=label)
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigurationError) as error:
            open_volume(path, "train", "raw", "label")
    finally:
        os.close(fd)
    message = str(error.value)
    assert message.startswith(f"train volume {path}: the file is locked by another process")
    assert "HDF5_USE_FILE_LOCKING=FALSE" in message and "truncated" not in message
    assert open_volume(path, "train", "raw", "label").spatial_shape == SHAPE  # unlocked: readable again


@pytest.mark.slow
def test_file_open_for_writing_in_another_process(tmp_path):
    raw, label = blob_volume(shape=SHAPE, seed=10)
    path = write_h5(tmp_path / "busy.h5", raw=raw, label=label)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, h5py
            with h5py.File({str(path)!r}, "a"):
                print("open", flush=True)
                sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline().strip() == "open"
        with pytest.raises(ConfigurationError, match="locked by another process"):
            open_volume(path, "predict")
    finally:
        child.communicate("done\n", timeout=30)


# ------------------------------------------------------------------------------------------------ writing
def test_disk_full_during_predict(trained, capsys, tmp_path, monkeypatch):
    _, checkpoint = trained
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

    monkeypatch.setattr(writer_module._ChunkRowDataset, "_write", full_disk)
    monkeypatch.setattr(writer_module, "h5py", types.SimpleNamespace(File=FullDiskFile))
    output_dir = tmp_path / "new" / "out"
    last = run_error(capsys, predict_args(checkpoint, volume, output_dir))
    assert f"error: prediction output {output_dir / 'v_predictions.h5'}: the disk is full" in last
    assert "prediction.output_dir" in last
    assert not (tmp_path / "new").exists()  # temporary file removed, and the directories the run created


def test_failed_predict_leaves_no_directory(trained, capsys, tmp_path):
    _, checkpoint = trained
    raw, _ = blob_volume(shape=SHAPE, seed=12)
    raw[1, 1, 1] = np.nan
    volume = write_h5(tmp_path / "data" / "nan.h5", raw=raw)
    last = run_error(capsys, predict_args(checkpoint, volume, tmp_path / "a" / "b"))
    assert "NaN" in last
    assert not (tmp_path / "a").exists()
    # An existing directory is kept, and nothing is written into it.
    (tmp_path / "kept").mkdir()
    run_error(capsys, predict_args(checkpoint, volume, tmp_path / "kept" / "sub"))
    assert list((tmp_path / "kept").iterdir()) == []


# ------------------------------------------------------------------------------------------------ memory
def test_memory_estimate_formula():
    # Hand-worked: patch 4 x 8 x 8 (P = 256), plane 10 x 12 = 120, B = 2, C_in = 1, C = 3, f_maps = 4.
    parts = writer_module.estimate_predict_memory((4, 8, 8), (20, 10, 12), 2, 1, 3, 4)
    assert parts["stitcher"] == 4 * (4 * 4 * 120 + 2 * 4 * 256 + 3 * 4 * 120)  # band, staging, one slab
    assert parts["patches"] == 4 * 2 * 256 * (1 + 6)  # input, logits, probabilities
    assert parts["network"] == 4 * 2 * 256 * 16 * 12  # f_maps counted as at least 16 (oneDNN's channel blocks)
    assert parts["writer"] == 3 * 120 * (16 * 4 + 3 * 4 * 4)
    with_tta = writer_module.estimate_predict_memory((4, 8, 8), (20, 10, 12), 2, 1, 3, 4, tta=True)
    assert with_tta["patches"] == 2 * parts["patches"]


@pytest.mark.slow
def test_network_activations_stay_within_the_estimate():
    """The activation term bounds the real peak: the resident memory one forward pass adds, measured in a fresh
    process after a small warm-up forward (which pages in the kernels' code)."""
    script = textwrap.dedent("""
        import torch
        from unet3d_lightning.module import UNet3DModule

        def status(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

        torch.set_num_threads(1)
        model = UNet3DModule(in_channels=1, out_channels=2, f_maps=8, num_levels=3, num_groups=4).eval()
        with torch.no_grad():
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
    parts = writer_module.estimate_predict_memory((32, 64, 64), (32, 64, 64), 1, 1, 2, 8)
    bound = parts["network"] + parts["patches"]
    assert 0 < peak <= bound, (peak, bound)
    assert peak > bound / 4, (peak, bound)  # and not so loose that it refuses runs that fit


def test_predict_too_large_for_memory_is_refused_before_it_starts(trained, capsys, tmp_path):
    _, checkpoint = trained
    raw, _ = blob_volume(shape=SHAPE, seed=13)
    volume = write_h5(tmp_path / "v.h5", raw=raw)
    # 2048^3 voxels per patch: terabytes of activations on any machine this runs on.
    last = run_error(capsys, predict_args(checkpoint, volume, tmp_path / "out", patch=(2048, 2048, 2048)))
    assert "predicting patches of data.predict_patch_shape [2048, 2048, 2048] in batches of data.batch_size 1" in last
    assert "use a smaller data.predict_patch_shape or data.batch_size" in last
    assert not (tmp_path / "out").exists()


def test_memory_check_compares_with_what_is_available(trained, capsys, tmp_path, monkeypatch):
    _, checkpoint = trained
    raw, _ = blob_volume(shape=SHAPE, seed=13)
    volume = write_h5(tmp_path / "v.h5", raw=raw)
    need = sum(writer_module.estimate_predict_memory((8, 8, 8), (8, 16, 16), 1, 1, 2, 4).values())
    monkeypatch.setattr(writer_module, "available_memory", lambda device: need - 1)
    last = run_error(capsys, predict_args(checkpoint, volume, tmp_path / "out"))
    assert "of cpu memory" in last and "is available" in last
    monkeypatch.setattr(writer_module, "available_memory", lambda device: need)
    main(predict_args(checkpoint, volume, tmp_path / "out"))
    assert (tmp_path / "out" / "v_predictions.h5").is_file()
