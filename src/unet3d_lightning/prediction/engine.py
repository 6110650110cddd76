"""Inference-time kernel choice, applied while prediction runs and removed after, so that the network itself holds
only standard modules (a trace, ``torch.compile``, an export or a CUDA run never see it).

PyTorch picks oneDNN for a CPU convolution by a rule written for 2D images: a batch of one, a kernel of at most 3
and ``batch * channels * depth * height <= 20480`` go to its own im2col convolution (``slow_conv3d``) instead. For
3D patches that catches the first, few-channel layers at full resolution: with a batch of 1 (the default) a
4 → 8 channel 3×3×3 convolution of a 32×128×128 patch took 214 ms instead of 16 ms on the benchmark machine, and a
small U-Net's forward pass 0.72 s per patch instead of 0.23 s. :func:`onednn_convolutions` sends the network's
float32 3D convolutions with a kernel larger than 1 to oneDNN (``aten.mkldnn_convolution``, the kernel PyTorch
itself uses for larger batches: the same result up to float32 rounding); everything else, any run with
``torch.backends.mkldnn`` disabled, autocast and compiled networks take ``nn.Conv3d``'s own path.

Usage::

    with onednn_convolutions(net):
        probabilities = net(patch).softmax(1)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import MethodType

import torch
from torch import Tensor, nn


def _onednn_forward(conv: nn.Conv3d, input: Tensor) -> Tensor:
    if (
        input.device.type == "cpu"
        and input.dtype == torch.float32
        and conv.weight.dtype == torch.float32
        and input.dim() == 5
        and torch.backends.mkldnn.enabled  # the user's switch
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()  # the compiler chooses its own kernels (and traces fake tensors)
    ):
        return torch.ops.aten.mkldnn_convolution(
            input, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups
        )
    return nn.Conv3d.forward(conv, input)


def _routable(module: nn.Module) -> bool:
    # Exactly nn.Conv3d: a subclass may compute something else in its forward.
    return (
        type(module) is nn.Conv3d
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.kernel_size != (1, 1, 1)  # 1×1×1 convolutions are matrix products PyTorch already runs well
        and "forward" not in module.__dict__
    )


@contextlib.contextmanager
def onednn_convolutions(net: nn.Module) -> Iterator[int]:
    """Within the block, the 3D convolutions of ``net`` run oneDNN's kernels on the CPU also where PyTorch's rule
    would not (see the module docstring); yields how many convolutions were routed. Nothing changes for a compiled
    network (``nn.Module.compile``), without oneDNN, or on other devices (checked at every call). Parameters, the
    state dict and hooks are untouched; on leaving, the convolutions are plain ``nn.Conv3d`` again."""
    if getattr(net, "_compiled_call_impl", None) is not None or not torch.backends.mkldnn.is_available():
        yield 0
        return
    routed = [m for m in net.modules() if _routable(m)]
    for conv in routed:
        # An instance attribute shadows the class's forward; nn.Module.__call__ (and so every hook) stays.
        conv.forward = MethodType(_onednn_forward, conv)
    try:
        yield len(routed)
    finally:
        for conv in routed:
            del conv.forward


def inference_context(module_device: torch.device | str, net: nn.Module) -> contextlib.AbstractContextManager:
    """The context prediction runs ``net`` in on ``module_device``: :func:`onednn_convolutions` on a CPU, nothing
    elsewhere (cuDNN chooses its own kernels)."""
    if torch.device(module_device).type == "cpu":
        return onednn_convolutions(net)
    return contextlib.nullcontext(0)
