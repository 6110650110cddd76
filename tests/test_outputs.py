"""The output stores on their own: chunk rows written in any slab sizes read back exactly in every format, HDF5's
filters reproduced by the writer's own compression, the rename to the final name only once complete, the full-disk
sentence, and the old ``prediction.writer`` module still reaching the code it used to hold."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

import unet3d_lightning.prediction.writer as writer
from unet3d_lightning.errors import ConfigurationError
from unet3d_lightning.prediction import callback, memory, paths
from unet3d_lightning.prediction.outputs import (
    ChunkRowDataset,
    Hdf5Store,
    VolumeOutput,
    ZarrStore,
    chunks,
    compresses_in_threads,
    writing,
)

SRC = Path(__file__).resolve().parents[1] / "src"
SLABS = [1, 4, 2, 5, 1]  # 13 rows: slabs that end inside chunk rows (3 deep) and span several


def values(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def read_back(path, fmt, name):
    if fmt == "zarr":
        import zarr

        return zarr.open_group(str(path), mode="r")[name][...]
    with h5py.File(path, "r") as file:
        return file[name][()]


@pytest.mark.parametrize("fmt, compression, threads", [("hdf5", "gzip", True), ("hdf5", "gzip", False),
                                                       ("hdf5", "lzf", True), ("hdf5", None, False),
                                                       ("zarr", "gzip", True), ("zarr", None, False)])
def test_chunk_rows_in_uneven_slabs_read_back_exactly(tmp_path, monkeypatch, fmt, compression, threads):
    monkeypatch.setattr(chunks, "CHUNK_ZYX", (3, 5, 7))
    expected = values((2, 13, 11, 9))
    labels = (expected[0] > 0.5).astype(np.uint8)
    path = tmp_path / "out"
    store = (ZarrStore if fmt == "zarr" else Hdf5Store)(path, compression)
    with ThreadPoolExecutor(2) as pool:
        probabilities = ChunkRowDataset(store, "predictions", expected.shape, "float32", pool if threads else None)
        segmentation = ChunkRowDataset(store, "segmentation", labels.shape, "uint8", pool if threads else None)
        z = 0
        for rows in SLABS:
            probabilities.add(z, z + rows, expected[:, z : z + rows])
            segmentation.add(z, z + rows, labels[z : z + rows])
            z += rows
        probabilities.close()
        segmentation.close()
    store.close()
    assert probabilities.chunks == (1, 3, 5, 7) and segmentation.chunks == (3, 5, 7)
    np.testing.assert_array_equal(read_back(path, fmt, "predictions"), expected)
    np.testing.assert_array_equal(read_back(path, fmt, "segmentation"), labels)
    if fmt == "hdf5":
        with h5py.File(path, "r") as file:
            assert file["predictions"].compression == compression
            assert file["predictions"].shuffle == (compression is not None)


def test_the_writers_own_deflate_is_hdf5s_shuffle_and_gzip(tmp_path, monkeypatch):
    """The stored bytes of a chunk, taken raw from the file, are a zlib stream of the chunk's bytes grouped by
    position within each float (HDF5's shuffle), including an edge chunk stored at full size."""
    monkeypatch.setattr(chunks, "CHUNK_ZYX", (4, 8, 8))
    expected = values((1, 4, 8, 12), seed=1)  # x: one full chunk and one edge chunk of 4 voxels
    store = Hdf5Store(tmp_path / "out.h5", "gzip")
    with ThreadPoolExecutor(2) as pool:
        dataset = ChunkRowDataset(store, "predictions", expected.shape, "float32", pool)
        dataset.add(0, 4, expected)
        dataset.close()
    store.close()
    with h5py.File(tmp_path / "out.h5", "r") as file:
        for x0 in (0, 8):
            mask, raw = file["predictions"].id.read_direct_chunk((0, 0, 0, x0))
            assert mask == 0  # every filter of the dataset applied
            planes = np.frombuffer(zlib.decompress(raw), np.uint8).reshape(4, -1)  # byte k of every value, k = 0..3
            chunk = np.ascontiguousarray(planes.T).view(np.float32).reshape(4, 8, 8)
            block = expected[0, :, :, x0 : x0 + 8]
            np.testing.assert_array_equal(chunk[:, :, : block.shape[2]], block)
            assert not chunk[:, :, block.shape[2]:].any()  # the part beyond the dataset: zeros


def test_rows_out_of_order_or_missing_are_refused(tmp_path):
    store = Hdf5Store(tmp_path / "out.h5", None)
    dataset = ChunkRowDataset(store, "predictions", (1, 13, 4, 4), "float32", None)
    dataset.add(0, 2, np.zeros((1, 2, 4, 4), np.float32))
    with pytest.raises(RuntimeError, match="rows 3-4 arrived, rows from 2 were expected"):
        dataset.add(3, 4, np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(RuntimeError, match="only rows 0-2 of 13 were written"):
        dataset.close()
    store.close()


def test_only_hdf5_with_gzip_compresses_in_the_writers_threads():
    assert compresses_in_threads("hdf5", "gzip")
    assert not compresses_in_threads("hdf5", "lzf") and not compresses_in_threads("hdf5", None)
    assert not compresses_in_threads("zarr", "gzip") and not compresses_in_threads("zarr", None)


@pytest.mark.parametrize("fmt, suffix", [("hdf5", "_predictions.h5"), ("zarr", "_predictions.zarr")])
def test_a_volume_output_takes_its_final_name_only_when_complete(tmp_path, fmt, suffix):
    final = tmp_path / f"vol{suffix}"
    first = values((2, 6, 5, 4), seed=2)
    output = VolumeOutput(final, (6, 5, 4), 2, "float32", "argmax", "gzip", None, fmt)
    output.write(0, 4, first[:, :4], None)
    assert not final.exists() and output.tmp.exists() and output.tmp.parent == tmp_path
    output.write(4, 6, first[:, 4:], None)
    output.commit()
    assert os.listdir(tmp_path) == [final.name]
    np.testing.assert_array_equal(read_back(final, fmt, "predictions"), first)
    np.testing.assert_array_equal(read_back(final, fmt, "segmentation"), first.argmax(0))  # derived on the host
    # A second output replaces the first (a Zarr store is moved aside, then deleted: nothing else stays) ...
    second = values((2, 6, 5, 4), seed=3)
    output = VolumeOutput(final, (6, 5, 4), 2, "uint8", None, "gzip", None, fmt)
    output.write(0, 6, second, None)
    output.commit()
    assert os.listdir(tmp_path) == [final.name]
    np.testing.assert_array_equal(read_back(final, fmt, "predictions"), np.clip(np.rint(second * 255), 0, 255))
    # ... and a discarded one leaves the complete output as it was.
    output = VolumeOutput(final, (6, 5, 4), 2, "float32", None, "gzip", None, fmt)
    output.write(0, 3, first[:, :3], None)
    output.discard()
    assert os.listdir(tmp_path) == [final.name]
    np.testing.assert_array_equal(read_back(final, fmt, "predictions"), np.clip(np.rint(second * 255), 0, 255))


def test_a_full_disk_is_one_sentence_and_other_errors_pass_unchanged(tmp_path):
    final = tmp_path / "vol_predictions.h5"
    with pytest.raises(ConfigurationError) as info:
        with writing(final, (2, 1024, 1024, 512), "float32"):
            raise OSError(errno.ENOSPC, "Can't write data")
    # 2 x 1024 x 1024 x 512 float32 values: 2**32 bytes.
    assert str(info.value) == (
        f"prediction output {final}: the disk is full (No space left on device); free space there or choose a "
        "prediction.output_dir on a disk with room (this volume's predictions take up to 4.0 GiB before compression)"
    )
    with pytest.raises(ConfigurationError, match="up to 16 MiB before compression"):
        with writing(final, (1, 16, 512, 512), "float32"):  # 2**24 bytes
            raise OSError("HDF5 error stack ... No space left on device")
    with pytest.raises(PermissionError):
        with writing(final, (1, 16, 512, 512), "float32"):
            raise PermissionError(errno.EACCES, "Permission denied")


# ------------------------------------------------------------------------------------------------ layout
def test_the_old_writer_module_reaches_the_code_it_used_to_hold(monkeypatch):
    assert writer.PredictionWriter is callback.PredictionWriter
    assert writer.check_output_dir is paths.check_output_dir and writer.temporary_path is paths.temporary_path
    assert writer.estimate_predict_memory is memory.estimate_predict_memory
    assert writer._ChunkRowDataset is ChunkRowDataset and writer._VolumeOutput is VolumeOutput
    for name in writer.__all__:
        assert getattr(writer, name) is not None, name


def test_outputs_paths_and_memory_know_no_lightning():
    """The stores, the path checks and the memory estimate are usable without Lightning: only the callback is a
    Lightning object."""
    script = ("import sys\n"
              "import unet3d_lightning.prediction.outputs, unet3d_lightning.prediction.paths, "
              "unet3d_lightning.prediction.memory\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == "[]"
