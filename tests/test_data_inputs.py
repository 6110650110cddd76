"""Input paths and input data as users give them: one path as a plain string, patterns that select volumes as a
directory scan does, TIFF files of several series, chunks a Zarr or HDF5 array does not store, a label file given for
two volumes, affinity offsets longer than the patch, and the watershed settings of instance prediction.

Each mistake ends in one `error:` line (exit status 2) naming the file or key, before any output or run directory is
made; data that is read is read whole, or the run says why not.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr

from conftest import write_h5
from unet3d_lightning.cli import main
from unet3d_lightning.data.datamodule import VolumeDataModule
from unet3d_lightning.data.io import MissingChunksWarning
from unet3d_lightning.data.volumes import resolve_paths
from unet3d_lightning.demo.cells import cells_volume
from unet3d_lightning.errors import ConfigurationError
from unet3d_lightning.instances import WatershedOptions

SHAPE = (8, 16, 16)
TINY = ["--model.f_maps", "4", "--model.num_levels", "2", "--model.num_groups", "2"]


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


def cells(path: Path, seed: int) -> Path:
    raw, label = cells_volume(SHAPE, np.random.default_rng(seed), cell_size=6.0, noise=0.1)
    return write_h5(path, raw=raw, label=label)


def fit_args(root: Path, *extra: str) -> list[str]:
    return ["fit", "--trainer.default_root_dir", str(root / "runs"), "--trainer.accelerator", "cpu",
            "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *TINY, "--data.train_patch_shape", "[8, 16, 16]",
            "--data.num_workers", "0", *extra]


@pytest.fixture(scope="module")
def boundary_model(tmp_path_factory):
    """The checkpoint of one training step of a boundary model (instances can be predicted from it)."""
    root = tmp_path_factory.mktemp("boundary_model")
    volume = cells(root / "data" / "cells.h5", 0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["unet3d"])
        main(fit_args(root, "--model.out_channels", "1", "--model.loss", "bce_dice",
                      "--data.label_transform", "boundaries", "--data.train_paths", f"[{volume}]",
                      "--data.val_paths", f"[{volume}]"))
    return root, next((root / "runs").rglob("last.ckpt"))


def run_error(capsys, args: list[str]) -> str:
    """Run the command, expect exit status 2 and exactly one `error:` line, and return it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def predict_args(checkpoint: Path, paths: str, out: Path, *extra: str) -> list[str]:
    return ["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths", paths,
            "--data.predict_patch_shape", "[8, 16, 16]", "--data.num_workers", "0",
            "--prediction.output_dir", str(out), "--trainer.enable_progress_bar", "false", *extra]


def attach_model(dm: VolumeDataModule, out_channels: int = 2) -> None:
    model = types.SimpleNamespace(in_channels=1, out_channels=out_channels, ignore_index=None)
    dm.trainer = types.SimpleNamespace(lightning_module=model, world_size=1, global_rank=0)


def noise(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(10, 1, shape).astype(np.float32)  # no voxel is 0, the fill value


# --------------------------------------------------------------------------------------------- one path is a path
def test_one_path_as_a_string_through_the_cli(tmp_path, boundary_model, capsys):
    """`--data.predict_paths volume.h5` and a quoted pattern, as users type them (and as the importer suggests)."""
    _, checkpoint = boundary_model
    volume = cells(tmp_path / "in" / "scan.h5", 3)
    cells(tmp_path / "in" / "other.h5", 4)
    main(predict_args(checkpoint, str(volume), tmp_path / "one"))
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["scan_predictions.h5"]
    main(predict_args(checkpoint, str(tmp_path / "in" / "*.h5"), tmp_path / "pattern"))
    assert sorted(p.name for p in (tmp_path / "pattern").iterdir()) == ["other_predictions.h5", "scan_predictions.h5"]
    with h5py.File(tmp_path / "one" / "scan_predictions.h5", "r") as one, \
            h5py.File(tmp_path / "pattern" / "scan_predictions.h5", "r") as pattern:
        assert np.array_equal(one["predictions"][...], pattern["predictions"][...])


def test_one_path_as_a_string_for_fit_and_label_paths(tmp_path, capsys):
    """A pattern on the command line, a directory and single label files in YAML: every `*_paths` key."""
    raw, label = cells_volume(SHAPE, np.random.default_rng(1), cell_size=6.0)
    (tmp_path / "train").mkdir()
    tifffile.imwrite(tmp_path / "train" / "a.tif", raw)
    write_h5(tmp_path / "labels" / "a.h5", label=(label > 0).astype(np.uint8))
    write_h5(tmp_path / "val" / "v.h5", raw=raw, label=(label > 0).astype(np.uint8))
    (tmp_path / "train" / "README.txt").write_text("notes, not a volume")
    config = {"data": {"val_paths": f"{tmp_path}/val/", "label_paths": {"train": f"{tmp_path}/labels/a.h5"}}}
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    main(fit_args(tmp_path, "--config", str(tmp_path / "fit.yaml"), "--model.out_channels", "2",
                  "--data.train_paths", f"{tmp_path}/train/*"))
    assert len(list((tmp_path / "runs").rglob("last.ckpt"))) == 1
    assert resolve_paths(f"{tmp_path}/train/", "train") == [tmp_path / "train" / "a.tif"]
    assert resolve_paths("", "train") == []  # an empty string is no path (the caller says what is missing)


# --------------------------------------------------------------------------------------------- patterns
def test_a_pattern_selects_the_volumes_a_directory_scan_selects(tmp_path):
    folder = tmp_path / "data"
    h5 = write_h5(folder / "a.h5", raw=noise())
    store = zarr.open_group(str(folder / "b.zarr"), mode="w")
    store.create_array("raw", data=noise())
    tifffile.imwrite(folder / "c.tif", noise())
    (folder / "README.txt").write_text("how these volumes were made")
    (folder / "scan.log").write_text("log")
    scanned = resolve_paths(str(folder), "train")
    assert scanned == [h5, folder / "b.zarr", folder / "c.tif"]
    assert resolve_paths(f"{folder}/*", "train") == scanned
    # "**" reaches into the Zarr store too; the store is the volume, not its array or chunk files
    assert resolve_paths(f"{folder}/**", "train") == scanned
    with pytest.raises(ConfigurationError) as info:
        resolve_paths(f"{folder}/*.txt", "predict")
    message = str(info.value)
    assert "'" + f"{folder}/*.txt" + "'" in message and "matched 1 path(s) (README.txt) but no volume" in message
    assert ".h5" in message and "on its own" in message
    # named on its own, a file is read whatever its suffix, as before
    assert resolve_paths(str(folder / "README.txt"), "predict") == [folder / "README.txt"]


# --------------------------------------------------------------------------------------------- TIFF series
def predict_setup_error(path: Path, **kwargs) -> str:
    dm = VolumeDataModule(predict_paths=str(path), predict_patch_shape=(4, 8, 8), num_workers=0, **kwargs)
    with pytest.raises(ConfigurationError) as info:
        dm.setup("predict")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_tiff_of_several_series_or_ragged_pages_is_refused_naming_them(tmp_path):
    two = tmp_path / "two series.tif"
    tifffile.imwrite(two, noise(seed=1))
    tifffile.imwrite(two, noise(seed=2), append=True)  # a second image of the same shape
    message = predict_setup_error(two)
    assert str(two) in message and "2 image series" in message and message.count("(8, 16, 16)") == 2
    assert "split the file" in message and "one series per file" in message

    ragged = tmp_path / "ragged.tif"
    with tifffile.TiffWriter(ragged) as tif:  # plain pages, 8 of 16 x 16 and 8 of 16 x 20
        for z in range(16):
            tif.write(noise((16, 16) if z < 8 else (16, 20), seed=z), metadata=None, contiguous=False)
    message = predict_setup_error(ragged)
    assert str(ragged) in message and "2 image series" in message
    assert "(8, 16, 16)" in message and "(8, 16, 20)" in message

    # A reduced-resolution copy (a thumbnail) repeats the image: it is no data of its own.
    thumbnail = tmp_path / "with thumbnail.tif"
    with tifffile.TiffWriter(thumbnail) as tif:
        tif.write(noise(), metadata=None, contiguous=False)
        tif.write(noise((8, 8)), subfiletype=1, metadata=None)
    dm = VolumeDataModule(predict_paths=str(thumbnail), predict_patch_shape=(4, 8, 8), num_workers=0)
    dm.setup("predict")
    assert dm.volumes["predict"][0].spatial_shape == SHAPE


# --------------------------------------------------------------------------------------------- missing chunks
def chunk_file(store: Path, array: str, zarr_format: int, index=(1, 0, 0)) -> Path:
    separator = "." if zarr_format == 2 else "/"
    name = separator.join(str(i) for i in index)
    return store / array / name if zarr_format == 2 else store / array / "c" / name


def zarr_volume(path: Path, zarr_format: int, **arrays) -> Path:
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    for name, data in arrays.items():
        group.create_array(name, data=data, chunks=(4, 8, 8))
    return path


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_missing_raw_chunk_at_predict_by_policy(tmp_path, zarr_format):
    """A store of 8 chunks (2 x 2 x 2 of 4 x 8 x 8) that lost its chunk (1, 0, 0)."""
    path = zarr_volume(tmp_path / "scan.zarr", zarr_format, raw=noise())
    chunk_file(path, "raw", zarr_format).unlink()
    key = "1.0.0" if zarr_format == 2 else "c/1/0/0"
    message = predict_setup_error(path, missing_chunks="error")
    assert message.startswith(f"predict volume {path}: dataset 'raw' lacks 1 of 8 chunk(s)")
    assert f"'{key}' at [4:8, 0:8, 0:8]" in message and "data.missing_chunks: fill" in message

    for policy in ("fill", "auto"):  # auto: nothing shows that the writer kept chunks of fill values
        dm = VolumeDataModule(predict_paths=str(path), predict_patch_shape=(4, 8, 8), num_workers=0,
                              missing_chunks=policy)
        with pytest.warns(MissingChunksWarning) as record:
            dm.setup("predict")
        assert len(record) == 1
        warning = str(record[0].message)
        assert str(path) in warning and "'raw' lacks 1 of 8 chunk(s)" in warning and "fill value 0" in warning
        # the statistics saw the chunk as zeros
        seen = noise().astype(np.float64)
        seen[4:8, 0:8, 0:8] = 0
        assert dm.volumes["predict"][0].stats.mean[0] == pytest.approx(seen.mean(), rel=1e-9)

    if zarr_format == 2:  # without a fill value, a missing chunk's content is undefined
        group = zarr.open_group(str(tmp_path / "nofill.zarr"), mode="w", zarr_format=2)
        group.create_array("raw", data=noise(), chunks=(4, 8, 8), fill_value=None)
        chunk_file(tmp_path / "nofill.zarr", "raw", 2, (0, 1, 1)).unlink()
        message = predict_setup_error(tmp_path / "nofill.zarr")
        assert "'raw' lacks 1 of 8 chunk(s) (the first '0.1.1' at [0:4, 8:16, 8:16])" in message
        assert "has no fill value" in message and "data.missing_chunks: fill" in message


def test_missing_label_chunks_at_fit_refused_when_the_writer_keeps_empty_chunks(tmp_path):
    """Zarr v2 written with every chunk stored (zarr-python 2's habit): a stored all-zero label chunk shows that the
    missing one was lost."""
    label = np.ones(SHAPE, np.uint8)
    label[:4, :8, :8] = 0  # chunk (0, 0, 0) holds only the fill value, and is stored
    group = zarr.open_group(str(tmp_path / "v.zarr"), mode="w", zarr_format=2)
    group.create_array("raw", data=noise(), chunks=(4, 8, 8))
    group.create_array("label", data=label, chunks=(4, 8, 8), config={"write_empty_chunks": True})
    assert chunk_file(tmp_path / "v.zarr", "label", 2, (0, 0, 0)).is_file()
    chunk_file(tmp_path / "v.zarr", "label", 2, (1, 1, 1)).unlink()
    dm = VolumeDataModule(train_paths=str(tmp_path / "v.zarr"), val_paths=str(tmp_path / "v.zarr"),
                          train_patch_shape=(4, 8, 8), num_workers=0)
    attach_model(dm)
    with pytest.raises(ConfigurationError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert f"{tmp_path / 'v.zarr'}: dataset 'label' lacks 1 of 8 chunk(s)" in message
    assert "'1.1.1' at [4:8, 8:16, 8:16]" in message and "were lost" in message
    assert "stores chunks that hold only the fill value 0 (the first '0.0.0' at [0:4, 0:8, 0:8])" in message


def test_labels_whose_writer_left_out_background_chunks_are_read_right(tmp_path):
    """zarr-python 3 leaves out chunks of only the fill value: the default reads them so (they are background) and
    says so; the patches equal those of the same data in HDF5."""
    raw, label = noise(), np.zeros(SHAPE, np.uint8)
    label[4:, 8:, 8:] = 1  # one of 8 chunks holds an object; zarr 3 stores only that one
    zarr_volume(tmp_path / "v.zarr", 3, raw=raw, label=label)
    assert sum(1 for p in (tmp_path / "v.zarr" / "label").rglob("*") if p.is_file() and p.name != "zarr.json") == 1
    write_h5(tmp_path / "v.h5", raw=raw, label=label)

    def patches(path, **kwargs):
        dm = VolumeDataModule(train_paths=str(path), val_paths=str(path), train_patch_shape=(4, 8, 8), num_workers=0,
                              seed=1, **kwargs)
        attach_model(dm)
        dm.setup("fit")
        return list(dm.train_dataloader())

    with pytest.warns(MissingChunksWarning, match=r"'label' lacks 7 of 8 chunk\(s\).*zarr-python 3"):
        from_zarr = patches(tmp_path / "v.zarr")
    from_h5 = patches(tmp_path / "v.h5")
    assert all(torch.equal(a["label"], b["label"]) and torch.equal(a["raw"], b["raw"])
               for a, b in zip(from_zarr, from_h5))
    with pytest.raises(ConfigurationError, match=r"'label' lacks 7 of 8 chunk\(s\)"):
        patches(tmp_path / "v.zarr", missing_chunks="error")


def test_hdf5_chunks_never_written_are_refused_unless_filled(tmp_path):
    path = tmp_path / "partial.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", shape=SHAPE, dtype="float32", chunks=(4, 8, 8))[:4] = noise()[:4]  # half written
    message = predict_setup_error(path)
    assert f"predict volume {path}: dataset 'raw' lacks 4 of 8 chunk(s) (the first [4:8, 0:8, 0:8])" in message
    assert "never written" in message
    dm = VolumeDataModule(predict_paths=str(path), predict_patch_shape=(4, 8, 8), num_workers=0, missing_chunks="fill")
    with pytest.warns(MissingChunksWarning, match=r"lacks 4 of 8 chunk\(s\).*fill value 0"):
        dm.setup("predict")
    with pytest.raises(ConfigurationError, match="data.missing_chunks 'ignore' is not one of auto, error, fill"):
        VolumeDataModule(missing_chunks="ignore")


def test_missing_chunks_setting_through_the_cli(tmp_path, boundary_model, capsys):
    _, checkpoint = boundary_model
    path = zarr_volume(tmp_path / "scan.zarr", 3, raw=noise())
    chunk_file(path, "raw", 3, (0, 1, 0)).unlink()
    out = tmp_path / "out"
    line = run_error(capsys, predict_args(checkpoint, f"[{path}]", out, "--data.missing_chunks", "error"))
    assert f"{path}: dataset 'raw' lacks 1 of 8 chunk(s) (the first 'c/0/1/0' at [0:4, 8:16, 0:8])" in line
    assert not out.exists()


# --------------------------------------------------------------------------------------------- label files
def test_a_label_file_given_for_two_volumes_is_named_with_both(tmp_path):
    raw, label = noise(), np.ones(SHAPE, np.uint8)
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    tifffile.imwrite(a, raw)
    tifffile.imwrite(b, raw)
    labels = write_h5(tmp_path / "labels.h5", label=label)
    dm = VolumeDataModule(train_paths=[str(a), str(b)], val_paths=str(a), train_patch_shape=(4, 8, 8),
                          label_paths={"train": [str(labels), str(labels)], "val": str(labels)}, num_workers=0)
    with pytest.raises(ConfigurationError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert f"gives the label file {labels} for two volumes, {a} and {b}" in message
    assert "data.label_paths.train" in message

    # a volume listed twice is used once: the count says why the lists differ
    dm = VolumeDataModule(train_paths=[str(a), str(a)], val_paths=str(a), train_patch_shape=(4, 8, 8),
                          label_paths={"train": [str(labels), str(tmp_path / "labels.h5")], "val": str(labels)},
                          num_workers=0)
    with pytest.raises(ConfigurationError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "expands to 2 file(s) (labels.h5, labels.h5) but data.train_paths to 1 volume(s) (a.tif)" in message
    assert f"data.train_paths lists {a} more than once" in message


# --------------------------------------------------------------------------------------------- affinity offsets
def test_an_affinity_offset_longer_than_the_patch_is_refused_at_setup(tmp_path, capsys):
    volume = cells(tmp_path / "data" / "cells.h5", 0)
    args = fit_args(tmp_path, "--model.out_channels", "2", "--model.loss", "bce", "--data.label_transform",
                    "affinities", "--data.target_options.offsets", "[[1, 0, 0], [40, 0, 0]]",
                    "--data.train_paths", f"[{volume}]", "--data.val_paths", f"[{volume}]")
    line = run_error(capsys, args)
    assert "data.target_options.offsets" in line and "[40, 0, 0]" in line and "40 voxels along z" in line
    assert "data.train_patch_shape [8, 16, 16] has only 8 along z" in line
    assert not (tmp_path / "runs").exists()  # nothing left behind
    # as long as the patch: no pair inside a patch either
    line = run_error(capsys, [*args, "--data.target_options.offsets", "[[1, 0, 0], [0, 0, -16]]"])
    assert "[0, 0, -16]" in line and "16 voxels along x" in line


# --------------------------------------------------------------------------------------------- watershed settings
@pytest.mark.parametrize("key, value, expected", [
    ("threshold", "1.5", "must be a number in (0, 1)"),
    ("threshold", "0", "must be a number in (0, 1)"),
    ("seed_sigma", "-2", "must be a number >= 0"),
    ("min_distance", "0", "must be an integer >= 1"),
    ("min_size", "-1", "must be an integer >= 0"),
    ("memory_limit_gb", "0", "must be a number > 0"),
])
def test_watershed_settings_are_checked_through_the_cli(tmp_path, boundary_model, capsys, key, value, expected):
    root, checkpoint = boundary_model
    out = tmp_path / "out"
    line = run_error(capsys, predict_args(checkpoint, f"[{root / 'data' / 'cells.h5'}]", out,
                                          "--prediction.instances", "true", f"--prediction.watershed.{key}", value))
    assert f"prediction.watershed.{key}" in line and expected in line
    assert not out.exists()


def test_watershed_options_refuse_values_outside_their_range():
    for bad in ({"threshold": 1.0}, {"threshold": float("nan")}, {"seed_sigma": float("inf")},
                {"min_distance": 2.5}, {"min_size": True}, {"memory_limit_gb": -1}):
        with pytest.raises(ConfigurationError, match=f"prediction.watershed.{next(iter(bad))}"):
            WatershedOptions(**bad)
    assert WatershedOptions(threshold=0.3, seed_sigma=0, min_distance=1, min_size=0, memory_limit_gb=0.5)
