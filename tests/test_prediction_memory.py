"""The memory check of prediction on its own: what it compares with which memory, against hand-worked sizes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from unet3d_lightning.errors import ConfigurationError
from unet3d_lightning.prediction import memory
from unet3d_lightning.prediction.memory import check_predict_memory, format_size

MiB = 2**20

# Patch 32 x 64 x 64 (P = 131072), padded plane 1024 x 1024, batch 1, C_in 1, C 2, f_maps 8 (counted as 16):
STITCHER = 4 * (32 * 3 * 2**20 + 3 * 131072 + 2 * 32 * 2**20)  # band, staging, one slab: 641.5 MiB
PATCHES = 4 * 131072 * (1 + 2 * 2)  # 2.5 MiB
NETWORK = 4 * 131072 * 16 * 12  # 96 MiB
WRITER = 2 * 2**20 * (16 * 4 + 3 * 4 * 32)  # chunk row, three slabs: 896 MiB
DEVICE = STITCHER + PATCHES + NETWORK  # 740 MiB


def plans():
    grid = [(slice(0, 32), slice(0, 64), slice(0, 64))]
    narrow = SimpleNamespace(grid=grid, padded_shape=(32, 64, 64), volume=SimpleNamespace(path="narrow.h5"))
    wide = SimpleNamespace(grid=grid, padded_shape=(40, 1024, 1024), volume=SimpleNamespace(path="wide.h5"))
    return [narrow, wide]


HPARAMS = {"in_channels": 1, "out_channels": 2, "f_maps": 8}


def available(monkeypatch, **bytes_by_type):
    monkeypatch.setattr(memory, "available_memory", lambda device: bytes_by_type.get(device.type))


def test_on_an_accelerator_the_device_holds_all_but_the_writers_buffers(monkeypatch):
    cuda = torch.device("cuda", 0)  # only a name here: nothing is allocated
    available(monkeypatch, cuda=DEVICE - 1, cpu=10 * WRITER)
    with pytest.raises(ConfigurationError) as info:
        check_predict_memory(plans(), HPARAMS, cuda, 1)
    message = str(info.value)
    assert message.startswith(
        "predicting patches of data.predict_patch_shape [32, 64, 64] in batches of data.batch_size 1 needs about "
        "740 MiB of cuda:0 memory (stitcher 642 MiB, patches 2 MiB, network 96 MiB; the stitcher holds patch-depth "
        "bands of wide.h5, 1024 x 1024 in y x) but 740 MiB is available"
    ), message
    assert "writer" not in message
    available(monkeypatch, cuda=DEVICE, cpu=WRITER - 1)
    with pytest.raises(ConfigurationError, match=r"896 MiB of cpu memory \(writer 896 MiB; "):
        check_predict_memory(plans(), HPARAMS, cuda, 1)
    available(monkeypatch, cuda=DEVICE, cpu=WRITER)
    check_predict_memory(plans(), HPARAMS, cuda, 1)


def test_on_the_cpu_everything_counts_against_host_memory(monkeypatch):
    cpu = torch.device("cpu")
    available(monkeypatch, cpu=DEVICE + WRITER - 1)
    with pytest.raises(ConfigurationError, match=r"1\.6 GiB of cpu memory \(stitcher 642 MiB, patches 2 MiB, "
                                                 r"network 96 MiB, writer 896 MiB;"):
        check_predict_memory(plans(), HPARAMS, cpu, 1)
    available(monkeypatch, cpu=DEVICE + WRITER)
    check_predict_memory(plans(), HPARAMS, cpu, 1)
    available(monkeypatch)  # unknown: nothing is refused
    check_predict_memory(plans(), HPARAMS, cpu, 1)


def test_tta_and_the_stored_dtype_change_the_estimate(monkeypatch):
    cpu = torch.device("cpu")
    uint8_writer = 2 * 2**20 * (16 * 1 + 3 * 4 * 32)  # 800 MiB
    available(monkeypatch, cpu=DEVICE + PATCHES + uint8_writer)
    check_predict_memory(plans(), HPARAMS, cpu, 1, tta=True, output_itemsize=1)
    available(monkeypatch, cpu=DEVICE + PATCHES + uint8_writer - 1)
    with pytest.raises(ConfigurationError, match="patches 5 MiB, network 96 MiB, writer 800 MiB"):
        check_predict_memory(plans(), HPARAMS, cpu, 1, tta=True, output_itemsize=1)


def test_f_maps_given_per_level_count_by_the_first(monkeypatch):
    cpu = torch.device("cpu")
    available(monkeypatch, cpu=DEVICE + WRITER)
    check_predict_memory(plans(), {**HPARAMS, "f_maps": [8, 16]}, cpu, 1)
    # Without f_maps the network's default of 64 counts: 4 x P x 64 x 12 bytes.
    hparams = {"out_channels": 2}
    with pytest.raises(ConfigurationError, match="network 384 MiB"):
        check_predict_memory(plans(), hparams, cpu, 1)


def test_sizes_read_in_mib_below_a_gib():
    assert format_size(2**30) == "1.0 GiB" and format_size(2**30 - 1) == "1024 MiB"
    assert format_size(3 * MiB) == "3 MiB" and format_size(0) == "0 MiB"
