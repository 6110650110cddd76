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
