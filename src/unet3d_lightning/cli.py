"""The ``unet3d`` command: a LightningCLI with the project's defaults.

``unet3d fit|validate|test|predict --config CONFIG.yaml [--section.key value ...]``; ``--print_config`` prints a
complete configuration that ``--config`` accepts back. Mistakes the command can see (bad paths, unwritable output
directory, data that does not fit the model) end with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import difflib
import logging
import os
import pickle
import random
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .callbacks import FitSummary, ProgressBar, SameRunResume, ValidationImages
from .data.datamodule import HDF5DataModule
from .data.volumes import resolve_paths
from .errors import ConfigurationError, nearest_existing, one_line
from .module import UNet3DModule, metric_mode
from .prediction.writer import PredictionWriter, check_output_dir
from .signals import GracefulShutdown, Interrupted, exit_status

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


def check_no_run_without_logger(root_dir: str | Path) -> None:
    """Without a logger a run writes ``config.yaml`` and ``checkpoints/`` straight into the root dir, so a second new
    run there would clash with (or silently sit beside) the first one's files: refuse it before anything starts."""
    config = Path(root_dir) / "config.yaml"
    if config.exists():
        raise ConfigurationError(
            f"trainer.default_root_dir {root_dir} already holds a run without a logger ({config}); give a new "
            f"default_root_dir, or resume that run with --ckpt_path {Path(root_dir) / 'checkpoints' / 'last.ckpt'}"
        )


def run_dir_of_checkpoint(ckpt_path: str | Path) -> Path | None:
    """``<root>/<name>/version_N`` when ``ckpt_path`` is ``<root>/<name>/version_N/checkpoints/<file>``, else None."""
    path = Path(ckpt_path).resolve()
    run = path.parent.parent
    if path.parent.name == "checkpoints" and run.name.startswith("version_"):
        return run
    return None


IMPORT_COMMAND = "unet3d import-pytorch3dunet --model_path {path} --config train_config.yml --output model.ckpt"


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by ``unet3d fit`` (tensors memory-mapped), or raise a one-line ConfigurationError
    that says what the file is instead — a pytorch-3dunet checkpoint, bare weights, not a PyTorch file — and what
    to do."""
    path = Path(ckpt_path)
    if not path.exists():
        raise ConfigurationError(f"ckpt_path {ckpt_path}: file does not exist")
    if not path.is_file():
        raise ConfigurationError(f"ckpt_path {ckpt_path}: is a directory; give a checkpoint file (e.g. last.ckpt)")
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except OSError as err:
        raise ConfigurationError(f"ckpt_path {ckpt_path}: cannot be read ({err.strerror or err})") from None
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            # torch's message suggests weights_only=False, i.e. running whatever code the file holds: never for us.
            raise ConfigurationError(
                f"ckpt_path {ckpt_path}: not a checkpoint unet3d can load (it holds Python objects other than "
                "tensors and settings); give a .ckpt written by unet3d fit"
            ) from None
        raise ConfigurationError(
            f"ckpt_path {ckpt_path}: not a PyTorch checkpoint file; give a .ckpt written by unet3d fit"
        ) from None
    except Exception:  # noqa: BLE001 - torch raises many kinds (KeyError, RuntimeError...) on files it cannot parse
        raise ConfigurationError(
            f"ckpt_path {ckpt_path}: not a PyTorch checkpoint file (truncated, or another format); give a .ckpt "
            "written by unet3d fit"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ConfigurationError(
            f"ckpt_path {ckpt_path}: holds a {type(checkpoint).__name__}, not a checkpoint; give a .ckpt written "
            "by unet3d fit"
        )
    if "model_state_dict" in checkpoint:
        raise ConfigurationError(
            f"ckpt_path {ckpt_path}: a pytorch-3dunet checkpoint, which lacks the settings unet3d needs; convert it "
            f"with: {IMPORT_COMMAND.format(path=ckpt_path)}"
        )
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ConfigurationError(
            f"ckpt_path {ckpt_path}: holds only weights (a state_dict, e.g. from torch.save(model.state_dict())), "
            "without the model settings; give a .ckpt written by unet3d fit, or load the weights in Python with "
            "UNet3DModule(...).load_state_dict (pytorch-3dunet weights: unet3d import-pytorch3dunet)"
        )
    if "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        missing = "state_dict" if "state_dict" not in checkpoint else "hyper_parameters"
        raise ConfigurationError(
            f"ckpt_path {ckpt_path}: not a unet3d checkpoint (no '{missing}'; it has {sorted(checkpoint)[:6]}); "
            "give a .ckpt written by unet3d fit"
        )
    return checkpoint


def _run_dir_recorded_in(ckpt_path: str | Path) -> Path | None:
    """The run directory a checkpoint saved outside its run (Lightning's ``hpc_ckpt_N.ckpt`` in the root dir)
    belongs to, from the checkpoint directory its ModelCheckpoint state records; None if it records none."""
    states = read_checkpoint(ckpt_path).get("callbacks") or {}
    for key, state in states.items():
        if str(key).startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("dirpath"):
            directory = Path(state["dirpath"]).expanduser().resolve()
            if directory.name == "checkpoints" and directory.parent.name.startswith("version_"):
                return directory.parent
    return None


def _global_step(ckpt_path: str | Path) -> int:
    return int(read_checkpoint(ckpt_path).get("global_step", 0))


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


# ------------------------------------------------------------------------------------------------ config files
class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader that rejects a key given twice in one mapping (PyYAML keeps the last and drops the first)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' is given twice (lines {seen[key]} and {line}); keep one", key_node.start_mark
            )
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def check_config_files(args: list[str]) -> None:
    """Check the files given with ``--config`` before the parser reads them: an empty file, invalid YAML or a key
    given twice in one mapping each end with one ``error:`` line naming the file and line."""
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        path = Path(value)
        if not path.is_file():
            continue  # a YAML string or a missing file: the parser's own message says what is wrong
        text = path.read_text(errors="replace")
        try:
            content = yaml.load(text, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            line = f" line {where.line + 1}:" if where is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigurationError(f"config {value}:{line} {problem}") from None
        if content is None:
            raise ConfigurationError(
                f"config {value} is empty; give settings such as 'trainer:', 'model:' and 'data:' sections (see "
                "configs/demo.yaml), or leave out --config"
            )
        if not isinstance(content, dict):
            raise ConfigurationError(
                f"config {value}: holds a {type(content).__name__}, not 'key: value' settings (see configs/demo.yaml)"
            )


def _unique_key_yaml_load(stream: str) -> Any:
    """jsonargparse's YAML value loader with the duplicate-key check (for nested config files and values)."""
    from jsonargparse._loaders_dumpers import get_yaml_default_loader

    loader = type("Loader", (get_yaml_default_loader(),), {})
    loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)
    value = yaml.load(stream, Loader=loader)
    if isinstance(value, dict) and value and all(v is None for v in value.values()):
        # jsonargparse reads "a, b" or "key:" given as a value as a string, not as a mapping of nulls.
        if len(value) == 1 and stream.strip() == next(iter(value)) + ":":
            return stream
        keys = set(stream.strip(" {}").replace(" ", "").split(","))
        if keys and keys == set(value):
            return stream
    return value


def _use_unique_key_yaml() -> None:
    try:
        from jsonargparse import set_loader
    except ImportError:  # pragma: no cover - an old jsonargparse: the --config pre-check still runs
        return
    set_loader("yaml", _unique_key_yaml_load, exceptions=(yaml.YAMLError,))


class ArgumentParser(LightningArgumentParser):
    """Lightning's parser with a one-line usage on errors: the full usage of every key (hundreds of lines) would
    bury the ``error:`` line that says what is wrong; ``--help`` still lists everything. The error itself is put
    on one line, control characters escaped."""

    def print_usage(self, file: Any = None) -> None:
        prog = self.prog.replace(" [options]", "")
        (file or sys.stderr).write(f"usage: {prog} [--config CONFIG.yaml] [--section.key VALUE ...]\n")

    def error(self, message: str, ex: Exception | None = None) -> Any:
        return super().error(one_line(message), ex)


# Model settings that fix the shape of the weights (a different value cannot load them).
_ARCHITECTURE = ("in_channels", "out_channels", "f_maps", "num_levels", "layer_order", "num_groups", "upsample")


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
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # The same arguments without defaults: the keys the user set (on the command line or in a config file),
        # whatever their value. Settings the checkpoint would otherwise supply are kept or compared by it.
        if not isinstance(args, (dict, type(self.config))):
            try:
                self.given = parser.parse_args(args, defaults=False, _skip_validation=True)
            except (SystemExit, Exception):  # noqa: BLE001 - the full parse succeeded; without this, no comparison
                self.given = None

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
        checkpoint = read_checkpoint(ckpt_path)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        self._check_model_flags(ckpt_path, hparams, sub)
        self._checkpoint_data = checkpoint.get("datamodule_hyper_parameters") or {}
        if not hparams:
            return
        model_config = self.config[sub].get("model")
        run_settings = {k: model_config.get(k) for k in _MODEL_RUN_SETTINGS} if model_config is not None else {}
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"(while reading the model settings of ckpt_path {ckpt_path})\n")
            raise
        # The checkpoint records how it was trained, but how this run executes the network is this run's choice.
        for key, value in run_settings.items():
            self.config[sub].model[key] = value

    def _check_model_flags(self, ckpt_path: str, hparams: dict[str, Any], sub: str) -> None:
        given = self._given("model")
        if given is ... or not hasattr(given, "keys"):
            return
        for key in given.keys():
            top = key.split(".")[0]
            if top not in hparams or top in _MODEL_RUN_SETTINGS:
                continue
            value = self.config[sub].model.get(top)
            # None means "work it out" (multiclass, from the data): the checkpoint's value is that answer.
            if value is None or _same_setting(value, hparams[top]):
                continue
            theirs = _plain(hparams[top])
            why = "its weights have this shape" if top in _ARCHITECTURE else "the model is rebuilt from the checkpoint"
            fix = "; to train with other settings, start a new run (without --ckpt_path)" if sub == "fit" else ""
            raise ConfigurationError(
                f"model.{top}={_plain(value)!r} contradicts the checkpoint {ckpt_path} ({top}={theirs!r}): {why}; "
                f"drop --model.{top}{fix}"
            )

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # Keeping every patch's probabilities for trainer.predict's return value would hold the whole output in RAM;
        # the PredictionWriter streams it to disk instead.
        if "predict" in self._subcommand_parsers:
            self._subcommand_parsers["predict"].set_defaults(return_predictions=False)

    def before_instantiate_classes(self) -> None:
        """Fail fast, before any model, data or checkpoint is loaded, on mistakes visible in the config."""
        sub = self.subcommand
        if sub is None:  # run=False: classes only, nothing will be run; the callbacks still need their modes
            self._resolve_modes(self.config)
            return
        config = self.config[sub]
        ckpt_path = config.get("ckpt_path")
        check_accelerator(config.trainer.get("accelerator"))
        self._resolve_modes(config)
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
                         format=config.prediction.get("format", "hdf5"))
        self._data_settings_from_checkpoint(ckpt_path, config)

    def _resume_requeued_slurm_job(self, config: Any) -> None:
        """A SLURM job requeued by Lightning (``SLURMEnvironment`` with ``auto_requeue``, on its requeue signal) runs
        the same command again: continue from the newest ``hpc_ckpt_N.ckpt`` Lightning saved in
        ``trainer.default_root_dir``, in the run directory it came from (Lightning alone would resume the weights
        but start a new ``version_N``)."""
        from lightning.fabric.plugins.environments import SLURMEnvironment

        if not SLURMEnvironment.detect():
            return
        root = Path(config.trainer.get("default_root_dir") or ".")
        saved = [(int(m.group(1)), p) for p in root.glob("hpc_ckpt_*.ckpt")
                 if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
        if saved:
            latest = max(saved)[1]
            # Our SIGTERM handling may have written the run's last.ckpt after Lightning's requeue save: take the
            # later of the two.
            run = _run_dir_recorded_in(latest)
            last = run / "checkpoints" / "last.ckpt" if run is not None else None
            if last is not None and last.is_file() and _global_step(last) > _global_step(latest):
                latest = last
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
                # Reported by _check_monitors before fit starts, after the name itself is checked (a typo is
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
        trained = getattr(self, "_checkpoint_data", None)
        if trained is None:
            trained = read_checkpoint(ckpt_path).get("datamodule_hyper_parameters") or {}
        for key in _DATA_FROM_CHECKPOINT:
            if key not in trained or self._given(f"data.{key}") is not ...:
                continue
            if not _same(config.data.get(key), trained[key]):
                config.data[key] = trained[key]
                print(f"using data.{key}={trained[key]!r} from the checkpoint", file=sys.stderr)

    def _check_inputs(self, stage: str) -> None:
        """Check every input volume against the model, and the model's loss against the labels, before the Trainer
        starts: a mistake then ends the run before any log directory or checkpoint is written."""
        self.datamodule.check(stage, self.model)
        voxel_weights = stage != "predict" and self.datamodule.weight_internal_path is not None
        self.model.use_label_kind(self.datamodule.label_kind, voxel_weights=voxel_weights)

    def _check_monitors(self) -> None:
        """Every monitored metric must be one the model logs: a typo otherwise fails only after the first epoch."""
        validation = self.trainer.limit_val_batches != 0
        logged = self.model.logged_metric_names(validation=validation)
        monitors = [(f"{name}.monitor", getattr(c, "monitor", None)) for name, c in (
            ("checkpoint", self.trainer.checkpoint_callback), ("early_stopping", self.trainer.early_stopping_callback))
        ]
        if self.model.lr_scheduler_factory is not None:
            monitors.append(("model.lr_scheduler_monitor", self.model.hparams.lr_scheduler_monitor))
        for key, monitor in monitors:
            if monitor is None:
                continue
            if monitor in logged:
                if key in self._undirected:
                    section = key.split(".")[0]
                    raise ConfigurationError(
                        f"{key} {monitor!r}: cannot tell from the name whether higher or lower is better; set "
                        f"--{section}.mode max or min"
                    )
                continue
            close = difflib.get_close_matches(monitor, logged, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigurationError(
                f"{key} {monitor!r} is not a metric this model logs; {hint}choose one of {', '.join(logged)}"
            )

    def before_fit(self) -> None:
        self._check_inputs("fit")
        self._check_monitors()

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
            model.load_state_dict(read_checkpoint(ckpt_path)["state_dict"])
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
        run = (run_dir_of_checkpoint(ckpt_path) or _run_dir_recorded_in(ckpt_path)) if ckpt_path else None
        if run is None:
            return None
        root = Path(trainer_config.get("default_root_dir") or ".").expanduser().resolve()
        if run.parent.parent == root:
            return run
        print(f"{ckpt_path} belongs to the run {run}, outside trainer.default_root_dir {root}: training continues "
              f"from it (weights, optimizer, step {read_checkpoint(ckpt_path).get('global_step', 0)}) in a new run "
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
        if self.subcommand != "fit":
            # Checkpointing and early stopping belong to training; in predict they would only restore stale state.
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, (ModelCheckpoint, EarlyStopping))]
        return trainer


def _plain(value: Any) -> Any:
    """A setting as plain data (Namespaces as dicts, tuples as lists) for comparing and printing."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same_setting(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, dict) and isinstance(b, dict):
        # An optimizer or scheduler: the class decides; its arguments are filled with defaults on one side only.
        if "class_path" in a or "class_path" in b:
            return str(a.get("class_path", "")).rsplit(".", 1)[-1] == str(b.get("class_path", "")).rsplit(".", 1)[-1]
        return a.keys() == b.keys() and all(_same_setting(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


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
    when stopped by SIGTERM / SIGINT (see :mod:`unet3d_lightning.signals`); 1 with a traceback for internal errors.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "import-pytorch3dunet":
        # Not a Lightning run: a small parser of its own (see importers.py).
        from .importers import main as import_main

        return import_main(argv[1:])
    silence_known_noise()
    _use_unique_key_yaml()
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
        print("\n".join(lines), file=sys.stderr, flush=True)
        raise SystemExit(exit_status(signum)) from None
    finally:
        shutdown.uninstall()


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


if __name__ == "__main__":
    main()
