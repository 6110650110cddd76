"""What the demo generators share: writing a volume file, and their command line."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np


def write_volume(path: Path, raw: np.ndarray, label: np.ndarray) -> None:
    """Write ``raw`` and ``label`` as the datasets ``/raw`` and ``/label`` of the HDF5 file ``path`` (chunked, gzip),
    under a temporary name first so that an interrupted run leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        chunks = tuple(min(32, s) for s in raw.shape)
        f.create_dataset("raw", data=raw, chunks=chunks, compression="gzip", compression_opts=1)
        label_chunks = tuple(min(32, s) for s in label.shape)
        f.create_dataset("label", data=label, chunks=label_chunks, compression="gzip", compression_opts=1)
    os.replace(tmp, path)


def run_generator(
    description: str, generate_fn: Callable[[str | os.PathLike, int], list[Path]], argv: list[str] | None = None
) -> None:
    """Command line of a demo generator: ``[DATA_DIR] [--seed N]``, then ``generate_fn(data_dir, seed)``, printing
    every file written."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("data_dir", nargs="?", default="data", help="output directory (default: data)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    for path in generate_fn(args.data_dir, args.seed):
        print(f"wrote {path}")
