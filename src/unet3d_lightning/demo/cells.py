"""The instance segmentation demo: ``python -m unet3d_lightning.demo cells [data_dir]``.

Written files (datasets ``/raw`` float32 and ``/label`` uint64 instance ids), under ``<data_dir>/cells/``:
``train_0.h5``, ``train_1.h5``, ``val_0.h5``: touching cells that fill the volume (a 3D Voronoi tessellation of
random points, as in a plant tissue), one id per cell; raw shows their membranes (the cell borders) bright on a dark,
noisy, unevenly lit background. Ids are large random uint64 numbers, as in real instance labels (they are arbitrary:
only their equality matters). ``configs/instances_demo.yaml`` trains a boundary model on them and
``configs/instances_demo_predict.yaml`` turns the prediction of ``val_0.h5`` into instances. Needs scipy (the
``instances`` extra).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ..data.targets import boundaries
from .common import run_generator, write_volume


def cells_volume(
    shape: tuple[int, int, int], rng: np.random.Generator, cell_size: float = 10.0, noise: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """Raw float32 and instance label uint64 ``shape`` of touching Voronoi cells.

    Args:
        shape: ``(D, H, W)``.
        rng: random generator.
        cell_size: typical cell diameter in voxels (one seed point per ``cell_size ** 3`` voxels). Default 10.
        noise: standard deviation of the gaussian noise added to raw (membranes have contrast 1). Default 0.25;
            0 gives a clean volume.
    """
    count = max(2, round(float(np.prod(shape)) / cell_size**3))
    points = rng.uniform(0, 1, (count, 3)) * np.asarray(shape, np.float64)
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    nearest = cKDTree(points).query(grid)[1].reshape(shape)
    ids = np.zeros(0, np.uint64)
    while ids.size != count:  # distinct ids, about half of them at or above 2**63 (beyond int64)
        ids = np.unique(rng.integers(2**62, 2**64 - 1, size=count, dtype=np.uint64))
    ids = rng.permutation(ids)
    label = ids[nearest]
    membrane = boundaries(label)[0]
    raw = ndimage.gaussian_filter(membrane, 0.7)
    raw = raw / max(float(raw.max()), 1e-8)
    if noise > 0:
        light = ndimage.gaussian_filter(rng.normal(0, 1, shape), 8.0)
        raw = raw + 0.2 * light / (light.std() + 1e-8) + rng.normal(0, noise, shape)
    return raw.astype(np.float32), label


def generate(data_dir: str | os.PathLike = "data", seed: int = 0) -> list[Path]:
    """Write the cells demo under ``<data_dir>/cells/`` and return the paths."""
    rng = np.random.default_rng(seed)
    written = []
    for name in ("train_0", "train_1", "val_0"):
        raw, label = cells_volume((40, 64, 64), rng)
        path = Path(data_dir) / "cells" / f"{name}.h5"
        write_volume(path, raw, label)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    run_generator("Generate the instance segmentation demo volumes (touching cells).", generate, argv)


if __name__ == "__main__":
    main()
