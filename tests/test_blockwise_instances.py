"""Blockwise seeded watershed (blockwise.py) against the whole-volume watershed, on generated touching cells."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import adapted_rand_error

from unet3d_lightning.blockwise import blockwise_instances, blockwise_plan, fits_whole
from unet3d_lightning.demo.cells import cells_volume
from unet3d_lightning.instances import WatershedOptions, watershed_instances

SHAPE = (96, 40, 40)


@pytest.fixture(scope="module")
def membranes():
    raw, label = cells_volume(SHAPE, np.random.default_rng(4), cell_size=12.0, noise=0.0)
    return raw.astype(np.float32), label  # raw is the blurred membrane map in [0, 1]: a boundary probability


def test_blockwise_watershed_matches_the_whole_volume_within_the_memory_limit(membranes):
    boundary, _ = membranes
    maps = boundary[None]
    spec = {"kind": "boundaries", "foreground_channel": None}
    # room for the watershed of about 32 + 2 x 10 rows of 40 x 40, not for the 96 rows of the whole volume
    limit_gb = 54 * 40 * 40 * 90 / 1024**3
    options = WatershedOptions(threshold=0.5, seed_sigma=2.0, min_distance=5, memory_limit_gb=limit_gb)
    assert not fits_whole(SHAPE, 1, options)
    plan = blockwise_plan(SHAPE, 1, options)
    assert plan == (32, 10)  # blocks of 32 core rows, 10 of context: three blocks, two faces
    whole = watershed_instances(boundary, None, options)

    out = np.zeros(SHAPE, np.uint32)
    writes = []

    def read_maps(z0, z1):
        return np.array(maps[:, z0:z1])  # a copy, as a read from the store is

    def write(z0, z1, ids):
        writes.append((z0, z1))
        out[z0:z1] = ids

    tracemalloc.start()
    count = blockwise_instances(read_maps, SHAPE, spec, options, write, lambda z0, z1: out[z0:z1].copy(), plan)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak <= limit_gb * 1024**3
    assert writes == [(0, 32), (32, 64), (64, 96)] * 2  # block ids, then the merged ids

    # ids 1..n, each one object (one connected piece: no id reused by two blocks for different objects)
    ids = np.unique(out[out > 0])
    assert count == len(ids) and ids.tolist() == list(range(1, count + 1))
    for index, box in enumerate(ndimage.find_objects(out.astype(np.int64)), start=1):
        _, pieces = ndimage.label(out[box] == index)
        assert pieces == 1, index
    # objects crossing the block faces at z = 32 and 64 were merged: some ids lie on both sides
    assert len(set(np.unique(out[31])) & set(np.unique(out[32])) - {0}) > 3
    error, _, _ = adapted_rand_error(whole, out.astype(np.int64))
    print(f"blockwise peak {peak / 2**20:.2f} MiB, limit {limit_gb * 1024:.2f} MiB, whole volume would need "
          f"{np.prod(SHAPE) * 84 / 2**20:.2f} MiB; {count} objects (whole: {whole.max()}), adapted Rand error "
          f"{error:.4f}")
    assert error <= 0.05, error
    assert abs(count - int(whole.max())) <= 0.1 * whole.max()


def test_no_block_fits_a_limit_below_one_chunk_row():
    assert blockwise_plan((64, 512, 512), 2, WatershedOptions(memory_limit_gb=0.01)) is None


@pytest.mark.slow
def test_predict_with_instances_above_the_memory_limit_runs_blockwise(tmp_path, monkeypatch):
    import sys

    import h5py

    from conftest import write_h5
    from unet3d_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["unet3d"])
    raw, label = cells_volume((16, 32, 32), np.random.default_rng(0), cell_size=10.0, noise=0.05)
    write_h5(tmp_path / "train.h5", raw=raw, label=label)
    write_h5(tmp_path / "big.h5", raw=cells_volume((48, 32, 32), np.random.default_rng(1), noise=0.0)[0])
    main(["fit", "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.logger", "false",
          "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
          "--model.out_channels", "1", "--model.f_maps", "4", "--model.num_levels", "2", "--model.num_groups", "2",
          "--model.loss", "bce", "--data.label_transform", "boundaries", "--data.train_paths",
          f"[{tmp_path / 'train.h5'}]", "--data.train_patch_shape", "[16, 16, 16]", "--data.num_workers", "0",
          "--checkpoint.dirpath", str(tmp_path / "ckpt")])
    # 48 x 32 x 32 needs about 4.1 MB whole; 3.5 MB holds blocks of 16 rows with 10 rows of context each side
    main(["predict", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--data.predict_paths",
          f"[{tmp_path / 'big.h5'}]", "--data.predict_patch_shape", "[16, 32, 32]", "--data.num_workers", "0",
          "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--prediction.output_dir",
          str(tmp_path / "out"), "--prediction.instances", "true", "--prediction.watershed.memory_limit_gb",
          "0.0035", "--prediction.watershed.threshold", "0.5"])
    with h5py.File(tmp_path / "out" / "big_predictions.h5") as f:
        instances = f["instances"][()]
        assert instances.shape == (48, 32, 32) and instances.dtype == np.uint32
        assert "blockwise, blocks of 16 z-rows" in f["instances"].attrs["method"]
        count = int(f["instances"].attrs["count"])
    assert np.unique(instances[instances > 0]).tolist() == list(range(1, count + 1))
