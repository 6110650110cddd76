"""Rank-owned output regions of DDP prediction (prediction/distributed.py) and resumable prediction
(prediction/resume.py): the assignment and the row-restricted stitcher against brute force, then the real ``unet3d``
command on gloo ranks and killed with SIGKILL."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from conftest import blob_volume, subprocess_env, unet3d_command, write_h5
from test_stitcher import reference_stitch, starts_of
from unet3d_lightning.data.patches import padded_shape, patch_grid
from unet3d_lightning.data.sampling import PaddingIndex
from unet3d_lightning.prediction.distributed import OwnedRowsSampler, assign_rows
from unet3d_lightning.prediction.stitcher import StreamingStitcher

HOOKS = Path(__file__).parent / "hooks"
REPORT = re.compile(r"^rank (\d+): (\d+) patches, (\d+) output voxels written", re.M)


class _Volume:
    def __init__(self, shape):
        self.spatial_shape = shape
        self.path = "v.h5"


class _Plan:
    def __init__(self, shape, patch, stride):
        self.volume = _Volume(shape)
        self.padded_shape = padded_shape(shape, patch)
        self.grid = patch_grid(self.padded_shape, patch, stride)


def kept(s, halo, padded):
    return (s.start if s.start == 0 else s.start + halo, s.stop if s.stop == padded else s.stop - halo)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("halo", [0, 2])
def test_assignment_owns_every_row_once_chunk_aligned_and_predicts_exactly_the_patches_meeting_it(world, halo):
    plans = [_Plan((70, 9, 9), (16, 9, 9), (8, 9, 9)), _Plan((6, 9, 9), (16, 9, 9), (8, 9, 9)),
             _Plan((33, 9, 9), (12, 4, 4), (6, 3, 3))]
    a = assign_rows(plans, world, halo_z=halo, chunk_depth=16)
    offsets = np.cumsum([0] + [len(p.grid) for p in plans])
    for v, plan in enumerate(plans):
        depth, padded = plan.volume.spatial_shape[0], plan.padded_shape[0]
        owner = np.full(depth, -1)
        for rank in range(world):
            lo, hi = a.rows[rank][v]
            if lo == hi:
                continue
            assert lo % min(depth, 16) == 0 and (hi % 16 == 0 or hi == depth)  # chunk-aligned
            assert (owner[lo:hi] == -1).all()
            owner[lo:hi] = rank
            # brute force: the patches whose kept z-range meets [lo, hi)
            expected = {offsets[v] + i for i, s in enumerate(plan.grid)
                        if kept(s[0], halo, padded)[0] < hi and kept(s[0], halo, padded)[1] > lo}
            mine = {i for i in a.items[rank] if offsets[v] <= i < offsets[v + 1]}
            assert mine == expected
        assert (owner >= 0).all()  # every row owned
        assert (np.diff(owner) >= 0).all()  # ranks in order: each rank's rows contiguous
    assert a.unique == len(set().union(*map(set, a.items))) == sum(len(p.grid) for p in plans)
    assert a.redundant == sum(len(i) for i in a.items) - a.unique
    if world > 1:  # balanced: no rank far above the mean
        assert max(len(i) for i in a.items) <= 2 * a.unique / world + 30


def test_a_rank_owning_nothing_gets_one_flagged_duplicate():
    a = assign_rows([_Plan((6, 9, 9), (16, 9, 9), (8, 9, 9))], 2)  # one chunk row: the last rank takes it
    assert a.rows[0] == [(0, 0)] and a.items[0] == [] and a.rows[1] == [(0, 6)]
    items = list(OwnedRowsSampler(a, 0))
    assert len(items) == 1 and isinstance(items[0], PaddingIndex)
    assert list(OwnedRowsSampler(a, 1)) == [0]


def test_finished_rows_are_left_out():
    plan = _Plan((64, 9, 9), (16, 9, 9), (8, 9, 9))  # z-starts 0, 8, ..., 48
    a = assign_rows([plan], 1, finished=[{(0, 16), (16, 32)}])
    assert a.rows[0] == [(32, 64)] and a.units[0][0] == [(32, 48), (48, 64)]
    assert sorted({plan.grid[i][0].start for i in a.items[0]}) == [24, 32, 40, 48]  # stop > 32


def test_row_restricted_stitchers_tile_the_brute_force_result():
    rng = random.Random(3)
    for trial in range(12):
        volume = (rng.randint(10, 40), rng.randint(3, 9), rng.randint(3, 9))
        patch = (rng.randint(4, 12), rng.randint(2, 5), rng.randint(2, 5))
        halo = (rng.randint(0, (patch[0] - 1) // 4), 0, 0)
        stride = (rng.randint(1, patch[0] - 2 * halo[0]), rng.randint(1, patch[1]), rng.randint(1, patch[2]))
        padded = padded_shape(volume, patch)
        grid = patch_grid(padded, patch, stride)
        predictions = torch.rand(len(grid), 2, *patch)
        blend = rng.choice(["average", "gaussian"])
        expected = reference_stitch(predictions, grid, padded, volume, halo, blend)
        cuts = sorted({0, volume[0], *rng.sample(range(1, volume[0]), 2)})
        pieces = []
        for lo, hi in zip(cuts, cuts[1:]):
            stitcher = StreamingStitcher(volume, grid, 2, blend=blend, halo=halo, rows=(lo, hi))
            needed = set(stitcher.needed_z_starts())
            order = [i for i, s in enumerate(grid) if s[0].start in needed]
            slabs = []
            for k in range(0, len(order), 3):
                chunk = order[k : k + 3]
                slabs += stitcher.add(predictions[chunk], starts_of([grid[i] for i in chunk]))
            slabs += stitcher.finish()
            assert [s[0] for s in slabs][0] == lo and slabs[-1][1] == hi
            pieces.append(torch.cat([s[2] for s in slabs], 1))
        torch.testing.assert_close(torch.cat(pieces, 1), expected, atol=1e-5, rtol=0)


def test_row_restricted_stitcher_refuses_foreign_and_missing_patches():
    grid = patch_grid((32, 4, 4), (8, 4, 4), (8, 4, 4))
    stitcher = StreamingStitcher((32, 4, 4), grid, 1, rows=(16, 32))
    with pytest.raises(ValueError, match="does not touch the rows"):
        stitcher.add(torch.zeros(1, 1, 8, 4, 4), [[0, 0, 0]])
    stitcher.add(torch.zeros(1, 1, 8, 4, 4), [[16, 0, 0]])
    with pytest.raises(RuntimeError, match="Only 1 of the grid's 2 patches"):
        stitcher.finish()


def test_hdf5_part_files_join_into_the_single_writer_file(tmp_path):
    from unet3d_lightning.prediction.outputs import VolumeOutput

    rng = np.random.default_rng(0)
    values = rng.random((2, 40, 9, 7)).astype(np.float32)
    final = tmp_path / "v_predictions.h5"
    main = VolumeOutput(final, (40, 9, 7), 2, "float32", "argmax", "gzip", None, rows=(0, 16))
    part = VolumeOutput(final, (40, 9, 7), 2, "float32", "argmax", "gzip", None, rows=(16, 40),
                        tmp=tmp_path / ".part")
    main.write(0, 16, values[:, :16], None)
    part.write(16, 40, values[:, 16:], None)
    part.finish_rows()
    main.finish_rows(close=False)
    main.complete([tmp_path / ".part"])
    assert sorted(os.listdir(tmp_path)) == ["v_predictions.h5"]  # the part is gone
    with h5py.File(final) as f:
        np.testing.assert_array_equal(f["predictions"][()], values)
        np.testing.assert_array_equal(f["segmentation"][()], values.argmax(0))
        assert f["predictions"].compression == "gzip"


# ------------------------------------------------------------------------------------ the real command
@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A one-step checkpoint, a second one with other weights, and the volumes: a (40 z-rows: 3 chunk rows),
    b (6 z-rows: one chunk row, fewer than ranks x chunk depth), deep (64 z-rows)."""
    from unet3d_lightning.cli import main

    root = tmp_path_factory.mktemp("regions")
    raw, label = blob_volume(shape=(8, 24, 24), seed=0)
    write_h5(root / "train.h5", raw=raw, label=label)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["unet3d"])
        main(["fit", "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.logger", "false",
              "--trainer.default_root_dir", str(root / "runs"),
              "--trainer.enable_progress_bar", "false", "--model.out_channels", "2", "--model.f_maps", "4",
              "--model.num_levels", "2", "--model.num_groups", "2", "--data.train_paths", f"[{root / 'train.h5'}]",
              "--data.train_patch_shape", "[8, 12, 12]", "--data.num_workers", "0",
              "--checkpoint.dirpath", str(root / "ckpt")])
    checkpoint = root / "ckpt" / "last.ckpt"
    other = torch.load(checkpoint, weights_only=True)
    name = next(k for k, v in other["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    other["state_dict"][name] = other["state_dict"][name] + 0.01
    torch.save(other, root / "ckpt" / "other.ckpt")
    write_h5(root / "a.h5", raw=blob_volume(shape=(40, 20, 20), seed=7)[0])
    write_h5(root / "b.h5", raw=blob_volume(shape=(6, 20, 20), seed=8)[0])
    write_h5(root / "deep.h5", raw=blob_volume(shape=(64, 20, 20), seed=9)[0])
    return root, checkpoint


def predict_args(root, checkpoint, volumes, out, fmt, *extra):
    return ["predict", "--ckpt_path", str(checkpoint), "--data.predict_paths",
            "[" + ", ".join(str(root / v) for v in volumes) + "]", "--data.predict_patch_shape", "[16, 20, 20]",
            "--data.predict_stride_shape", "[4, 20, 20]", "--data.num_workers", "0", "--prediction.output_dir",
            str(out), "--prediction.format", fmt, "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
            "false", *extra]


def in_process(args, capsys):
    from unet3d_lightning.cli import main

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["unet3d"])
        main(args)
    return capsys.readouterr().out


def subprocess_run(args, env=None, expect=0):
    result = subprocess.run([*unet3d_command(), *args], capture_output=True, text=True,
                            env=env or subprocess_env(), timeout=300)
    assert result.returncode == expect, (result.stdout + result.stderr)[-4000:]
    return result


def read(path, key="predictions"):
    if path.name.endswith(".ome.zarr"):  # level 0 of the image or of a label image
        group = zarr.open_group(str(path), mode="r")
        return (group["0"] if key == "predictions" else group["labels"][key]["0"])[...]
    if path.suffix == ".zarr":
        return zarr.open_group(str(path), mode="r")[key][...]
    with h5py.File(path) as f:
        return f[key][()]


DDP2 = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
SHAPES = {"a.h5": (40, 20, 20), "b.h5": (6, 20, 20)}


@pytest.mark.slow
def test_two_ranks_write_their_own_rows_into_one_zarr_store_equal_to_one_device(setting, capsys):
    root, checkpoint = setting
    extra = ["--prediction.blend", "gaussian", "--prediction.save_segmentation", "true"]
    in_process(predict_args(root, checkpoint, SHAPES, root / "one", "zarr", *extra), capsys)
    result = subprocess_run(predict_args(root, checkpoint, SHAPES, root / "two", "zarr", *extra, *DDP2))
    for name, shape in SHAPES.items():
        stem = name[:-3] + "_predictions.zarr"
        single, double = read(root / "one" / stem), read(root / "two" / stem)
        assert single.shape == (2, *shape)
        np.testing.assert_allclose(double, single, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(read(root / "two" / stem, "segmentation"),
                                      read(root / "one" / stem, "segmentation"))
    assert sorted(os.listdir(root / "two")) == ["a_predictions.zarr", "b_predictions.zarr"]  # no temporaries
    reports = {int(r): (int(p), int(v)) for r, p, v in REPORT.findall(result.stdout)}
    assert sorted(reports) == [0, 1], result.stdout
    assert all(p > 0 and v > 0 for p, v in reports.values())
    assert sum(v for _, v in reports.values()) == sum(2 * np.prod(s) for s in SHAPES.values())
    # a: z-starts 0, 4, ..., 24 (7 patches), b: 1 patch. Rank 0 owns rows [0, 16) of a (the 4 patches starting
    # below 16), rank 1 rows [16, 40) of a (the 6 patches ending above 16) and all of b, which is one chunk row
    # (6 z-rows, fewer than ranks x chunk depth): rank 0 owns none of it.
    assert reports == {0: (4, 2 * 16 * 400), 1: (7, 2 * (24 + 6) * 400)}
    assert "11 patches for 8 distinct ones: 3 redundant" in result.stdout


@pytest.mark.slow
def test_two_ranks_write_their_own_rows_of_one_ome_zarr_image(setting, capsys):
    """OME-Zarr: each rank writes its own chunk rows of level 0; rank 0 adds the smaller levels and the metadata
    once all rows are written, so the image equals the single-device one, pyramid included."""
    root, checkpoint = setting
    extra = ["--prediction.save_segmentation", "true"]
    in_process(predict_args(root, checkpoint, ["a.h5"], root / "one_ome", "ome-zarr", *extra), capsys)
    result = subprocess_run(predict_args(root, checkpoint, ["a.h5"], root / "two_ome", "ome-zarr", *extra, *DDP2))
    reports = {int(r): (int(p), int(v)) for r, p, v in REPORT.findall(result.stdout)}
    assert reports == {0: (4, 2 * 16 * 400), 1: (6, 2 * 24 * 400)}, result.stdout  # rows shared, not all-reduced
    one, two = root / "one_ome" / "a_predictions.ome.zarr", root / "two_ome" / "a_predictions.ome.zarr"
    np.testing.assert_allclose(read(two), read(one), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(read(two, "segmentation"), read(one, "segmentation"))
    single, double = zarr.open_group(str(one), mode="r"), zarr.open_group(str(two), mode="r")
    assert dict(double.attrs) == dict(single.attrs)  # the same multiscales metadata
    levels = [d["path"] for d in single.attrs["multiscales"][0]["datasets"]]
    for level in levels:
        np.testing.assert_allclose(double[level][...], single[level][...], atol=1e-5, rtol=0)
    assert os.listdir(root / "two_ome") == ["a_predictions.ome.zarr"]


@pytest.mark.slow
def test_hdf5_two_ranks_equal_one_device_and_a_rank_that_owns_nothing_exits_cleanly(setting, capsys):
    """b is one chunk row: rank 1 owns it and writes a part file; rank 0 owns nothing (it predicts one flagged
    duplicate), and joins rank 1's part into the output it renames."""
    root, checkpoint = setting
    in_process(predict_args(root, checkpoint, ["b.h5"], root / "one_h5", "hdf5"), capsys)
    result = subprocess_run(predict_args(root, checkpoint, ["b.h5"], root / "two_h5", "hdf5", *DDP2))
    reports = {int(r): (int(p), int(v)) for r, p, v in REPORT.findall(result.stdout)}
    assert reports == {0: (0, 0), 1: (1, 2 * 6 * 400)}, result.stdout
    np.testing.assert_allclose(read(root / "two_h5" / "b_predictions.h5"),
                               read(root / "one_h5" / "b_predictions.h5"), atol=1e-5, rtol=0)
    with h5py.File(root / "two_h5" / "b_predictions.h5") as f:
        assert f["predictions"].compression == "gzip" and f["predictions"].attrs["scale"] == 1.0
    assert os.listdir(root / "two_h5") == ["b_predictions.h5"]  # the part file is gone


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zarr", "ome-zarr"])
def test_resume_after_sigkill_completes_equal_to_an_uninterrupted_run_with_fewer_patches(setting, capsys, fmt):
    root, checkpoint = setting
    suffix = ".zarr" if fmt == "zarr" else ".ome.zarr"
    extra = ["--prediction.save_segmentation", "true", "--data.predict_stride_shape", "[8, 20, 20]"]
    full = in_process(predict_args(root, checkpoint, ["deep.h5"], root / f"whole{fmt}", fmt, *extra), capsys)
    out = root / f"killed{fmt}"
    env = subprocess_env()
    env["PYTHONPATH"] = str(HOOKS) + os.pathsep + env["PYTHONPATH"]
    env["UNET3D_TEST_KILL_AFTER_ROWS"] = "2"  # after rows 0-32 of 64 are final
    resume = ["--prediction.resume", "true"]
    subprocess_run(predict_args(root, checkpoint, ["deep.h5"], out, fmt, *extra, *resume), env=env,
                   expect=-signal.SIGKILL)
    partial = f".deep_predictions{suffix}.partial"
    assert sorted(os.listdir(out)) == [partial, f"{partial}-progress"]
    # a resume with another grid or another checkpoint is refused, and leaves the interrupted output alone
    from conftest import error_line

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["unet3d"])
        grid = error_line(capsys, predict_args(root, checkpoint, ["deep.h5"], out, fmt,
                                               "--prediction.save_segmentation", "true", *resume))
        weights = error_line(capsys, predict_args(root, root / "ckpt" / "other.ckpt", ["deep.h5"], out, fmt,
                                                  *extra, *resume))
    assert "different patch grid" in grid and "[0, 8, 16, 24, 32, 40, 48]" in grid
    assert "different model weights" in weights
    assert len(os.listdir(out)) == 2
    resumed = in_process(predict_args(root, checkpoint, ["deep.h5"], out, fmt, *extra, *resume), capsys)
    # z-starts 0, 8, ..., 48: rows 32-64 need the 4 patches ending above 32, of 7
    assert "rank 0: 4 patches, 25600 output voxels written" in resumed, resumed
    assert "patches" not in full or "rank 0:" not in full  # a plain single-device run stays as it was
    assert sorted(os.listdir(out)) == [f"deep_predictions{suffix}"]
    for key in ("predictions", "segmentation"):
        np.testing.assert_array_equal(read(out / f"deep_predictions{suffix}", key),
                                      read(root / f"whole{fmt}" / f"deep_predictions{suffix}", key))
    if fmt == "ome-zarr":  # the smaller levels and the metadata, written once the resumed rows are complete
        resumed_image = zarr.open_group(str(out / f"deep_predictions{suffix}"), mode="r")
        whole_image = zarr.open_group(str(root / f"whole{fmt}" / f"deep_predictions{suffix}"), mode="r")
        assert dict(resumed_image.attrs) == dict(whole_image.attrs)
        for dataset in whole_image.attrs["multiscales"][0]["datasets"]:
            np.testing.assert_array_equal(resumed_image[dataset["path"]][...], whole_image[dataset["path"]][...])
