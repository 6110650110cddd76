"""``unet3d plan``: the topology rule by hand, the fingerprint against numpy on the arrays written, and a plan on
small generated data whose config ``fit`` runs, with a patch whose training step, measured here independently in a
process of its own, stays within the memory budget given."""

from __future__ import annotations

import math
import multiprocessing
import resource
import sys

import h5py
import numpy as np
import pytest
import torch
import yaml

from unet3d_lightning.data.datamodule import VolumeDataModule
from unet3d_lightning.plan import divisor, fingerprint, topology

from conftest import blob_volume, cli_error_line


def _volumes(root, count=2, shape=(24, 40, 40), voxel=(2.0, 0.5, 0.5)):
    paths = []
    for i in range(count):
        raw, label = blob_volume(shape=shape, seed=i)
        label = (label + ((raw > 0.7) & (label == 1))).astype(np.uint8)  # classes 0, 1, 2
        path = root / f"v{i}.h5"
        with h5py.File(path, "w") as f:
            f["raw"] = raw
            f["label"] = label
            f["raw"].attrs["element_size_um"] = list(voxel)
        paths.append(path)
    return paths


def test_topology_by_hand():
    pools, convs = topology((32, 64, 64), (1.0, 1.0, 1.0))
    assert pools == [[2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]] and convs == [[3, 3, 3]] * 5
    # z four times as coarse: no z convolution or pooling until y and x have been pooled once.
    pools, convs = topology((16, 64, 64), (4.0, 1.0, 1.0))
    assert pools == [[1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert convs == [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert divisor(pools) == (4, 16, 16)
    assert topology((8, 8, 8), (1.0, 1.0, 1.0)) == ([[2, 2, 2]], [[3, 3, 3], [3, 3, 3]])


def test_fingerprint_matches_numpy(tmp_path):
    paths = _volumes(tmp_path)
    dm = VolumeDataModule(train_paths=[str(p) for p in paths])
    volumes = dm._load_volumes("train", {"in_channels": None, "out_channels": None, "ignore_index": None,
                                         "spatial_dims": None})
    fp = fingerprint(volumes)
    raws, labels = [], []
    for p in paths:
        with h5py.File(p) as f:
            raws.append(f["raw"][()])
            labels.append(f["label"][()])
    raw, label = np.concatenate([r.ravel() for r in raws]), np.concatenate([lab.ravel() for lab in labels])
    assert fp.class_voxels == {c: int((label == c).sum()) for c in (0, 1, 2)}
    assert fp.mean[0] == pytest.approx(raw.mean(), abs=1e-5) and fp.std[0] == pytest.approx(raw.std(), rel=1e-5)
    foreground = raw[label != 0]  # fewer than FOREGROUND_SAMPLES: every foreground voxel is sampled
    assert fp.foreground_mean[0] == pytest.approx(foreground.mean(), rel=1e-5)
    assert fp.foreground_p995[0] == pytest.approx(np.percentile(foreground, 99.5), rel=1e-5)
    assert fp.median_voxel_size == (2.0, 0.5, 0.5) and not fp.integer_raw


def _step_peak(conn, model, patch, batch):
    """An independent measurement: one training step in a fresh fork, its peak resident-set growth."""
    import psutil

    from unet3d_lightning.module import UNet3DModule

    torch.set_num_threads(1)
    start = psutil.Process().memory_info().rss
    module = UNet3DModule(**model)
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    batch_data = {"raw": torch.randn(batch, 1, *patch),
                  "label": torch.randint(0, model["out_channels"], (batch, *patch))}
    module._training_loss(batch_data).backward()
    optimizer.step()
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start)


def test_plan_writes_a_config_that_fit_runs_within_the_memory_budget(tmp_path, monkeypatch, capsys):
    from unet3d_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["unet3d"])
    paths = _volumes(tmp_path)
    output = tmp_path / "plan.yaml"
    budget_gb = 0.12
    main(["plan", "--data.train_paths", f"[{paths[0]}]", "--data.val_paths", f"[{paths[1]}]",
          "--data.num_workers", "0", "--memory_gb", str(budget_gb), "--trainer.max_time", "00:00:02:00",
          "--trainer.accelerator", "cpu", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "fingerprint of 1 training volume(s)" in printed and "data.train_patch_shape" in printed
    config = yaml.safe_load(output.read_text())
    model, data = config["model"], config["data"]
    assert (model["out_channels"], model["loss"], model["deep_supervision"]) == (3, "dice_ce", True)
    assert model["pool_kernel_size"][0] == [1, 2, 2] and model["conv_kernel_size"][0] == [1, 3, 3]  # z is coarse
    assert data["sampling"] == "random" and data["foreground_oversampling"] == 0.33
    assert data["predict_patch_shape"] == data["train_patch_shape"]
    assert data["predict_stride_shape"] == [p // 2 for p in data["train_patch_shape"]]
    assert config["prediction"]["blend"] == "gaussian"
    assert model["lr_scheduler"]["init_args"]["total_iters"] == config["trainer"]["max_steps"]
    patch, batch = data["train_patch_shape"], data["batch_size"]
    assert math.prod(patch) < 24 * 40 * 40  # the budget forced a patch smaller than the volume
    assert all(p % d == 0 for p, d in zip(patch, divisor(model["pool_kernel_size"])))

    network = {k: model[k] for k in ("in_channels", "out_channels", "f_maps", "num_levels", "layer_order",
                                     "num_groups", "loss", "pool_kernel_size", "conv_kernel_size",
                                     "deep_supervision")}
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_step_peak, args=(send, network, patch, batch))
    process.start()
    assert receive.poll(300), f"the measuring process ended with status {process.exitcode}"
    peak = receive.recv()
    process.join()
    assert 0 < peak <= budget_gb * 2**30, peak

    main(["fit", "--config", str(output), "--trainer.max_steps", "2", "--trainer.default_root_dir",
          str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    checkpoint = next((tmp_path / "runs").rglob("last.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    assert state["hyper_parameters"]["deep_supervision"] is True


def test_plan_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from unet3d_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["unet3d"])
    paths = _volumes(tmp_path, count=1)
    assert "data.train_paths is empty" in cli_error_line(capsys, ["plan", "--output", str(tmp_path / "p.yaml")])
    line = cli_error_line(capsys, ["plan", "--data.train_paths", f"[{paths[0]}]", "--output", str(tmp_path / "p.txt")])
    assert "must end in .yaml" in line
    line = cli_error_line(capsys, ["plan", "--data.train_paths", f"[{paths[0]}]", "--data.label_internal_path",
                                   "nothing", "--output", str(tmp_path / "p.yaml")])
    assert "nothing" in line
    assert not (tmp_path / "p.yaml").exists()


def test_a_short_time_budget_shrinks_the_patch_until_it_holds_enough_steps(tmp_path, monkeypatch, capsys):
    """Step time modelled as proportional to the patch's voxels (as it is, roughly): with a budget that leaves the
    full-volume patch too few steps, the plan shrinks the patch until the schedule holds MIN_STEPS."""
    from unet3d_lightning import plan
    from unet3d_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["unet3d"])
    per_voxel = 2e-5  # seconds per patch voxel and step: the 24 x 40 x 40 volume as one patch is 0.77 s a step
    timed = []

    def step_time(settings, patch, batch, precision, device, multiclass, steps=1):
        timed.append(list(patch))
        return math.prod(patch) * per_voxel

    monkeypatch.setattr(plan, "_one_step", step_time)
    monkeypatch.setattr(plan, "measure_peak", lambda *args, **kwargs: 1)  # memory is not what this test limits
    paths = _volumes(tmp_path)
    output = tmp_path / "plan.yaml"
    main(["plan", "--data.train_paths", f"[{paths[0]}]", "--trainer.max_time", "00:00:02:00",
          "--trainer.accelerator", "cpu", "--output", str(output)])
    config = yaml.safe_load(output.read_text())
    patch = config["data"]["train_patch_shape"]
    assert timed[0] == [24, 40, 40] and len(timed) > 1  # measured at the volume's size first, then smaller
    steps = 120 * 0.85 / (math.prod(patch) * per_voxel)
    assert steps >= plan.MIN_STEPS and config["trainer"]["max_steps"] == int(steps)
    assert math.prod(patch) < 24 * 40 * 40
    assert all(p % d == 0 for p, d in zip(patch, divisor(config["model"]["pool_kernel_size"])))
    assert "so that the time budget holds at least 1000 steps" in capsys.readouterr().out
