"""The ``unet3d`` command: a LightningCLI with the project's defaults.

``unet3d fit|validate|test|predict --config CONFIG.yaml [--section.key value ...]``; ``--print_config`` prints a
complete configuration that ``--config`` accepts back. Mistakes the command can see (bad paths, unwritable output
directory, data that does not fit the model) end with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from .callbacks import FitSummary, ProgressBar, ValidationImages
from .data.datamodule import HDF5DataModule
from .data.volumes import resolve_paths
from .errors import ConfigurationError
from .module import UNet3DModule
from .prediction.writer import PredictionWriter, check_output_dir

# Model settings that change how fast the network runs, not what it computes: the checkpoint records them, but each
# run takes them from its own config and command line (a GPU-trained, compiled model predicts uncompiled on a CPU).
_MODEL_RUN_SETTINGS = ("channels_last", "compile")
# Data settings that change the numbers a model sees: prediction takes them from the checkpoint unless given.
_DATA_FROM_CHECKPOINT = {"normalization": "standardize", "percentiles": (1.0, 99.0)}


class SaveRunConfig(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` in the run's log directory, beside ``checkpoints/``.

    Written when fit starts — after every input check has passed, so a run stopped by a configuration error leaves
    no directory behind — and only for fit (``unet3d fit --config config.yaml`` repeats the run).
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        return

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.ckpt_path:
            self.overwrite = True  # a resumed run continues in its directory and records the resuming config
        super().setup(trainer, pl_module, "fit")


def run_dir_of_checkpoint(ckpt_path: str | Path) -> Path | None:
    """``<root>/<name>/version_N`` when ``ckpt_path`` is ``<root>/<name>/version_N/checkpoints/<file>``, else None."""
    path = Path(ckpt_path).resolve()
    run = path.parent.parent
    if path.parent.name == "checkpoints" and run.name.startswith("version_"):
        return run
    return None


class ArgumentParser(LightningArgumentParser):
    """Lightning's parser with a one-line usage on errors: the full usage of every key (hundreds of lines) would
    bury the ``error:`` line that says what is wrong; ``--help`` still lists everything."""

    def print_usage(self, file: Any = None) -> None:
        prog = self.prog.replace(" [options]", "")
        (file or sys.stderr).write(f"usage: {prog} [--config CONFIG.yaml] [--section.key VALUE ...]\n")


class UNet3DCLI(LightningCLI):
    """LightningCLI with checkpointing, early stopping, image logging and prediction writing set up."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.filename": "best",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.auto_insert_metric_name": False,
                # val/loss exists only after a validation run: checking at a train epoch's end (e.g. one cut short
                # by max_steps) would find nothing to compare.
                "checkpoint.save_on_train_epoch_end": False,
            }
        )
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults(
            {
                "early_stopping.monitor": "val/loss",
                "early_stopping.mode": "min",
                "early_stopping.patience": 20,
                "early_stopping.check_on_train_epoch_end": False,  # patience counts validation runs
            }
        )
        parser.add_lightning_class_args(ValidationImages, "image_logger")
        parser.add_lightning_class_args(PredictionWriter, "prediction")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads the checkpoint's hyperparameters before any hook of ours runs: a missing or unreadable
        file becomes the same one-line error as the other checkpoint mistakes."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and not Path(ckpt_path).is_file():
            raise ConfigurationError(f"ckpt_path {ckpt_path}: file does not exist")
        model_config = self.config[subcommand].get("model") if subcommand else None
        run_settings = {k: model_config.get(k) for k in _MODEL_RUN_SETTINGS} if model_config is not None else {}
        try:
            super()._parse_ckpt_path()
        except Exception as err:  # noqa: BLE001 - any failure means the file is not a usable checkpoint
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigurationError(f"ckpt_path {ckpt_path}: cannot be read as a checkpoint ({reason})") from None
        # The checkpoint records how it was trained, but how this run executes the network is this run's choice.
        for key, value in run_settings.items():
            self.config[subcommand].model[key] = value

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # Keeping every patch's probabilities for trainer.predict's return value would hold the whole output in RAM;
        # the PredictionWriter streams it to disk instead.
        self._subcommand_parsers["predict"].set_defaults(return_predictions=False)

    def before_instantiate_classes(self) -> None:
        """Fail fast, before any model, data or checkpoint is loaded, on mistakes visible in the config."""
        sub = self.subcommand
        if sub is None:  # run=False: classes only, nothing will be run
            return
        config = self.config[sub]
        ckpt_path = config.get("ckpt_path")
        if sub != "predict":
            return
        if not ckpt_path:
            raise ConfigurationError("predict needs --ckpt_path, the checkpoint of a trained model (e.g. best.ckpt)")
        volumes = resolve_paths(config.data.predict_paths, "predict")
        if not config.data.predict_paths:
            raise ConfigurationError("data.predict_paths is empty: give the volumes to predict")
        # Checked, not created: the writer creates it once every input check has passed, so a failed run leaves no
        # directory behind.
        check_output_dir(config.prediction.output_dir, volumes, create=False, other_inputs=[ckpt_path],
                         format=config.prediction.get("format", "hdf5"))
        self._data_settings_from_checkpoint(ckpt_path, config)

    def _data_settings_from_checkpoint(self, ckpt_path: str, config: Any) -> None:
        """Use the training run's normalisation for prediction unless the command line sets one."""
        try:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - any failure means the file is not a usable checkpoint
            raise ConfigurationError(f"ckpt_path {ckpt_path}: cannot be read as a checkpoint ({err})") from None
        trained = checkpoint.get("datamodule_hyper_parameters") or {}
        for key, default in _DATA_FROM_CHECKPOINT.items():
            value = config.data.get(key)
            if key in trained and _same(value, default) and not _same(trained[key], default):
                config.data[key] = trained[key]
                print(f"using data.{key}={trained[key]!r} from the checkpoint", file=sys.stderr)

    def _check_inputs(self, stage: str) -> None:
        """Check every input volume against the model, and the model's loss against the labels, before the Trainer
        starts: a mistake then ends the run before any log directory or checkpoint is written."""
        self.datamodule.check(stage, self.model)
        voxel_weights = stage != "predict" and self.datamodule.weight_internal_path is not None
        self.model.use_label_kind(self.datamodule.label_kind, voxel_weights=voxel_weights)

    def before_fit(self) -> None:
        self._check_inputs("fit")

    def before_validate(self) -> None:
        self._check_inputs("validate")

    def before_test(self) -> None:
        self._check_inputs("test")

    def before_predict(self) -> None:
        self._check_inputs("predict")

    def _run_evaluation(self, method: str, model: Any, ckpt_path: str | None = None, **kwargs: Any) -> Any:
        """validate / test / predict: load the checkpoint's weights into the model built from its hyperparameters.

        Passing ``ckpt_path`` on to the Trainer would also restore the training callbacks' state (checkpointing,
        early stopping), which these runs do not have; only the weights matter here.
        """
        if ckpt_path:
            # mmap: the tensors are paged in as load_state_dict copies them, not read into a second full copy.
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            model.load_state_dict(checkpoint["state_dict"])
            print(f"loaded weights from {ckpt_path}", file=sys.stderr)
        return getattr(self.trainer, method)(model, **kwargs)

    def validate(self, model: Any, **kwargs: Any) -> Any:
        return self._run_evaluation("validate", model, **kwargs)

    def test(self, model: Any, **kwargs: Any) -> Any:
        return self._run_evaluation("test", model, **kwargs)

    def predict(self, model: Any, **kwargs: Any) -> Any:
        return self._run_evaluation("predict", model, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_config.get("callbacks") or [])
        if trainer_config.get("enable_progress_bar") is not False:
            callbacks.append(ProgressBar())
        if self.subcommand == "fit":
            callbacks.append(FitSummary())
            if trainer_config.get("logger") is not False:
                callbacks.append(LearningRateMonitor(logging_interval="step"))
        if self.subcommand == "predict":
            kwargs.setdefault("logger", False)  # prediction logs nothing; a logger would only leave empty run dirs
        resumed = run_dir_of_checkpoint(self.config.fit.ckpt_path) if self.subcommand == "fit" and \
            self.config.fit.get("ckpt_path") else None
        if resumed is not None and trainer_config.get("logger") in (None, True):
            # Resume in the run's own directory: logs continue there, and ModelCheckpoint (same dirpath) restores
            # its best score, so best.ckpt stays the best of the whole run rather than of the resumed part.
            kwargs.setdefault(
                "logger", TensorBoardLogger(save_dir=str(resumed.parent.parent), name=resumed.parent.name,
                                            version=resumed.name)
            )
        if trainer_config.get("benchmark") is None and not trainer_config.get("deterministic"):
            # Patches have a fixed shape, so cuDNN's autotuner pays for itself after the first batch; it picks
            # kernels by timing, which deterministic runs must not do.
            kwargs.setdefault("benchmark", True)
        trainer = super().instantiate_trainer(callbacks=callbacks, **kwargs)
        if self.subcommand != "fit":
            # Checkpointing and early stopping belong to training; in predict they would only restore stale state.
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, (ModelCheckpoint, EarlyStopping))]
        return trainer


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return [float(x) for x in a] == [float(x) for x in b]
    return a == b


class _DropTips(logging.Filter):
    """Drops Lightning's advertisement lines ("💡 Tip: try installing …"), which it logs on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def silence_known_noise() -> None:
    """Filter, at their sources, the lines that a normal run prints but that tell the user nothing actionable.

    Only exact, known messages from named modules are dropped; every other warning still shows.
    """
    for name in ("lightning_utilities.core.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    # torch deprecates LeafSpec; Lightning's own pytree helper still uses it (nothing for users to change).
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # jsonargparse deprecates APIs that Lightning's CLI module calls (not ours, nothing for users to change).
    try:
        from jsonargparse._deprecated import JsonargparseDeprecationWarning
    except ImportError:  # a jsonargparse without these warnings
        pass
    else:
        warnings.filterwarnings("ignore", category=JsonargparseDeprecationWarning, module=r"lightning\.pytorch\.cli")


def main(args: list[str] | None = None) -> None:
    """Entry point of ``unet3d``; ``args`` replaces ``sys.argv[1:]`` (for tests and scripts)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "import-pytorch3dunet":
        # Not a Lightning run: a small parser of its own (see importers.py).
        from .importers import main as import_main

        return import_main(argv[1:])
    silence_known_noise()
    if "PL_GLOBAL_SEED" not in os.environ:
        # `seed_everything: true` (the default) promises a fresh seed, but Lightning falls back to 0 when this variable
        # is unset. Draw one here: Lightning prints it ("Seed set to N"), records it in the run's config.yaml, and DDP
        # processes inherit the variable, so all ranks share it.
        os.environ["PL_GLOBAL_SEED"] = str(random.SystemRandom().randrange(2**31))
    try:
        UNet3DCLI(
            UNet3DModule,
            HDF5DataModule,
            args=args,
            save_config_callback=SaveRunConfig,
            parser_class=ArgumentParser,
            parser_kwargs={"description": "Train and apply a 3D U-Net (Çiçek et al. 2016) with the losses of Sudre et "
                           "al. 2017 on HDF5, Zarr or TIFF volumes. Run 'unet3d SUBCOMMAND --help' for a subcommand's "
                           "options. 'unet3d import-pytorch3dunet --model_path FILE --config train_config.yml --output "
                           "model.ckpt' converts a model trained with pytorch-3dunet."},
            auto_configure_optimizers=False,
            trainer_defaults={
                "max_epochs": 500,
                "max_steps": 100_000,
                "default_root_dir": "runs",
                # The datamodule shards patches itself: Lightning's DistributedSampler would pad validation and
                # prediction with duplicates (biased metrics, patches stitched twice).
                "use_distributed_sampler": False,
            },
        )
    except ConfigurationError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
