"""bioimage.io packages: ``unet3d export --format bioimageio`` and ``unet3d predict --ckpt_path package.zip``.

Oracles: ``bioimageio.core.test_model`` (which runs every weight format of the package on its test tensors after
the package's own preprocessing), pytorch-3dunet's network for the PlantSeg-form package, numpy for the
normalisation. All offline: the network is closed for the duration of each test.
"""

from __future__ import annotations

import ast
import itertools
import socket
import sys
import zipfile

import h5py
import numpy as np
import pytest
import torch
import yaml

from conftest import error_line, write_h5

from unet3d_lightning.cli import main

# TorchScript is deprecated in favour of torch.export, but it is what the files are for (torch-only runtimes).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
bioimageio_core = pytest.importorskip("bioimageio.core")  # test extra
bm = pytest.importorskip("bioimageio.spec.model.v0_5")
from bioimageio.spec import save_bioimageio_package  # noqa: E402

p3d_model = pytest.importorskip("pytorch3dunet.unet3d.model")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network: every connection attempt fails (packages are read, tested and predicted offline)."""

    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(sys, "argv", ["unet3d"])


def predict(ckpt, volume, out, patch="[8, 16, 16]", stride=None):
    args = ["predict", "--ckpt_path", str(ckpt), "--data.predict_paths", f"[{volume}]", "--data.predict_patch_shape",
            patch, "--prediction.output_dir", str(out), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--data.num_workers", "0"]
    if stride:
        args += ["--data.predict_stride_shape", stride]
    main(args)
    with h5py.File(out / f"{volume.stem}_predictions.h5", "r") as f:
        return f["predictions"][()]


def test_exported_package_passes_test_model_and_predicts_as_the_checkpoint(one_step_fit, tmp_path):
    _, ckpt = one_step_fit
    package = tmp_path / "model.zip"
    main(["export", "--ckpt_path", str(ckpt), "--output", str(package), "--name", "tiny blobs", "--authors", "A. Person",
          "--voxel_size", "2", "0.5", "0.5", "--unit", "micrometer"])
    with zipfile.ZipFile(package) as archive:
        names = set(archive.namelist())
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
        architecture = archive.read("unet3d_network.py").decode()
    # The architecture file builds the network with torch alone (bioimage.io tools do not have this package).
    tree = ast.parse(architecture)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {"." * node.level + (node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in imported} <= {"__future__", "torch", "re", "collections", "typing",
                                                         "pathlib", "math"}, imported
    assert {"weights_state_dict.pt", "weights_torchscript.pt", "weights.onnx", "unet3d_network.py", "README.md",
            "test_input.npy", "test_output.npy"} <= names
    assert sorted(rdf["weights"]) == ["onnx", "pytorch_state_dict", "torchscript"]
    (raw,) = rdf["inputs"]
    assert [a.get("id", a["type"]) for a in raw["axes"]] == ["batch", "channel", "z", "y", "x"]
    assert [a["size"] for a in raw["axes"][2:]] == [{"min": 2, "step": 2}] * 3  # f_maps 4, 2 levels: one pooling
    assert [(a["scale"], a["unit"]) for a in raw["axes"][2:]] == [(2, "micrometer"), (0.5, "micrometer"),
                                                                   (0.5, "micrometer")]
    assert rdf["name"] == "tiny blobs" and [a["name"] for a in rdf["authors"]] == ["A. Person"]
    steps = [p for p in raw["preprocessing"] if p["id"] != "ensure_dtype"]  # bioimageio.spec adds float32 casts
    assert [p["id"] for p in steps] == ["zero_mean_unit_variance"]
    assert steps[0]["kwargs"]["axes"] == ["z", "y", "x"]  # per sample and channel, as unet3d
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["class0", "class1"]
    assert {c["doi"] for c in rdf["cite"]} == {"10.1007/978-3-319-46723-8_49", "10.1007/978-3-319-67558-9_28"}

    summary = bioimageio_core.test_model(package)
    failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", failed
    tested = " ".join(d.name for d in summary.details)
    for fmt in ("pytorch_state_dict", "torchscript", "onnx"):
        assert fmt in tested, tested

    rng = np.random.default_rng(5)
    write_h5(tmp_path / "vol.h5", raw=rng.normal(500, 60, (8, 16, 16)).astype(np.float32))
    from_ckpt = predict(ckpt, tmp_path / "vol.h5", tmp_path / "a")
    from_zip = predict(package, tmp_path / "vol.h5", tmp_path / "b")
    np.testing.assert_allclose(from_zip, from_ckpt, atol=1e-5, rtol=0)
    folder = tmp_path / "unpacked"
    zipfile.ZipFile(package).extractall(folder)
    from_yaml = predict(folder / "rdf.yaml", tmp_path / "vol.h5", tmp_path / "c")
    np.testing.assert_allclose(from_yaml, from_ckpt, atol=1e-5, rtol=0)


def their_network(seed=0):
    """pytorch-3dunet 1.9.6's UNet3D with random, non-trivial weights, as PlantSeg's boundary models: one sigmoid
    output channel."""
    kwargs = dict(in_channels=1, out_channels=1, f_maps=4, num_levels=2, layer_order="gcr", num_groups=2,
                  final_sigmoid=True, is_segmentation=True)
    torch.manual_seed(seed)
    net = p3d_model.UNet3D(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net.eval(), kwargs


def plantseg_package(tmp_path, net, kwargs, preprocessing=None, library=p3d_model.__name__, callable_="UNet3D",
                     tensorflow_only=False):
    """A package in the form of PlantSeg's zoo models: pytorch-3dunet's architecture by import path and kwargs, its
    state dict, zero_mean_unit_variance per sample; test tensors computed by their network."""
    work = tmp_path / "plantseg"
    work.mkdir()
    torch.save(net.state_dict(), work / "weights.pt")
    raw = np.random.default_rng(1).normal(50, 10, (1, 1, 8, 16, 16)).astype(np.float32)
    normalised = (raw - raw.mean()) / (raw.std() + 1e-6)
    with torch.no_grad():
        output = net(torch.from_numpy(normalised)).numpy()
    np.save(work / "in.npy", raw)
    np.save(work / "out.npy", output)
    (work / "README.md").write_text("PlantSeg-style test model\n")
    axes_in = [bm.BatchAxis(), bm.ChannelAxis(channel_names=[bm.Identifier("raw")]),
               *(bm.SpaceInputAxis(id=bm.AxisId(a), size=bm.ParameterizedSize(min=8, step=8)) for a in "zyx")]
    axes_out = [bm.BatchAxis(), bm.ChannelAxis(channel_names=[bm.Identifier("boundaries")]),
                *(bm.SpaceOutputAxis(id=bm.AxisId(a), size=bm.SizeReference(tensor_id=bm.TensorId("raw"),
                                                                             axis_id=bm.AxisId(a))) for a in "zyx")]
    if tensorflow_only:
        with zipfile.ZipFile(work / "saved_model.zip", "w") as archive:
            archive.writestr("saved_model.pb", b"")
        weights = bm.WeightsDescr(tensorflow_saved_model_bundle=bm.TensorflowSavedModelBundleWeightsDescr(
            source=work / "saved_model.zip", tensorflow_version=bm.Version("2.15")))
    else:
        weights = bm.WeightsDescr(pytorch_state_dict=bm.PytorchStateDictWeightsDescr(
            source=work / "weights.pt", pytorch_version=bm.Version("2.13"),
            architecture=bm.ArchitectureFromLibraryDescr(import_from=library, callable=bm.Identifier(callable_),
                                                         kwargs=kwargs)))
    if preprocessing is None:
        preprocessing = [bm.ZeroMeanUnitVarianceDescr(kwargs=bm.ZeroMeanUnitVarianceKwargs(
            axes=[bm.AxisId(a) for a in "zyx"]))]
    description = bm.ModelDescr(
        name="plantseg-like", description="pytorch-3dunet UNet3D", authors=[bm.Author(name="test")],
        cite=[bm.CiteEntry(text="Wolny et al. 2020", doi=bm.Doi("10.7554/eLife.57613"))], license=bm.LicenseId("MIT"),
        documentation=bm.FileDescr(source=work / "README.md"),
        inputs=[bm.InputTensorDescr(id=bm.TensorId("raw"), axes=axes_in, test_tensor=bm.FileDescr(source=work / "in.npy"),
                                    preprocessing=preprocessing)],
        outputs=[bm.OutputTensorDescr(id=bm.TensorId("boundaries"), axes=axes_out,
                                      test_tensor=bm.FileDescr(source=work / "out.npy"))],
        weights=weights,
    )
    return save_bioimageio_package(description, output_path=tmp_path / "plantseg.zip")


def starts(size, patch, stride):
    out = list(range(0, size - patch + 1, stride))
    return out if out[-1] == size - patch else out + [size - patch]


def test_plantseg_package_predicts_as_their_network_on_every_patch(tmp_path):
    net, kwargs = their_network()
    package = plantseg_package(tmp_path, net, kwargs)
    from unet3d_lightning.checkpoints import classify, load_file

    read = load_file(package)
    assert classify(read) == "bioimageio"
    assert read["hyper_parameters"]["variant"] == "pytorch3dunet" and read["hyper_parameters"]["loss"] == "bce"
    assert read["datamodule_hyper_parameters"] == {"normalization": "standardize"}
    volume = np.random.default_rng(3).normal(200, 30, (10, 20, 18)).astype(np.float32)
    write_h5(tmp_path / "vol.h5", raw=volume)
    patch, stride = [8, 12, 12], [2, 8, 6]
    predicted = predict(package, tmp_path / "vol.h5", tmp_path / "pred", patch=str(patch), stride=str(stride))
    x = volume.astype(np.float64)
    x = ((x - x.mean()) / x.std()).astype(np.float32)
    total = np.zeros((1, *volume.shape))
    count = np.zeros(volume.shape)
    for z, y, x0 in itertools.product(*(starts(n, p, s) for n, p, s in zip(volume.shape, patch, stride))):
        region = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x0, x0 + patch[2]))
        with torch.no_grad():
            total[(slice(None), *region)] += net(torch.from_numpy(x[region])[None, None])[0].numpy()
        count[region] += 1
    np.testing.assert_allclose(predicted, total / count, atol=1e-5, rtol=0)


def test_unsupported_packages_end_in_one_error_line(tmp_path, capsys):
    net, kwargs = their_network()
    write_h5(tmp_path / "vol.h5", raw=np.zeros((8, 16, 16), np.float32))
    base = ["predict", "--data.predict_paths", f"[{tmp_path / 'vol.h5'}]", "--data.predict_patch_shape", "[8, 16, 16]",
            "--prediction.output_dir", str(tmp_path / "out"), "--trainer.accelerator", "cpu"]
    (tmp_path / "a").mkdir()
    other = plantseg_package(tmp_path / "a", net, kwargs, library="mylib.models")
    line = error_line(capsys, [*base, "--ckpt_path", str(other)])
    assert "mylib.models.UNet3D" in line and "not supported" in line
    (tmp_path / "b").mkdir()
    fixed = plantseg_package(tmp_path / "b", net, kwargs, preprocessing=[bm.FixedZeroMeanUnitVarianceDescr(
        kwargs=bm.FixedZeroMeanUnitVarianceKwargs(mean=3.0, std=2.0))])
    line = error_line(capsys, [*base, "--ckpt_path", str(fixed)])
    assert "fixed_zero_mean_unit_variance" in line and "not supported" in line
    assert not (tmp_path / "out").exists()
    (tmp_path / "c").mkdir()
    tensorflow = plantseg_package(tmp_path / "c", net, kwargs, tensorflow_only=True)
    line = error_line(capsys, [*base, "--ckpt_path", str(tensorflow)])
    assert "no pytorch_state_dict weights" in line and "tensorflow_saved_model_bundle" in line
    assert not (tmp_path / "out").exists()
    good = plantseg_package(tmp_path, net, kwargs)
    line = error_line(capsys, ["fit", "--ckpt_path", str(good), "--data.train_paths", f"[{tmp_path / 'vol.h5'}]",
                               "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert "bioimage.io package" in line and "not a run to resume" in line
    assert not (tmp_path / "runs").exists()


def test_missing_export_extra_is_one_error_line(tmp_path, capsys, monkeypatch, one_step_fit):
    net, kwargs = their_network()
    package = plantseg_package(tmp_path, net, kwargs)
    write_h5(tmp_path / "vol.h5", raw=np.zeros((8, 16, 16), np.float32))
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)
    line = error_line(capsys, ["predict", "--ckpt_path", str(package), "--data.predict_paths",
                               f"[{tmp_path / 'vol.h5'}]", "--data.predict_patch_shape", "[8, 16, 16]",
                               "--prediction.output_dir", str(tmp_path / "out")])
    assert "'export' extra" in line and "unet3d-lightning[export]" in line and str(package) in line
    line = error_line(capsys, ["export", "--ckpt_path", str(one_step_fit[1]), "--output", str(tmp_path / "m.zip"),
                               "--unit", "furlong"])
    assert "'export' extra" in line and "bioimageio.spec" in line
    assert not (tmp_path / "m.zip").exists() and not (tmp_path / "out").exists()
    monkeypatch.delitem(sys.modules, "bioimageio.spec")
    line = error_line(capsys, ["export", "--ckpt_path", str(one_step_fit[1]), "--output", str(tmp_path / "m.zip"),
                               "--unit", "furlong"])
    assert "unit 'furlong'" in line and "micrometer" in line
    assert not (tmp_path / "m.zip").exists()


def test_plantseg_package_of_format_0_4_predicts_as_their_network(tmp_path):
    """The zoo's PlantSeg models are mostly written in format 0.4 (architecture as a dotted import path, axes as a
    string); bioimageio.spec reads them as 0.5."""
    net, kwargs = their_network(seed=2)
    work = tmp_path / "p04"
    work.mkdir()
    torch.save(net.state_dict(), work / "weights.pt")
    raw = np.random.default_rng(1).normal(50, 10, (1, 1, 8, 16, 16)).astype(np.float32)
    np.save(work / "in.npy", raw)
    with torch.no_grad():
        np.save(work / "out.npy", net(torch.from_numpy((raw - raw.mean()) / (raw.std() + 1e-6))).numpy())
    (work / "README.md").write_text("PlantSeg-style model, format 0.4\n")
    rdf = {
        "format_version": "0.4.10", "type": "model", "name": "plantseg-0.4", "description": "UNet3D",
        "authors": [{"name": "test"}], "cite": [{"text": "Wolny et al. 2020", "doi": "10.7554/eLife.57613"}],
        "license": "MIT", "documentation": "README.md", "timestamp": "2022-01-01T00:00:00",
        "test_inputs": ["in.npy"], "test_outputs": ["out.npy"],
        "inputs": [{"name": "raw", "axes": "bczyx", "data_type": "float32",
                    "shape": {"min": [1, 1, 8, 8, 8], "step": [0, 0, 8, 8, 8]},
                    "preprocessing": [{"name": "zero_mean_unit_variance",
                                       "kwargs": {"mode": "per_sample", "axes": "zyx"}}]}],
        "outputs": [{"name": "boundaries", "axes": "bczyx", "data_type": "float32",
                     "shape": {"reference_tensor": "raw", "scale": [1, 1, 1, 1, 1], "offset": [0, 0, 0, 0, 0]}}],
        "weights": {"pytorch_state_dict": {"source": "weights.pt", "kwargs": kwargs,
                                           "architecture": "pytorch3dunet.unet3d.model.UNet3D"}},
    }
    (work / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    with zipfile.ZipFile(tmp_path / "p04.zip", "w") as archive:
        for path in work.iterdir():
            archive.write(path, path.name)
    volume = np.random.default_rng(3).normal(200, 30, (8, 16, 16)).astype(np.float32)
    write_h5(tmp_path / "vol.h5", raw=volume)
    predicted = predict(tmp_path / "p04.zip", tmp_path / "vol.h5", tmp_path / "pred")
    x = volume.astype(np.float64)
    x = ((x - x.mean()) / x.std()).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)[None, None])[0].numpy()
    np.testing.assert_allclose(predicted, expected, atol=1e-5, rtol=0)


def test_package_states_the_voxel_size_the_checkpoint_records(one_step_fit, tmp_path):
    _, ckpt = one_step_fit
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["voxel_size"] = {"zyx": [4.0, 1.0, 0.5], "unit": "nanometer"}  # what fit records from the data
    recorded = tmp_path / "recorded.ckpt"
    torch.save(checkpoint, recorded)
    package = tmp_path / "model.zip"
    main(["export", "--ckpt_path", str(recorded), "--output", str(package)])
    with zipfile.ZipFile(package) as archive:
        (raw,) = yaml.safe_load(archive.read("rdf.yaml"))["inputs"]
    assert [(a["scale"], a["unit"]) for a in raw["axes"][2:]] == [(4, "nanometer"), (1, "nanometer"),
                                                                   (0.5, "nanometer")]
