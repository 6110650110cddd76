"""Regression (denoising) tasks: the mse / l1 / smooth_l1 losses against torch's own, PSNR against scikit-image, float
targets through the data (checks, normalisation, augmentations), and fit + predict through the command."""

from __future__ import annotations

import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import error_line, write_h5
from unet3d_lightning.cli import main
from unet3d_lightning.data.transforms import Augmentation
from unet3d_lightning.losses import (
    L1Loss,
    MSELoss,
    SmoothL1Loss,
    apply_final_activation,
    create_loss,
    final_activation_name,
    regression_loss,
)
from unet3d_lightning.module import UNet3DModule, metric_mode
from unet3d_lightning.regression import TargetRangePSNR, normalize_target, regression_metrics

TINY = dict(f_maps=4, num_levels=2, num_groups=2)
TORCH = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unet3d"])


def pair(shape=(2, 2, 3, 4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g) * 3 + 1


# ------------------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("kind", ["mse", "l1", "smooth_l1"])
def test_losses_equal_torchs_and_weights_count_as_repeated_voxels(kind):
    x, y = pair()
    module = {"mse": MSELoss, "l1": L1Loss, "smooth_l1": SmoothL1Loss}[kind]()
    torch.testing.assert_close(module(x, y), TORCH[kind](x, y), rtol=1e-6, atol=1e-6)
    # an ignored value: the mean over the other elements only
    y_ignored = y.clone()
    y_ignored[0, 1, :2] = -1.0
    valid = y_ignored != -1
    ignored = create_loss(kind, multiclass=False, ignore_index=-1)(x, y_ignored)
    torch.testing.assert_close(ignored, TORCH[kind](x[valid], y[valid]), rtol=1e-6, atol=1e-6)
    # integer per-voxel weights w: the same as repeating each element w times (a weight-0 element drops out)
    weights = torch.randint(0, 4, (2, 3, 4, 5), generator=torch.Generator().manual_seed(3)).float()
    repeats = weights[:, None].expand_as(x).reshape(-1).long()
    expected = TORCH[kind](x.reshape(-1).repeat_interleave(repeats), y.reshape(-1).repeat_interleave(repeats))
    torch.testing.assert_close(module(x, y, weights), expected, rtol=1e-5, atol=1e-6)
    # per-channel weights: channel 1 counts three times
    per_channel = create_loss(kind, multiclass=False, weight=[1.0, 3.0], out_channels=2)(x, y)
    expected = TORCH[kind](torch.cat([x[:, 0].flatten(), x[:, 1].flatten().repeat(3)]),
                           torch.cat([y[:, 0].flatten(), y[:, 1].flatten().repeat(3)]))
    torch.testing.assert_close(per_channel, expected, rtol=1e-5, atol=1e-6)


def test_smooth_l1_by_hand_and_its_beta():
    x = torch.tensor([0.0, 0.0, 0.0, 0.0]).view(1, 1, 4, 1, 1)
    y = torch.tensor([0.2, -0.5, 2.0, -3.0]).view(1, 1, 4, 1, 1)
    # beta 1: 0.5 d^2 below 1, |d| - 0.5 above
    assert float(SmoothL1Loss()(x, y)) == pytest.approx((0.02 + 0.125 + 1.5 + 2.5) / 4)
    # beta 2: 0.5 d^2 / 2 below 2 (0.2, -0.5), |d| - 1 from 2 on
    assert float(SmoothL1Loss(beta=2.0)(x, y)) == pytest.approx((0.01 + 0.0625 + 1.0 + 2.0) / 4)
    torch.testing.assert_close(regression_loss(x, y, "smooth_l1", beta=0.3), F.smooth_l1_loss(x, y, beta=0.3))


def test_ignored_and_zero_weight_voxels_get_no_gradient_and_an_empty_batch_is_zero():
    x, y = pair(seed=1)
    x.requires_grad_(True)
    y[:, :, 0] = 255.0
    MSELoss(ignore_index=255)(x, y).backward()
    assert bool((x.grad[:, :, 0] == 0).all()) and bool((x.grad[:, :, 1:] != 0).any())
    x.grad = None
    loss = MSELoss()(x, y, torch.zeros(2, 3, 4, 5))
    loss.backward()
    assert float(loss) == 0.0 and bool((x.grad == 0).all())
    # a 3D target stands for one channel; 0 is a valid ignore value for regression (no 0/1 label values here)
    one = torch.randn(2, 1, 3, 4, 5)
    torch.testing.assert_close(L1Loss(ignore_index=0)(one, one[:, 0] + 1), torch.tensor(1.0))


def test_loss_factory_activation_and_errors():
    assert final_activation_name("smooth_l1", multiclass=False) == "none"
    logits = torch.randn(1, 2, 2, 2, 2) * 5
    assert torch.equal(apply_final_activation(logits.to(torch.bfloat16), "none"), logits.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="regression loss"):
        create_loss("mse", multiclass=True)
    with pytest.raises(ValueError, match="2 entries but out_channels=3"):
        create_loss("l1", multiclass=False, weight=[1.0, 2.0], out_channels=3)
    x, y = pair()
    with pytest.raises(ValueError, match="output's shape"):
        MSELoss()(x, y[:, :1])
    y[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        MSELoss()(x, y)


# ------------------------------------------------------------------------------------------------------- metrics
def test_psnr_takes_the_peak_from_the_targets_range_over_the_epoch():
    from skimage.metrics import peak_signal_noise_ratio

    metrics = regression_metrics("val")
    batches = [pair(seed=s) for s in (4, 5)]
    batches[1][1][0, 0] += 10  # the second batch widens the range
    for x, y in batches:
        metrics.update(x.reshape(-1), y.reshape(-1))
    values = metrics.compute()
    x = torch.cat([b[0].reshape(-1) for b in batches]).numpy().astype(np.float64)
    y = torch.cat([b[1].reshape(-1) for b in batches]).numpy().astype(np.float64)
    expected = peak_signal_noise_ratio(y, x, data_range=y.max() - y.min())
    assert float(values["val/psnr"]) == pytest.approx(expected, rel=1e-5)
    assert float(values["val/mse"]) == pytest.approx(np.mean((x - y) ** 2), rel=1e-5)
    assert isinstance(metrics["psnr"], TargetRangePSNR)
    assert metric_mode("val/psnr") == "max" and metric_mode("val/mse") == "min"


def test_regression_module_task_activation_and_metrics():
    model = UNet3DModule(out_channels=2, loss="l1", ignore_index=-1, **TINY)
    assert model.task == "regression" and UNet3DModule(**TINY).task == "segmentation"
    logits = torch.randn(1, 2, 4, 4, 4) * 4
    assert torch.equal(model.final_activation(logits), logits)
    assert model.logged_metric_names() == ["train/loss", "train/loss_epoch", "val/loss", "val/psnr", "val/mse"]
    assert model.logged_metric_names(validation=False) == ["train/loss", "train/loss_epoch"]
    x = torch.randn(2, 1, 8, 8, 8)
    y = torch.randn(2, 2, 8, 8, 8)
    y[0, 1] = -1  # ignored: counts in neither loss nor metrics
    model.eval()
    out = model._evaluate({"raw": x, "label": y}, "val")
    with torch.no_grad():
        prediction = model(x)
    valid = y != -1
    assert float(out["loss"]) == pytest.approx(float(F.l1_loss(prediction[valid], y[valid])), rel=1e-5)
    values = model.val_metrics.compute()
    assert float(values["val/mse"]) == pytest.approx(float(F.mse_loss(prediction[valid], y[valid])), rel=1e-5)
    with pytest.raises(Exception, match="regression loss"):
        UNet3DModule(loss="mse", multiclass=True, **TINY)


# ------------------------------------------------------------------------------------------------------- data
def test_target_normalization_and_augmentations_treat_the_target_spatially_only():
    from unet3d_lightning.data.volumes import IntensityStats

    target = np.array([[[[1.0, 3.0], [-1.0, 9.0]]]], np.float32)
    stats = IntensityStats(mean=(2.0,), std=(4.0,), low=(0.0,), high=(2.0,))
    assert np.array_equal(normalize_target(target, stats, "standardize", "none"), target)
    np.testing.assert_allclose(normalize_target(target, stats, "standardize", "like_raw", ignore_index=-1),
                               [[[[-0.25, 0.25], [-1.0, 1.75]]]])  # -1 is ignored: kept as it is
    # percentile: the raw's affine map without its clipping (9 -> 4.5, beyond [0, 1])
    np.testing.assert_allclose(normalize_target(target, stats, "percentile", "like_raw"), [[[[0.5, 1.5], [-0.5, 4.5]]]])

    # raw == target: spatial transforms move both alike, intensity and noise change the raw only
    field = torch.randn(1, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    sample = {"raw": field.clone(), "label": field.clone()}
    spatial = dict(flip=True, rotate90=True, elastic=True, elastic_spacing=4)
    full = Augmentation(**spatial, intensity=True, noise_sigma=0.5).build(interpolate_label=True)
    geometric = Augmentation(**spatial, intensity=False, noise_sigma=0.0).build(interpolate_label=True)
    moved = changed = 0
    for seed in range(12):
        a = full(sample, torch.Generator().manual_seed(seed))
        b = geometric(sample, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(a["label"], b["label"])
        torch.testing.assert_close(b["raw"], b["label"])
        moved += not torch.equal(a["label"], field)
        changed += not torch.allclose(a["raw"], a["label"])
    assert moved and changed


def regression_volume(path, shape=(8, 16, 16), seed=0, target=None, **extra):
    """A raw around 500 (standardised by the data) and a float target 3 * field + 2, far outside [0, 1]."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.linspace(0, 2 * np.pi, s) for s in shape), indexing="ij")
    field = np.sin(zz + seed) * np.cos(yy) * np.sin(xx + 1)
    raw = ((field + rng.normal(0, 0.3, shape)) * 100 + 500).astype(np.float32)
    label = (3 * field + 2).astype(np.float32) if target is None else target
    return write_h5(path, raw=raw, label=label, **extra)


def fit_args(tmp_path, train, val=None, *extra):
    args = ["fit", "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.log_every_n_steps", "1", "--seed_everything", "3",
            "--model.loss", "mse", "--model.out_channels", "1", "--model.f_maps", "4", "--model.num_levels", "2",
            "--model.num_groups", "2", "--model.learning_rate", "0.01",
            "--data.train_paths", f"[{train}]", "--data.train_patch_shape", "[8, 8, 8]", "--data.num_workers", "0"]
    if val is not None:
        args += ["--data.val_paths", f"[{val}]", "--data.val_patch_shape", "[8, 16, 16]"]
    return args + list(extra)


@pytest.mark.parametrize("case, words", [
    ("nan", ["t.h5: dataset 'label'", "NaN at (z, y, x) = (3, 5, 7)", "and 1 more", "ignore_index"]),
    ("float64", ["holds 1e+39, beyond the float32 range", "(c, z, y, x) = (0, 2, 3, 4)"]),
    ("shape", ["dataset 'label' has shape (8, 16, 15)", "regression target"]),
    ("channels", ["regression target (C, D, H, W) with C = 2", "out_channels=1", "set model.out_channels to 2"]),
    ("transform", ["data.label_transform 'boundaries'", "regression model"]),
    ("foreground", ["data.min_foreground_fraction", "regression target"]),
    ("like_raw_segmentation", ["data.target_normalization 'like_raw'", "segmentation model"]),
    ("multiclass", ["regression loss", "model.multiclass"]),
])
def test_bad_targets_and_settings_end_in_one_error_line(tmp_path, capsys, case, words):
    target = None
    extra: list[str] = []
    if case == "nan":
        target = np.ones((8, 16, 16), np.float32)
        target[3, 5, 7] = np.nan
        target[6, 0, 0] = np.inf
    elif case == "float64":
        target = np.ones((1, 8, 16, 16))
        target[0, 2, 3, 4] = 1e39
    elif case == "shape":
        target = np.ones((8, 16, 15), np.float32)
    elif case == "channels":
        target = np.ones((2, 8, 16, 16), np.float32)
    elif case == "transform":
        target = np.ones((8, 16, 16), np.uint16)
        extra = ["--data.label_transform", "boundaries"]
    elif case == "foreground":
        extra = ["--data.min_foreground_fraction", "0.1"]
    elif case == "like_raw_segmentation":
        target = np.zeros((8, 16, 16), np.uint8)
        extra = ["--model.loss", "ce", "--model.out_channels", "2", "--data.target_normalization", "like_raw"]
    elif case == "multiclass":
        extra = ["--model.multiclass", "true"]
    path = regression_volume(tmp_path / "t.h5", target=target)
    line = error_line(capsys, fit_args(tmp_path, path, None, *extra))
    for word in words:
        assert word in line, line
    assert not (tmp_path / "runs").exists()  # refused before any run directory was written


def normalised(raw: np.ndarray) -> np.ndarray:
    """The default ``standardize`` normalisation, computed here: population mean and standard deviation."""
    raw = raw.astype(np.float64)
    return ((raw - raw.mean()) / raw.std()).astype(np.float32)[None, None]


def test_regression_fits_validates_with_psnr_and_predicts_raw_outputs(tmp_path, capsys):
    from skimage.metrics import peak_signal_noise_ratio
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train = regression_volume(tmp_path / "train.h5", seed=0)
    val = regression_volume(tmp_path / "val.h5", seed=1)
    main(fit_args(tmp_path, train, val, "--trainer.max_epochs", "3", "--checkpoint.monitor", "val/psnr"))
    run = next((tmp_path / "runs").rglob("version_0"))
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    psnr = [e.value for e in events.Scalars("val/psnr")]
    assert len(psnr) == 3 and "val/mse" in events.Tags()["scalars"] and "val/images" in events.Tags()["images"]
    # the best checkpoint is the one of the highest PSNR: the mode follows the name
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["callbacks"]
    best = next(v["best_model_score"] for k, v in state.items() if k.startswith("ModelCheckpoint"))
    assert float(best) == pytest.approx(max(psnr), rel=1e-6)

    last = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    for tta in ("false", "true"):
        main(["predict", "--ckpt_path", str(last), "--trainer.accelerator", "cpu", "--data.predict_paths", f"[{val}]",
              "--data.predict_patch_shape", "[8, 16, 16]", "--prediction.output_dir", str(out / tta),
              "--prediction.tta", tta, "--trainer.enable_progress_bar", "false"])
    with h5py.File(val, "r") as f:
        raw, target = f["raw"][()], f["label"][()]
    with h5py.File(out / "false" / "val_predictions.h5", "r") as f:
        predictions = f["predictions"][()]
        assert f["predictions"].dtype == np.float32 and "segmentation" not in f
    with h5py.File(out / "true" / "val_predictions.h5", "r") as f:
        averaged = f["predictions"][()]

    model = UNet3DModule.load_from_checkpoint(last, map_location="cpu").eval()
    x = torch.from_numpy(normalised(raw))
    with torch.no_grad():
        expected = model.net(x)[0].numpy()
        flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
        mean = sum(model.net(x.flip(d) if d else x).flip(d if d else ()) for d in flips)[0].numpy() / 8
    np.testing.assert_allclose(predictions, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(averaged, mean, atol=1e-4, rtol=0)
    assert (predictions < 0).any() or (predictions > 1).any()  # raw outputs, never clipped
    assert predictions.max() > 1  # the target reaches 5: a trained output goes beyond 1
    # the last validation ran on this whole volume with these weights: its PSNR is the prediction's
    assert psnr[-1] == pytest.approx(
        peak_signal_noise_ratio(target.astype(np.float64), predictions[0].astype(np.float64),
                                data_range=float(target.max() - target.min())), rel=1e-4)

    for option in (["--prediction.save_segmentation", "true"], ["--prediction.dtype", "uint8"],
                   ["--prediction.instances", "true"]):
        line = error_line(capsys, ["predict", "--ckpt_path", str(last), "--trainer.accelerator", "cpu",
                                   "--data.predict_paths", f"[{val}]", "--data.predict_patch_shape", "[8, 16, 16]",
                                   "--prediction.output_dir", str(tmp_path / "refused"), *option])
        assert "regression model" in line and option[0].lstrip("-") in line, line
        assert not (tmp_path / "refused").exists()


def test_regression_without_validation_weights_like_raw_and_integer_targets(tmp_path, capsys):
    """Integer targets are values (a clean uint16 image is a target like any other; a segmentation label set put
    here by mistake is caught by its channel count, see above); the loss is weighted by data.weight_internal_path and
    the target is in the raw's units with like_raw."""
    shape = (8, 16, 16)
    rng = np.random.default_rng(0)
    target = rng.integers(400, 600, shape).astype(np.uint16)
    weight = rng.uniform(0, 2, shape).astype(np.float32)
    path = regression_volume(tmp_path / "u.h5", target=target, weight=weight)
    # the settings as a user writes them in a config file
    config = {"model": {"loss": "smooth_l1"},
              "data": {"target_normalization": "like_raw", "weight_internal_path": "weight"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    main(fit_args(tmp_path, path, None, "--config", str(tmp_path / "c.yaml"), "--trainer.max_steps", "2",
                  "--data.augmentation.flip", "false", "--data.augmentation.rotate90", "false"))
    assert "best.ckpt is chosen by train/loss_epoch" in capsys.readouterr().err
    checkpoints = next((tmp_path / "runs").rglob("checkpoints"))
    assert (checkpoints / "best.ckpt").exists() and (checkpoints / "last.ckpt").exists()
    saved = yaml.safe_load((checkpoints.parent / "config.yaml").read_text())
    assert saved["model"]["loss"] == "smooth_l1" and saved["data"]["target_normalization"] == "like_raw"

    # the training patches hold the target scaled by the raw's statistics, and the loss weighs each voxel
    from unet3d_lightning.data.datamodule import VolumeDataModule

    model = UNet3DModule(out_channels=1, loss="mse", **TINY)
    data = VolumeDataModule(train_paths=[str(path)], train_patch_shape=(8, 8, 8), train_stride_shape=(8, 8, 8),
                            weight_internal_path="weight", target_normalization="like_raw", num_workers=0,
                            augmentation=Augmentation(flip=False, rotate90=False, intensity=False, noise_sigma=0.0))
    data.check("fit", model)
    model.use_label_kind(data.label_kind, voxel_weights=True)
    dataset = data._build_dataset("train")
    sample = dataset[0]
    with h5py.File(path, "r") as f:
        raw = f["raw"][()].astype(np.float64)
    expected = (target[:, :8, :8].astype(np.float64) - raw.mean()) / raw.std()
    np.testing.assert_allclose(sample["label"][0].numpy(), expected, rtol=1e-5, atol=1e-5)
    x = sample["raw"][None]
    with torch.no_grad():
        loss = model.loss_fn(model(x), sample["label"][None], sample["weight"][None])
        out = model(x)[0, 0].numpy().astype(np.float64)
    w = weight[:, :8, :8].astype(np.float64)
    assert float(loss) == pytest.approx(float((w * (out - expected) ** 2).sum() / w.sum()), rel=1e-4)


@pytest.mark.parametrize("ignore_index, interpolated", [(None, True), (-1, False)])
def test_the_elastic_warp_interpolates_targets_unless_ignore_values_must_survive(tmp_path, ignore_index, interpolated):
    from unet3d_lightning.data.datamodule import VolumeDataModule
    from unet3d_lightning.data.transforms import ElasticDeformation

    path = regression_volume(tmp_path / "e.h5")
    model = UNet3DModule(out_channels=1, loss="mse", ignore_index=ignore_index, **TINY)
    data = VolumeDataModule(train_paths=[str(path)], train_patch_shape=(8, 8, 8), num_workers=0,
                            augmentation=Augmentation(elastic=True))
    data.check("fit", model)
    warps = [t for t in data._build_dataset("train").transforms if isinstance(t, ElasticDeformation)]
    assert len(warps) == 1 and warps[0].interpolate_label is interpolated


def test_like_raw_needs_paired_channels(tmp_path, capsys):
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(2, 8, 16, 16)).astype(np.float32)
    path = write_h5(tmp_path / "c.h5", raw=raw, label=rng.normal(size=(3, 8, 16, 16)).astype(np.float32))
    args = fit_args(tmp_path, path, None, "--model.in_channels", "2", "--model.out_channels", "3",
                    "--data.target_normalization", "like_raw")
    line = error_line(capsys, args)
    assert "3 target channel(s) but 'raw' has 2" in line and "like_raw" in line, line


# ------------------------------------------------------------------------------------------------------- import
@pytest.mark.parametrize("theirs, ours", [("MSELoss", "mse"), ("L1Loss", "l1"), ("SmoothL1Loss", "smooth_l1")])
def test_pytorch3dunet_regression_losses_map_to_ours(theirs, ours):
    from unet3d_lightning.importers import model_settings

    model = {"name": "UNet3D", "in_channels": 1, "out_channels": 2, "is_segmentation": False}
    settings, notes = model_settings(model, "config c.yml", {"name": theirs, "ignore_index": -1})
    assert settings["loss"] == ours and settings["ignore_index"] == -1 and not notes
    assert UNet3DModule(**settings).task == "regression"
    settings, notes = model_settings(model, "config c.yml", {"name": "WeightedSmoothL1Loss"})
    assert settings["loss"] == "mse" and "WeightedSmoothL1Loss" in notes[0]
    settings, notes = model_settings(model, "config c.yml")
    assert settings["loss"] == "mse" and "names no loss" in notes[0]
    # segmentation networks are read as before, whatever their loss section says
    segmentation, _ = model_settings({**model, "is_segmentation": True}, "config c.yml", {"name": "MSELoss"})
    assert segmentation["loss"] == "bce" and UNet3DModule(**segmentation).task == "segmentation"


def test_imported_pytorch3dunet_regression_model_predicts_its_own_forward_pass(tmp_path, capsys):
    p3d_model = pytest.importorskip("pytorch3dunet.unet3d.model", reason="the pytorch3dunet test dependency")
    p3d_utils = pytest.importorskip("pytorch3dunet.unet3d.utils")

    settings = dict(in_channels=1, out_channels=1, f_maps=8, num_levels=3, layer_order="gcr", num_groups=4,
                    is_segmentation=False)
    torch.manual_seed(0)
    theirs = p3d_model.UNet3D(**settings)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    theirs.eval()
    assert theirs.final_activation is None  # their regression network: no activation, at training or prediction
    # what pytorch-3dunet's trainer writes (UNetTrainer._save_checkpoint), and its training config
    p3d_utils.save_checkpoint({"num_epochs": 2, "num_iterations": 50, "model_state_dict": theirs.state_dict(),
                               "best_eval_score": 31.5}, is_best=True, checkpoint_dir=str(tmp_path / "p3d"))
    config = {"model": {"name": "UNet3D", **settings}, "loss": {"name": "SmoothL1Loss"},
              "eval_metric": {"name": "PSNR"}, "trainer": {"checkpoint_dir": str(tmp_path / "p3d")}}
    (tmp_path / "train_config.yml").write_text(yaml.safe_dump(config))
    main(["import-pytorch3dunet", "--model_path", str(tmp_path / "p3d" / "best_checkpoint.pytorch"),
          "--config", str(tmp_path / "train_config.yml"), "--output", str(tmp_path / "model.ckpt")])
    assert "error" not in capsys.readouterr().err

    volume = regression_volume(tmp_path / "noisy.h5", seed=2)
    main(["predict", "--ckpt_path", str(tmp_path / "model.ckpt"), "--trainer.accelerator", "cpu",
          "--data.predict_paths", f"[{volume}]", "--data.predict_patch_shape", "[8, 16, 16]",
          "--prediction.output_dir", str(tmp_path / "out"), "--trainer.enable_progress_bar", "false"])
    with h5py.File(volume, "r") as f:
        x = torch.from_numpy(normalised(f["raw"][()]))
    with h5py.File(tmp_path / "out" / "noisy_predictions.h5", "r") as f:
        ours = f["predictions"][()]
    with torch.no_grad():
        expected = theirs(x)[0].numpy()
    assert np.abs(ours - expected).max() <= 1e-4
    assert (ours < 0).any() and (ours > 1).any()
    imported = UNet3DModule.load_from_checkpoint(tmp_path / "model.ckpt", map_location="cpu")
    assert imported.task == "regression" and imported.hparams.loss == "smooth_l1"
