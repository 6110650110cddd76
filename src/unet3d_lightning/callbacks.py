"""Training callbacks of the ``unet3d`` command: validation images in TensorBoard, the end-of-fit summary and the
continuation of a resumed run's checkpoint files."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor


def _to_unit(image: Tensor) -> Tensor:
    """Scale a 2D float image to [0, 1] for display (constant images become 0)."""
    image = image.float()
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else torch.zeros_like(image)


def middle_slice_panel(
    raw: Tensor, label: Tensor, probabilities: Tensor, multiclass: bool, regression: bool = False
) -> Tensor:
    """One grey-scale panel ``(1, rows * H, 3 * W)``: raw | label | prediction at the middle z-slice of one patch.

    ``raw`` ``(C, D, H, W)``; ``label`` ``(D, H, W)`` class ids or ``(C, D, H, W)`` masks; ``probabilities``
    ``(C, D, H, W)``. Class ids are shown as id / (classes - 1); for masks one row per channel. With ``regression``
    (default False) ``label`` is the float target ``(C, D, H, W)`` and ``probabilities`` the raw outputs: one row
    per channel, target and output mapped to [0, 1] by the target slice's range (so both share one grey scale).
    """
    z = raw.shape[1] // 2
    raw_slice = _to_unit(raw[0, z])
    classes = probabilities.shape[0]
    if regression:
        label_rows, prediction_rows = [], []
        for c in range(classes):
            target = label[c, z].float()
            low, high = target.min(), target.max()
            span = high - low if high > low else torch.ones_like(high)
            label_rows.append(((target - low) / span).clamp(0, 1))
            prediction_rows.append(((probabilities[c, z].float() - low) / span).clamp(0, 1))
    elif multiclass:
        scale = max(classes - 1, 1)
        label_rows = [label[z].float().clamp(0, scale) / scale]
        prediction_rows = [probabilities[:, z].argmax(0).float() / scale]
    else:
        label_rows = [label[c, z].float().clamp(0, 1) for c in range(classes)]
        prediction_rows = [probabilities[c, z].float() for c in range(classes)]
    rows = [torch.cat([raw_slice, lab, pred], dim=1) for lab, pred in zip(label_rows, prediction_rows)]
    return torch.cat(rows, dim=0)[None].cpu()


class ValidationImages(Callback):
    """Every ``every_n_validations`` validation runs, log the middle z-slice of raw, label and prediction of the
    first validation patch to TensorBoard (tag ``val/images``).

    Args:
        every_n_validations: how often; 0 turns images off. Default 1 (every validation).
    """

    def __init__(self, every_n_validations: int = 1) -> None:
        if every_n_validations < 0:
            raise ValueError(f"every_n_validations must be >= 0, got {every_n_validations}")
        self.every_n_validations = every_n_validations
        self._validations = 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validations += 1

    @rank_zero_only
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if (
            self.every_n_validations == 0
            or trainer.sanity_checking
            or batch_idx != 0
            or (self._validations - 1) % self.every_n_validations != 0
            or not isinstance(outputs, dict)
            or outputs.get("probabilities") is None
        ):
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        batch = outputs.get("batch", batch)  # the batch the probabilities belong to (DDP padding removed)
        panel = middle_slice_panel(
            batch["raw"][0], batch["label"][0], outputs["probabilities"][0],
            bool(getattr(pl_module, "multiclass", True)), regression=getattr(pl_module, "task", "segmentation") == "regression",
        )
        for logger in loggers:
            logger.experiment.add_image("val/images", panel, global_step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = state_dict.get("validations", 0)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with ``last.ckpt`` always the run's latest state.

    Lightning (2.6) writes ``last.ckpt`` only when it saves a top-k checkpoint at the same step: with one best
    checkpoint kept, ``last.ckpt`` stays at the best epoch, and a run resumed from it would repeat every epoch since.
    Here it is written at every checkpointing point (each validation, or each training epoch's end when the run does
    not validate) and when training ends. ``fast_dev_run`` writes no checkpoint at all, as Lightning means it to
    (its end-of-training save would otherwise leave a ``last.ckpt``, then ``last-v1.ckpt``... one more each run).
    The state is stored under ModelCheckpoint's key, so a checkpoint of either class resumes with the other.

    A checkpoint written at a training epoch's end (the run does not validate) records that epoch as finished, so
    that the resumed run starts the next one (see :func:`record_epoch_finished`).
    """

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._keep_last_current(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._keep_last_current(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        super().on_train_end(trainer, pl_module)
        # Training that ends between checkpointing points (max_steps or max_time in the middle of an epoch) keeps
        # its last steps too.
        self._keep_last_current(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        record_epoch_finished(checkpoint)

    def _keep_last_current(self, trainer: pl.Trainer) -> None:
        # save_last="link" links last.ckpt to the newest top-k file by design: left as Lightning does it.
        if self.save_last is True and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def record_epoch_finished(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint written during a training epoch's end hooks resume with the next epoch.

    There Lightning has counted the epoch as processed but not yet as completed. A run with ``max_steps`` (always
    the case with ``unet3d``) resumes such a state as "restarted at the epoch's end" and, as no validation ran,
    trains one more batch in the finished epoch before it moves on: the resumed run is off by a batch and an epoch
    from the run it continues. Recorded as completed, with no batch of the next epoch done yet, it resumes as a run
    that was never stopped continues.
    """
    loop = (checkpoint.get("loops") or {}).get("fit_loop")
    if not isinstance(loop, dict):
        return
    epochs = loop.get("epoch_progress") or {}
    total, current = epochs.get("total") or {}, epochs.get("current") or {}
    if not total or total.get("processed") != total.get("completed", 0) + 1:
        return
    for counts in (total, current):
        if "processed" in counts:
            counts["completed"] = counts["processed"]
    batches = loop.get("epoch_loop.batch_progress") or {}
    if isinstance(batches.get("current"), dict):
        batches["current"] = {k: 0 for k in batches["current"]}
        batches["is_last_batch"] = False


class FitSummary(Callback):
    """At the end of ``fit``, print where the best and last checkpoints and the logs went, with the wall time."""

    def __init__(self) -> None:
        self._start = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lines = [f"fit finished: {trainer.global_step} steps, {trainer.current_epoch} epochs, "
                 f"{_duration(time.perf_counter() - self._start)}"]
        checkpoint = trainer.checkpoint_callback
        if trainer.fast_dev_run:
            lines.append("  checkpoints:     none (fast_dev_run saves none)")
        elif isinstance(checkpoint, ModelCheckpoint):
            if checkpoint.best_model_path:
                score = checkpoint.best_model_score
                value = f" ({checkpoint.monitor} = {score.item():.4f})" if score is not None else ""
                lines.append(f"  best checkpoint: {checkpoint.best_model_path}{value}")
            elif checkpoint.monitor is not None and checkpoint.save_top_k != 0:
                lines.append(f"  best checkpoint: none ({checkpoint.monitor} was never logged)")
            if checkpoint.last_model_path:
                lines.append(f"  last checkpoint: {checkpoint.last_model_path}")
        # logger.log_dir, not trainer.log_dir: the latter is a collective (broadcast) and this runs on rank 0 only.
        log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
        if log_dir:
            lines.append(f"  logs:            {log_dir}  (tensorboard --logdir {log_dir})")
        print("\n".join(lines), flush=True)


class SameRunResume(Callback):
    """Let ``fit --ckpt_path`` continue the checkpoint files of the run it resumes, or leave another run's alone.

    Lightning's ModelCheckpoint restores its best score and file names only when the directory recorded in the
    checkpoint is spelled exactly as its own. A run started with a relative ``trainer.default_root_dir`` (as
    ``configs/demo.yaml`` has), or resumed from another working directory, spells it differently: best-score
    tracking would restart and ``best-v1.ckpt`` / ``last-v1.ckpt`` appear beside the old files while ``last.ckpt``
    stays behind. So, before the state is loaded, the recorded paths are rewritten to the directory in use.

    Args:
        same_run: True when training continues in the checkpoint's own run directory (paths are rewritten); False
            for a new run (fine-tuning from another run): the other run's checkpoint-file state, which names files
            there, is dropped and the new run tracks its own best.
    """

    def __init__(self, same_run: bool) -> None:
        self.same_run = same_run

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        current = trainer.checkpoint_callback
        states = checkpoint.get("callbacks") or {}
        if not isinstance(current, ModelCheckpoint) or current.dirpath is None:
            return
        for key in [k for k in states if str(k).startswith("ModelCheckpoint")]:
            state = states[key]
            recorded = state.get("dirpath")
            if recorded is None or recorded == current.dirpath:
                continue
            if not self.same_run:
                del states[key]
                continue
            new = str(current.dirpath)

            def move(path: Any, recorded: str = recorded, new: str = new) -> Any:
                if not path:
                    return path
                try:
                    return os.path.join(new, str(Path(path).relative_to(recorded)))
                except ValueError:
                    return path  # a file outside the run's checkpoint directory: leave it

            state["dirpath"] = new
            for name in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if name in state:
                    state[name] = move(state[name])
            if "best_k_models" in state:
                state["best_k_models"] = {move(k): v for k, v in state["best_k_models"].items()}


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar for fit, validate and test; prediction shows one bar per volume instead (drawn by
    :class:`~unet3d_lightning.prediction.callback.PredictionWriter`), so the overall predict bar is hidden."""

    def init_predict_tqdm(self) -> Any:
        return Tqdm(desc=self.predict_description, disable=True)
