"""Prediction outputs never destroy what is not ours: a path at an output's name is replaced only if it is an earlier
output of the writer; names the file system cannot hold, and paths of another kind, are refused before the model is
built; temporary outputs of processes that were killed are removed by the next run, with a note."""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest

from conftest import blob_volume, write_h5
from unet3d_lightning.cli import main
from unet3d_lightning.errors import ConfigurationError
from unet3d_lightning.module import UNet3DModule
from unet3d_lightning.prediction.paths import temporary_path

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A freshly initialised tiny model saved as Lightning saves one (the weights do not matter here)."""
    root = tmp_path_factory.mktemp("model")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, max_steps=0,
                         default_root_dir=str(root))
    model = UNet3DModule(out_channels=2, f_maps=4, num_levels=2, num_groups=2)
    trainer.strategy.connect(model)
    path = root / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture
def volume(tmp_path):
    raw, _ = blob_volume((8, 16, 16), seed=3)
    return write_h5(tmp_path / "vol.h5", raw=raw)


def predict_args(checkpoint, volume, out, *extra):
    return ["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", f"[{volume}]",
            "--data.predict_patch_shape", "[8, 16, 16]", "--prediction.output_dir", str(out),
            "--trainer.accelerator", "cpu", "--data.num_workers", "0", "--trainer.enable_progress_bar", "false",
            *extra]


def error_line(capsys, args) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args=args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


@pytest.fixture
def no_model(monkeypatch):
    """Building the model fails the test: the checks must have refused the run before."""
    original = UNet3DModule.__init__

    @functools.wraps(original)  # the parser reads the options from the signature
    def refuse(self, *args, **kwargs):
        raise AssertionError("the model was built before the output was checked")

    monkeypatch.setattr(UNet3DModule, "__init__", refuse)


def tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under ``path``: relative name -> file content (None for directories)."""
    return {str(p.relative_to(path)): (None if p.is_dir() else p.read_bytes()) for p in sorted(path.rglob("*"))}


# ------------------------------------------------------------------------------------------------ what is ours
def users_folder(final):
    final.mkdir(parents=True)
    (final / "notes.txt").write_text("my notes")


def users_file(final):
    final.parent.mkdir(parents=True, exist_ok=True)
    final.write_text("a text file that happens to have this name")


def other_tools_hdf5(final):
    # pytorch-3dunet writes <stem>_predictions.h5 with a 'predictions' dataset too, without our 'scale'.
    write_h5(final, predictions=np.zeros((2, 8, 16, 16), np.float32))


def our_hdf5_with_a_users_dataset(final):
    write_h5(final, predictions=np.zeros((2, 8, 16, 16), np.float32), proofread=np.zeros((8, 16, 16), np.uint8))
    with h5py.File(final, "a") as f:
        f["predictions"].attrs["scale"] = 1.0


def link_to_a_users_folder(final):
    users_folder(final.parent / "elsewhere")
    final.symlink_to(final.parent / "elsewhere", target_is_directory=True)


CASES = [
    ("zarr", users_folder, "not a Zarr (format 3) group"),
    ("zarr", users_file, "it is a file, not a Zarr store"),
    ("zarr", link_to_a_users_folder, "symbolic link"),
    ("hdf5", users_folder, "it is a directory, not an HDF5 file"),
    ("hdf5", users_file, "it is not an HDF5 file"),
    ("hdf5", other_tools_hdf5, "no 'predictions' dataset with the writer's 'scale'"),
    ("hdf5", our_hdf5_with_a_users_dataset, "['proofread']"),
]


@pytest.mark.parametrize("fmt, make, reason", CASES, ids=[f"{c[0]}-{c[1].__name__}" for c in CASES])
def test_a_path_that_is_not_our_output_is_refused_before_the_model_is_built(
        tmp_path, capsys, checkpoint, volume, no_model, fmt, make, reason):
    out = tmp_path / "out"
    final = out / ("vol_predictions.zarr" if fmt == "zarr" else "vol_predictions.h5")
    make(final)
    before = tree(out)
    line = error_line(capsys, predict_args(checkpoint, volume, out, "--prediction.format", fmt))
    assert f"prediction output {final} (of predict volume {volume}) already exists and is not an earlier output" \
        in line, line
    assert reason in line and "move or rename it, or choose another prediction.output_dir" in line
    assert tree(out) == before  # nothing deleted, replaced or added


def test_our_zarr_output_with_a_users_file_inside_is_refused(tmp_path, capsys, checkpoint, volume):
    out = tmp_path / "out"
    main(args=predict_args(checkpoint, volume, out, "--prediction.format", "zarr"))
    (out / "vol_predictions.zarr" / "notes.txt").write_text("my notes")
    before = tree(out)
    line = error_line(capsys, predict_args(checkpoint, volume, out, "--prediction.format", "zarr"))
    assert "['notes.txt'], which the writer never writes" in line
    assert tree(out) == before


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_an_earlier_output_is_replaced(tmp_path, checkpoint, volume, fmt):
    out = tmp_path / "out"
    main(args=predict_args(checkpoint, volume, out, "--prediction.format", fmt, "--prediction.save_segmentation",
                           "true"))
    name = "vol_predictions.zarr" if fmt == "zarr" else "vol_predictions.h5"
    main(args=predict_args(checkpoint, volume, out, "--prediction.format", fmt))
    assert os.listdir(out) == [name]
    if fmt == "hdf5":
        with h5py.File(out / name, "r") as f:
            assert set(f) == {"predictions"}  # the new output, without the earlier segmentation
    else:
        assert sorted(os.listdir(out / name)) == ["predictions", "zarr.json"]


class AUserMeanwhile(UNet3DModule):
    """Puts a folder of the user's at the output's name while the volume is being predicted."""

    final: Path

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            users_folder(self.final)
        return super().predict_step(batch, batch_idx, dataloader_idx)


def test_a_path_that_appears_during_the_run_is_not_replaced(tmp_path):
    from unet3d_lightning.data.datamodule import HDF5DataModule
    from unet3d_lightning.prediction.callback import PredictionWriter

    raw, _ = blob_volume((8, 16, 16), seed=4)
    path = write_h5(tmp_path / "vol.h5", raw=raw)
    out = tmp_path / "out"
    model = AUserMeanwhile(out_channels=2, f_maps=4, num_levels=2, num_groups=2).eval()
    model.final = out / "vol_predictions.zarr"
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[PredictionWriter(str(out), format="zarr")])
    data = HDF5DataModule(predict_paths=[str(path)], predict_patch_shape=[8, 16, 16], num_workers=0)
    with pytest.raises(ConfigurationError, match="vol_predictions.zarr already exists and is not an earlier output"):
        trainer.predict(model, datamodule=data, return_predictions=False)
    assert tree(out) == {"vol_predictions.zarr": None, "vol_predictions.zarr/notes.txt": b"my notes"}


# ------------------------------------------------------------------------------------------------ name lengths
def name_max(directory: Path) -> int:
    return os.pathconf(directory, "PC_NAME_MAX")


@pytest.mark.parametrize("fmt, suffix", [("zarr", "_predictions.zarr"), ("hdf5", "_predictions.h5")])
def test_an_output_name_over_the_limit_is_refused_and_nothing_is_created(
        tmp_path, capsys, checkpoint, no_model, fmt, suffix):
    limit = name_max(tmp_path)
    stem = "v" * (limit - len(".h5"))  # the volume's own name just fits; its output's does not
    raw, _ = blob_volume((8, 16, 16), seed=5)
    volume = write_h5(tmp_path / f"{stem}.h5", raw=raw)
    out = tmp_path / "new" / "out"
    line = error_line(capsys, predict_args(checkpoint, volume, out, "--prediction.format", fmt))
    size = len(temporary_path(out / f"{stem}{suffix}").name)
    assert f"predict volume {volume}: its output {stem}{suffix} needs a file name of {size} bytes" in line
    assert f"over the file system's limit of {limit} bytes per name" in line
    assert not (tmp_path / "new").exists()


def test_an_output_whose_temporary_name_only_is_over_the_limit_is_refused(tmp_path, capsys, checkpoint, no_model):
    limit = name_max(tmp_path)
    stem = "v" * (limit - len("_predictions.h5"))  # the final name fits exactly, the temporary one cannot
    raw, _ = blob_volume((8, 16, 16), seed=5)
    volume = write_h5(tmp_path / f"{stem}.h5", raw=raw)
    out = tmp_path / "out"
    line = error_line(capsys, predict_args(checkpoint, volume, out))
    assert f"predict volume {volume}" in line and f"limit of {limit} bytes" in line and ".tmp-" in line
    assert not out.exists()


def test_an_output_dir_name_over_the_limit_is_refused(tmp_path, capsys, checkpoint, volume, no_model):
    long = "d" * (name_max(tmp_path) + 1)
    line = error_line(capsys, predict_args(checkpoint, volume, tmp_path / long / "out"))
    assert f"prediction.output_dir {tmp_path / long / 'out'}: its directory name" in line
    assert "choose a shorter prediction.output_dir" in line


# ------------------------------------------------------------------------------------------------ stale temporaries
def test_temporary_names_hold_host_and_pid():
    name = temporary_path(Path("out") / "x_predictions.h5").name
    prefix, suffix = ".x_predictions.h5.tmp-", f"-{os.getpid()}"
    assert name.startswith(prefix) and name.endswith(suffix)
    host = socket.gethostname()
    if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", host):
        assert name[len(prefix):-len(suffix)] == host


def ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temporaries_of_ended_processes_of_this_host_are_removed_with_a_note(tmp_path, capsys, checkpoint, volume):
    out = tmp_path / "out"
    out.mkdir()
    dead = ended_pid()
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        def ours(name, kind, pid):  # the writer's name for this host, with another pid
            return temporary_path(out / name).name.replace(".tmp-", f".{kind}-").rsplit("-", 1)[0] + f"-{pid}"

        dead_h5 = out / ours("vol_predictions.h5", "tmp", dead)
        dead_h5.write_bytes(b"half an HDF5 file")
        dead_zarr = out / ours("other_predictions.zarr", "tmp", dead)
        (dead_zarr / "predictions" / "c").mkdir(parents=True)
        (dead_zarr / "predictions" / "c" / "0").write_bytes(b"chunk")
        dead_aside = out / ours("vol_predictions.zarr", "old", dead)
        dead_aside.mkdir()
        (dead_aside / "zarr.json").write_text("{}")
        live = out / ours("vol_predictions.h5", "tmp", sleeper.pid)
        live.write_bytes(b"being written")
        other_host = out / f".vol_predictions.h5.tmp-some-other-node-{dead}"
        other_host.write_bytes(b"being written elsewhere")
        unhosted = out / f".vol_predictions.h5.tmp-{dead}"
        unhosted.write_bytes(b"from an older release")
        (out / "notes.txt").write_text("mine")
        capsys.readouterr()
        main(args=predict_args(checkpoint, volume, out))
        err = capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(os.listdir(out)) == sorted(
        [live.name, other_host.name, unhosted.name, "notes.txt", "vol_predictions.h5"])
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    for path in (dead_h5, dead_zarr, dead_aside):
        assert f"note: removed {path}: the unfinished output of process {dead} of this machine, which has ended" \
            in notes, err
    assert any(str(unhosted) in note and "remove it if no prediction is writing it" in note for note in notes)
    assert len(notes) == 4
    assert (out / "notes.txt").read_text() == "mine" and live.read_bytes() == b"being written"


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from unet3d_lightning.prediction.outputs import VolumeOutput
for final, fmt in ((sys.argv[1], "hdf5"), (sys.argv[2], "zarr")):
    output = VolumeOutput(Path(final), (8, 16, 16), 2, "float32", None, "gzip", None, fmt)
    output.write(0, 4, __import__("numpy").zeros((2, 4, 16, 16), "float32"), None)
    print(output.tmp, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_after_kill_9_the_next_run_removes_the_temporary_outputs(tmp_path, capsys, checkpoint, volume):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(out / "vol_predictions.h5"), str(out / "vol_predictions.zarr")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    left = [Path(line) for line in killed.stdout.split()]
    assert len(left) == 2 and all(path.exists() for path in left)
    capsys.readouterr()
    main(args=predict_args(checkpoint, volume, out, "--prediction.format", "zarr"))
    err = capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["vol_predictions.zarr"]
    for path in left:
        assert f"note: removed {path}: the unfinished output of process" in err, err
