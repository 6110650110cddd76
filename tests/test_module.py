"""UNet3DModule: final activation, label-type resolution, training with every loss, metrics, optimizers, logging."""

import math
import types
from functools import partial

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from conftest import blob_volume, write_h5
from unet3d_lightning import HDF5DataModule, UNet3DModule
from unet3d_lightning.errors import ConfigurationError

TINY = dict(f_maps=4, num_levels=2, num_groups=2)


def attach_labels(module, kind):
    """Run module.setup as a Trainer would, with a datamodule reporting label type ``kind``."""
    module._trainer = types.SimpleNamespace(datamodule=types.SimpleNamespace(label_kind=kind))
    try:
        module.setup("fit")
    finally:
        module._trainer = None


@pytest.mark.parametrize(
    "loss, kind, activation",
    [("ce", None, "softmax"), ("wce", None, "softmax"), ("bce", None, "sigmoid"), ("bce_dice", None, "sigmoid"),
     ("dice", "class_ids", "softmax"), ("dice", "binary", "sigmoid")],
)
def test_final_activation_follows_loss_and_labels(loss, kind, activation):
    module = UNet3DModule(out_channels=3, loss=loss, **TINY)
    if kind:
        assert module.multiclass is None
        attach_labels(module, kind)
    logits = torch.randn(2, 3, 4, 5, 6)
    expected = logits.softmax(1) if activation == "softmax" else logits.sigmoid()
    torch.testing.assert_close(module.final_activation(logits), expected)
    assert module.hparams.multiclass == (activation == "softmax")


@pytest.mark.parametrize(
    "loss, kind, message",
    [("ce", "binary", "use loss bce, dice or bce_dice"), ("bce", "class_ids", "use loss ce, wce or dice")],
)
def test_loss_that_does_not_fit_the_labels_is_rejected_at_setup(loss, kind, message):
    module = UNet3DModule(out_channels=2, loss=loss, **TINY)
    with pytest.raises(ConfigurationError, match=message):
        attach_labels(module, kind)


def test_argument_errors_at_construction():
    with pytest.raises(ValueError, match="weight has 3 entries but out_channels=2"):
        UNet3DModule(out_channels=2, loss="ce", loss_weight=[1, 2, 3], **TINY)
    with pytest.raises(ValueError, match="takes no weight"):
        UNet3DModule(out_channels=2, loss="dice", loss_weight=[1, 2], **TINY)
    with pytest.raises(ConfigurationError, match="multiclass=False"):
        UNet3DModule(out_channels=2, loss="ce", multiclass=False, **TINY)


def _demo_batch(binary: bool, seed: int = 0):
    raw, label = blob_volume(shape=(12, 16, 16), seed=seed)
    x = torch.from_numpy(raw)[None, None].repeat(2, 1, 1, 1, 1)
    x[1] = x[1].flip(-1)
    y = torch.from_numpy(label).long()[None].repeat(2, 1, 1, 1)
    y[1] = y[1].flip(-1)
    if binary:
        y = torch.stack([y, 1 - y], dim=1).float()  # two masks: foreground and background
    return {"raw": x, "label": y}


@pytest.mark.parametrize(
    "loss, binary", [("ce", False), ("wce", False), ("dice", False), ("bce", True), ("dice", True), ("bce_dice", True)]
)
def test_each_loss_trains_the_demo_model(loss, binary):
    """The demo's architecture (f_maps 8, 3 levels) on a learnable toy patch: the loss must fall clearly."""
    torch.manual_seed(0)
    module = UNet3DModule(out_channels=2, loss=loss, f_maps=8, num_levels=3, num_groups=4)
    batch = _demo_batch(binary)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss_value, _ = module._loss(batch)
        loss_value.backward()
        optimizer.step()
        losses.append(loss_value.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_voxel_weights_reach_the_loss():
    module = UNet3DModule(out_channels=2, loss="ce", **TINY)
    batch = _demo_batch(binary=False)
    logits = module(batch["raw"])
    weight = torch.rand(batch["label"].shape)
    per_voxel = torch.nn.functional.cross_entropy(logits, batch["label"], reduction="none")
    expected = (weight * per_voxel).sum() / weight.sum()
    got = module.loss_fn(logits, batch["label"], weight)
    torch.testing.assert_close(got, expected)


def test_validation_metrics_match_hand_counts_and_ignore_index():
    module = UNet3DModule(out_channels=3, loss="ce", ignore_index=255, **TINY)
    target = torch.tensor([[0, 1, 2, 2, 1, 255, 255, 0]]).view(1, 2, 2, 2)
    predicted = torch.tensor([[0, 1, 1, 2, 0, 2, 0, 0]]).view(1, 2, 2, 2)
    probabilities = torch.nn.functional.one_hot(predicted, 3).permute(0, 4, 1, 2, 3).float()
    module.val_metrics.update(probabilities, target)
    values = module.val_metrics.compute()
    # Non-ignored voxels: target 0,1,2,2,1,0 vs predicted 0,1,1,2,0,0
    # class 0: tp 2, fp 1, fn 0 -> dice 4/5; class 1: tp 1, fp 1, fn 1 -> 2/4; class 2: tp 1, fp 0, fn 1 -> 2/3
    torch.testing.assert_close(values["val/dice"], torch.tensor([4 / 5, 2 / 4, 2 / 3]))
    # IoU: 2/3, 1/3, 1/2 -> mean
    torch.testing.assert_close(values["val/iou"], torch.tensor((2 / 3 + 1 / 3 + 1 / 2) / 3))
    # predictions at ignored voxels do not matter
    module.val_metrics.reset()
    changed = probabilities.clone()
    changed[0, :, 1, 0, 1] = torch.tensor([0.0, 1.0, 0.0])
    changed[0, :, 1, 1, 0] = torch.tensor([0.0, 0.0, 1.0])
    module.val_metrics.update(changed, target)
    torch.testing.assert_close(module.val_metrics.compute()["val/dice"], values["val/dice"])


# ----------------------------------------------------------------------------------------------- with a Trainer
class LearningRates(Callback):
    def __init__(self):
        self.rates, self.losses = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


@pytest.fixture
def datamodule_factory(tmp_path):
    paths = []
    for seed in range(2):
        raw, label = blob_volume(shape=(8, 16, 16), seed=seed)
        paths.append(str(write_h5(tmp_path / f"v{seed}.h5", raw=raw, label=label)))

    def make(**kwargs):
        settings = dict(train_paths=paths, val_paths=paths[:1], train_patch_shape=(8, 8, 8),
                        train_stride_shape=(8, 8, 8), val_patch_shape=(8, 16, 16), batch_size=2, num_workers=0)
        settings.update(kwargs)
        return HDF5DataModule(**settings)

    return make


def _trainer(tmp_path, callbacks, **kwargs):
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                    default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    settings.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **settings)


@pytest.mark.parametrize(
    "scheduler, interval, formula",
    [
        (partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5), "step",
         lambda base, t: base * 0.5 ** (t // 2)),
        (partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=6), "step",
         lambda base, t: base * (1 + math.cos(math.pi * t / 6)) / 2),
        (partial(torch.optim.lr_scheduler.PolynomialLR, total_iters=6, power=0.9), "step",
         lambda base, t: base * (1 - min(t, 6) / 6) ** 0.9),
        (partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.1), "epoch",
         lambda base, t: base * 0.1 ** (t // 4)),  # 4 training batches per epoch
    ],
)
def test_learning_rate_follows_the_schedule(tmp_path, datamodule_factory, scheduler, interval, formula):
    module = UNet3DModule(out_channels=2, learning_rate=0.01, lr_scheduler=scheduler,
                          lr_scheduler_interval=interval, **TINY)
    recorder = LearningRates()
    _trainer(tmp_path, [recorder], max_steps=8, limit_val_batches=0).fit(module, datamodule=datamodule_factory())
    expected = [formula(0.01, t) for t in range(8)]
    np.testing.assert_allclose(recorder.rates, expected, rtol=1e-6)


def test_reduce_on_plateau_reacts_to_a_plateau(tmp_path, datamodule_factory):
    # A learning rate of 1e-12 freezes the model, so val/loss stays flat: a plateau by construction.
    module = UNet3DModule(
        out_channels=2, learning_rate=1e-12,
        lr_scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.5, patience=1),
        **TINY,
    )
    recorder = LearningRates()
    _trainer(tmp_path, [recorder], max_epochs=5, limit_val_batches=1).fit(module, datamodule=datamodule_factory())
    per_epoch = recorder.rates[::4]
    # epoch 0 sets the best value, epochs 1-2 are bad ones; after the 2nd bad epoch (> patience 1) the LR halves
    assert per_epoch[:3] == [1e-12] * 3
    assert per_epoch[3] == pytest.approx(0.5e-12)


def test_optimizer_from_config_gets_learning_rate_and_rejects_a_second_one():
    module = UNet3DModule(learning_rate=0.05, weight_decay=0.001,
                          optimizer=partial(torch.optim.SGD, momentum=0.9, nesterov=True), **TINY)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["momentum"], group["nesterov"]) == (0.05, 0.001, 0.9, True)
    with pytest.raises(ConfigurationError, match="lr=0.1 but model.learning_rate is 0.05"):
        UNet3DModule(learning_rate=0.05, optimizer=partial(torch.optim.SGD, lr=0.1), **TINY)
    default = UNet3DModule(**TINY).configure_optimizers()
    assert isinstance(default, torch.optim.Adam)
    assert (default.param_groups[0]["lr"], default.param_groups[0]["weight_decay"]) == (2e-4, 1e-4)


def test_bf16_mixed_step_is_finite(tmp_path, datamodule_factory):
    recorder = LearningRates()
    module = UNet3DModule(out_channels=2, loss="dice", **TINY)
    _trainer(tmp_path, [recorder], max_steps=2, limit_val_batches=0, precision="bf16-mixed").fit(
        module, datamodule=datamodule_factory()
    )
    assert len(recorder.losses) == 2 and all(math.isfinite(v) for v in recorder.losses)


def test_gradient_accumulation_and_clipping_run(tmp_path, datamodule_factory):
    recorder = LearningRates()
    module = UNet3DModule(out_channels=2, **TINY)
    trainer = _trainer(tmp_path, [recorder], max_steps=2, limit_val_batches=0, accumulate_grad_batches=2,
                       gradient_clip_val=0.5)
    trainer.fit(module, datamodule=datamodule_factory())
    assert trainer.global_step == 2 and len(recorder.losses) == 4  # 2 optimizer steps of 2 batches each


def test_same_seed_gives_the_same_losses(tmp_path, datamodule_factory):
    curves = []
    for run in range(2):
        pl.seed_everything(123, workers=True)
        recorder = LearningRates()
        module = UNet3DModule(out_channels=2, learning_rate=1e-3, **TINY)
        _trainer(tmp_path / str(run), [recorder], max_epochs=2, limit_val_batches=0).fit(
            module, datamodule=datamodule_factory()
        )
        curves.append(recorder.losses)
    assert len(curves[0]) == 8
    assert curves[0] == curves[1]
    pl.seed_everything(124, workers=True)
    recorder = LearningRates()
    module = UNet3DModule(out_channels=2, learning_rate=1e-3, **TINY)
    _trainer(tmp_path / "other", [recorder], max_epochs=2, limit_val_batches=0).fit(
        module, datamodule=datamodule_factory()
    )
    assert recorder.losses != curves[0]


def test_tensorboard_events_hold_scalars_and_an_image(tmp_path, datamodule_factory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from unet3d_lightning.callbacks import ValidationImages
    from lightning.pytorch.callbacks import LearningRateMonitor

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    module = UNet3DModule(out_channels=2, **TINY)
    trainer = _trainer(tmp_path, [ValidationImages(every_n_validations=1), LearningRateMonitor("step")],
                       logger=logger, max_epochs=2, log_every_n_steps=1)
    trainer.fit(module, datamodule=datamodule_factory())
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/loss_epoch", "val/loss", "val/dice", "val/iou", "val/dice_class0",
                "val/dice_class1", "lr-Adam"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert "val/images" in tags["images"]
    images = events.Images("val/images")
    assert len(images) == 2  # one per validation run
    assert images[0].width == 3 * 16 and images[0].height == 16  # raw | label | prediction of an 8x16x16 patch
