"""The spheres demo and the original tool's examples: ``python -m unet3d_lightning.demo spheres [data_dir]``.

Written files (datasets ``/raw`` and ``/label``):

- ``random_label3D.h5``: random raw ``(64, 128, 128)`` float32 with random class ids {0, 1} — the original tool's
  3D-label example (nothing to learn; it exercises the pipeline).
- ``random_label4D.h5``: the same raw with a random 4D label ``(3, 64, 128, 128)`` of binary masks — the original's
  4D-label / ``bce`` example.
- ``demo/train_0.h5``, ``demo/train_1.h5``, ``demo/val_0.h5``: a small *learnable* set: random spheres (label 1) on
  background (label 0); raw is the sphere mask blurred, with an uneven background and gaussian noise, so the
  network must learn shape and context rather than a threshold. ``configs/demo.yaml`` trains on it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .common import run_generator, write_volume


def _blur(volume: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    t = torch.from_numpy(volume.astype(np.float32))[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        t = F.conv3d(F.pad(t, pad, mode="replicate"), kernel.view(shape))
    return t[0, 0].numpy()


def spheres_volume(shape: tuple[int, int, int], rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw float32 and label uint8 for ``count`` random spheres in a volume of ``shape``."""
    zz, yy, xx = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    label = np.zeros(shape, np.uint8)
    for _ in range(count):
        radius = rng.uniform(3.0, 7.0)
        centre = [rng.uniform(radius, s - radius) for s in shape]
        inside = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2
        label[inside] = 1
    background = _blur(rng.normal(0, 1, shape).astype(np.float32), 6.0)
    background *= 0.3 / (background.std() + 1e-8)
    raw = _blur(label.astype(np.float32), 1.0) + background + rng.normal(0, 0.25, shape).astype(np.float32)
    return raw.astype(np.float32), label


def generate(data_dir: str | os.PathLike = "data", seed: int = 0) -> list[Path]:
    """Write every example file under ``data_dir`` and return their paths."""
    root = Path(data_dir)
    rng = np.random.default_rng(seed)
    written = []
    shape = (64, 128, 128)
    raw = rng.random(shape, dtype=np.float32)
    label3d = rng.integers(0, 2, shape, dtype=np.uint8)
    label4d = rng.integers(0, 2, (3, *shape), dtype=np.uint8)
    for name, label in (("random_label3D.h5", label3d), ("random_label4D.h5", label4d)):
        write_volume(root / name, raw, label)
        written.append(root / name)
    demo_shape = (48, 64, 64)
    count = math.ceil(demo_shape[0] * demo_shape[1] * demo_shape[2] / 12000)
    for name in ("train_0", "train_1", "val_0"):
        raw, label = spheres_volume(demo_shape, rng, count)
        path = root / "demo" / f"{name}.h5"
        write_volume(path, raw, label)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    run_generator("Generate the example and demo HDF5 volumes.", generate, argv)


if __name__ == "__main__":
    main()
