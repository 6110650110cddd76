"""Generators of the demo volumes: ``python -m unet3d_lightning.demo {spheres,cells} [DATA_DIR] [--seed N]``.

- ``spheres`` (:mod:`.spheres`): the learnable spheres set of ``configs/demo.yaml`` in ``DATA_DIR/demo/``, and the
  original tool's random examples ``DATA_DIR/random_label3D.h5`` and ``random_label4D.h5``;
- ``cells`` (:mod:`.cells`): the touching cells of the instance segmentation demo (``configs/instances_demo.yaml``)
  in ``DATA_DIR/cells/``.

``DATA_DIR`` defaults to ``data``; the files are the same for the same ``--seed`` (default 0). The demos write HDF5
files and read nothing; the package imports the data package (for the cells' boundaries), never the reverse.
"""

from __future__ import annotations

import argparse
from importlib import import_module

# The demo sets, by the name given on the command line: the module that generates each.
SETS = {"spheres": "unet3d_lightning.demo.spheres", "cells": "unet3d_lightning.demo.cells"}


def main(argv: list[str] | None = None) -> None:
    """Command line of every demo set: ``{spheres,cells} [DATA_DIR] [--seed N]``; prints every file written.

    Args:
        argv: the arguments. Default None: ``sys.argv[1:]``.
    """
    parser = argparse.ArgumentParser(prog="python -m unet3d_lightning.demo",
                                     description="Generate the demo volumes of a demo set.")
    parser.add_argument("set", choices=sorted(SETS), help="the demo set: spheres (make data) or cells (instances)")
    parser.add_argument("data_dir", nargs="?", default="data", help="output directory (default: data)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    # Imported on demand: the cells need scipy, which the spheres do not.
    generate = import_module(SETS[args.set]).generate
    for path in generate(args.data_dir, args.seed):
        print(f"wrote {path}")
