"""Checks the ``unet3d`` command makes before a run starts, so that a mistake ends it before anything is written: the
root directory, the accelerator, a second run without a logger, enough training patches for every DDP device, the
monitored metrics; whether fit validates; and where a SLURM job that Lightning requeued continues.

Each check raises a :class:`~unet3d_lightning.errors.ConfigurationError` naming the setting and the fix, and creates
nothing.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import torch

from .checkpoints import global_step, run_dir_recorded_in
from .errors import ConfigurationError, nearest_existing


def check_root_dir(root_dir: str | Path) -> None:
    """Fail if ``trainer.default_root_dir`` cannot be created or written, without creating anything: a run stopped
    by a configuration error leaves no directory behind."""
    existing = nearest_existing(Path(root_dir).expanduser().absolute())
    if not existing.is_dir():
        raise ConfigurationError(
            f"trainer.default_root_dir {root_dir}: {existing} is a file, not a directory; choose another directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigurationError(f"trainer.default_root_dir {root_dir}: {existing} is not writable")


def check_accelerator(accelerator: Any) -> None:
    """A GPU accelerator on a machine without one is a configuration mistake; say so before Lightning's traceback."""
    name = str(accelerator).lower() if isinstance(accelerator, str) else None
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigurationError(
            f"trainer.accelerator {accelerator}: no CUDA GPU is visible (torch {torch.__version__}, {build}); use "
            "--trainer.accelerator cpu, or auto to take a GPU when there is one"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigurationError(f"trainer.accelerator {accelerator}: MPS is not available here; use cpu or auto")


def check_no_run_without_logger(root_dir: str | Path) -> None:
    """Without a logger a run writes ``config.yaml`` and ``checkpoints/`` straight into the root dir, so a second new
    run there would clash with (or silently sit beside) the first one's files: refuse it before anything starts."""
    config = Path(root_dir) / "config.yaml"
    if config.exists():
        raise ConfigurationError(
            f"trainer.default_root_dir {root_dir} already holds a run without a logger ({config}); give a new "
            f"default_root_dir, or resume that run with --ckpt_path {Path(root_dir) / 'checkpoints' / 'last.ckpt'}"
        )


def check_patches_per_device(datamodule: Any, world_size: int) -> None:
    """Every device needs a training patch. Checked before the Trainer starts the other processes and creates the
    run directory: inside the run each process would report it, and the directory would stay.

    Args:
        datamodule: the run's :class:`~unet3d_lightning.data.datamodule.HDF5DataModule`, its volumes discovered.
        world_size: the number of processes the run trains on.
    """
    if world_size <= 1:
        return
    patch, stride = datamodule._shapes("train")
    # Before filtering by foreground (data.min_foreground_fraction), which the run checks again once it has
    # filtered: this count is the most there can be.
    count = sum(len(datamodule._grid(v, v.spatial_shape, patch, stride, "train"))
                for v in datamodule.volumes["train"])
    if getattr(datamodule, "sampling", "grid") == "random" and datamodule.patches_per_epoch is not None:
        count = datamodule.patches_per_epoch  # random positions: the epoch has as many as it is told
    if count < world_size:
        raise ConfigurationError(
            f"only {count} training patches for {world_size} devices; use smaller strides or fewer devices"
        )


NO_VAL_PATHS = "data.val_paths is empty"


def why_no_validation(config: Any) -> str | None:
    """Why ``fit`` with ``config`` (its section of the parsed settings) runs no validation, or None when it
    validates."""
    if not config.data.get("val_paths"):
        return NO_VAL_PATHS
    limit = config.trainer.get("limit_val_batches")
    if limit is not None and not isinstance(limit, bool) and float(limit) == 0:
        return "trainer.limit_val_batches is 0"
    return None


def check_monitors(trainer: Any, model: Any, no_validation: str | None, undirected: list[str]) -> None:
    """Every monitored metric (checkpointing, early stopping, a plateau scheduler) must be one the model logs: a
    typo otherwise fails only after the first epoch.

    Args:
        trainer: the run's Trainer, its callbacks set up.
        model: the run's :class:`~unet3d_lightning.module.UNet3DModule`.
        no_validation: why the run does not validate (validation metrics are then not logged), None if it does.
        undirected: the ``<section>.monitor`` keys whose mode could not be told from the metric's name; one that
            names a logged metric is an error asking for the mode.
    """
    logged = model.logged_metric_names(validation=no_validation is None)
    monitors = [(f"{name}.monitor", getattr(c, "monitor", None)) for name, c in (
        ("checkpoint", trainer.checkpoint_callback), ("early_stopping", trainer.early_stopping_callback))
    ]
    if model.lr_scheduler_factory is not None:
        monitors.append(("model.lr_scheduler_monitor", model.hparams.lr_scheduler_monitor))
    for key, monitor in monitors:
        if monitor is None:
            continue
        if monitor in logged:
            if key in undirected:
                section = key.split(".")[0]
                raise ConfigurationError(
                    f"{key} {monitor!r}: cannot tell from the name whether higher or lower is better; set "
                    f"--{section}.mode max or min"
                )
            continue
        if no_validation is not None and monitor in model.logged_metric_names(validation=True):
            raise ConfigurationError(
                f"{key} {monitor!r} is not a metric this model logs without validation ({no_validation}); choose "
                f"one of {', '.join(logged)}, or give validation volumes"
            )
        close = difflib.get_close_matches(monitor, logged, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigurationError(
            f"{key} {monitor!r} is not a metric this model logs; {hint}choose one of {', '.join(logged)}"
        )


def requeued_slurm_checkpoint(root_dir: str | Path) -> Path | None:
    """The checkpoint a SLURM job requeued by Lightning (``SLURMEnvironment`` with ``auto_requeue``, on its requeue
    signal) continues from when it runs the same command again: the newest ``hpc_ckpt_N.ckpt`` Lightning saved in
    ``root_dir``, or the ``last.ckpt`` of the run it came from if that one is later. None outside SLURM, or when
    Lightning saved none."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return None
    saved = [(int(m.group(1)), p) for p in Path(root_dir).glob("hpc_ckpt_*.ckpt")
             if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    if not saved:
        return None
    latest = max(saved)[1]
    # Our SIGTERM handling may have written the run's last.ckpt after Lightning's requeue save: take the later one.
    run = run_dir_recorded_in(latest)
    last = run / "checkpoints" / "last.ckpt" if run is not None else None
    if last is not None and last.is_file() and global_step(last) > global_step(latest):
        return last
    return latest
