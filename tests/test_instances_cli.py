"""Instance segmentation through the unet3d command: fit on touching cells, predict instances, user mistakes."""

import csv
import json
import sys

import h5py
import numpy as np
import pytest
import yaml

from conftest import write_h5
from unet3d_lightning.cli import main
from unet3d_lightning.data.demo_cells import cells_volume
from unet3d_lightning.data.targets import relabel
from unet3d_lightning.instances import adapted_rand_error, average_precision

SHAPE = (16, 32, 32)


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


def _cells(path, seed, noise=0.1, dtype=np.uint64):
    raw, label = cells_volume(SHAPE, np.random.default_rng(seed), cell_size=10.0, noise=noise)
    if dtype != np.uint64:
        label = relabel(label).astype(dtype)
    return write_h5(path, raw=raw, label=label), label


def _config(tmp_path, **data):
    for name, seed in (("train_0", 0), ("train_1", 1), ("val_0", 2)):
        _cells(tmp_path / "data" / f"{name}.h5", seed)
    config = {
        "seed_everything": 3,
        "trainer": {"default_root_dir": str(tmp_path / "runs"), "accelerator": "cpu", "max_epochs": 6,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs")}}},
        "model": {"out_channels": 1, "f_maps": 8, "num_levels": 2, "num_groups": 4, "loss": "bce_dice",
                  "learning_rate": 0.01},
        "data": {"train_paths": [str(tmp_path / "data" / "train_*.h5")],
                 "val_paths": [str(tmp_path / "data" / "val_0.h5")],
                 "label_transform": "boundaries",
                 "train_patch_shape": [16, 16, 16], "train_stride_shape": [16, 8, 8],
                 "val_patch_shape": list(SHAPE), "batch_size": 2, "num_workers": 0, **data},
        "checkpoint": {"monitor": "val/arand", "mode": "min"},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _metrics(tmp_path, key):
    rows = list(csv.DictReader(open(next((tmp_path / "runs").rglob("metrics.csv")))))
    return [float(r[key]) for r in rows if r.get(key)]


def test_fit_on_touching_cells_lowers_arand_and_predict_recovers_the_cells(tmp_path, capsys):
    config = _config(tmp_path)
    main(args=["fit", "--config", str(config)])
    arand, ap = _metrics(tmp_path, "val/arand"), _metrics(tmp_path, "val/ap")
    assert len(arand) == 6 and len(ap) == 6
    assert min(arand[-2:]) < arand[0] and min(arand) < 0.2, arand
    assert max(ap) > ap[0], ap
    best = next((tmp_path / "runs").rglob("best.ckpt"))

    # A clean volume of new cells, ids above 2**63.
    clean, label = _cells(tmp_path / "clean" / "clean cells.h5", seed=5, noise=0.0)
    out = tmp_path / "out"
    main(args=["predict", "--ckpt_path", str(best), "--data.predict_paths", json.dumps([str(clean)]),
               "--data.predict_patch_shape", "[16, 32, 32]", "--data.num_workers", "0",
               "--prediction.output_dir", str(out), "--prediction.instances", "true",
               "--trainer.enable_progress_bar", "false"])
    with h5py.File(out / "clean cells_predictions.h5", "r") as f:
        instances = f["instances"][...]
        assert f["predictions"].shape == (1, *SHAPE)
    assert instances.shape == SHAPE and instances.dtype == np.uint32
    truth = relabel(label)
    assert average_precision(truth, instances) >= 0.9
    assert adapted_rand_error(truth, instances) < 0.1


def test_instance_mistakes_end_in_one_error_line(tmp_path, capsys):
    config = _config(tmp_path)

    def error(*args):
        with pytest.raises(SystemExit) as exit_info:
            main(args=["fit", "--config", str(config), "--trainer.max_epochs", "0", *args])
        assert exit_info.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, lines
        return lines[0]

    assert "out_channels=2" in error("--model.out_channels", "2") and "set model.out_channels to 1" in error(
        "--model.out_channels", "2")
    assert "3 target channel(s)" in error("--data.label_transform", "affinities")
    assert "loss 'ce'" in error(
        "--model.loss", "ce", "--model.out_channels", "3", "--data.label_transform", "affinities"
    )
    assert "label_transform" in error("--data.label_transform", "distance")
    write_h5(tmp_path / "data" / "val_0.h5", raw=np.zeros(SHAPE, np.float32), label=np.zeros(SHAPE, np.float32))
    assert "dtype float32" in error()


def test_affinity_model_predicts_instances_and_refuses_a_volume_above_the_memory_limit(tmp_path, capsys):
    """An affinity run goes through fit (masked targets, instance metrics) and predict (instances from
    affinities); a volume whose watershed would exceed the memory limit is refused with one error line, before any
    output is written."""
    config = _config(tmp_path, label_transform="affinities", target_options={"offsets": [[1, 0, 0], [0, 1, 0],
                                                                                        [0, 0, 1], [0, 0, 3]]})
    main(args=["fit", "--config", str(config), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
               "--model.out_channels", "4"])
    assert len(_metrics(tmp_path, "val/arand")) == 1 and len(_metrics(tmp_path, "val/ap")) == 1
    best = next((tmp_path / "runs").rglob("last.ckpt"))
    out = tmp_path / "out"
    base = ["predict", "--ckpt_path", str(best), "--data.predict_paths", json.dumps([str(tmp_path / "data" / "val_0.h5")]),
            "--data.predict_patch_shape", "[16, 32, 32]", "--data.num_workers", "0",
            "--prediction.output_dir", str(out), "--prediction.instances", "true"]
    with pytest.raises(SystemExit):
        main(args=[*base, "--prediction.watershed.memory_limit_gb", "0.0001"])
    err = capsys.readouterr().err
    assert "memory_limit_gb=0.0001" in err and "blockwise" in err and "error:" in err
    assert not list(out.glob("*.h5*"))
    main(args=base)
    with h5py.File(out / "val_0_predictions.h5", "r") as f:
        assert f["predictions"].shape == (4, *SHAPE) and f["instances"].shape == SHAPE
        assert f["instances"].dtype == np.uint32 and f["instances"].attrs["count"] == f["instances"][...].max()


def test_instances_need_a_model_trained_on_boundaries_or_affinities():
    from types import SimpleNamespace

    from unet3d_lightning import UNet3DModule
    from unet3d_lightning.errors import ConfigurationError
    from unet3d_lightning.prediction.callback import PredictionWriter

    plans = [SimpleNamespace(volume=SimpleNamespace(path="a.h5", spatial_shape=(8, 8, 8)))]
    writer = PredictionWriter(instances=True)
    with pytest.raises(ConfigurationError, match="prediction.instances needs a model trained on boundaries"):
        writer._check_instances(plans, UNet3DModule(out_channels=2, f_maps=4, num_levels=2, num_groups=2))
    model = UNet3DModule(out_channels=1, f_maps=4, num_levels=2, num_groups=2, loss="bce",
                         targets={"kind": "boundaries"})
    assert writer._check_instances(plans, model) == {"kind": "boundaries"}
