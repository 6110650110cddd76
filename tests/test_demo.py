"""The demo generators (:mod:`unet3d_lightning.demo`): one command line for every demo set, and the commands of
earlier versions (``python -m unet3d_lightning.data.demo``, ``... .data.demo_cells``), which the README and users
call, writing the very same files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from unet3d_lightning import demo
from unet3d_lightning.data import demo as old_spheres
from unet3d_lightning.data import demo_cells as old_cells
from unet3d_lightning.demo import cells, spheres

REPO = Path(__file__).resolve().parents[1]


def contents(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every HDF5 file under ``root`` by its relative path, as ``{dataset: array}``."""
    found = {}
    for path in sorted(root.rglob("*.h5")):
        with h5py.File(path, "r") as f:
            found[str(path.relative_to(root))] = {name: f[name][()] for name in f}
    return found


def same_files(a: Path, b: Path) -> bool:
    first, second = contents(a), contents(b)
    return first.keys() == second.keys() and all(
        first[k].keys() == second[k].keys() and all(np.array_equal(first[k][d], second[k][d]) for d in first[k])
        for k in first
    )


def test_one_command_line_writes_each_set_as_the_commands_of_earlier_versions(tmp_path, capsys):
    demo.main(["cells", str(tmp_path / "new"), "--seed", "3"])
    printed = capsys.readouterr().out.splitlines()
    old_cells.main([str(tmp_path / "old"), "--seed", "3"])
    assert printed == [f"wrote {tmp_path / 'new' / 'cells' / n}.h5" for n in ("train_0", "train_1", "val_0")]
    assert same_files(tmp_path / "new", tmp_path / "old")
    label = contents(tmp_path / "new")["cells/val_0.h5"]["label"]
    assert label.dtype == np.uint64 and label.shape == (40, 64, 64)
    # The seed decides the files: another seed, other cells.
    old_cells.main([str(tmp_path / "other"), "--seed", "4"])
    assert not same_files(tmp_path / "new", tmp_path / "other")


def test_the_spheres_set_and_its_old_names(tmp_path, capsys):
    assert old_spheres.generate is spheres.generate and old_spheres.spheres_volume is spheres.spheres_volume
    assert old_cells.cells_volume is cells.cells_volume and old_cells.generate is cells.generate
    demo.main(["spheres", str(tmp_path / "new")])
    written = [line.removeprefix("wrote ") for line in capsys.readouterr().out.splitlines()]
    names = ["random_label3D.h5", "random_label4D.h5", "demo/train_0.h5", "demo/train_1.h5", "demo/val_0.h5"]
    assert written == [str(tmp_path / "new" / n) for n in names]
    spheres.generate(tmp_path / "old")
    assert same_files(tmp_path / "new", tmp_path / "old")
    files = contents(tmp_path / "new")
    assert files["random_label4D.h5"]["label"].shape == (3, 64, 128, 128)
    assert set(np.unique(files["demo/val_0.h5"]["label"])) == {0, 1}


def test_an_unknown_set_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["sphere", "data"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'sphere'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("command", [["unet3d_lightning.demo", "cells"], ["unet3d_lightning.data.demo_cells"]])
def test_python_dash_m_commands(tmp_path, command):
    """``python -m`` of the new command and of the old one, as the README and the Makefile run them."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-m", *command, str(tmp_path / "data")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"wrote {tmp_path / 'data' / 'cells' / 'val_0.h5'}"
    assert (tmp_path / "data" / "cells" / "train_0.h5").is_file()


def test_the_makefile_generates_the_demo_data_with_the_demo_command():
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\ndata:", 1)[1].split("\n\n", 1)[0]
    assert "$(BIN)/python -m unet3d_lightning.demo spheres data" in recipe
