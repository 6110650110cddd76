"""Checkpoint files: each is read once per run, and classified.

Every part of a run that needs a checkpoint — the model settings and normalisation it records, its weights, the
run directory and step a resumed run continues from, Lightning's restore of the training state, the message after
a stop signal, ``unet3d import-pytorch3dunet`` — reads it through :func:`load_file`: the file is loaded once (tensors
memory-mapped, so that weights are paged in as they are copied into the network, and the optimizer state that
prediction never uses is not read at all), and later reads of the same, unchanged file get the same object.

:func:`classify` names what a loaded file holds (a ``"lightning"`` checkpoint, ours or another module's, a
``"pytorch-3dunet"`` one, a bare ``"state_dict"``, a ``"bioimageio"`` package, or ``"other"``); :func:`read_checkpoint` turns everything but a unet3d checkpoint into a one-line
:class:`~unet3d_lightning.errors.ConfigurationError` that says what the file is and what to do.

Example::

    checkpoint = read_checkpoint("runs/lightning_logs/version_0/checkpoints/best.ckpt")
    checkpoint["hyper_parameters"]["f_maps"]
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .errors import ConfigurationError

IMPORT_COMMAND = "unet3d import-pytorch3dunet --model_path {path} --config train_config.yml --output model.ckpt"
# Model settings that fix the shape of the weights (a different value cannot load them)...
WEIGHT_SETTINGS = ("in_channels", "out_channels", "f_maps", "num_levels", "layer_order", "num_groups", "upsample",
                   "pool_kernel_size", "conv_kernel_size")
# ...and those that choose the network the weights belong to.
NETWORK_SETTINGS = (*WEIGHT_SETTINGS, "architecture", "spatial_dims", "variant")
# Model settings that change how fast the network runs, not what it computes: the checkpoint records them, but each
# run takes them from its own config and command line (a GPU-trained, compiled model predicts uncompiled on a CPU).
RUN_SETTINGS = ("channels_last", "compile")
# Settings added later: a checkpoint written before them has their default (its network was built with it).
IMPLIED_SETTINGS = {"pool_kernel_size": 2, "conv_kernel_size": 3}

# The first bytes of a file torch.save writes (a zip archive; the legacy pickle format has no index to lose).
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointReadError(Exception):
    """A file that ``torch.load`` cannot load (safely). ``reason`` says why, for the caller's message:

    ``"missing"``, ``"directory"``, ``"unreadable"`` (an OS error, ``detail`` its text), ``"truncated"`` (a zip
    archive without its end; ``detail`` the size), ``"python_objects"`` (a pickle of other objects than tensors and
    settings; ``detail`` torch's message, which names the first one), ``"not_pickle"`` (not a pickle at all),
    ``"unknown_format"`` (anything else torch cannot parse).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# resolved path -> ((device, inode, size, mtime), the loaded object); see load_file and forget.
_loaded: dict[str, tuple[tuple[int, ...], Any]] = {}


def _version(path: Path) -> tuple[int, ...]:
    """What changes when the file is replaced or rewritten (checkpoints are saved to a new file, then renamed)."""
    status = path.stat()
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


def load_file(path: str | Path) -> Any:
    """What ``torch.load(path, weights_only=True)`` returns, tensors on the CPU and memory-mapped where the format
    allows; loaded once per file version (a file rewritten since, by a save that replaces it, is loaded again).

    The object is shared by every caller of the run: read it, do not change it (:func:`restorable_copy` gives
    Lightning, which does change it, its own copy).

    Raises:
        CheckpointReadError: the file is missing, a directory, unreadable, cut short, or not a (safe) PyTorch file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointReadError("missing")
    if not path.is_file():
        raise CheckpointReadError("directory")
    try:
        key, version = str(path.resolve()), _version(path)
    except OSError as err:
        raise CheckpointReadError("unreadable", err.strerror or str(err)) from None
    if key not in _loaded or _loaded[key][0] != version:
        _loaded.pop(key, None)  # a replaced file's old content is not kept mapped
        _loaded[key] = (version, _load(path))
    return _loaded[key][1]


def forget() -> None:
    """Drop the loaded checkpoints (and their file mappings); the command does this when a run ends."""
    _loaded.clear()


def _load(path: Path) -> Any:
    from .bioimage import is_package

    if is_package(path):
        # A bioimage.io model package (zip or rdf.yaml): read offline and turned into a checkpoint of ours.
        from .bioimage import read_package

        return read_package(path)
    _check_complete(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except OSError as err:
        raise CheckpointReadError("unreadable", err.strerror or str(err)) from None
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise CheckpointReadError("python_objects", str(err)) from None
        raise CheckpointReadError("not_pickle", str(err)) from None
    except Exception as err:  # noqa: BLE001 - torch raises many kinds (KeyError, RuntimeError...) on files it cannot parse
        raise CheckpointReadError("unknown_format", str(err)) from None


def _check_complete(path: Path) -> None:
    """A checkpoint cut short (a copy or a save that did not finish, a full disk) names itself as such: torch would
    report a bad zip archive, or the operating system's "Invalid argument" of mapping a file too short."""
    try:
        with open(path, "rb") as file:
            head = file.read(len(_ZIP_MAGIC))
    except OSError as err:
        raise CheckpointReadError("unreadable", err.strerror or str(err)) from None
    # A zip archive ends with its directory of entries: a file that starts as one but lacks it was cut short.
    if head == _ZIP_MAGIC and not zipfile.is_zipfile(path):
        raise CheckpointReadError("truncated", str(path.stat().st_size))


def classify(content: Any) -> str:
    """What a loaded file holds: ``"lightning"`` (a Lightning checkpoint with weights and hyperparameters: one of
    ours, or of another LightningModule, see :func:`foreign_settings`), ``"pytorch-3dunet"`` (its trainer's
    checkpoint, with ``model_state_dict``), ``"state_dict"`` (bare weights, ``torch.save(model.state_dict())``),
    ``"bioimageio"`` (a bioimage.io model package, read by :func:`unet3d_lightning.bioimage.read_package` as a
    checkpoint of ours) or ``"other"``."""
    if not isinstance(content, dict):
        return "other"
    if "bioimageio_package" in content and "state_dict" in content and "hyper_parameters" in content:
        return "bioimageio"
    if "model_state_dict" in content:
        return "pytorch-3dunet"
    if content and all(isinstance(v, torch.Tensor) for v in content.values()):
        return "state_dict"
    if "state_dict" in content and "hyper_parameters" in content:
        return "lightning"
    return "other"


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """The checkpoint ``ckpt_path`` written by ``unet3d fit`` (through :func:`load_file`, so once per run), or a
    one-line ConfigurationError that says what the file is instead — a pytorch-3dunet checkpoint, bare weights,
    not a PyTorch file, cut short — and what to do."""
    try:
        checkpoint = load_file(ckpt_path)
    except CheckpointReadError as err:
        raise ConfigurationError(_unreadable(ckpt_path, err)) from None
    kind = classify(checkpoint)
    if kind == "pytorch-3dunet":
        raise ConfigurationError(
            f"ckpt_path {ckpt_path}: a pytorch-3dunet checkpoint, which lacks the settings unet3d needs; convert it "
            f"with: {IMPORT_COMMAND.format(path=ckpt_path)}"
        )
    if kind == "state_dict":
        raise ConfigurationError(
            f"ckpt_path {ckpt_path}: holds only weights (a state_dict, e.g. from torch.save(model.state_dict())), "
            "without the model settings; give a .ckpt written by unet3d fit, or load the weights in Python with "
            "UNet3DModule(...).load_state_dict (pytorch-3dunet weights: unet3d import-pytorch3dunet)"
        )
    if not isinstance(checkpoint, dict):
        raise ConfigurationError(
            f"ckpt_path {ckpt_path}: holds a {type(checkpoint).__name__}, not a checkpoint; give a .ckpt written "
            "by unet3d fit"
        )
    if kind == "other":
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


def _unreadable(ckpt_path: str | Path, err: CheckpointReadError) -> str:
    if err.reason == "missing":
        return f"ckpt_path {ckpt_path}: file does not exist"
    if err.reason == "directory":
        return f"ckpt_path {ckpt_path}: is a directory; give a checkpoint file (e.g. last.ckpt)"
    if err.reason == "unreadable":
        return f"ckpt_path {ckpt_path}: cannot be read ({err.detail})"
    if err.reason == "truncated":
        return (f"ckpt_path {ckpt_path}: truncated, not a complete checkpoint ({err.detail} bytes, the end of the "
                "archive is missing): the copy or save that wrote it did not finish; copy it again, or use another "
                "checkpoint of the run")
    if err.reason == "python_objects":
        # torch's message suggests weights_only=False, i.e. running whatever code the file holds: never for us.
        return (f"ckpt_path {ckpt_path}: not a checkpoint unet3d can load (it holds Python objects other than "
                "tensors and settings); give a .ckpt written by unet3d fit")
    if err.reason == "not_pickle":
        return f"ckpt_path {ckpt_path}: not a PyTorch checkpoint file; give a .ckpt written by unet3d fit"
    return (f"ckpt_path {ckpt_path}: not a PyTorch checkpoint file (truncated, or another format); give a .ckpt "
            "written by unet3d fit")


def foreign_settings(hparams: Mapping[str, Any], model_class: type) -> str | None:
    """Why ``hparams`` of a Lightning checkpoint belong to another LightningModule than ``model_class`` (the module
    recorded as their writer, and the settings ``model_class`` does not take), or None when they are its own."""
    accepted = set(inspect.signature(model_class.__init__).parameters) - {"self", "args", "kwargs"}
    written_by = hparams.get("_class_path")
    foreign = sorted(str(k) for k in hparams if k not in accepted and k not in ("_class_path", "_instantiator"))
    if not foreign and not (written_by and str(written_by).rsplit(".", 1)[-1] != model_class.__name__):
        return None
    by = f" ({written_by})" if written_by else ""
    names = ", ".join(foreign[:8]) + (", ..." if len(foreign) > 8 else "")
    keys = f"; its hyper_parameters hold {names}, which {model_class.__name__} does not have" if foreign else ""
    return f"written by another model or program{by}, not by unet3d fit{keys}"


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, the shape "
    r"in current model is torch\.Size\(\[([\d, ]*)\]\)"
)


def load_checkpoint_weights(ckpt_path: str | Path, model: torch.nn.Module) -> None:
    """Load the checkpoint's weights into ``model``, built from its hyper_parameters; weights that do not fit (an
    edited or mixed-up file) are a ConfigurationError naming the setting, raised before any volume is read."""
    try:
        # Memory-mapped: the tensors are paged in as load_state_dict copies them, not read into a second full copy.
        checkpoint = read_checkpoint(ckpt_path)
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise ConfigurationError(
            f"ckpt_path {ckpt_path}: hyper_parameters {_weights_problem(str(err), model)}; the file was edited or is "
            "damaged: give a .ckpt as unet3d fit wrote it"
        ) from None
    # The voxel size of the training data, which prediction compares with its volumes' (older checkpoints: None).
    from .data.spacing import VoxelSize

    model.voxel_size = VoxelSize.from_dict(checkpoint.get("voxel_size"))  # type: ignore[assignment]


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
    settings = ", ".join(f"{k}={hparams.get(k)!r}" for k in NETWORK_SETTINGS if k in hparams)
    problems = [line.strip() for line in message.splitlines()[1:] if line.strip()]
    detail = problems[0] if problems else message
    if len(detail) > 200:
        detail = detail[:200] + "..."
    return f"({settings}) make a network its weights do not fit: {detail}"


def global_step(ckpt_path: str | Path) -> int:
    """The training step the checkpoint was saved at (0 when it records none)."""
    return int(read_checkpoint(ckpt_path).get("global_step", 0))


def run_dir_of_checkpoint(ckpt_path: str | Path) -> Path | None:
    """``<root>/<name>/version_N`` when ``ckpt_path`` is ``<root>/<name>/version_N/checkpoints/<file>``, else None."""
    path = Path(ckpt_path).resolve()
    run = path.parent.parent
    if path.parent.name == "checkpoints" and run.name.startswith("version_"):
        return run
    return None


def run_dir_recorded_in(ckpt_path: str | Path) -> Path | None:
    """The run directory a checkpoint saved outside its run (Lightning's ``hpc_ckpt_N.ckpt`` in the root dir)
    belongs to, from the checkpoint directory its ModelCheckpoint state records; None if it records none."""
    states = read_checkpoint(ckpt_path).get("callbacks") or {}
    for key, state in states.items():
        if str(key).startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("dirpath"):
            directory = Path(state["dirpath"]).expanduser().resolve()
            if directory.name == "checkpoints" and directory.parent.name.startswith("version_"):
                return directory.parent
    return None


# ------------------------------------------------------------------------------------ a run's settings against it
def check_model_setting(ckpt_path: str | Path, key: str, value: Any, hparams: Mapping[str, Any], fit: bool) -> None:
    """A ``model.<key>`` the user gave as ``value`` must be the checkpoint's (its ``hparams``): the model is rebuilt
    from the checkpoint. Run settings (:data:`RUN_SETTINGS`) and keys the checkpoint lacks are this run's choice;
    ``fit`` adds the fix for a run that wants other settings."""
    if key in IMPLIED_SETTINGS and key not in hparams:
        hparams = {**hparams, key: IMPLIED_SETTINGS[key]}
    if key not in hparams or key in RUN_SETTINGS:
        return
    # None means "work it out" (multiclass, from the data): the checkpoint's value is that answer.
    if value is None or same_setting(value, hparams[key]) or _same_kernels(key, value, hparams):
        return
    why = "its weights have this shape" if key in WEIGHT_SETTINGS else "the model is rebuilt from the checkpoint"
    fix = "; to train with other settings, start a new run (without --ckpt_path)" if fit else ""
    raise ConfigurationError(
        f"model.{key}={plain(value)!r} contradicts the checkpoint {ckpt_path} ({key}={plain(hparams[key])!r}): "
        f"{why}; drop --model.{key}{fix}"
    )


def check_trained_data_setting(ckpt_path: str | Path, key: str, value: Any, normalizations: tuple[str, ...]) -> None:
    """The ``normalization`` (one of ``normalizations``) or ``percentiles`` a checkpoint records as ``value`` must be
    one this version can apply."""
    if key == "normalization":
        good = isinstance(value, str) and value in normalizations
        expected = f"one of {', '.join(normalizations)}"
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


def plain(value: Any) -> Any:
    """A setting as plain data (Namespaces as dicts, tuples as lists) for comparing and printing."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _same_kernels(key: str, value: Any, hparams: Mapping[str, Any]) -> bool:
    """Whether two forms of a kernel setting (``2``, ``[2, 2, 2]``, one per level) give the same kernels."""
    if key not in IMPLIED_SETTINGS:
        return False
    from .networks.kernels import conv_kernels, pool_kernels

    levels, dims = int(hparams.get("num_levels", 4)), int(hparams.get("spatial_dims", 3))
    f_maps = hparams.get("f_maps")
    if isinstance(f_maps, (list, tuple)):
        levels = len(f_maps)
    normalise = pool_kernels if key == "pool_kernel_size" else conv_kernels
    try:
        return normalise(plain(value), levels, dims) == normalise(plain(hparams[key]), levels, dims)
    except ValueError:
        return False


def same_setting(a: Any, b: Any) -> bool:
    """Whether two values of a setting mean the same (``1`` and ``1.0``, a tuple and a list, an optimizer of the same
    class)."""
    a, b = plain(a), plain(b)
    if isinstance(a, dict) and isinstance(b, dict):
        # An optimizer or scheduler: the class decides; its arguments are filled with defaults on one side only.
        if "class_path" in a or "class_path" in b:
            return str(a.get("class_path", "")).rsplit(".", 1)[-1] == str(b.get("class_path", "")).rsplit(".", 1)[-1]
        return a.keys() == b.keys() and all(same_setting(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_setting(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


# ------------------------------------------------------------------------------------ Lightning's restore
def restorable_copy(content: Any) -> Any:
    """``content`` with every container and tensor copied: Lightning's restore changes the checkpoint it is given
    in place (migrations, the callbacks' ``on_load_checkpoint``, the module's memory-format hook) and the optimizer
    keeps the state tensors it loads and updates them in place, so it must not get the run's shared object (nor
    memory-mapped pages of a file that later saves replace)."""
    if isinstance(content, torch.Tensor):
        return content.clone()
    if isinstance(content, dict):
        copied = content.copy()  # keeps the mapping's type (OrderedDict, defaultdict)
        for key, value in content.items():
            copied[key] = restorable_copy(value)
        return copied
    if type(content) in (list, tuple):
        return type(content)(restorable_copy(v) for v in content)
    return content


class SharedCheckpointIO(TorchCheckpointIO):
    """Lightning's default checkpoint IO (the same files, written the same way), whose loads go through
    :func:`load_file`: ``fit --ckpt_path`` then reads its checkpoint once, although the command has looked into it
    before the Trainer restores it. The Trainer gets the tensors on the CPU and moves them where the run trains, as
    when it resumes any checkpoint. Remote (fsspec URL) paths, and loads asked for another ``map_location``, load
    as Lightning loads them."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        local = Path(os.fspath(path)) if isinstance(path, (str, os.PathLike)) and "://" not in str(path) else None
        if map_location is not None:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        try:
            if local is not None and local.is_file():
                return restorable_copy(load_file(local))
        except CheckpointReadError:
            pass  # Lightning's own load says what is wrong with the file
        return super().load_checkpoint(path, weights_only=weights_only)
