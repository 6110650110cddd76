"""``unet3d export``: a trained model as TorchScript, ONNX or a bioimage.io model package.

Usage::

    unet3d export --ckpt_path best.ckpt --output model.pt          # TorchScript (format from the suffix)
    unet3d export --ckpt_path best.ckpt --output model.onnx        # ONNX (opset 17 by default)
    unet3d export --ckpt_path best.ckpt --output model.zip         # bioimage.io package (all three weight formats)
    unet3d export --ckpt_path best.ckpt --format onnx --output exported/model

What every format holds is the same graph (:class:`~unet3d_lightning.networks.packaged.PackagedUNet`): the plain
network in eval mode followed by the model's final activation. Its input is the *normalised* raw patch
``(N, in_channels, D, H, W)`` float32 (normalised as the checkpoint's ``data.normalization`` says; the bioimage.io
package states that as its preprocessing), its output what ``unet3d predict`` writes per patch: the probabilities
after the softmax / sigmoid (a model without final activation: its raw outputs), ``(N, out_channels, D, H, W)``.
Batch and spatial sizes are dynamic; valid spatial sizes are multiples of the network's per-axis divisor
(:func:`spatial_divisor`: ``2 ** (num_levels - 1)`` for the default pooling; z of a 2D network: any size).

The graph is traced from the network itself, never from the prediction path: the CPU kernel routing of
:mod:`unet3d_lightning.prediction.engine` exists only while ``unet3d predict`` runs, so the exported files hold only
standard operators (TorchScript ``aten::`` ops, ONNX's default domain).
"""

from __future__ import annotations

import argparse
import inspect
import os
import secrets
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigurationError

FORMATS = ("torchscript", "onnx", "bioimageio")
SUFFIXES = {".pt": "torchscript", ".onnx": "onnx", ".zip": "bioimageio"}
# opset 17: run by onnxruntime's CPU and CUDA providers since 1.14 and by TensorRT 8.6+; the TorchScript-based
# exporter writes max pooling with ceil_mode and nearest resizing there as standard ops.
DEFAULT_OPSET = 17
# Resize (nearest upsampling to a size) needs opset 11; 20 is the newest the TorchScript-based exporter writes.
OPSETS = range(11, 21)
INPUT_NAME = "raw"
OUTPUT_NAME = "prediction"
EXPORT_EXTRA = "pip install 'unet3d-lightning[export]'"


# ----------------------------------------------------------------------------------------------- the model
def load_module(ckpt_path: str | Path) -> Any:
    """The :class:`~unet3d_lightning.module.UNet3DModule` of a checkpoint (``unet3d fit``'s, an imported one, or a
    bioimage.io package that ``unet3d predict`` reads), in eval mode with its weights.

    Raises:
        ConfigurationError: not a unet3d checkpoint, or settings and weights that do not make a model.
    """
    from .checkpoints import foreign_settings, load_checkpoint_weights, read_checkpoint
    from .module import UNet3DModule

    hparams = dict(read_checkpoint(ckpt_path).get("hyper_parameters") or {})
    for key in ("_instantiator", "_class_path"):
        hparams.pop(key, None)
    foreign = foreign_settings(hparams, UNet3DModule)
    if foreign is not None:
        raise ConfigurationError(f"ckpt_path {ckpt_path}: {foreign}; give a .ckpt written by unet3d fit")
    # The optimizer and schedule do not take part in the exported graph (and may name classes of other programs).
    for key in ("optimizer", "lr_scheduler"):
        hparams.pop(key, None)
    try:
        module = UNet3DModule(**hparams)
    except (ConfigurationError, TypeError, ValueError) as err:
        raise ConfigurationError(
            f"ckpt_path {ckpt_path}: its hyper_parameters do not make a model ({err}); give a .ckpt as unet3d fit "
            "wrote it"
        ) from None
    load_checkpoint_weights(ckpt_path, module)
    return module.eval()


def network_arguments(hparams: dict[str, Any]) -> dict[str, Any]:
    """The module's settings that build its network (the arguments of ``networks.build_network`` but
    ``architecture`` and ``spatial_dims``), as plain data."""
    from .checkpoints import plain
    from .networks import build_network

    names = set(inspect.signature(build_network).parameters) - {"architecture", "spatial_dims"}
    # None means "the default" (e.g. a dropout probability): the network's own default then applies.
    return {k: plain(v) for k, v in hparams.items() if k in names and v is not None}


def activation_name(module: Any) -> str | None:
    """``"softmax"``, ``"sigmoid"`` or None (no final activation): how the module turns its network's output into
    what prediction writes; checked against ``module.final_activation`` by :func:`packaged_network`."""
    name = getattr(module, "activation", None)
    return name if name in ("softmax", "sigmoid") else None


def spatial_divisor(module: Any) -> tuple[int, int, int]:
    """Per axis (z, y, x), what every spatial size of the exported graph must be a multiple of: the product of the
    network's pooling factors along that axis over its ``num_levels - 1`` poolings. A 2D network pools only y and x.

    The pooling is read from the module's ``pool_kernel_size`` setting where it has one (an int for every axis, one
    per axis, or one per axis per level), else it is 2 along every pooled axis. At these sizes every level is
    halved exactly, so the sizes that the trace records for the upsampling (output padding, target size) hold at
    every valid size.
    """
    divisor = getattr(module, "patch_divisor", None)  # the module's own rule, where it has one
    if divisor is not None:
        return tuple(int(d) for d in divisor)
    hparams = dict(getattr(module, "hparams", {}) or {})
    levels = len(getattr(module.net, "encoders", ())) or int(hparams.get("num_levels", 4))
    dims = int(hparams.get("spatial_dims", 3))
    kernel = hparams.get("pool_kernel_size", 2)
    if kernel is None:
        kernel = 2
    if isinstance(kernel, int):
        per_level = [[kernel] * dims] * (levels - 1)
    elif all(isinstance(k, int) for k in kernel):
        per_level = [list(kernel)] * (levels - 1)
    else:
        per_level = [list(k) for k in kernel][: levels - 1]
    divisor = [1] * dims
    for factors in per_level:
        factors = list(factors) if len(factors) == dims else [factors[0]] * dims
        divisor = [d * int(f) for d, f in zip(divisor, factors)]
    return tuple(divisor) if dims == 3 else (1, *divisor)


def packaged_network(module: Any) -> torch.nn.Module:
    """The exported graph's module: :class:`PackagedUNet` with the module's network weights, in eval mode, checked
    to compute ``module.final_activation(module(x))`` (within 1e-5) on a random input.

    Raises:
        ConfigurationError: a model the exported graph cannot express (another architecture or final activation).
    """
    from .networks.packaged import ARCHITECTURE_BLOCKS, PackagedUNet

    hparams = dict(module.hparams)
    architecture = hparams.get("architecture", "unet")
    if architecture not in ARCHITECTURE_BLOCKS:
        raise ConfigurationError(
            f"model.architecture {architecture!r} cannot be exported; supported: {', '.join(ARCHITECTURE_BLOCKS)}"
        )
    packaged = PackagedUNet(
        architecture, activation_name(module), int(hparams.get("spatial_dims", 3)), **network_arguments(hparams)
    )
    packaged.net.load_state_dict(module.net.state_dict())
    packaged.eval()
    x = example_input(module, batch=1, scale=2)
    with torch.no_grad():
        module.input_memory_format = None
        expected = module.final_activation(module(x))
        got = packaged(x)
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-5, rtol=0):
        raise ConfigurationError(
            f"the exported network does not compute what unet3d predict computes for this model (architecture "
            f"{architecture!r}, final activation {activation_name(module)!r}); it cannot be exported"
        )
    return packaged


def example_input(module: Any, batch: int = 1, scale: int = 2, seed: int = 0) -> torch.Tensor:
    """A random normalised input ``(batch, in_channels, *(scale * divisor))``; z of a 2D network is ``scale``."""
    divisor = spatial_divisor(module)
    shape = (batch, int(module.hparams.get("in_channels", 1)), *(scale * d for d in divisor))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- the formats
@contextmanager
def _quiet_trace() -> Iterator[None]:
    # The tracer warns about the network's Python checks (input dimensions, sizes): they hold at every valid size.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*(legacy TorchScript-based ONNX export|dynamo=False).*")
        # torch 2.9+ deprecates TorchScript in favour of torch.export, whose files need torch to run them; TorchScript
        # is what inference servers and bioimage.io tools load.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.(onnx|jit)")
        yield


def trace(packaged: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of the packaged network (no gradients; the tracer's own re-run check is replaced by the
    checks of :func:`export_torchscript`)."""
    with torch.no_grad(), _quiet_trace():
        return torch.jit.trace(packaged, example, check_trace=False)


def export_torchscript(packaged: torch.nn.Module, example: torch.Tensor, output: Path) -> None:
    """Write the TorchScript of ``packaged`` traced on ``example`` to ``output`` (atomically)."""
    traced = trace(packaged, example)
    with _written(output) as temporary, _quiet_trace():
        torch.jit.save(traced, str(temporary))


def export_onnx(packaged: torch.nn.Module, example: torch.Tensor, output: Path, opset: int = DEFAULT_OPSET) -> None:
    """Write ``packaged`` as ONNX (``opset``, dynamic batch and spatial axes) to ``output`` (atomically), checked
    with ``onnx.checker``.

    Raises:
        ConfigurationError: the ``export`` extra (onnx) is missing.
    """
    onnx = require("onnx", "ONNX export")
    axes = {0: "batch", 2: "z", 3: "y", 4: "x"}
    with _written(output) as temporary:
        with torch.no_grad(), _quiet_trace():
            torch.onnx.export(
                packaged, (example,), str(temporary), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, do_constant_folding=True,
            )
        try:
            onnx.checker.check_model(str(temporary), full_check=True)
        except Exception as err:  # noqa: BLE001 - onnx raises its own ValidationError and others
            raise ConfigurationError(f"output {output}: the ONNX graph fails onnx.checker: {err}") from None


def require(name: str, purpose: str) -> Any:
    """Import the module ``name`` of the ``export`` extra, or a ConfigurationError naming the extra."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigurationError(
            f"{purpose} needs the 'export' extra ({name} is not installed): {EXPORT_EXTRA}"
        ) from None


@contextmanager
def _written(output: Path) -> Iterator[Path]:
    """A new temporary name beside ``output``, renamed to ``output`` when the block completes (removed if it
    fails): an interrupted export never leaves a partial file under the final name."""
    temporary = temporary_beside(output)
    try:
        yield temporary
        os.replace(temporary, output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def temporary_beside(output: Path) -> Path:
    """A new, empty file ``.<name>.<random>.tmp`` beside ``output`` (mode 0666 less the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = output.with_name(f".{output.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temporary, flags, 0o666))
            return temporary
        except FileExistsError:
            continue


# ----------------------------------------------------------------------------------------------- the command
def format_of(output: Path, given: str | None) -> str:
    """The format: ``given``, else the one of the suffix of ``output`` (``.pt``, ``.onnx``, ``.zip``)."""
    if given is not None:
        return given
    fmt = SUFFIXES.get(output.suffix.lower())
    if fmt is None:
        raise ConfigurationError(
            f"output {output}: cannot tell the format from the suffix {output.suffix!r}; name it .pt (TorchScript), "
            ".onnx or .zip (bioimage.io package), or pass --format torchscript|onnx|bioimageio"
        )
    return fmt


def check_output(output: Path, ckpt_path: Path, overwrite: bool) -> None:
    """An output that can be written: not a directory, not an input, new unless ``overwrite``."""
    if output.is_dir():
        raise ConfigurationError(f"output {output} is a directory; give the file to write, e.g. {output / 'model.pt'}")
    if output.exists() and not output.is_file():
        raise ConfigurationError(f"output {output} exists and is not a regular file; choose another name")
    if output.exists() and output.resolve() == ckpt_path.resolve():
        raise ConfigurationError(f"output {output} is the checkpoint itself; choose another name")
    if output.exists() and not overwrite:
        raise ConfigurationError(f"output {output} already exists; choose another name or pass --overwrite")
    if not output.parent.is_dir():
        raise ConfigurationError(f"output {output}: directory {output.parent} does not exist")


def export(
    ckpt_path: str | Path, output: str | Path, format: str | None = None, overwrite: bool = False,  # noqa: A002
    opset: int = DEFAULT_OPSET, log: Callable[[str], None] | None = None, name: str | None = None,
    authors: list[str] | None = None, voxel_size: list[float] | None = None, unit: str | None = None,
) -> str:
    """Export the model of ``ckpt_path`` to ``output``; returns the format written.

    Args:
        ckpt_path: a checkpoint written by ``unet3d fit`` (or ``unet3d import-pytorch3dunet``).
        output: the file to write (a temporary name beside it, renamed when complete).
        format: ``"torchscript"``, ``"onnx"`` or ``"bioimageio"``. Default None: from the suffix of ``output``.
        overwrite: replace an existing ``output``. Default False: an existing file is an error.
        opset: the ONNX opset (ONNX and bioimage.io). Default :data:`DEFAULT_OPSET`.
        log: where progress lines go. Default None: nowhere.
        name, authors: the bioimage.io package's model name and author names. Default None: ``"unet3d <checkpoint
            stem>"`` and the user's login name.
        voxel_size, unit: the bioimage.io package's voxel size ``[z, y, x]`` and its unit (e.g. ``"micrometer"``).
            Default None: not stated (scale 1, no unit).

    Raises:
        ConfigurationError: bad arguments, an unreadable checkpoint, a model that cannot be exported, a missing
            ``export`` extra.
    """
    ckpt_path, output = Path(ckpt_path), Path(output)
    fmt = format_of(output, format)
    if fmt not in FORMATS:
        raise ConfigurationError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    check_output(output, ckpt_path, overwrite)
    if fmt != "torchscript" and opset not in OPSETS:
        raise ConfigurationError(
            f"opset {opset} is not supported; choose one from {OPSETS.start} to {OPSETS.stop - 1} (default "
            f"{DEFAULT_OPSET}, which onnxruntime runs on CPU and CUDA)"
        )
    if fmt == "bioimageio":
        require("bioimageio.spec", "a bioimage.io package")
        require("onnx", "a bioimage.io package (its ONNX weights)")
    if fmt == "onnx":
        require("onnx", "ONNX export")
    module = load_module(ckpt_path)
    packaged = packaged_network(module)
    example = example_input(module)
    if fmt == "torchscript":
        export_torchscript(packaged, example, output)
    elif fmt == "onnx":
        export_onnx(packaged, example, output, opset)
    else:
        from .bioimage import export_package

        export_package(ckpt_path, module, packaged, output, opset=opset, log=log, name=name, authors=authors,
                       voxel_size=voxel_size, unit=unit)
    return fmt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unet3d export",
        description="Export a trained model (network + final activation, on normalised input) as TorchScript, ONNX "
        "or a bioimage.io model package.",
    )
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint, e.g. best.ckpt")
    parser.add_argument("--output", required=True, help="the file to write: model.pt, model.onnx or model.zip")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="torchscript, onnx or bioimageio; default: from the suffix of --output")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    package = parser.add_argument_group("bioimage.io package")
    package.add_argument("--name", default=None, help="the model's name (default: unet3d <checkpoint name>)")
    package.add_argument("--authors", nargs="+", default=None, help="author names (default: your login name)")
    package.add_argument("--voxel_size", nargs=3, type=float, default=None, metavar=("Z", "Y", "X"),
                         help="voxel size of the training data along z, y, x")
    package.add_argument("--unit", default=None, help="unit of --voxel_size, e.g. micrometer or nanometer")
    return parser


def main(args: list[str] | None = None) -> None:
    """``unet3d export``; ``args`` replaces the arguments after the subcommand."""
    from .errors import one_line

    parsed = build_parser().parse_args(args)
    try:
        fmt = export(parsed.ckpt_path, parsed.output, parsed.format, parsed.overwrite, parsed.opset,
                     log=lambda line: print(line, file=sys.stderr), name=parsed.name, authors=parsed.authors,
                     voxel_size=parsed.voxel_size, unit=parsed.unit)
    except ConfigurationError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {parsed.output} ({fmt}): input the normalised raw (N, C, D, H, W) float32, output the "
          "prediction after the final activation", file=sys.stderr)
