"""Memory and time of ``unet3d evaluate`` as the volume grows in depth.

Writes label and prediction volumes of ``(depth, 256, 256)`` for each ``--depths`` value: three classes from a
smooth random field tiled along z (every class spans the whole volume, so its bounding box is the volume), the
prediction a copy shifted by one voxel in x with a few thousand voxels flipped. Runs ``unet3d evaluate`` on each pair
in a fresh process and prints its wall time and peak resident memory (``ru_maxrss`` of the child), and the memory of
the data itself. Counts are accumulated over z-slabs and the surface metrics keep only the surface voxels, so the peak
grows with the surfaces, not with the voxels.

Example::

    python benchmarks/bench_evaluate.py --depths 64 256
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np


def write_pair(where: Path, depth: int, seed: int = 0) -> tuple[Path, Path]:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    tile = ndimage.zoom(ndimage.gaussian_filter(rng.normal(size=(16, 64, 64)), 2.0), 4, order=1)  # (64, 256, 256)
    edges = np.quantile(tile, [0.5, 0.8])
    label_path, prediction_path = where / f"d{depth}.h5", where / f"d{depth}_predictions.h5"
    with h5py.File(label_path, "w") as lf, h5py.File(prediction_path, "w") as pf:
        label = lf.create_dataset("label", (depth, 256, 256), np.uint8, chunks=(16, 128, 128))
        prediction = pf.create_dataset("segmentation", (depth, 256, 256), np.uint8, chunks=(16, 128, 128))
        for z0 in range(0, depth, 64):
            z1 = min(depth, z0 + 64)
            block = np.digitize(tile[: z1 - z0], edges).astype(np.uint8)
            label[z0:z1] = block
            shifted = np.roll(block, 1, axis=2)
            flips = rng.integers(0, shifted.size, 2000)
            shifted.reshape(-1)[flips] = rng.integers(0, 3, flips.size)
            prediction[z0:z1] = shifted
    return prediction_path, label_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    print(f"{'depth':>6} {'voxels':>12} {'data MB':>8} {'wall s':>7} {'peak RSS MB':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            prediction, label = write_pair(Path(tmp), depth)
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "unet3d_lightning.launcher", "evaluate", "--prediction_paths",
                            str(prediction), "--label_paths", str(label)], check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far
            voxels = depth * 256 * 256
            note = "" if peak > before else " (not above an earlier run's)"
            print(f"{depth:>6} {voxels:>12,} {2 * voxels / 2**20:>8.0f} {seconds:>7.1f} {peak / 1024:>12.0f}{note}")


if __name__ == "__main__":
    main()
