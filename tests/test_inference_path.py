"""The inference path: without gradients the decoders release their inputs layer by layer (bit-identical to calling
the modules), and prediction on a CPU routes 3D convolutions to oneDNN (``prediction.engine``) while the network
itself stays plain torch (a trace records no CPU-only op)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from unet3d_lightning.module import UNet3DModule
from unet3d_lightning.networks import ARCHITECTURES, UNet3D, build_network
from unet3d_lightning.prediction.engine import inference_context, onednn_convolutions


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ``||actual - expected|| / ||expected||`` (Frobenius norms)."""
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-12))


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


# ----------------------------------------------------------------------------------------------------------------------
# Inference releases the decoder's inputs layer by layer
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["gcr", "crg", "cbr"])
@pytest.mark.parametrize("upsample", ["interpolate", "deconv"])
def test_inference_path_equals_the_module_path(order, upsample):
    """Without gradients the decoders run layer by layer; the result is bit-identical to calling the modules (the
    path taken with gradients, or when a decoder carries a hook), and decoder hooks still run when registered."""
    torch.manual_seed(0)
    net = UNet3D(1, 3, f_maps=4, num_levels=3, layer_order=order, num_groups=2, upsample=upsample).eval()
    x = torch.randn(2, 1, 9, 16, 14)  # odd depth: the interpolated path resizes, not only doubles
    with torch.no_grad():
        lean = net(x.clone())
    with torch.enable_grad():
        with_grad = net(x.clone()).detach()
    seen = []
    handle = net.decoders[0].block[1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        hooked = net(x.clone())
    handle.remove()
    assert torch.equal(lean, with_grad)
    assert torch.equal(lean, hooked)
    assert seen == [torch.Size([2, 8, 5, 8, 7])]


_PEAK_SCRIPT = """
import sys, torch
from unet3d_lightning.networks import UNet3D

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

torch.set_num_threads(1)
torch.manual_seed(0)
net = UNet3D(1, 2, f_maps=8, num_levels=3, layer_order="gcr", num_groups=4, upsample="interpolate").eval()
net.to(memory_format=torch.channels_last_3d)  # as predict runs it (contiguous, oneDNN's own copies dominate)
if sys.argv[1] == "hooked":  # a decoder hook: the module path, which keeps each decoder's inputs to its end
    net.decoders[-1].register_forward_hook(lambda module, args, out: None)
with torch.no_grad():
    net(torch.randn(1, 1, 8, 16, 16).contiguous(memory_format=torch.channels_last_3d))
    x = torch.randn(2, 1, 32, 64, 128).contiguous(memory_format=torch.channels_last_3d)  # batch 1: im2col scratch
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    net(x)
print(status("VmHWM:") - before)
"""


@pytest.mark.slow
def test_inference_releases_decoder_inputs_early():
    """Peak memory of one forward pass, each path in a fresh process: the layer-by-layer path frees the skip
    connection, the deeper features and the concatenation as soon as they are read. With 16 MiB per 8-channel
    full-resolution tensor here, the module path's peak is the concatenation (48 MiB), its normalised copy (48), the
    first convolution's output (16), the skip connection (16) and the deeper features (4): 132 MiB; the
    layer-by-layer path's is 100 MiB (while concatenating). Measured: about 125 vs 157 MiB."""
    import subprocess
    import sys

    peaks = {}
    for path in ("lean", "hooked"):
        result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, path], capture_output=True, text=True,
                                check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        peaks[path] = int(result.stdout.split()[-1]) / 2**20
    assert peaks["lean"] <= peaks["hooked"] - 24, peaks


@pytest.mark.parametrize("spatial_dims", [3, 2])
@pytest.mark.parametrize("architecture,variant,upsample", [
    ("unet", "pytorch3dunet", "interpolate"),
    ("unet", "pytorch3dunet", "deconv"),
    ("residual_unet", "native", "deconv"),
    ("residual_se_unet", "pytorch3dunet", "deconv"),
    ("residual_unet", "native", "interpolate"),
])
def test_inference_path_equals_the_module_path_for_every_architecture(architecture, variant, upsample, spatial_dims):
    torch.manual_seed(0)
    net = build_network(architecture, 1, 3, 4, 3, "gcr", 2, upsample, spatial_dims, variant).eval()
    x = torch.randn(2, 1, *((9, 16, 14) if spatial_dims == 3 else (16, 14)))
    with torch.no_grad():
        lean = net(x.clone())
    with torch.enable_grad():
        with_grad = net(x.clone()).detach()
    seen = []
    handle = net.decoders[-1].register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    with torch.no_grad():
        hooked = net(x.clone())
    handle.remove()
    assert torch.equal(lean, with_grad)
    assert torch.equal(lean, hooked)
    assert seen == [4]


def test_decoder_layers_are_what_its_forward_applies():
    """The layer-by-layer protocol of every decoder level: join, then its layers, equals the decoder module."""
    torch.manual_seed(0)
    for architecture in ARCHITECTURES:
        net = build_network(architecture, 1, 2, 4, 2, "gcr", 2).eval()
        decoder = net.decoders[0]
        deep, skip = torch.randn(1, 8, 3, 4, 4), torch.randn(1, 4, 5, 8, 7)
        with torch.no_grad():
            x = decoder.join(deep, skip)
            for layer in decoder.layers():
                x = layer(x)
            assert torch.equal(x, decoder(deep, skip))
        kinds = {type(layer) for layer in decoder.layers()}
        assert (nn.Conv3d in kinds) == (architecture == "unet")  # a double convolution is taken apart


# ----------------------------------------------------------------------------------------------------------------------
# The engine: oneDNN also for batches of one, at predict time only
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_trace_of_the_network_records_no_cpu_only_op(architecture):
    """Traced on the CPU at a batch of one (where the kernel routing applies at prediction), the network records
    torch's portable convolution, so the trace or an export runs on any device."""
    torch.manual_seed(0)
    net = build_network(architecture, 1, 2, 4, 2, "gcr", 2).eval()
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        traced = torch.jit.trace(net, x)
    graph = str(traced.inlined_graph)
    assert "mkldnn_convolution" not in graph
    assert "aten::_convolution" in graph
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x), atol=1e-6, rtol=0)


def test_engine_takes_onednn_where_pytorch_would_not():
    """PyTorch sends a batch-of-one 3×3×3 convolution with few channels to its im2col kernel (slow_conv3d); within the
    engine it goes to oneDNN, and after it back to PyTorch's choice. Which kernel ran is read from the profiler, not
    inferred from timings."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1))
    x = torch.randn(1, 4, 8, 32, 32)
    with torch.no_grad():
        assert "aten::slow_conv3d_forward" in _ops(lambda: net(x))
        with onednn_convolutions(net) as routed:
            assert routed == 1
            ops = _ops(lambda: net(x))
            assert "aten::mkldnn_convolution" in ops and "aten::slow_conv3d_forward" not in ops
            with torch.backends.mkldnn.flags(enabled=False):  # the user's switch is respected
                assert "aten::mkldnn_convolution" not in _ops(lambda: net(x))
        assert "aten::slow_conv3d_forward" in _ops(lambda: net(x))
        assert "forward" not in net[0].__dict__ and type(net[0]) is nn.Conv3d


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "padding": 0, "bias": False},
    {"kernel_size": (3, 1, 3), "padding": (1, 0, 1), "stride": 2},
    {"kernel_size": 3, "padding": 2, "dilation": 2, "groups": 2},
    {"kernel_size": 1},
])
def test_engine_equals_torch_conv3d_values_and_gradients(batch, layout, kwargs):
    torch.manual_seed(0)
    reference = nn.Conv3d(4, 6, **kwargs)
    ours = nn.Conv3d(4, 6, **kwargs)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(batch, 4, 7, 10, 9)
    if layout != "contiguous":
        ours.to(memory_format=torch.channels_last_3d)
    if layout == "channels_last":
        x_ours = x.contiguous(memory_format=torch.channels_last_3d)
    else:
        x_ours = x.clone()
    x_ref = x.clone().requires_grad_()
    x_ours.requires_grad_()
    expected = reference(x_ref)
    with onednn_convolutions(ours) as routed:
        assert routed == (0 if kwargs["kernel_size"] == 1 else 1)
        actual = ours(x_ours)
    assert _relative_error(actual, expected) <= 1e-5
    g = torch.randn_like(expected)
    expected.backward(g)
    actual.backward(g)
    assert _relative_error(x_ours.grad, x_ref.grad) <= 1e-5
    assert _relative_error(ours.weight.grad, reference.weight.grad) <= 1e-5
    if reference.bias is not None:
        assert _relative_error(ours.bias.grad, reference.bias.grad) <= 1e-5


def test_engine_under_autocast_follows_autocast():
    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1))
    with onednn_convolutions(net), torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = net(torch.randn(1, 2, 4, 8, 8))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("spatial_dims", [3, 2])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_engine_network_equals_plain_network(architecture, spatial_dims, channels_last):
    torch.manual_seed(0)
    net = build_network(architecture, 1, 3, 4, 3, "gcr", 2, "deconv", spatial_dims).eval()
    x = torch.randn(1, 1, *((9, 16, 14) if spatial_dims == 3 else (16, 14)))
    if channels_last:
        fmt = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
        net.to(memory_format=fmt)
        x = x.contiguous(memory_format=fmt)
    with torch.no_grad():
        plain = net(x.clone())
        with onednn_convolutions(net) as routed:
            routed_output = net(x.clone())
    # 3D: every 3x3x3 convolution (two per double-convolution block); 2D networks have none to route.
    assert (routed > 0) == (spatial_dims == 3)
    assert _relative_error(routed_output, plain) <= 1e-5
    assert float((routed_output - plain).abs().max()) <= 1e-5


def test_engine_leaves_compiled_networks_and_other_devices_alone():
    net = build_network("unet", 1, 2, 4, 2, "gcr", 2)
    with inference_context("meta", net) as routed:
        assert routed == 0 and not any("forward" in m.__dict__ for m in net.modules())
    net._compiled_call_impl = lambda *args, **kwargs: None  # what nn.Module.compile sets
    with inference_context("cpu", net) as routed:
        assert routed == 0
    net._compiled_call_impl = None
    with inference_context(torch.device("cpu"), net) as routed:
        assert routed == sum(type(m) is nn.Conv3d and m.kernel_size == (3, 3, 3) for m in net.modules()) > 0


class _Patches(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return {"raw": torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(index))}


def test_predict_on_cpu_at_batch_one_runs_onednn_and_equals_the_plain_network():
    """The module's predict path enters the engine: the profiler sees oneDNN's kernel and not PyTorch's im2col one
    for the batch-of-one patches, the probabilities equal the plain network's, and the network is plain afterwards."""
    torch.manual_seed(0)
    module = UNet3DModule(f_maps=4, num_levels=2, num_groups=2, channels_last=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(_Patches(), batch_size=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        outputs = trainer.predict(module, loader)
    calls = [event.name for event in prof.events()]
    convolutions = [m for m in module.net.modules() if type(m) is nn.Conv3d]
    routed = [m for m in convolutions if m.kernel_size != (1, 1, 1)]
    assert len(routed) == 6  # two per double convolution: two encoder levels and one decoder level
    # Per patch: every 3x3x3 convolution on oneDNN; only the final 1x1x1 one (a matrix product) takes PyTorch's own.
    assert calls.count("aten::mkldnn_convolution") == len(routed) * len(loader)
    assert calls.count("aten::slow_conv3d_forward") == (len(convolutions) - len(routed)) * len(loader)
    assert not any("forward" in m.__dict__ for m in module.net.modules())
    module.eval()
    for index, output in enumerate(outputs):
        with torch.no_grad():
            plain = torch.softmax(module.net(_Patches()[index]["raw"][None]), dim=1)
        assert float((output["probabilities"] - plain).abs().max()) <= 1e-5
    with torch.no_grad():  # outside predict, the same module takes PyTorch's own kernel choice
        assert "aten::slow_conv3d_forward" in _ops(lambda: module(_Patches()[0]["raw"][None]))
