"""Input data that used to be handled silently or badly: each case ends in one `error:` line (exit 2) naming the file
or dataset before anything is written, or is now read as the user meant it.

Covers: file names with glob characters, values beyond float32 (raw and weights), complex raw, virtual datasets and
external links whose targets are missing, a file locked by a writer or open for writing in another process.
"""

import fcntl
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from conftest import blob_volume, cli_error_line, write_h5
from unet3d_lightning.data.datamodule import VolumeDataModule
from unet3d_lightning.data.volumes import open_volume, resolve_paths
from unet3d_lightning.errors import ConfigurationError

SHAPE = (8, 16, 16)


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


def fit_error(capsys, trained, path) -> str:
    root, _ = trained
    return cli_error_line(capsys, ["fit", "--config", str(root / "fit.yaml"), "--data.train_paths", f"[{path}]",
                                   "--trainer.default_root_dir", str(path.parent / "runs")])


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
def test_values_beyond_float32_stop_training(one_step_fit, capsys, tmp_path):
    raw, label = blob_volume(shape=SHAPE, seed=6)
    raw = raw.astype(np.float64)
    raw[2, 3, 4] = 1e39  # finite in float64, Inf once cast to the float32 the network computes in
    path = write_h5(tmp_path / "huge.h5", raw=raw, label=label)
    last = fit_error(capsys, one_step_fit, path)
    assert f"train volume {path}: dataset 'raw' holds values up to 1e+39" in last
    assert "float32" in last and "rescale" in last
    assert not (tmp_path / "runs").exists()


def test_values_beyond_float32_in_weights(tmp_path):
    raw, label = blob_volume(shape=SHAPE, seed=6)
    weight = np.ones(SHAPE, np.float64)
    weight[0, 0, 0] = -3e40
    path = write_h5(tmp_path / "w.h5", raw=raw, label=label, weight=weight)
    datamodule = VolumeDataModule(train_paths=[str(path)], val_paths=[str(path)], train_patch_shape=[8, 8, 8],
                                  weight_internal_path="weight", num_workers=0)
    with pytest.raises(ConfigurationError, match=r"dataset 'weight' holds values up to 3e\+40 in z rows 0-7"):
        datamodule.check("fit")


def test_complex_raw_is_refused(one_step_fit, capsys, tmp_path):
    raw, label = blob_volume(shape=SHAPE, seed=7)
    path = write_h5(tmp_path / "complex.h5", raw=raw + 1j * raw, label=label)
    last = fit_error(capsys, one_step_fit, path)
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


def test_virtual_dataset_with_a_missing_source_file(one_step_fit, capsys, tmp_path):
    path, raw = virtual_volume(tmp_path)
    volume = open_volume(path, "train", "raw", "label")  # intact: accepted, and reads the source's values
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["raw"][()], raw)
    assert volume.spatial_shape == SHAPE
    (tmp_path / "src.h5").rename(tmp_path / "moved.h5")
    last = fit_error(capsys, one_step_fit, path)
    assert f"train volume {path}: dataset 'raw' is a virtual dataset whose source file src.h5 does not exist" in last
    assert not (tmp_path / "runs").exists()


def test_virtual_dataset_with_a_missing_source_dataset(tmp_path):
    path, _ = virtual_volume(tmp_path, source_dataset="volume")
    with pytest.raises(ConfigurationError, match=r"source file .*src.h5 has no dataset 'volume'"):
        open_volume(path, "train", "raw", "label")


def test_broken_external_link_names_its_target(one_step_fit, capsys, tmp_path):
    raw, label = blob_volume(shape=SHAPE, seed=9)
    write_h5(tmp_path / "images.h5", image=raw)
    path = write_h5(tmp_path / "linked.h5", label=label)
    with h5py.File(path, "a") as f:
        f["raw"] = h5py.ExternalLink("images.h5", "/image")
    assert open_volume(path, "train", "raw", "label").spatial_shape == SHAPE  # the link works
    (tmp_path / "images.h5").unlink()
    last = fit_error(capsys, one_step_fit, path)
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
