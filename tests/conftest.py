"""Shared fixtures: small HDF5 volumes written on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

# Tests run on CPU; keep each test process to the cores the CI machine has.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def write_h5(path: Path, **datasets: np.ndarray) -> Path:
    """Write ``datasets`` (name → array; names may contain '/') to a new HDF5 file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for name, array in datasets.items():
            f.create_dataset(name, data=array, chunks=True if np.asarray(array).ndim >= 3 else None)
    return path


def blob_volume(shape=(16, 24, 24), seed=0, channels=None):
    """A learnable toy volume: label 1 where a smooth random field is high, raw = that field + mild noise."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.linspace(0, 2 * np.pi, s) for s in shape), indexing="ij")
    phase = rng.uniform(0, 2 * np.pi, 3)
    field = np.sin(zz + phase[0]) * np.cos(yy + phase[1]) * np.sin(xx + phase[2])
    label = (field > 0.2).astype(np.uint8)
    raw = (field + rng.normal(0, 0.1, shape)).astype(np.float32)
    if channels:
        raw = np.stack([raw * (c + 1) for c in range(channels)])
    return raw, label


@pytest.fixture
def h5_writer():
    return write_h5


@pytest.fixture
def blob_files(tmp_path):
    """Two training volumes and one validation volume of class-id labels, as paths."""
    files = {}
    for name, seed in (("train_0", 0), ("train_1", 1), ("val_0", 2)):
        raw, label = blob_volume(seed=seed)
        files[name] = write_h5(tmp_path / f"{name}.h5", raw=raw, label=label)
    return files


@pytest.fixture(scope="module")
def one_step_fit(tmp_path_factory):
    """A fit config on good ``(8, 16, 16)`` data (``<root>/fit.yaml``, tiny model, CPU) and the ``last.ckpt`` of one
    training step, as ``(root, checkpoint)``; once per test module."""
    import sys

    import yaml

    from unet3d_lightning.cli import main

    root = tmp_path_factory.mktemp("trained")
    raw, label = blob_volume(shape=(8, 16, 16), seed=0)
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


def cli_error_line(capsys, args) -> str:
    """Run ``unet3d`` in-process with ``args``, expect exit status 2, and return its last stderr line (which must be
    the ``error:`` line)."""
    from unet3d_lightning.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    return last


# ------------------------------------------------------------------------------------------ the unet3d command
@pytest.fixture
def command_line(monkeypatch):
    """main(args=...) stands for the command line: pytest's own arguments must not be visible beside it."""
    import sys

    monkeypatch.setattr(sys, "argv", ["unet3d"])


def unet3d_command() -> list[str]:
    """The installed console script next to this Python, else the module (same entry point)."""
    import sys

    script = Path(sys.executable).parent / "unet3d"
    return [str(script)] if script.exists() else [sys.executable, "-m", "unet3d_lightning"]


def subprocess_env() -> dict[str, str]:
    """The environment of a subprocess run of the command: this checkout's sources, every warning shown."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "default"  # show every warning the run raises, so the test sees them
    return env


def make_config(root: Path, default_root_dir: str, **trainer) -> Path:
    """A fit config ``<root>/run.yaml`` of a tiny model on one (8, 16, 16) training and one validation volume in
    ``<root>/data`` (written once), two epochs of two batches; ``trainer`` settings are added to (or replace) the
    defaults."""
    import yaml

    data = root / "data"
    for name, seed in (("train_0", 0), ("val_0", 2)):
        if not (data / f"{name}.h5").exists():
            raw, label = blob_volume(shape=(8, 16, 16), seed=seed)
            write_h5(data / f"{name}.h5", raw=raw, label=label)
    config = {
        "seed_everything": 7,
        "trainer": {"default_root_dir": default_root_dir, "accelerator": "cpu", "max_epochs": 2,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False, **trainer},
        "model": {"out_channels": 2, "f_maps": 4, "num_levels": 2, "num_groups": 2, "learning_rate": 0.01},
        "data": {"train_paths": [str(data / "train_0.h5")], "val_paths": [str(data / "val_0.h5")],
                 "train_patch_shape": [8, 8, 8], "train_stride_shape": [8, 8, 8], "val_patch_shape": [8, 16, 16],
                 "batch_size": 2, "num_workers": 0},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def error_line(capsys, args) -> str:
    """Run the command in-process, expect exit status 2, and return its single `error:` line (the last line of
    stderr); stricter than :func:`cli_error_line`: no second `error:` line, no traceback."""
    from unet3d_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: "), err[-2000:]
    assert sum(line.startswith("error:") for line in lines) == 1
    assert "Traceback" not in err
    return lines[-1]


def version_dir(root: Path) -> Path:
    """The newest ``version_N`` run directory under ``<root>/lightning_logs``."""
    versions = sorted((root / "lightning_logs").glob("version_*"))
    assert versions, f"no run under {root}"
    return versions[-1]


def run_dir(root: Path) -> Path:
    """The one ``version_N`` run directory under ``<root>/lightning_logs`` (there must be exactly one)."""
    versions = sorted((root / "lightning_logs").glob("version_*"))
    assert len(versions) == 1, versions
    return versions[0]


def load_checkpoint_file(path: Path) -> dict:
    """A checkpoint as torch loads it, independently of the package's reader."""
    import torch

    return torch.load(path, weights_only=True)


def checkpoint_state(path: Path) -> dict:
    """The ModelCheckpoint callback state a checkpoint holds."""
    callbacks = load_checkpoint_file(path)["callbacks"]
    return next(v for k, v in callbacks.items() if k.startswith("ModelCheckpoint"))


def scores(run: Path, tag: str) -> list[float]:
    """Every value of the scalar ``tag`` in the TensorBoard event files of ``run``, oldest file first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(run.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        values += [e.value for e in accumulator.Scalars(tag)] if tag in accumulator.Tags()["scalars"] else []
    return values


def _run_command(args: list[str]) -> None:
    import sys

    from unet3d_lightning.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["unet3d"])
        main(args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run of :func:`make_config`, shared by the tests of a module that only need a checkpoint:
    (config, run directory)."""
    root = tmp_path_factory.mktemp("trained")
    config = make_config(root, str(root / "runs"), max_epochs=1)
    _run_command(["fit", "--config", str(config)])
    return config, root / "runs" / "lightning_logs" / "version_0"


@pytest.fixture(scope="module")
def percentile_checkpoint(tmp_path_factory):
    """A checkpoint trained with a non-default normalisation (percentiles 2..98): (root, config, last.ckpt)."""
    root = tmp_path_factory.mktemp("percentile")
    config = make_config(root, str(root / "runs"), max_epochs=1)
    _run_command(["fit", "--config", str(config), "--data.normalization", "percentile", "--data.percentiles",
                  "[2, 98]"])
    return root, config, run_dir(root / "runs") / "checkpoints" / "last.ckpt"


def predict_args(root: Path, out: Path) -> list[str]:
    """The arguments of a small CPU prediction of ``<root>/data/val_0.h5`` (a :func:`make_config` volume) into
    ``out``, without ``--ckpt_path``."""
    return ["--data.predict_paths", f"[{root / 'data' / 'val_0.h5'}]", "--data.predict_patch_shape", "[8, 16, 16]",
            "--prediction.output_dir", str(out), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
            "false", "--data.num_workers", "0"]


def steps_per_epoch(config: Path) -> int:
    """Training batches per epoch of a make_config config: one volume (8, 16, 16) in (8, 8, 8) patches, stride 8."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    patches = len(cfg["data"]["train_paths"]) * (16 // 8) * (16 // 8)
    return -(-patches // cfg["data"]["batch_size"])


@pytest.fixture
def run_config(tmp_path):
    """A small fit config on blob volumes (two training volumes, one validation volume); returns its path."""
    import yaml

    data = tmp_path / "data"
    for name, seed in (("train_0", 0), ("train_1", 1), ("val_0", 2)):
        raw, label = blob_volume(shape=(8, 16, 16), seed=seed)
        write_h5(data / f"{name}.h5", raw=raw, label=label)
    config = {
        "seed_everything": 7,
        "trainer": {"default_root_dir": str(tmp_path / "runs"), "accelerator": "cpu", "max_epochs": 2,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"out_channels": 2, "f_maps": 4, "num_levels": 2, "num_groups": 2, "learning_rate": 0.01},
        "data": {"train_paths": [str(data / "train_*.h5")], "val_paths": [str(data / "val_0.h5")],
                 "train_patch_shape": [8, 8, 8], "train_stride_shape": [8, 8, 8], "val_patch_shape": [8, 16, 16],
                 "batch_size": 2, "num_workers": 0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
