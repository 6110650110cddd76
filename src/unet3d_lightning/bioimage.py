"""bioimage.io model packages: ``unet3d export --format bioimageio`` writes one, ``unet3d predict --ckpt_path
package.zip`` (or its ``rdf.yaml``) predicts with one.

A package (spec 0.5, built and checked with ``bioimageio.spec``; the ``export`` extra) holds three weight formats of
one graph (:class:`~unet3d_lightning.networks.packaged.PackagedUNet`: the network and the model's final activation):

- ``pytorch_state_dict``: the weights, with the architecture as a *source file inside the package*
  (``unet3d_network.py``, the project's ``networks/blocks.py``, ``unet.py`` and ``packaged.py`` as one file that
  imports only torch) and its keyword arguments. A bioimage.io tool builds the network from that file, so neither
  this package nor any other library but torch has to be installed where the model is used (an ``import_from``
  naming ``unet3d_lightning`` would need it).
- ``torchscript`` and ``onnx``: the traced graph (see :mod:`unet3d_lightning.export`).

Input ``raw``: axes batch, channel, z, y, x; the spatial sizes ``min = step =`` the network's divisor per axis
(:func:`~unet3d_lightning.export.spatial_divisor`); the checkpoint's normalisation as preprocessing, per sample and
channel as ``unet3d`` applies it per volume: ``standardize`` → ``zero_mean_unit_variance`` over z, y, x;
``percentile`` → ``scale_range`` over z, y, x with the checkpoint's percentiles, then ``clip`` to [0, 1];
``none`` → nothing. Output ``prediction``: the same axes, sizes those of the input; the final activation is part of
the weights' graph, so there is no postprocessing. The test tensors are a random raw volume and the exported
graph's output for it after that preprocessing. The ``config.unet3d_lightning`` entry records the checkpoint's
settings: ``unet3d predict`` rebuilds the model from it exactly.

Reading a package (:func:`read_package`) needs ``bioimageio.spec`` and nothing from the network: the description
and the files are read from the zip archive (or the folder of ``rdf.yaml``), never downloaded. Besides our own
packages, those whose ``pytorch_state_dict`` architecture is one of pytorch-3dunet's networks
(``pytorch3dunet.unet3d.model.UNet3D`` and its kwargs: the form of PlantSeg's zoo models) are mapped as
``unet3d import-pytorch3dunet`` maps them (:mod:`unet3d_lightning.importers`).
"""

from __future__ import annotations

import getpass
import io
import tempfile
import typing
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigurationError

PACKAGE_YAML_NAMES = ("rdf.yaml", "bioimageio.yaml")
CONFIG_KEY = "unet3d_lightning"
ARCHITECTURE_FILE = "unet3d_network.py"
PYTORCH3DUNET_MODULE = "pytorch3dunet.unet3d.model"
CITATIONS = [
    ("Çiçek, Ö., Abdulkadir, A., Lienkamp, S. S., Brox, T., Ronneberger, O. 3D U-Net: Learning Dense Volumetric "
     "Segmentation from Sparse Annotation. MICCAI 2016.", "10.1007/978-3-319-46723-8_49"),
    ("Sudre, C. H., Li, W., Vercauteren, T., Ourselin, S., Cardoso, M. J. Generalised Dice Overlap as a Deep "
     "Learning Loss Function for Highly Unbalanced Segmentations. DLMIA 2017.", "10.1007/978-3-319-67558-9_28"),
]
_EPS = 1e-6  # bioimage.io's smallest allowed epsilon of zero_mean_unit_variance; unet3d floors std at 1e-8


# ----------------------------------------------------------------------------------------------- recognising one
def is_package(path: str | Path) -> bool:
    """Whether ``path`` is a bioimage.io package: a zip archive with an ``rdf.yaml`` / ``bioimageio.yaml`` at its top
    (a torch checkpoint is a zip archive too, without one), or such a YAML file itself."""
    path = Path(path)
    if path.name in PACKAGE_YAML_NAMES or path.name.endswith(".bioimageio.yaml"):
        return path.is_file()
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(name in PACKAGE_YAML_NAMES or name.endswith(".bioimageio.yaml") for name in names)


# ----------------------------------------------------------------------------------------------- writing one
def preprocessing_of(data_hparams: dict[str, Any]) -> list[Any]:
    """The bioimage.io preprocessing that does what the checkpoint's ``data.normalization`` does."""
    from bioimageio.spec.model import v0_5 as bm

    spatial = [bm.AxisId(a) for a in ("z", "y", "x")]
    normalization = data_hparams.get("normalization", "standardize")
    if normalization == "standardize":
        return [bm.ZeroMeanUnitVarianceDescr(kwargs=bm.ZeroMeanUnitVarianceKwargs(axes=spatial, eps=_EPS))]
    if normalization == "percentile":
        low, high = (float(p) for p in data_hparams.get("percentiles", (1.0, 99.0)))
        return [
            bm.ScaleRangeDescr(kwargs=bm.ScaleRangeKwargs(axes=spatial, min_percentile=low, max_percentile=high)),
            bm.ClipDescr(kwargs=bm.ClipKwargs(min=0.0, max=1.0)),
        ]
    if normalization == "none":
        return []
    raise ConfigurationError(f"data.normalization {normalization!r} has no bioimage.io preprocessing")


def preprocess(raw: np.ndarray, data_hparams: dict[str, Any]) -> np.ndarray:
    """``raw`` ``(N, C, D, H, W)`` preprocessed by the formulas of the bioimage.io spec for
    :func:`preprocessing_of`: per sample and channel ``(x - mean) / (std + eps)``, or ``(x - p_low) / (p_high - p_low
    + eps)`` clipped to [0, 1] (percentiles as ``numpy.percentile``, eps 1e-6)."""
    values = raw.astype(np.float64)
    normalization = data_hparams.get("normalization", "standardize")
    if normalization == "standardize":
        mean = values.mean(axis=(2, 3, 4), keepdims=True)
        std = values.std(axis=(2, 3, 4), keepdims=True)
        return ((values - mean) / (std + _EPS)).astype(np.float32)
    if normalization == "percentile":
        low, high = data_hparams.get("percentiles", (1.0, 99.0))
        p_low = np.percentile(values, low, axis=(2, 3, 4), keepdims=True)
        p_high = np.percentile(values, high, axis=(2, 3, 4), keepdims=True)
        return np.clip((values - p_low) / (p_high - p_low + _EPS), 0, 1).astype(np.float32)
    return values.astype(np.float32)


def channel_names(module: Any) -> tuple[list[str], list[str]]:
    """Names of the input and output channels: ``raw0..``; ``class0..`` (softmax), ``mask0..`` (sigmoid) or
    ``output0..`` (no final activation); instance targets name their channels by kind."""
    from .export import activation_name

    hparams = module.hparams
    inputs = [f"raw{i}" for i in range(int(hparams.get("in_channels", 1)))]
    prefix = {"softmax": "class", "sigmoid": "mask"}.get(activation_name(module), "output")
    targets = hparams.get("targets") or {}
    if isinstance(targets, dict) and targets.get("kind"):
        prefix = f"{targets['kind']}"
    return inputs, [f"{prefix}{i}" for i in range(int(hparams.get("out_channels", 1)))]


def readme(ckpt_path: Path, checkpoint: dict[str, Any], divisor: tuple[int, int, int], names: list[str]) -> str:
    """The package's documentation: what the model expects and returns, and how it was trained."""
    import yaml

    from .checkpoints import plain

    hparams = {k: plain(v) for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    data = plain(dict(checkpoint.get("datamodule_hyper_parameters") or {}))
    text = [
        f"# {ckpt_path.stem}: a U-Net trained with unet3d-lightning",
        "",
        "A 3D U-Net (Çiçek et al. 2016) trained with the losses of Sudre et al. 2017 by `unet3d fit`, exported by "
        f"`unet3d export` from `{ckpt_path.name}` (epoch {checkpoint.get('epoch', '?')}, step "
        f"{checkpoint.get('global_step', '?')}).",
        "",
        "## Input and output",
        "",
        "- input `raw`: float32 `(batch, channel, z, y, x)`, normalised as the preprocessing says (the training "
        f"run's `data.normalization`: {data.get('normalization', 'standardize')!r}); spatial sizes multiples of "
        f"{list(divisor)} (z, y, x).",
        f"- output `prediction`: `(batch, {len(names)}, z, y, x)`, channels {', '.join(names)}: the network's output "
        "after its final activation (probabilities), what `unet3d predict` writes; no postprocessing.",
        "- weights: `pytorch_state_dict` (architecture `unet3d_network.py`, self-contained, only torch), "
        "`torchscript`, `onnx`: one graph.",
        "",
        "## Training configuration",
        "",
        "Model (`model.*`):",
        "",
        "```yaml",
        yaml.safe_dump(hparams, sort_keys=True, default_flow_style=None).rstrip(),
        "```",
        "",
        "Data (`data.*`):",
        "",
        "```yaml",
        yaml.safe_dump(data, sort_keys=True, default_flow_style=None).rstrip() if data else "{}",
        "```",
        "",
        "## Citations",
        "",
        *(f"- {text_} doi:{doi}" for text_, doi in CITATIONS),
        "",
    ]
    return "\n".join(text)


def export_package(
    ckpt_path: Path, module: Any, packaged: torch.nn.Module, output: Path, opset: int = 17,
    log: Callable[[str], None] | None = None, name: str | None = None, authors: list[str] | None = None,
    voxel_size: list[float] | None = None, unit: str | None = None,
) -> None:
    """Write the bioimage.io package of ``module`` (read from ``ckpt_path``; ``packaged`` its exported graph) to
    ``output`` (a zip archive, written to a temporary name and renamed when complete).

    Args:
        name: the model's name in the package. Default None: ``"unet3d <checkpoint stem>"``.
        authors: author names. Default None: the login name of the user.
        voxel_size: the voxel size ``[z, y, x]`` of the data the model was trained on, stated as the spatial axes'
            scale. Default None: 1.
        unit: the unit of ``voxel_size``, one of bioimage.io's space units (``"micrometer"``, ``"nanometer"``, ...).
            Default None: none stated.
    """
    import yaml
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as bm

    from .checkpoints import plain, read_checkpoint
    from .export import (
        INPUT_NAME,
        OUTPUT_NAME,
        _written,
        example_input,
        export_onnx,
        export_torchscript,
        network_arguments,
        spatial_divisor,
    )
    from .networks.packaged import standalone_source

    checkpoint = read_checkpoint(ckpt_path)
    hparams = {k: plain(v) for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    data_hparams = plain(dict(checkpoint.get("datamodule_hyper_parameters") or {}))
    data_hparams = {k: data_hparams[k] for k in ("normalization", "percentiles") if k in data_hparams}
    divisor = spatial_divisor(module)
    in_names, out_names = channel_names(module)
    recorded = checkpoint.get("voxel_size") if isinstance(checkpoint.get("voxel_size"), dict) else None
    if voxel_size is None and recorded and recorded.get("zyx"):
        # the voxel size of the training data, which fit records in the checkpoint; --voxel_size/--unit override
        voxel_size = [float(v) for v in recorded["zyx"]]
        unit = unit if unit is not None else recorded.get("unit")
    if voxel_size is not None and (len(voxel_size) != 3 or min(voxel_size) <= 0):
        raise ConfigurationError(f"voxel_size {voxel_size}: give three positive numbers z y x")
    scales = [float(v) for v in voxel_size] if voxel_size is not None else [1.0] * 3
    units = sorted(typing.get_args(bm.SpaceUnit)) if hasattr(bm, "SpaceUnit") else []
    if unit is not None and units and unit not in units:
        raise ConfigurationError(f"unit {unit!r} is not a bioimage.io space unit; one of {', '.join(units)}")
    with tempfile.TemporaryDirectory(prefix=".unet3d-export-", dir=output.parent) as tmp:
        work = Path(tmp)
        example = example_input(module)
        if log:
            log("tracing the network (TorchScript, ONNX)")
        export_torchscript(packaged, example, work / "weights_torchscript.pt")
        export_onnx(packaged, example, work / "weights.onnx", opset)
        torch.save(packaged.state_dict(), work / "weights_state_dict.pt")
        (work / ARCHITECTURE_FILE).write_text(standalone_source(), encoding="utf-8")
        # Test tensors: a raw volume with an offset and a spread (as microscopy data), and the graph's output for it.
        rng = np.random.default_rng(0)
        shape = (1, len(in_names), *(2 * d if d > 1 else 2 for d in divisor))
        raw = rng.normal(100.0, 20.0, shape).astype(np.float32)
        with torch.no_grad():
            expected = packaged(torch.from_numpy(preprocess(raw, data_hparams))).numpy()
        np.save(work / "test_input.npy", raw)
        np.save(work / "test_output.npy", expected)
        (work / "README.md").write_text(readme(ckpt_path, checkpoint, divisor, out_names), encoding="utf-8")

        spatial_in = [
            bm.SpaceInputAxis(id=bm.AxisId(axis), size=bm.ParameterizedSize(min=d, step=d), scale=scale, unit=unit)
            for axis, d, scale in zip("zyx", divisor, scales)
        ]
        spatial_out = [
            bm.SpaceOutputAxis(id=bm.AxisId(axis), size=bm.SizeReference(tensor_id=bm.TensorId(INPUT_NAME),
                                                                         axis_id=bm.AxisId(axis)),
                              scale=scale, unit=unit)
            for axis, scale in zip("zyx", scales)
        ]
        probabilities = module.hparams.get("targets") is None and out_names[0].startswith(("class", "mask"))
        inputs = [bm.InputTensorDescr(
            id=bm.TensorId(INPUT_NAME), description="raw volume; preprocessing: the training run's normalisation",
            axes=[bm.BatchAxis(), bm.ChannelAxis(channel_names=[bm.Identifier(n) for n in in_names]), *spatial_in],
            test_tensor=bm.FileDescr(source=work / "test_input.npy"),
            data=bm.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=preprocessing_of(data_hparams),
        )]
        outputs = [bm.OutputTensorDescr(
            id=bm.TensorId(OUTPUT_NAME), description="the network's output after its final activation",
            axes=[bm.BatchAxis(), bm.ChannelAxis(channel_names=[bm.Identifier(n) for n in out_names]), *spatial_out],
            test_tensor=bm.FileDescr(source=work / "test_output.npy"),
            data=bm.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0) if probabilities else (None, None)),
        )]
        from .export import activation_name

        kwargs = {"architecture": hparams.get("architecture", "unet"), "activation": activation_name(module),
                  "spatial_dims": int(hparams.get("spatial_dims", 3)), **network_arguments(hparams)}
        version = bm.Version(torch.__version__.split("+")[0])
        weights = bm.WeightsDescr(
            pytorch_state_dict=bm.PytorchStateDictWeightsDescr(
                source=work / "weights_state_dict.pt", pytorch_version=version,
                architecture=bm.ArchitectureFromFileDescr(
                    source=work / ARCHITECTURE_FILE, callable=bm.Identifier("PackagedUNet"), kwargs=kwargs),
            ),
            torchscript=bm.TorchscriptWeightsDescr(
                source=work / "weights_torchscript.pt", pytorch_version=version, parent="pytorch_state_dict"),
            onnx=bm.OnnxWeightsDescr(source=work / "weights.onnx", opset_version=opset, parent="pytorch_state_dict"),
        )
        config = {CONFIG_KEY: yaml.safe_load(yaml.safe_dump(
            {"hyper_parameters": hparams, "datamodule_hyper_parameters": data_hparams}, allow_unicode=True))}
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no login name (containers)
            user = "unknown"
        try:
            description = bm.ModelDescr(
                name=name or f"unet3d {ckpt_path.stem}",
                description="3D U-Net (Çiçek et al. 2016) trained with unet3d-lightning; input the normalised raw "
                "volume, output the probabilities after the final activation.",
                authors=[bm.Author(name=a) for a in (authors or [user])],
                cite=[bm.CiteEntry(text=t, doi=bm.Doi(d)) for t, d in CITATIONS],
                license=bm.LicenseId("MIT"),
                documentation=bm.FileDescr(source=work / "README.md"),
                tags=["unet3d-lightning", "3d", "unet", "pytorch", "segmentation"],
                inputs=inputs, outputs=outputs, weights=weights, config=config,
            )
        except Exception as err:  # noqa: BLE001 - pydantic's ValidationError, listing every field
            raise ConfigurationError(f"the bioimage.io description is not valid: {err}") from None
        if log:
            log("writing the bioimage.io package")
        with _written(output) as temporary:
            # bioimageio.spec wants a .zip name: write inside the temporary directory, then move into place.
            package = work / "package.zip"
            save_bioimageio_package(description, output_path=package)
            package.replace(temporary)


# ----------------------------------------------------------------------------------------------- reading one
def read_package(path: str | Path) -> dict[str, Any]:
    """A bioimage.io package as a unet3d checkpoint (``state_dict``, ``hyper_parameters``,
    ``datamodule_hyper_parameters``; ``bioimageio_package`` the path), read offline.

    Raises:
        ConfigurationError: the export extra missing, an invalid package, or what it holds is not supported here
            (another architecture, no pytorch_state_dict weights, another preprocessing), naming it.
    """
    from .export import require

    require("bioimageio.spec", f"ckpt_path {path}: reading a bioimage.io package")
    from bioimageio.spec import InvalidDescr, load_model_description
    from bioimageio.spec.model import v0_5 as bm

    source = f"ckpt_path {path}"
    try:
        with warnings.catch_warnings():
            # Converting format 0.4 guesses output sizes it does not need here (unet3d's output has the input's).
            warnings.filterwarnings("ignore", category=UserWarning, module=r"bioimageio\.spec")
            description = load_model_description(Path(path), format_version="latest", perform_io_checks=False)
    except Exception as err:  # noqa: BLE001 - whatever bioimageio.spec raises on a broken archive
        raise ConfigurationError(f"{source}: not a readable bioimage.io model package ({err})") from None
    if isinstance(description, InvalidDescr) or not isinstance(description, bm.ModelDescr):
        summary = getattr(description, "validation_summary", None)
        errors = getattr(summary, "details", None) or []
        first = next((e for d in errors for e in getattr(d, "errors", [])), None)
        detail = f": {getattr(first, 'loc', '')} {getattr(first, 'msg', '')}" if first else ""
        raise ConfigurationError(f"{source}: not a valid bioimage.io model description{detail}")
    if len(description.inputs) != 1 or len(description.outputs) != 1:
        raise ConfigurationError(
            f"{source}: the model has {len(description.inputs)} inputs and {len(description.outputs)} outputs; unet3d "
            "predicts with models of one input and one output"
        )
    weights = description.weights.pytorch_state_dict
    if weights is None:
        present = [k for k, v in description.weights if v is not None]
        raise ConfigurationError(
            f"{source}: has no pytorch_state_dict weights (only {', '.join(present)}); unet3d predicts with "
            "pytorch_state_dict weights only"
        )
    config = description.config
    config = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config or {})
    own = config.get(CONFIG_KEY)
    state = torch.load(io.BytesIO(_read_bytes(weights.source, path)), map_location="cpu", weights_only=True)
    if isinstance(own, dict):
        return _own_checkpoint(source, own, state, path)
    return _pytorch3dunet_checkpoint(source, description, weights, state, path)


def _read_bytes(file_source: Any, package: str | Path) -> bytes:
    """The bytes of a file of the package, from the archive (or beside the YAML file), never from the network."""
    name = str(getattr(file_source, "path", file_source))
    if "://" in str(file_source):
        raise ConfigurationError(
            f"ckpt_path {package}: its file {file_source} is a URL; unet3d reads packages offline: download the "
            "package as a zip archive and give that"
        )
    package = Path(package)
    member = Path(name).name
    if zipfile.is_zipfile(package):
        with zipfile.ZipFile(package) as archive:
            names = archive.namelist()
            match = next((n for n in names if n == name or n == member or n.endswith("/" + member)), None)
            if match is None:
                raise ConfigurationError(f"ckpt_path {package}: the archive lacks its file {member}")
            return archive.read(match)
    candidate = package.parent / name
    if not candidate.is_file():
        raise ConfigurationError(f"ckpt_path {package}: its file {candidate} does not exist")
    return candidate.read_bytes()


def _own_checkpoint(source: str, own: dict[str, Any], state: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """A package written by ``unet3d export``: the module rebuilt from the recorded settings, its network weights
    those of the package (whose parameters are the network's under ``net.``, as in a checkpoint)."""
    from .module import UNet3DModule

    hparams = dict(own.get("hyper_parameters") or {})
    for key in ("optimizer", "lr_scheduler"):
        hparams.pop(key, None)
    try:
        module = UNet3DModule(**hparams)
    except (TypeError, ValueError) as err:
        raise ConfigurationError(f"{source}: its config.{CONFIG_KEY}.hyper_parameters do not make a model ({err})"
                                 ) from None
    full = module.state_dict()
    try:
        module.net.load_state_dict({k[len("net."):]: v for k, v in state.items() if k.startswith("net.")})
    except RuntimeError as err:
        raise ConfigurationError(f"{source}: its weights do not fit its recorded settings ({str(err)[:200]})") from None
    full.update(module.state_dict())
    return {"state_dict": full, "hyper_parameters": hparams,
            "datamodule_hyper_parameters": dict(own.get("datamodule_hyper_parameters") or {}),
            "bioimageio_package": str(path), "epoch": 0, "global_step": 0}


def _pytorch3dunet_checkpoint(
    source: str, description: Any, weights: Any, state: dict[str, Any], path: str | Path
) -> dict[str, Any]:
    """A package whose architecture is one of pytorch-3dunet's networks (PlantSeg's zoo models), mapped as
    ``unet3d import-pytorch3dunet`` maps a checkpoint and its config."""
    from bioimageio.spec.model import v0_5 as bm

    from .importers import SUPPORTED_MODELS, convert_state_dict, model_settings
    from .module import UNet3DModule

    architecture = weights.architecture
    where = f"{getattr(architecture, 'import_from', None) or getattr(architecture, 'source', '')}.{architecture.callable}"
    if not isinstance(architecture, bm.ArchitectureFromLibraryDescr) or \
            architecture.import_from != PYTORCH3DUNET_MODULE or str(architecture.callable) not in SUPPORTED_MODELS:
        supported = ", ".join(f"{PYTORCH3DUNET_MODULE}.{n}" for n in SUPPORTED_MODELS)
        raise ConfigurationError(
            f"{source}: its pytorch_state_dict architecture {where} is not supported; unet3d predicts with packages "
            f"it exported and with pytorch-3dunet networks ({supported})"
        )
    settings, _ = model_settings({"name": str(architecture.callable), **dict(architecture.kwargs)},
                                 f"{source}: weights.pytorch_state_dict.architecture.kwargs")
    module = UNet3DModule(**settings)
    weights_of_net = convert_state_dict(state.get("model_state_dict", state) if isinstance(state, dict) else {})
    try:
        module.net.load_state_dict(weights_of_net)
    except RuntimeError as err:
        problem = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ConfigurationError(
            f"{source}: its weights do not fit its {architecture.callable} kwargs: {problem[:200]}"
        ) from None
    data = _normalization_of(source, description.inputs[0], settings["in_channels"])
    _check_postprocessing(source, description.outputs[0])
    return {"state_dict": module.state_dict(), "hyper_parameters": settings, "datamodule_hyper_parameters": data,
            "bioimageio_package": str(path), "epoch": 0, "global_step": 0}


def _normalization_of(source: str, tensor: Any, in_channels: int) -> dict[str, Any]:
    """``data.normalization`` (and ``percentiles``) that do what the input's preprocessing does."""
    from bioimageio.spec.model import v0_5 as bm

    steps = [s for s in tensor.preprocessing if not isinstance(s, bm.EnsureDtypeDescr)]
    spatial = {a.id for a in tensor.axes if isinstance(a, (bm.SpaceInputAxis,))}

    def per_sample(axes: Any, what: str) -> None:
        chosen = set(axes) if axes is not None else {a.id for a in tensor.axes}
        if not spatial <= chosen or (in_channels > 1 and any(str(a) == "channel" for a in chosen)):
            raise ConfigurationError(
                f"{source}: input preprocessing {what} over axes {sorted(str(a) for a in chosen)} is not supported; "
                "unet3d normalises each channel of a volume over its spatial axes"
            )

    if not steps:
        return {"normalization": "none"}
    first = steps[0]
    if isinstance(first, bm.ZeroMeanUnitVarianceDescr) and len(steps) == 1:
        per_sample(first.kwargs.axes, "zero_mean_unit_variance")
        return {"normalization": "standardize"}
    if isinstance(first, bm.ScaleRangeDescr) and first.kwargs.reference_tensor is None and len(steps) == 2 and \
            isinstance(steps[1], bm.ClipDescr) and steps[1].kwargs.min == 0 and steps[1].kwargs.max == 1:
        per_sample(first.kwargs.axes, "scale_range")
        return {"normalization": "percentile",
                "percentiles": [float(first.kwargs.min_percentile), float(first.kwargs.max_percentile)]}
    names = [getattr(s, "id", type(s).__name__) for s in steps]
    raise ConfigurationError(
        f"{source}: input preprocessing {names} is not supported; unet3d maps zero_mean_unit_variance (per sample) "
        "to data.normalization standardize and scale_range + clip [0, 1] to percentile"
    )


def _check_postprocessing(source: str, tensor: Any) -> None:
    from bioimageio.spec.model import v0_5 as bm

    steps = [s for s in tensor.postprocessing if not isinstance(s, bm.EnsureDtypeDescr)]
    if steps:
        names = [getattr(s, "id", type(s).__name__) for s in steps]
        raise ConfigurationError(
            f"{source}: output postprocessing {names} is not supported; unet3d writes the network's output after "
            "its own final activation"
        )
