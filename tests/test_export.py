"""``unet3d export`` to TorchScript and ONNX: the exported graphs compute what ``unet3d predict`` computes per patch.

References are independent of the exported graph: the module's own prediction step (the network through the
LightningModule, with predict's CPU kernel routing, and its final activation) for the graphs, onnxruntime for the
ONNX files, and numpy's mean and standard deviation for the normalisation ``unet3d predict`` applies.
"""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import error_line, write_h5

from unet3d_lightning.export import (
    export_onnx,
    export_torchscript,
    packaged_network,
    spatial_divisor,
)
from unet3d_lightning.module import UNet3DModule

# TorchScript is deprecated in favour of torch.export, but it is what the files are for (torch-only runtimes).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
onnxruntime = pytest.importorskip("onnxruntime")  # the dev extra installs it (the oracle of the ONNX files)

CASES = [
    # architecture, spatial_dims, variant, module settings
    ("unet", 3, "native", {}),
    ("residual_unet", 3, "native", {}),
    ("residual_se_unet", 3, "native", {"upsample": "deconv"}),
    ("unet", 2, "native", {}),
    ("residual_unet", 2, "native", {}),
    ("residual_se_unet", 2, "native", {}),
    ("unet", 3, "pytorch3dunet", {"upsample": "interpolate", "layer_order": "gcr"}),
    ("residual_unet", 3, "native", {"in_channels": 2, "out_channels": 3, "loss": "bce"}),
    # anisotropic: no pooling along z at the first level, 1x3x3 kernels there (divisor 2, 4, 4)
    ("unet", 3, "native", {"num_levels": 3, "pool_kernel_size": [[1, 2, 2], [2, 2, 2]],
                           "conv_kernel_size": [[1, 3, 3], [3, 3, 3], [3, 3, 3]]}),
    ("residual_se_unet", 2, "native", {"num_levels": 3, "pool_kernel_size": [[2, 2], [1, 2]]}),
    # regression: no final activation, the raw output
    ("residual_unet", 3, "native", {"loss": "mse", "out_channels": 1}),
]


def tiny_module(architecture, spatial_dims, variant, settings, seed=0):
    torch.manual_seed(seed)
    module = UNet3DModule(**{"f_maps": 4, "num_levels": 2, "num_groups": 2, "architecture": architecture,
                             "spatial_dims": spatial_dims, "variant": variant, **settings})
    # Non-trivial normalisation statistics, so that eval mode (running stats) is what is exported.
    for layer in module.modules():
        if isinstance(layer, (torch.nn.BatchNorm3d, torch.nn.BatchNorm2d)):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2)
    return module.eval()


def predict_reference(module, x):
    """What the module's prediction step writes for the batch ``x``."""
    with torch.no_grad():
        return module.predict_step({"raw": x}, 0)["probabilities"]


def sizes(module):
    """Two spatial sizes (multiples of the divisor) times two batch sizes."""
    divisor = np.array(spatial_divisor(module))
    first, second = divisor * (2, 3, 2), divisor * (3, 2, 4)
    if module.hparams.spatial_dims == 2:
        first[0], second[0] = 1, 3
    return [(batch, tuple(int(s) for s in shape)) for shape in (first, second) for batch in (1, 2)]


@pytest.mark.parametrize("architecture, spatial_dims, variant, settings", CASES,
                         ids=[f"{a}-{d}d-{v}-{i}" for i, (a, d, v, _) in enumerate(CASES)])
def test_torchscript_and_onnx_equal_the_module(tmp_path, architecture, spatial_dims, variant, settings):
    module = tiny_module(architecture, spatial_dims, variant, settings)
    packaged = packaged_network(module)
    channels = module.hparams.in_channels
    example = torch.randn(1, channels, *(2 * d for d in spatial_divisor(module)))
    export_torchscript(packaged, example, tmp_path / "m.pt")
    export_onnx(packaged, example, tmp_path / "m.onnx")
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch, shape in sizes(module):
        x = torch.randn(batch, channels, *shape)
        expected = predict_reference(module, x)
        assert expected.shape == (batch, module.hparams.out_channels, *shape)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), expected, atol=1e-4, rtol=0)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0)


def test_divisor_and_final_activation_follow_the_model():
    anisotropic = tiny_module("unet", 3, "native", {"num_levels": 3, "pool_kernel_size": [[1, 2, 2], [2, 2, 2]]})
    assert spatial_divisor(anisotropic) == (2, 4, 4)
    assert spatial_divisor(tiny_module("unet", 2, "native", {"num_levels": 3})) == (1, 4, 4)
    regression = tiny_module("unet", 3, "native", {"loss": "mse", "out_channels": 1})
    x = torch.randn(1, 1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(packaged_network(regression)(x), regression.net(x))  # no activation at all


def test_graphs_hold_only_standard_operators(tmp_path):
    import onnx

    module = tiny_module("residual_se_unet", 3, "native", {})
    packaged = packaged_network(module)
    example = torch.randn(1, 1, 4, 4, 4)
    export_torchscript(packaged, example, tmp_path / "m.pt")
    export_onnx(packaged, example, tmp_path / "m.onnx")
    kinds = {node.kind() for node in torch.jit.load(str(tmp_path / "m.pt")).inlined_graph.nodes()}
    assert kinds and all(kind.startswith(("aten::", "prim::")) for kind in kinds), kinds
    assert not any("mkldnn" in kind for kind in kinds), kinds  # predict's CPU routing is not part of the graph
    assert "aten::softmax" in kinds  # the final activation is
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}
    assert graph.node[-1].op_type == "Softmax"
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "z", "y", "x"]


@pytest.mark.slow
def test_torchscript_runs_without_the_package(tmp_path):
    module = tiny_module("unet", 3, "native", {})
    packaged = packaged_network(module)
    export_torchscript(packaged, torch.randn(1, 1, 4, 4, 4), tmp_path / "m.pt")
    x = torch.randn(2, 1, 6, 4, 8)
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import sys\n"
        "sys.modules['unet3d_lightning'] = None\n"  # also where an installed copy would be found
        "try:\n    import unet3d_lightning\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('unet3d_lightning is importable')\n"
        "import numpy, torch\n"
        f"m = torch.jit.load({str(tmp_path / 'm.pt')!r})\n"
        f"x = torch.from_numpy(numpy.load({str(tmp_path / 'x.npy')!r}))\n"
        f"numpy.save({str(tmp_path / 'y.npy')!r}, m(x).detach().numpy())\n"
    )
    # -I: no PYTHONPATH, no user site, no current directory: the checkout's sources are not on the path.
    result = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), predict_reference(module, x).numpy(), atol=1e-5)


def test_predict_equals_the_exported_model_on_the_normalised_volume(one_step_fit, tmp_path, command_line):
    from unet3d_lightning.cli import main

    root, ckpt = one_step_fit
    main(["export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "model.pt")])
    main(["export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "model.onnx")])
    rng = np.random.default_rng(3)
    raw = (rng.normal(300, 40, (8, 16, 16))).astype(np.uint16)  # an integer volume with an offset
    write_h5(tmp_path / "vol.h5", raw=raw)
    main(["predict", "--ckpt_path", str(ckpt), "--data.predict_paths", f"[{tmp_path / 'vol.h5'}]",
          "--data.predict_patch_shape", "[8, 16, 16]", "--prediction.output_dir", str(tmp_path / "out"),
          "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--data.num_workers", "0"])
    with h5py.File(tmp_path / "out" / "vol_predictions.h5", "r") as f:
        predicted = f["predictions"][()]
    values = raw.astype(np.float64)
    normalised = ((values - values.mean()) / values.std()).astype(np.float32)[None, None]
    with torch.no_grad():
        scripted = torch.jit.load(str(tmp_path / "model.pt"))(torch.from_numpy(normalised))[0].numpy()
    np.testing.assert_allclose(predicted, scripted, atol=1e-5, rtol=0)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(predicted, session.run(None, {"raw": normalised})[0][0], atol=1e-5, rtol=0)


def test_export_errors(one_step_fit, tmp_path, capsys, command_line, monkeypatch):
    _, ckpt = one_step_fit
    line = error_line(capsys, ["export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "model.bin")])
    assert "'.bin'" in line and "--format" in line
    (tmp_path / "taken.pt").write_bytes(b"x")
    line = error_line(capsys, ["export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "taken.pt")])
    assert "already exists" in line and "--overwrite" in line
    assert (tmp_path / "taken.pt").read_bytes() == b"x"
    line = error_line(capsys, ["export", "--ckpt_path", str(tmp_path / "none.ckpt"), "--output",
                               str(tmp_path / "m.pt")])
    assert "none.ckpt" in line and "does not exist" in line
    monkeypatch.setitem(sys.modules, "onnx", None)  # the export extra missing
    line = error_line(capsys, ["export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "m.onnx")])
    assert "'export' extra" in line and "unet3d-lightning[export]" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.pt"]  # nothing half-written left behind
