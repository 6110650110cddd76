"""The ``unet3d`` command: a LightningCLI with the project's defaults.

``unet3d fit|validate|test|predict --config CONFIG.yaml [--section.key value ...]``; ``--print_config`` prints a
complete configuration that ``--config`` accepts back (for a run from a checkpoint, with the checkpoint's model
settings and normalisation, as the run uses them). Mistakes the command can see (bad paths, unwritable output
directory, data that does not fit the model) end with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import os
import pickle
import random
import re
import sys
import typing
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .callbacks import FitSummary, ProgressBar, RunCheckpoint, SameRunResume, ValidationImages
from .data.datamodule import HDF5DataModule, Normalization
from .data.volumes import resolve_paths
from .errors import ConfigurationError, nearest_existing, one_line
from .module import UNet3DModule, metric_mode
from .prediction.writer import PredictionWriter, check_output_dir
from .signals import GracefulShutdown, Interrupted, exit_status, tell

try:
    from jsonargparse._actions import _ActionPrintConfig
except ImportError:  # pragma: no cover - another jsonargparse: --print_config prints the config as parsed
    _ActionPrintConfig = None

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


# Model settings that fix the shape of the weights (a different value cannot load them).
_ARCHITECTURE = ("in_channels", "out_channels", "f_maps", "num_levels", "layer_order", "num_groups", "upsample")
# ...and those that choose the network the weights belong to.
_NETWORK_SETTINGS = (*_ARCHITECTURE, "architecture", "spatial_dims", "variant")

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
    _check_complete(path, ckpt_path)
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
    for key in ("state_dict", "hyper_parameters", "datamodule_hyper_parameters"):
        value = checkpoint.get(key)
        if key in checkpoint and value is not None and not isinstance(value, Mapping):
            raise ConfigurationError(
                f"ckpt_path {ckpt_path}: {key} is a {type(value).__name__}, not a mapping of "
                f"{'weights' if key == 'state_dict' else 'settings'}; the file was edited or is damaged: give a "
                ".ckpt as unet3d fit wrote it"
            )
    return checkpoint


# The first bytes of a file torch.save writes (a zip archive; the legacy pickle format has no index to lose).
_ZIP_MAGIC = b"PK\x03\x04"


def _check_complete(path: Path, ckpt_path: str | Path) -> None:
    """A checkpoint cut short (a copy or a save that did not finish, a full disk) names itself as such: torch would
    report a bad zip archive, or the operating system's "Invalid argument" of mapping a file too short."""
    try:
        with open(path, "rb") as file:
            head = file.read(len(_ZIP_MAGIC))
    except OSError as err:
        raise ConfigurationError(f"ckpt_path {ckpt_path}: cannot be read ({err.strerror or err})") from None
    # A zip archive ends with its directory of entries: a file that starts as one but lacks it was cut short.
    if head == _ZIP_MAGIC and not zipfile.is_zipfile(path):
        raise ConfigurationError(
            f"ckpt_path {ckpt_path}: truncated, not a complete checkpoint ({path.stat().st_size} bytes, the end of "
            "the archive is missing): the copy or save that wrote it did not finish; copy it again, or use another "
            "checkpoint of the run"
        )


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, the shape "
    r"in current model is torch\.Size\(\[([\d, ]*)\]\)"
)


def load_checkpoint_weights(ckpt_path: str | Path, model: torch.nn.Module) -> None:
    """Load the checkpoint's weights into ``model``, built from its hyper_parameters; weights that do not fit (an
    edited or mixed-up file) are a ConfigurationError naming the setting, raised before any volume is read."""
    try:
        # mmap: the tensors are paged in as load_state_dict copies them, not read into a second full copy.
        model.load_state_dict(read_checkpoint(ckpt_path)["state_dict"])
    except RuntimeError as err:
        raise ConfigurationError(
            f"ckpt_path {ckpt_path}: hyper_parameters {_weights_problem(str(err), model)}; the file was edited or is "
            "damaged: give a .ckpt as unet3d fit wrote it"
        ) from None


def _weights_problem(message: str, model: torch.nn.Module) -> str:
    """What torch's load_state_dict error ``message`` means in the model's settings."""
    hparams = getattr(model, "hparams", {})
    kernels = [k for k, v in model.state_dict().items() if v.dim() >= 3]  # convolution weights: (out, in, *kernel)
    for key, theirs, ours in _SIZE_MISMATCH.findall(message):
        file_shape, model_shape = ([int(n) for n in shape.split(",") if n.strip()] for shape in (theirs, ours))
        if not kernels or len(file_shape) < 3 or len(file_shape) != len(model_shape):
            continue
        if key == kernels[-1] and file_shape[0] != model_shape[0]:
            return f"out_channels={hparams.get('out_channels')} but its weights have {file_shape[0]} output channels"
        if key == kernels[0] and file_shape[1] != model_shape[1]:
            return f"in_channels={hparams.get('in_channels')} but its weights take {file_shape[1]} input channels"
    settings = ", ".join(f"{k}={hparams.get(k)!r}" for k in _NETWORK_SETTINGS if k in hparams)
    problems = [line.strip() for line in message.splitlines()[1:] if line.strip()]
    detail = problems[0] if problems else message
    if len(detail) > 200:
        detail = detail[:200] + "..."
    return f"({settings}) make a network its weights do not fit: {detail}"


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


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_unique_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> None:
    """Raise on a key written twice in ``node``. Keys brought in by a merge key (``<<: *defaults``) are not written
    in the mapping: an explicit key overrides them, as YAML's merge rules say; the merged mappings are checked on
    their own."""
    seen: dict[Any, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:
            merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for mapping in merged:
                if isinstance(mapping, yaml.MappingNode):
                    _check_unique_keys(loader, mapping)
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' is given twice (lines {seen[key]} and {line}); keep one", key_node.start_mark
            )
        seen[key] = line


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    _check_unique_keys(loader, node)
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


# Settings that name files or directories: environment variables and ~ in them are expanded (see
# UNet3DCLI._expand_path_settings).
_PATH_SETTINGS = (
    "trainer.default_root_dir", "ckpt_path", "data.train_paths", "data.val_paths", "data.test_paths",
    "data.predict_paths", "data.label_paths", "prediction.output_dir", "checkpoint.dirpath",
)
# Python's os.path.expandvars rule for a variable: $name or ${name}.
_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})", re.ASCII)


def expand_path_setting(value: Any, key: str) -> Any:
    """``value`` (a path, a list of paths, or a mapping of them such as ``data.label_paths``) with ``$VAR``,
    ``${VAR}`` and a leading ``~`` expanded; an unset variable raises a ConfigurationError naming ``key``."""
    if isinstance(value, (list, tuple)):
        return type(value)(expand_path_setting(v, key) for v in value)
    if isinstance(value, Mapping):
        return {k: expand_path_setting(v, f"{key}.{k}") for k, v in value.items()}
    if not isinstance(value, (str, os.PathLike)):
        return value
    text = os.fspath(value)
    for match in _VARIABLE.finditer(text):
        name = match.group(1).strip("{}")
        if name and name not in os.environ:
            raise ConfigurationError(
                f"{key} {text!r}: the environment variable {name} is not set; set it (export {name}=...) or write "
                "the path out"
            )
    expanded = os.path.expanduser(os.path.expandvars(text))
    return expanded if isinstance(value, str) else type(value)(expanded)


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
        for key in _PATH_SETTINGS:
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
        checkpoint = read_checkpoint(ckpt_path)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        self._check_foreign_settings(ckpt_path, hparams)
        self._check_model_flags(ckpt_path, hparams, sub)
        self._checkpoint_data = checkpoint.get("datamodule_hyper_parameters") or {}
        if not hparams:
            return
        model_config = self.config[sub].get("model")
        run_settings = {k: model_config.get(k) for k in _MODEL_RUN_SETTINGS} if model_config is not None else {}
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

    def _check_foreign_settings(self, ckpt_path: str, hparams: dict[str, Any]) -> None:
        """A checkpoint of another LightningModule (a Lightning checkpoint, but not of this model) is named as such,
        with the settings it holds that this model does not have."""
        model_class = self.model_class if isinstance(self.model_class, type) else UNet3DModule
        accepted = set(inspect.signature(model_class.__init__).parameters) - {"self", "args", "kwargs"}
        written_by = hparams.get("_class_path")
        foreign = sorted(str(k) for k in hparams if k not in accepted and k != "_class_path")
        if foreign or (written_by and str(written_by).rsplit(".", 1)[-1] != model_class.__name__):
            by = f" ({written_by})" if written_by else ""
            names = ", ".join(foreign[:8]) + (", ..." if len(foreign) > 8 else "")
            keys = f"; its hyper_parameters hold {names}, which {model_class.__name__} does not have" if foreign else ""
            raise ConfigurationError(
                f"ckpt_path {ckpt_path}: written by another model or program{by}, not by unet3d fit{keys}; give a "
                ".ckpt written by unet3d fit"
            )

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
        if len(self._subcommand_parsers) > 1:
            # All subcommands are listed (--help, or a mistyped one): include the one main() runs itself.
            subcommands = getattr(parser, "_subcommands_action", None)
            if subcommands is not None:
                description = "Convert a model trained with pytorch-3dunet into a unet3d checkpoint."
                subcommands.add_subcommand(
                    "import-pytorch3dunet", ArgumentParser(description=description), help=description
                )

    def before_instantiate_classes(self) -> None:
        """Fail fast, before any model, data or checkpoint is loaded, on mistakes visible in the config."""
        sub = self.subcommand
        if sub is None:  # run=False: classes only, nothing will be run; the callbacks still need their modes
            self._resolve_modes(self.config)
            return
        config = self.config[sub]
        ckpt_path = config.get("ckpt_path")
        check_accelerator(config.trainer.get("accelerator"))
        if sub == "fit":
            self._adapt_to_no_validation(config)
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

    def _adapt_to_no_validation(self, config: Any) -> None:
        """Fit without validation (no ``data.val_paths``, or ``trainer.limit_val_batches 0``): the defaults built
        on validation metrics follow. ``best.ckpt`` is chosen by ``train/loss_epoch``, at each training epoch's end
        (``last.ckpt`` too), and early stopping is off; monitors the user set are kept, and checked as always."""
        self._no_validation = _why_no_validation(config)
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
            _check_trained_data_setting(ckpt_path, key, trained[key])
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
        without = self._no_validation or (
            "trainer.limit_val_batches is 0" if self.trainer.limit_val_batches == 0 else None)
        logged = self.model.logged_metric_names(validation=without is None)
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
            if without is not None and monitor in self.model.logged_metric_names(validation=True):
                raise ConfigurationError(
                    f"{key} {monitor!r} is not a metric this model logs without validation ({without}); choose one "
                    f"of {', '.join(logged)}, or give validation volumes"
                )
            close = difflib.get_close_matches(monitor, logged, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigurationError(
                f"{key} {monitor!r} is not a metric this model logs; {hint}choose one of {', '.join(logged)}"
            )

    def _check_weights(self) -> None:
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path:
            # For fit, the Trainer loads them again, with the rest of the training state.
            load_checkpoint_weights(ckpt_path, self.model)
            self._weights_loaded = ckpt_path

    def before_fit(self) -> None:
        self._check_weights()
        self._check_inputs("fit")
        self._check_monitors()
        self._check_patches_per_device()

    def before_validate(self) -> None:
        self._check_weights()
        self._check_inputs("validate")

    def before_test(self) -> None:
        self._check_weights()
        self._check_inputs("test")

    def before_predict(self) -> None:
        self._check_weights()
        self._check_inputs("predict")

    def _check_patches_per_device(self) -> None:
        """Every device needs a training patch. Checked here, before the Trainer starts the other processes and
        creates the run directory: inside the run each process would report it, and the directory would stay."""
        world = self.trainer.world_size
        if world <= 1:
            return
        data = self.datamodule
        patch, stride = data._shapes("train")
        # Before filtering by foreground (data.min_foreground_fraction), which the run checks again once it has
        # filtered: this count is the most there can be.
        count = sum(len(data._grid(v, v.spatial_shape, patch, stride, "train")) for v in data.volumes["train"])
        if count < world:
            raise ConfigurationError(
                f"only {count} training patches for {world} devices; use smaller strides or fewer devices"
            )

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
            if self._no_validation == _NO_VAL_PATHS:
                kwargs["limit_val_batches"] = 0  # nothing to validate on: no sanity check, no empty loader
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
        elif self._early_stopping_off:
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, EarlyStopping)]
        return trainer


_NO_VAL_PATHS = "data.val_paths is empty"


def _why_no_validation(config: Any) -> str | None:
    """Why ``fit`` with ``config`` runs no validation, or None when it validates."""
    if not config.data.get("val_paths"):
        return _NO_VAL_PATHS
    limit = config.trainer.get("limit_val_batches")
    if limit is not None and not isinstance(limit, bool) and float(limit) == 0:
        return "trainer.limit_val_batches is 0"
    return None


def _note(message: str) -> None:
    """A line on stderr, from the first process only (under DDP every process runs the command)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(message, file=sys.stderr)


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


def _check_trained_data_setting(ckpt_path: str, key: str, value: Any) -> None:
    """The normalisation a checkpoint records must be one this version can apply."""
    if key == "normalization":
        valid = typing.get_args(Normalization)
        good = isinstance(value, str) and value in valid
        expected = f"one of {', '.join(valid)}"
    else:
        good = (
            isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            and 0 <= value[0] < value[1] <= 100
        )
        expected = "two numbers low < high in [0, 100]"
    if not good:
        raise ConfigurationError(
            f"ckpt_path {ckpt_path}: its datamodule_hyper_parameters {key} {value!r} is not {expected}; the file was "
            f"edited or is damaged: give the {key} the model was trained with, e.g. --data.{key} "
            f"{'standardize' if key == 'normalization' else '[1.0, 99.0]'}"
        )


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
        tell("\n".join(lines))
        raise SystemExit(exit_status(signum)) from None
    finally:
        shutdown.uninstall()


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


if __name__ == "__main__":
    main()
