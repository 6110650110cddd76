"""The ``unet3d`` command: a LightningCLI with the project's defaults.

``unet3d fit|validate|test|predict --config CONFIG.yaml [--section.key value ...]``; ``--print_config`` prints a
complete configuration that ``--config`` accepts back (for a run from a checkpoint, with the checkpoint's model
settings and normalisation, as the run uses them). Mistakes the command can see (bad paths, unwritable output
directory, data that does not fit the model) end with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import typing
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from . import checkpoints
from .callbacks import FitSummary, ProgressBar, RunCheckpoint, SameRunResume, ValidationImages
from .checkpoints import (
    RUN_SETTINGS,
    SharedCheckpointIO,
    check_model_setting,
    check_trained_data_setting,
    foreign_settings,
    global_step,
    load_checkpoint_weights,
    read_checkpoint,
    run_dir_of_checkpoint,
    run_dir_recorded_in,
)
from .config_files import PATH_SETTINGS, check_config_files, expand_path_setting, use_unique_key_yaml
from .data.datamodule import HDF5DataModule, Normalization
from .data.volumes import resolve_paths
from .errors import ConfigurationError, one_line
from .module import UNet3DModule, metric_mode
from .preflight import (
    NO_VAL_PATHS,
    check_accelerator,
    check_monitors,
    check_no_run_without_logger,
    check_patches_per_device,
    check_root_dir,
    requeued_slurm_checkpoint,
    why_no_validation,
)
from .prediction.callback import PredictionWriter
from .prediction.paths import check_output_dir
from .signals import GracefulShutdown, Interrupted, exit_status, tell

try:
    from jsonargparse._actions import _ActionPrintConfig
except ImportError:  # pragma: no cover - another jsonargparse: --print_config prints the config as parsed
    _ActionPrintConfig = None

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


def _print_config_deferred() -> Any:
    """A context in which ``--print_config`` is recorded by the parser but not acted on: jsonargparse would print
    the config as parsed, and exit, before the command completes it."""
    return _ActionPrintConfig.skip_print_config() if _ActionPrintConfig is not None else contextlib.nullcontext()


class ArgumentParser(LightningArgumentParser):
    """Lightning's parser with a one-line usage on errors: the full usage of every key (hundreds of lines) would
    bury the ``error:`` line that says what is wrong; ``--help`` still lists everything. The error itself is put
    on one line, control characters escaped."""

    def print_usage(self, file: Any = None) -> None:
        prog = self.prog.replace(" [options]", "")
        (file or sys.stderr).write(f"usage: {prog} [--config CONFIG.yaml] [--section.key VALUE ...]\n")

    def error(self, message: str, ex: Exception | None = None) -> Any:
        return super().error(one_line(message), ex)


class UNet3DCLI(LightningCLI):
    """LightningCLI with checkpointing, early stopping, image logging, prediction writing and signal handling set up.

    Args:
        shutdown: the :class:`~unet3d_lightning.signals.GracefulShutdown` whose handlers are installed (``main``
            installs one); default: a new one, without handlers.
        *args, **kwargs: LightningCLI's.
    """

    def __init__(self, *args: Any, shutdown: GracefulShutdown | None = None, **kwargs: Any) -> None:
        self.shutdown = shutdown if shutdown is not None else GracefulShutdown()
        self.given: Any = None
        self._undirected: list[str] = []  # monitors whose mode could not be read from the name
        self._no_validation: str | None = None  # why fit does not validate (None: it does)
        self._early_stopping_off = False
        self._weights_loaded: str | None = None  # the checkpoint whose weights the model holds
        requested = kwargs.get("args")
        requested = sys.argv[1:] if requested is None else requested
        everything = LightningCLI.subcommands()
        if kwargs.get("run", True) and isinstance(requested, list) and requested and requested[0] in everything:
            # `unet3d predict ...` needs the predict parser only: building all four (fit, validate, test, predict)
            # costs about half a second of every run. `unet3d --help` and mistyped subcommands still see all four.
            only = {requested[0]: everything[requested[0]]}
            self.subcommands = lambda: only  # type: ignore[method-assign]
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": None,  # from the monitored metric's name unless given: see metric_mode
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
                "early_stopping.mode": None,
                "early_stopping.patience": 20,
                "early_stopping.check_on_train_epoch_end": False,  # patience counts validation runs
            }
        )
        parser.add_lightning_class_args(ValidationImages, "image_logger")
        parser.add_lightning_class_args(PredictionWriter, "prediction")
        parser.add_argument(
            "--whole_volume", type=bool, default=False,
            help="validate/test: also predict every volume whole (stitched) and log the metrics of unet3d evaluate "
            "as val/whole/<metric> (test/whole/...): dice, iou, hd95, assd, surface_dice (see whole_volume.py)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # --print_config waits until the settings are complete: a run from a checkpoint takes its model and
        # normalisation from there, and the printed config is to be what the run uses.
        with _print_config_deferred():
            super().parse_arguments(parser, args)
            # The same arguments without defaults: the keys the user set (on the command line or in a config file),
            # whatever their value. Settings the checkpoint would otherwise supply are kept or compared by it.
            if not isinstance(args, (dict, type(self.config))):
                try:
                    self.given = parser.parse_args(args, defaults=False, _skip_validation=True)
                except (SystemExit, Exception):  # noqa: BLE001 - the full parse succeeded; without this, no comparison
                    self.given = None
        self._expand_path_settings()
        if _ActionPrintConfig is not None and _ActionPrintConfig.is_print_config_requested(parser):
            self._print_config(parser)

    def _print_config(self, parser: LightningArgumentParser) -> None:
        """Print the config (then exit), with what a checkpoint supplies: its model settings and, for validate,
        test and predict, its normalisation. Fed back with ``--config``, it runs as the command that printed it."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path:
            with _print_config_deferred():  # parsing the checkpoint's settings would print too
                self._parse_ckpt_path()
                if sub != "fit":
                    self._data_settings_from_checkpoint(ckpt_path, self.config[sub])
        _ActionPrintConfig.print_config_if_requested(parser, self.config)

    def _expand_path_settings(self) -> None:
        """Expand ``$VAR``, ``${VAR}`` and ``~`` in every path setting, once, before anything reads them.

        Lightning expands variables in a logger's ``log_dir`` but not where ModelCheckpoint puts its files, so
        logs and checkpoints of ``default_root_dir: ${RUNS}/x`` would part ways; expanded here, every part of the
        run sees one path. An unset variable is an error naming the key.
        """
        sub = self.config.get("subcommand")
        if sub is None:
            return
        config = self.config[sub]
        for key in PATH_SETTINGS:
            value = config.get(key)
            if value is not None:
                config[key] = expand_path_setting(value, key)
        loggers = config.get("trainer.logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and isinstance(init_args.get("save_dir"), str):
                init_args["save_dir"] = expand_path_setting(init_args["save_dir"], "trainer.logger.init_args.save_dir")

    def _given(self, key: str) -> Any:
        """The value the user set for ``<subcommand>.<key>``, or ``...`` when it was not set."""
        sub = self.config.get("subcommand")
        if self.given is None or sub is None:
            return ...
        try:
            return self.given[f"{sub}.{key}"] if f"{sub}.{key}" in self.given else ...
        except (KeyError, TypeError):
            return ...

    def _parse_ckpt_path(self) -> None:
        """Rebuild the model from the checkpoint's hyperparameters (LightningCLI's behaviour), after checking that
        the file is a unet3d checkpoint and that no explicitly given ``model.*`` setting contradicts it."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path:
            return
        hparams = dict(read_checkpoint(ckpt_path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        model_class = self.model_class if isinstance(self.model_class, type) else UNet3DModule
        foreign = foreign_settings(hparams, model_class)
        if foreign is not None:
            raise ConfigurationError(f"ckpt_path {ckpt_path}: {foreign}; give a .ckpt written by unet3d fit")
        self._check_model_flags(ckpt_path, hparams, sub)
        if not hparams:
            return
        model_config = self.config[sub].get("model")
        run_settings = {k: model_config.get(k) for k in RUN_SETTINGS} if model_config is not None else {}
        exit_on_error, self.parser.exit_on_error = self.parser.exit_on_error, False
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except ArgumentError as err:
            raise ConfigurationError(
                f"ckpt_path {ckpt_path}: its hyper_parameters do not make a model ({err}); the file was edited or is "
                "damaged: give a .ckpt as unet3d fit wrote it"
            ) from None
        finally:
            self.parser.exit_on_error = exit_on_error
        # The checkpoint records how it was trained, but how this run executes the network is this run's choice.
        for key, value in run_settings.items():
            self.config[sub].model[key] = value

    def _check_model_flags(self, ckpt_path: str, hparams: dict[str, Any], sub: str) -> None:
        """Every ``model.*`` setting the user gave must agree with the checkpoint's."""
        given = self._given("model")
        if given is ... or not hasattr(given, "keys"):
            return
        for key in given.keys():
            top = key.split(".")[0]
            check_model_setting(ckpt_path, top, self.config[sub].model.get(top), hparams, fit=sub == "fit")

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # Keeping every patch's probabilities for trainer.predict's return value would hold the whole output in RAM;
        # the PredictionWriter streams it to disk instead.
        if "predict" in self._subcommand_parsers:
            self._subcommand_parsers["predict"].set_defaults(return_predictions=False)
        if len(self._subcommand_parsers) > 1:
            # All subcommands are listed (--help, or a mistyped one): include the one main() runs itself.
            subcommands = getattr(parser, "_subcommands_action", None)
            if subcommands is not None:
                description = "Convert a model trained with pytorch-3dunet into a unet3d checkpoint."
                subcommands.add_subcommand(
                    "import-pytorch3dunet", ArgumentParser(description=description), help=description
                )
                description = "Read the training volumes and write a fit config fitted to them and the device."
                subcommands.add_subcommand("plan", ArgumentParser(description=description), help=description)
                description = "Whole-volume metrics of predictions against labels (unet3d evaluate --help)."
                subcommands.add_subcommand("evaluate", ArgumentParser(description=description), help=description)
                description = "Export a trained model as TorchScript, ONNX or a bioimage.io package."
                subcommands.add_subcommand("export", ArgumentParser(description=description), help=description)

    def before_instantiate_classes(self) -> None:
        """Fail fast, before any model, data or checkpoint is loaded, on mistakes visible in the config."""
        sub = self.subcommand
        if sub is None:  # run=False: classes only, nothing will be run; the callbacks still need their modes
            self._resolve_modes(self.config)
            return
        config = self.config[sub]
        ckpt_path = config.get("ckpt_path")
        check_accelerator(config.trainer.get("accelerator"))
        if config.get("whole_volume") and sub not in ("validate", "test"):
            raise ConfigurationError(f"whole_volume is a setting of validate and test, not of {sub}; drop it here")
        if sub == "fit":
            self._adapt_to_no_validation(config)
        self._resolve_modes(config)
        if sub == "fit" and ckpt_path:
            from .bioimage import is_package

            if is_package(ckpt_path):
                raise ConfigurationError(
                    f"ckpt_path {ckpt_path}: a bioimage.io package holds weights, not a run to resume; predict with it "
                    "(unet3d predict --ckpt_path), or start a new fit without --ckpt_path"
                )
        if sub == "fit":
            check_root_dir(config.trainer.get("default_root_dir") or ".")
            if not ckpt_path and config.trainer.get("logger") is False:
                check_no_run_without_logger(config.trainer.get("default_root_dir") or ".")
            if not ckpt_path:
                self._resume_requeued_slurm_job(config)
        if sub in ("validate", "test") and not ckpt_path:
            raise ConfigurationError(
                f"{sub} needs --ckpt_path, the checkpoint to evaluate (e.g. best.ckpt); without it the metrics "
                "would be those of untrained, random weights"
            )
        if sub != "predict":
            if ckpt_path and sub != "fit":
                self._data_settings_from_checkpoint(ckpt_path, config)
            return
        if not ckpt_path:
            raise ConfigurationError("predict needs --ckpt_path, the checkpoint of a trained model (e.g. best.ckpt)")
        volumes = resolve_paths(config.data.predict_paths, "predict")
        if not config.data.predict_paths:
            raise ConfigurationError("data.predict_paths is empty: give the volumes to predict")
        # Checked, not created: the writer creates it once every input check has passed, so a failed run leaves no
        # directory behind.
        check_output_dir(config.prediction.output_dir, volumes, create=False, other_inputs=[ckpt_path],
                         format=config.prediction.get("format", "hdf5"),
                         preview=bool(config.prediction.get("preview", False)))
        self._data_settings_from_checkpoint(ckpt_path, config)

    def _adapt_to_no_validation(self, config: Any) -> None:
        """Fit without validation (no ``data.val_paths``, or ``trainer.limit_val_batches 0``): the defaults built
        on validation metrics follow. ``best.ckpt`` is chosen by ``train/loss_epoch``, at each training epoch's end
        (``last.ckpt`` too), and early stopping is off; monitors the user set are kept, and checked as always."""
        self._no_validation = why_no_validation(config)
        if self._no_validation is None:
            return
        changed = []
        if self._given("checkpoint.monitor") is ...:
            config.checkpoint.monitor = "train/loss_epoch"
            if self._given("checkpoint.mode") is ...:
                config.checkpoint.mode = None  # from the new monitor's name
            changed.append("best.ckpt is chosen by train/loss_epoch")
        if self._given("checkpoint.save_on_train_epoch_end") is ...:
            config.checkpoint.save_on_train_epoch_end = True
        if self._given("early_stopping.monitor") is ...:
            self._early_stopping_off = True
            changed.append("early stopping is off")
        elif self._given("early_stopping.check_on_train_epoch_end") is ...:
            config.early_stopping.check_on_train_epoch_end = True
        if config.model.get("lr_scheduler") is not None and self._given("model.lr_scheduler_monitor") is ...:
            config.model.lr_scheduler_monitor = "train/loss_epoch"
            changed.append("model.lr_scheduler_monitor is train/loss_epoch")
        if changed:
            _note(f"note: no validation ({self._no_validation}): {', '.join(changed)}")

    def _resume_requeued_slurm_job(self, config: Any) -> None:
        """A SLURM job requeued by Lightning runs the same command again: continue from the checkpoint Lightning
        saved, in the run directory it came from (Lightning alone would resume the weights but start a new
        ``version_N``); see :func:`~unet3d_lightning.preflight.requeued_slurm_checkpoint`."""
        latest = requeued_slurm_checkpoint(config.trainer.get("default_root_dir") or ".")
        if latest is not None:
            config["ckpt_path"] = str(latest)
            print(f"SLURM job {os.environ.get('SLURM_JOB_ID', '')} requeued: resuming from {config['ckpt_path']}",
                  file=sys.stderr)

    def _resolve_modes(self, config: Any) -> None:
        """``mode`` of checkpointing and early stopping, when not given, follows the monitored metric's name."""
        for section in ("checkpoint", "early_stopping"):
            monitor = config[section].get("monitor")
            if monitor is None or config[section].get("mode") is not None:
                continue
            mode = metric_mode(monitor)
            if mode is None:
                # Reported by check_monitors before fit starts, after the name itself is checked (a typo is
                # the likelier mistake); validate/test/predict do not use these callbacks.
                self._undirected.append(f"{section}.monitor")
                mode = "min"
            config[section]["mode"] = mode
        scheduler = config.model.get("lr_scheduler")
        init_args = getattr(scheduler, "init_args", None) if scheduler is not None else None
        if (
            init_args is not None
            and str(getattr(scheduler, "class_path", "")).endswith("ReduceLROnPlateau")
            and self._given("model.lr_scheduler.init_args.mode") is ...
            and "mode" in init_args
        ):
            mode = metric_mode(config.model.get("lr_scheduler_monitor") or "val/loss")
            if mode is not None:
                init_args["mode"] = mode

    def _data_settings_from_checkpoint(self, ckpt_path: str, config: Any) -> None:
        """Use the training run's normalisation for validate/test/predict unless the user sets one."""
        trained = read_checkpoint(ckpt_path).get("datamodule_hyper_parameters") or {}
        for key in _DATA_FROM_CHECKPOINT:
            if key not in trained or self._given(f"data.{key}") is not ...:
                continue
            check_trained_data_setting(ckpt_path, key, trained[key], typing.get_args(Normalization))
            if not _same(config.data.get(key), trained[key]):
                config.data[key] = trained[key]
                print(f"using data.{key}={trained[key]!r} from the checkpoint", file=sys.stderr)

    def _check_inputs(self, stage: str) -> None:
        """Check every input volume against the model, and the model's loss against the labels, before the Trainer
        starts: a mistake then ends the run before any log directory or checkpoint is written."""
        self.datamodule.check(stage, self.model)
        voxel_weights = stage != "predict" and self.datamodule.weight_internal_path is not None
        self.model.use_label_kind(self.datamodule.label_kind, voxel_weights=voxel_weights)

    def _check_weights(self) -> None:
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path:
            # For fit, the Trainer loads them again, with the rest of the training state.
            load_checkpoint_weights(ckpt_path, self.model)
            self._weights_loaded = ckpt_path

    def before_fit(self) -> None:
        self._check_weights()
        self._check_inputs("fit")
        without = self._no_validation or (
            "trainer.limit_val_batches is 0" if self.trainer.limit_val_batches == 0 else None)
        check_monitors(self.trainer, self.model, without, self._undirected)
        check_patches_per_device(self.datamodule, self.trainer.world_size)

    def before_validate(self) -> None:
        self._check_weights()
        self._check_inputs("validate")

    def before_test(self) -> None:
        self._check_weights()
        self._check_inputs("test")

    def before_predict(self) -> None:
        self._check_weights()
        writer = next((c for c in self.trainer.callbacks if isinstance(c, PredictionWriter)), None)
        if writer is not None and writer.rescale and getattr(self.model, "voxel_size", None) is not None:
            # known before the volumes are checked: resampled volumes get no voxel-size warning
            self.datamodule.predict_voxel_size = self.model.voxel_size
        if writer is not None:  # prediction.ensemble refuses this file as a member
            writer.ckpt_path = self.config.predict.get("ckpt_path")
        self._check_inputs("predict")

    def _run_evaluation(self, method: str, model: Any, ckpt_path: str | None = None, **kwargs: Any) -> Any:
        """validate / test / predict: load the checkpoint's weights into the model built from its hyperparameters.

        Passing ``ckpt_path`` on to the Trainer would also restore the training callbacks' state (checkpointing,
        early stopping), which these runs do not have; only the weights matter here.
        """
        if ckpt_path:
            if self._weights_loaded != ckpt_path or model is not self.model:
                load_checkpoint_weights(ckpt_path, model)
            print(f"loaded weights from {ckpt_path}", file=sys.stderr)
        return getattr(self.trainer, method)(model, **kwargs)

    def validate(self, model: Any, **kwargs: Any) -> Any:
        return self._run_evaluation("validate", model, **kwargs)

    def test(self, model: Any, **kwargs: Any) -> Any:
        return self._run_evaluation("test", model, **kwargs)

    def predict(self, model: Any, **kwargs: Any) -> Any:
        return self._run_evaluation("predict", model, **kwargs)

    def _run_dir_to_resume(self, trainer_config: Any) -> Path | None:
        """The run directory ``fit --ckpt_path`` continues in: the checkpoint's own run when it lies under
        ``trainer.default_root_dir``; otherwise (fine-tuning from another run) None, and a new run starts there."""
        ckpt_path = self.config.fit.get("ckpt_path")
        run = (run_dir_of_checkpoint(ckpt_path) or run_dir_recorded_in(ckpt_path)) if ckpt_path else None
        if run is None:
            return None
        root = Path(trainer_config.get("default_root_dir") or ".").expanduser().resolve()
        if run.parent.parent == root:
            return run
        print(f"{ckpt_path} belongs to the run {run}, outside trainer.default_root_dir {root}: training continues "
              f"from it (weights, optimizer, step {global_step(ckpt_path)}) in a new run "
              f"under {root}", file=sys.stderr)
        return None

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_config.get("callbacks") or [])
        if trainer_config.get("enable_progress_bar") is not False:
            callbacks.append(ProgressBar())
        callbacks.append(self.shutdown)
        if self.subcommand == "fit":
            callbacks.append(FitSummary())
            if trainer_config.get("logger") is not False:
                callbacks.append(LearningRateMonitor(logging_interval="step"))
            resumed = self._run_dir_to_resume(trainer_config) if self.config.fit.get("ckpt_path") else None
            callbacks.append(SameRunResume(same_run=resumed is not None))
            if resumed is not None and trainer_config.get("logger") in (None, True):
                # Resume in the run's own directory: logs continue there, and ModelCheckpoint (same dirpath) restores
                # its best score, so best.ckpt stays the best of the whole run rather than of the resumed part.
                kwargs.setdefault(
                    "logger", TensorBoardLogger(save_dir=str(resumed.parent.parent), name=resumed.parent.name,
                                                version=resumed.name)
                )
            if self._no_validation == NO_VAL_PATHS:
                kwargs["limit_val_batches"] = 0  # nothing to validate on: no sanity check, no empty loader
        if self.subcommand in ("validate", "test") and self.config[self.subcommand].get("whole_volume"):
            from .whole_volume import WholeVolumeMetrics

            callbacks.append(WholeVolumeMetrics())
        if self.subcommand == "predict":
            kwargs.setdefault("logger", False)  # prediction logs nothing; a logger would only leave empty run dirs
        if trainer_config.get("benchmark") is None and not trainer_config.get("deterministic"):
            # Patches have a fixed shape, so cuDNN's autotuner pays for itself after the first batch; it picks
            # kernels by timing, which deterministic runs must not do.
            kwargs.setdefault("benchmark", True)
        try:
            trainer = super().instantiate_trainer(callbacks=callbacks, **kwargs)
        except MisconfigurationException as err:
            # Lightning's name for a Trainer setting that cannot work here (devices, strategy, precision...).
            raise ConfigurationError(f"trainer: {one_line(str(err))}") from None
        if self.subcommand == "fit" and type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            # The command has read the checkpoint to resume from already (settings, weights, run directory):
            # the Trainer's restore takes it from there instead of loading the file once more.
            trainer.strategy.checkpoint_io = SharedCheckpointIO()
        if self.subcommand != "fit":
            # Checkpointing and early stopping belong to training; in predict they would only restore stale state.
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, (ModelCheckpoint, EarlyStopping))]
        elif self._early_stopping_off:
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, EarlyStopping)]
        return trainer


def _note(message: str) -> None:
    """A line on stderr, from the first process only (under DDP every process runs the command)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(message, file=sys.stderr)


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
    """Entry point of ``unet3d``; ``args`` replaces ``sys.argv[1:]`` (for tests and scripts).

    Exit status: 0 when the run completes; 2 for a configuration or input mistake (one ``error:`` line); 143 / 130
    / 129 / 138 when stopped by SIGTERM / SIGINT / SIGHUP / SIGUSR1 (SIGUSR1 outside SLURM; see
    :mod:`unet3d_lightning.signals`); 1 with a traceback for internal errors.
    """
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] == "import-pytorch3dunet":
            # Not a Lightning run: a small parser of its own (see importers.py).
            from .importers import main as import_main

            return import_main(argv[1:])
        if argv and argv[0] == "plan":
            # Not a Lightning run either: reads the training volumes and writes a fit config (see plan.py).
            from .plan import main as plan_main

            return plan_main(argv[1:])
        if argv and argv[0] == "evaluate":
            # Not a Lightning run either: whole-volume metrics of written predictions (see evaluate.py).
            from .evaluate import main as evaluate_main

            return evaluate_main(argv[1:])
        if argv and argv[0] == "export":
            # Not a Lightning run either: TorchScript, ONNX, bioimage.io (see export.py).
            from .export import main as export_main

            return export_main(argv[1:])
        return _run(args)
    finally:
        checkpoints.forget()  # the next run in this process reads its checkpoints afresh


def _run(args: list[str] | None) -> None:
    silence_known_noise()
    use_unique_key_yaml()
    if "PL_GLOBAL_SEED" not in os.environ:
        # `seed_everything: true` (the default) promises a fresh seed, but Lightning falls back to 0 when this variable
        # is unset. Draw one here: Lightning prints it ("Seed set to N"), records it in the run's config.yaml, and DDP
        # processes inherit the variable, so all ranks share it.
        os.environ["PL_GLOBAL_SEED"] = str(random.SystemRandom().randrange(2**31))
    shutdown = GracefulShutdown()
    shutdown.install()
    try:
        check_config_files(list(sys.argv[1:] if args is None else args))
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
            shutdown=shutdown,
        )
    except ConfigurationError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    except (SIGTERMException, Interrupted) as stop:
        signum = shutdown.signum or getattr(stop, "signum", None) or 15
        lines = shutdown.report or [f"stopped by {signal_name(signum)} before any work was saved"]
        tell("\n".join(lines))
        raise SystemExit(exit_status(signum)) from None
    finally:
        shutdown.uninstall()


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


if __name__ == "__main__":
    main()
