"""``unet3d import-pytorch3dunet``: turn a model trained with pytorch-3dunet into a checkpoint of ours.

Usage::

    unet3d import-pytorch3dunet --model_path best_checkpoint.pytorch --config train_config.yml --output model.ckpt
    unet3d predict --ckpt_path model.ckpt --data.predict_paths '[vol.h5]' --data.predict_patch_shape '[80,160,160]'

The ``model`` section of pytorch-3dunet's training config says which network was trained; its checkpoint holds the
weights under ``model_state_dict`` (as its trainer saves them; a bare state dict and ``module.`` prefixes from
``nn.DataParallel`` are accepted too). The network is rebuilt with our classes in the ``pytorch3dunet`` variant
(:mod:`unet3d_lightning.architectures`), which computes what pytorch-3dunet computes, and the weights are renamed
by :func:`convert_state_dict`. The output is a Lightning checkpoint that ``UNet3DModule.load_from_checkpoint`` and
``unet3d predict --ckpt_path`` use directly.

Mapping of the ``model`` section (anything else ends in one ``error:`` line naming the unsupported setting):

==========================  ==================================================================================
``name``                    ``UNet3D``, ``ResidualUNet3D``, ``ResidualUNetSE3D``, ``UNet2D``, ``ResidualUNet2D``
                            → ``architecture`` ``unet`` / ``residual_unet`` / ``residual_se_unet``,
                            ``spatial_dims`` 3 or 2
``in_channels``,            the same keys
``out_channels``,
``f_maps``, ``num_groups``
``num_levels``              the same (defaults as pytorch-3dunet: 4, residual networks 5)
``layer_order``             the same, dropout letters ``d`` (``nn.Dropout``) and ``D`` (channel dropout) included
``final_sigmoid``           true → ``loss: bce`` (per-channel sigmoid masks), false → ``loss: ce`` (softmax);
                            not read for regression networks (pytorch-3dunet applies no activation to them)
``is_segmentation``         true (default): a segmentation network, as above; false: a regression (denoising)
                            network without final activation → ``loss`` from the config's top-level ``loss``
                            section: ``MSELoss`` → ``mse``, ``L1Loss`` → ``l1``, ``SmoothL1Loss`` → ``smooth_l1``
                            (any other loss, or none, → ``mse`` with a note: the loss matters only for
                            fine-tuning); the loss section's ``ignore_index`` → ``ignore_index``
``upsample``                ``default``/``nearest`` → ``interpolate`` for ``UNet*``, ``default`` → ``deconv`` for
                            residual networks; ``deconv`` → ``deconv`` for ``UNet*``
``conv_padding``,           must be 1 and 2 (pytorch-3dunet's defaults): its constructors pass them on, and
``conv_upscale``            other values build networks whose output is not the input's size, or other channels
``conv_kernel_size``,       ignored with a note, as pytorch-3dunet 1.9.6 does: ``UNet3D``, ``ResidualUNet3D``,
``pool_kernel_size``        ``ResidualUNetSE3D``, ``UNet2D`` and ``ResidualUNet2D`` take them in ``**kwargs`` and
                            never pass them on, so its networks always convolve 3 and pool 2 (and the weights say
                            so); the imported model has those
``dropout_prob``            → ``dropout`` where ``layer_order`` has ``d``/``D`` (default 0.1; a pair
                            ``[first, second]`` per double convolution); residual networks get 0.1 whatever it says,
                            since pytorch-3dunet's residual blocks never pass it to their convolutions
any other key               ignored with a note, as pytorch-3dunet 1.9 ignores it (``testing`` of older configs)
==========================  ==================================================================================
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoints import CheckpointReadError, load_file
from .errors import ConfigurationError

SUPPORTED_MODELS = {
    "UNet3D": ("unet", 3),
    "ResidualUNet3D": ("residual_unet", 3),
    "ResidualUNetSE3D": ("residual_se_unet", 3),
    "UNet2D": ("unet", 2),
    "ResidualUNet2D": ("residual_unet", 2),
}
# Settings pytorch-3dunet lets a config change but that only its defaults are supported for here.
_FIXED = {"conv_padding": 1, "conv_upscale": 2}
# Keys pytorch-3dunet 1.9.6's network constructors take in **kwargs and never use: its networks always have these.
_SWALLOWED = {"conv_kernel_size": 3, "pool_kernel_size": 2}
_KNOWN = {
    "name", "in_channels", "out_channels", "f_maps", "num_levels", "layer_order", "num_groups", "final_sigmoid",
    "is_segmentation", "upsample", "dropout_prob", *_FIXED, *_SWALLOWED,
}

# Their parameter names → ours (see architectures.py): block internals first, then the level prefixes.
_BLOCK_RENAMES = [
    (r"\.SingleConv1\.", ".0."),  # DoubleConv
    (r"\.SingleConv2\.", ".1."),
    (r"\.conv1\.(weight|bias)$", r".project.\1"),  # ResNetBlock: 1x1 projection, then the two convolutions
    (r"\.conv2\.", ".conv1."),
    (r"\.conv3\.", ".conv2."),
    (r"\.se_module\.cSE\.fc([12])\.", r".se.fc\1."),  # ResNetBlockSE's scSE
    (r"\.se_module\.sSE\.conv\.", ".se.spatial."),
]
_LEVEL_RENAMES = [
    (r"^encoders\.(\d+)\.basic_module\.", r"encoders.\1."),
    (r"^decoders\.(\d+)\.basic_module\.", r"decoders.\1.block."),
    # 1.9: TransposeConvUpsampling wraps the layer as upsample.conv_transposed; earlier releases as upsample.
    (r"^decoders\.(\d+)\.upsampling\.upsample\.(?:conv_transposed\.)?(weight|bias)$", r"decoders.\1.up.\2"),
]


# pytorch-3dunet's regression losses (its `loss.name`) → ours.
REGRESSION_LOSSES = {"MSELoss": "mse", "L1Loss": "l1", "SmoothL1Loss": "smooth_l1"}


def model_settings(
    model: dict[str, Any], source: str = "config", loss: Any = None
) -> tuple[dict[str, Any], list[str]]:
    """Our ``model`` hyperparameters for pytorch-3dunet's ``model`` config section, and notes for the user.

    ``loss`` is the config's top-level ``loss`` section (default None), read only for regression networks
    (``is_segmentation: false``), whose loss it names.

    Raises:
        ConfigurationError: an unsupported network or setting, naming it.
    """
    if not isinstance(model, dict):
        raise ConfigurationError(f"{source}: has no 'model' section (pytorch-3dunet's training config has one)")
    name = model.get("name")
    if name not in SUPPORTED_MODELS:
        raise ConfigurationError(
            f"{source}: model.name {name!r} is not supported; supported: {', '.join(SUPPORTED_MODELS)}"
        )
    architecture, spatial_dims = SUPPORTED_MODELS[name]
    notes = []
    unknown = sorted(set(model) - _KNOWN)
    if unknown:
        # pytorch-3dunet 1.9 takes any other key and ignores it (older configs carry e.g. `testing`); a key that did
        # change the network in some release shows as weights that do not fit, below.
        notes.append(f"model settings {unknown} ignored (pytorch-3dunet 1.9 ignores them too)")
    for key, default in _FIXED.items():
        value = model.get(key, default)
        if value != default and not (isinstance(value, (list, tuple)) and set(value) == {default}):
            why = (f" ({name} does pass it to its 3x3x3 convolutions, unlike conv_kernel_size and pool_kernel_size, "
                   "and only padding 1 keeps their output the input's size, as every network here does)"
                   if key == "conv_padding" else "")
            raise ConfigurationError(
                f"{source}: model.{key}={value!r} is not supported; only pytorch-3dunet's default {default} is{why}"
            )
    swallowed = {
        key: model[key] for key in _SWALLOWED if key in model and not _all_equal_to(model[key], _SWALLOWED[key])
    }
    if swallowed:
        given = ", ".join(f"{key}={value!r}" for key, value in swallowed.items())
        notes.append(
            f"model.{given} ignored, as pytorch-3dunet 1.9.6's {name} ignores it (its constructor takes it in **kwargs "
            "and never passes it on): the trained network convolves 3 and pools 2 on every axis, and so does the "
            "imported one"
        )
    for key in ("in_channels", "out_channels"):
        _positive_int(model.get(key), key, source)
    for key in ("is_segmentation", "final_sigmoid"):
        if not isinstance(model.get(key, True), bool):
            raise ConfigurationError(f"{source}: model.{key} must be true or false, got {model[key]!r}")
    if not isinstance(model.get("layer_order", "gcr"), str):
        raise ConfigurationError(
            f"{source}: model.layer_order must be a string of layer letters such as gcr, got {model['layer_order']!r}"
        )
    order = str(model.get("layer_order", "gcr"))
    dropout = _dropout(model, order, architecture, name, source, notes)
    upsample = model.get("upsample", "default")
    if architecture == "unet":
        modes = {"default": "interpolate", "nearest": "interpolate", "deconv": "deconv"}
    else:
        modes = {"default": "deconv"}
    if upsample not in modes:
        raise ConfigurationError(
            f"{source}: model.upsample={upsample!r} is not supported for {name}; supported: {', '.join(modes)}"
        )
    f_maps = model.get("f_maps", 64)
    default_levels = 4 if architecture == "unet" else 5
    if isinstance(f_maps, (list, tuple)) and f_maps:
        f_maps, num_levels = [_positive_int(c, "f_maps", source) for c in f_maps], len(f_maps)
    else:
        _positive_int(f_maps, "f_maps", source, "or a list of them, one per level")
        num_levels = _positive_int(model.get("num_levels", default_levels), "num_levels", source)
    num_groups = model.get("num_groups")
    if num_groups is not None:
        _positive_int(num_groups, "num_groups", source, "or null")
    final_sigmoid = model.get("final_sigmoid", True)
    settings = {
        "architecture": architecture,
        "spatial_dims": spatial_dims,
        "variant": "pytorch3dunet",
        "in_channels": model["in_channels"],
        "out_channels": model["out_channels"],
        "f_maps": f_maps,
        "num_levels": num_levels,
        "layer_order": order,
        "num_groups": num_groups or 8,  # null in configs without GroupNorm
        "upsample": modes[upsample],
        # pytorch-3dunet's final activation: sigmoid masks (its BCE-style training) or a softmax over classes.
        "loss": "bce" if final_sigmoid else "ce",
        "multiclass": not final_sigmoid,
    }
    if dropout is not None:
        settings["dropout"] = dropout
    if not model.get("is_segmentation", True):
        settings.update(_regression_settings(loss, source, notes))
    return settings, notes


def _all_equal_to(value: Any, default: int) -> bool:
    """Whether a kernel setting (an int or nested lists of them) is ``default`` everywhere."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_all_equal_to(v, default) for v in value)
    return value == default


def _dropout(model: dict[str, Any], order: str, architecture: str, name: str, source: str,
             notes: list[str]) -> float | list[float] | None:
    """Our ``model.dropout`` for pytorch-3dunet's ``dropout_prob`` and the ``d``/``D`` letters of ``order``, as its
    1.9.6 networks use them: the double convolutions of ``UNet*`` take ``dropout_prob`` (one value or one per
    convolution), the residual blocks always 0.1 (``ResNetBlock`` builds its convolutions without passing it on);
    without a dropout letter there is no dropout layer at all (None)."""
    given = model.get("dropout_prob", 0.1)
    values = given if isinstance(given, (list, tuple)) else [given]
    if len(values) not in (1, 2) or not all(
            isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in values):
        raise ConfigurationError(
            f"{source}: model.dropout_prob must be a probability in [0, 1] or a pair of them, got {given!r}"
        )
    if not any(letter in order for letter in "dD"):
        if "dropout_prob" in model:
            notes.append(f"model.dropout_prob ignored: layer_order {order!r} has no dropout layer (d/D), in "
                         "pytorch-3dunet as here")
        return None
    if architecture != "unet":
        if any(float(p) != 0.1 for p in values):
            notes.append(f"model.dropout_prob={given!r}: {name}'s residual blocks ignore it and drop out with 0.1 "
                         "(pytorch-3dunet 1.9.6), so the imported model has dropout 0.1 (active only in training)")
        return 0.1
    dropout = [float(p) for p in values] if len(values) == 2 else float(values[0])
    notes.append(f"layer_order {order!r}: dropout {dropout} kept (model.dropout; active only in training, never at "
                 "prediction)")
    return dropout


def _regression_settings(loss: Any, source: str, notes: list[str]) -> dict[str, Any]:
    """The loss (and ignore value) of a pytorch-3dunet regression network (``is_segmentation: false``): its output
    has no final activation, which our regression losses mean too."""
    section = loss if isinstance(loss, dict) else {}
    name = section.get("name")
    ours = REGRESSION_LOSSES.get(name)
    if ours is None:
        what = f"loss {name!r} has no counterpart here" if name else "the config names no loss"
        notes.append(
            f"regression network (is_segmentation: false): {what}; imported with loss mse (the loss matters only "
            f"for fine-tuning; choose one of {', '.join(REGRESSION_LOSSES)} in the config to set it)"
        )
        ours = "mse"
    ignore = section.get("ignore_index")
    if ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int)):
        raise ConfigurationError(f"{source}: loss.ignore_index must be an integer or null, got {ignore!r}")
    return {"loss": ours, "multiclass": None, "ignore_index": ignore}


def _positive_int(value: Any, key: str, source: str, alternative: str = "") -> int:
    """``value`` if it is an integer >= 1 (YAML's true/false are not), else a ConfigurationError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        also = f" {alternative}" if alternative else ""
        raise ConfigurationError(f"{source}: model.{key} must be a positive integer{also}, got {value!r}")
    return value


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pytorch-3dunet's parameter names → ours (without the module's ``net.`` prefix); ``module.`` prefixes of
    ``nn.DataParallel`` are dropped. Names that match no rule are kept (``final_conv.*`` is the same in both)."""
    out = {}
    for key, value in state_dict.items():
        new = key[len("module."):] if key.startswith("module.") else key
        for pattern, replacement in _LEVEL_RENAMES:
            new = re.sub(pattern, replacement, new)
        if new.startswith(("encoders.", "decoders.")):
            for pattern, replacement in _BLOCK_RENAMES:
                new = re.sub(pattern, replacement, new)
        out[new] = value
    return out


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a pytorch-3dunet checkpoint (``model_state_dict``, or a bare state dict)."""
    if path.is_dir():
        raise ConfigurationError(f"model_path {path}: is a directory; give pytorch-3dunet's best_checkpoint.pytorch")
    if not path.is_file():
        raise ConfigurationError(f"model_path {path}: file does not exist")
    try:
        checkpoint = load_file(path)
    except CheckpointReadError as err:
        if err.reason in ("unreadable", "missing", "directory"):
            raise ConfigurationError(f"model_path {path}: cannot be read ({err.detail or err.reason})") from None
        if _is_yaml_mapping(path):
            raise ConfigurationError(
                f"model_path {path}: is a YAML file (a config?), not a PyTorch checkpoint; give pytorch-3dunet's "
                "best_checkpoint.pytorch as --model_path and its training config as --config"
            ) from None
        if err.reason == "python_objects":
            # torch's advice is weights_only=False, i.e. running whatever code the file holds: never for a download.
            found = re.search(r"Unsupported global: GLOBAL (\S+)", err.detail)
            what = f" such as {found.group(1)}" if found else ""
            raise ConfigurationError(
                f"model_path {path}: cannot be read safely: it holds Python objects{what} besides tensors and "
                "settings; give pytorch-3dunet's best_checkpoint.pytorch, or re-save only its model_state_dict"
            ) from None
        raise ConfigurationError(
            f"model_path {path}: cannot be read as a PyTorch checkpoint (truncated, or another format); give "
            "pytorch-3dunet's best_checkpoint.pytorch"
        ) from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model_state_dict"), dict):
        checkpoint = checkpoint["model_state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint or \
            not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        keys = sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConfigurationError(
            f"model_path {path}: holds no 'model_state_dict' (found {keys}); give pytorch-3dunet's "
            "best_checkpoint.pytorch or last_checkpoint.pytorch"
        )
    return checkpoint


def _is_yaml_mapping(path: Path) -> bool:
    """Whether ``path`` is a small text file holding a YAML mapping: a config given where a checkpoint belongs."""
    import yaml

    try:
        if path.stat().st_size > 2**20:
            return False
        return isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False


def read_config(path: Path) -> dict[str, Any]:
    """pytorch-3dunet's training config, read as ``unet3d`` reads its own: a key given twice is an error naming the
    file and lines (PyYAML would keep the last one silently, and the weights would then not fit)."""
    import yaml

    from .config_files import UniqueKeyLoader, yaml_problem

    if path.is_dir():
        raise ConfigurationError(f"config {path}: is a directory; give pytorch-3dunet's training config (a YAML file)")
    if not path.is_file():
        raise ConfigurationError(f"config {path}: file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"config {path}: is not a text (YAML) file; is it the checkpoint? That one goes to --model_path"
        ) from None
    except OSError as err:
        raise ConfigurationError(f"config {path}: cannot be read ({err.strerror or err})") from None
    try:
        config = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigurationError(f"config {path}:{yaml_problem(err)}") from None
    if not isinstance(config, dict):
        raise ConfigurationError(f"config {path}: is not a YAML mapping with a 'model' section")
    return config


def import_pytorch3dunet(
    model_path: str | Path, config: str | Path, output: str | Path, overwrite: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """Convert pytorch-3dunet's checkpoint ``model_path`` trained with ``config`` into our checkpoint ``output``.

    Args:
        model_path: pytorch-3dunet's ``best_checkpoint.pytorch`` (or ``last_checkpoint.pytorch``).
        config: its training config (YAML with a ``model`` section).
        output: the checkpoint to write; written to a temporary name in the same directory and renamed when complete.
        overwrite: replace an existing ``output``. Default False: an existing file is an error.

    Returns:
        The model hyperparameters written, and notes for the user (settings dropped on the way).

    Raises:
        ConfigurationError: unreadable inputs, an unsupported network or setting, weights that do not fit it.
    """
    import lightning

    from .module import UNet3DModule

    model_path, config, output = Path(model_path), Path(config), Path(output)
    if output.is_dir():
        raise ConfigurationError(
            f"output {output} is a directory; give the checkpoint file to write, e.g. {output / 'model.ckpt'}"
        )
    if output.exists() and not output.is_file():
        raise ConfigurationError(f"output {output} exists and is not a regular file; choose another name")
    if output.exists() and not overwrite:
        raise ConfigurationError(f"output {output} already exists; choose another name or pass --overwrite")
    if output.exists() and output.resolve() in (model_path.resolve(), config.resolve()):
        raise ConfigurationError(f"output {output} is one of the inputs; choose another name")
    if not output.parent.is_dir():
        raise ConfigurationError(f"output {output}: directory {output.parent} does not exist")
    config_data = read_config(config)
    settings, notes = model_settings(config_data.get("model"), f"config {config}", config_data.get("loss"))
    weights = convert_state_dict(read_state_dict(model_path))
    try:
        module = UNet3DModule(**settings)
    except ConfigurationError as err:
        raise ConfigurationError(f"config {config}: {err}") from None
    missing, unexpected = _compare(module.net.state_dict(), weights)
    if missing or unexpected:
        raise ConfigurationError(
            f"model_path {model_path}: its weights do not fit the {settings['architecture']} network of config "
            f"{config} (missing {missing[:3]}, unexpected {unexpected[:3]}); is it the config it was trained with?"
        )
    try:
        module.net.load_state_dict(weights)
    except RuntimeError as err:
        mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise ConfigurationError(
            f"model_path {model_path}: weights do not fit config {config}: {mismatch}"
        ) from None
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "imported_from": {"pytorch3dunet_model_path": str(model_path), "config": str(config)},
    }
    try:
        _save_atomically(checkpoint, output)
    except OSError as err:
        raise ConfigurationError(f"output {output}: cannot be written ({err.strerror or err})") from None
    return settings, notes


def _save_atomically(checkpoint: dict[str, Any], output: Path) -> None:
    """``torch.save`` to a new temporary name beside ``output``, then rename: an interrupted import never leaves a
    truncated checkpoint. The file is created as ``open()`` creates one (mode 0666 less the umask, as Lightning's
    checkpoints are), not owner-only as ``tempfile.mkstemp`` makes it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = output.with_name(f".{output.name}.{secrets.token_hex(4)}.tmp")
        try:
            handle = os.open(temporary, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
        os.replace(temporary, output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _compare(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[list[str], list[str]]:
    return sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unet3d import-pytorch3dunet",
        description="Convert a model trained with pytorch-3dunet (its checkpoint and training config) into a "
        "checkpoint that 'unet3d predict --ckpt_path' uses.",
    )
    parser.add_argument("--model_path", required=True, help="pytorch-3dunet's best_checkpoint.pytorch")
    parser.add_argument("--config", required=True, help="its training config (train_config.yml)")
    parser.add_argument("--output", required=True, help="the checkpoint to write, e.g. model.ckpt")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def main(args: list[str] | None = None) -> None:
    """``unet3d import-pytorch3dunet``; ``args`` replaces the arguments after the subcommand."""
    parsed = build_parser().parse_args(args)
    try:
        settings, notes = import_pytorch3dunet(parsed.model_path, parsed.config, parsed.output, parsed.overwrite)
    except ConfigurationError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    patch = "[1,Y,X]" if settings["spatial_dims"] == 2 else "[Z,Y,X]"
    # Quoted as a shell needs it: brackets are glob patterns there.
    print(f"wrote {parsed.output} ({settings['architecture']}, {settings['spatial_dims']}D); predict with: unet3d "
          f"predict --ckpt_path {shlex.quote(parsed.output)} --data.predict_paths '[VOLUME.h5]' "
          f"--data.predict_patch_shape '{patch}'", file=sys.stderr)
