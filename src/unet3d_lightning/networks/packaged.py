"""The network as it leaves the tool: the U-Net followed by the model's final activation, on ``(N, C, D, H, W)``.

:class:`PackagedUNet` is what ``unet3d export`` traces (TorchScript, ONNX) and what a bioimage.io package's
``pytorch_state_dict`` weights rebuild: its input is the *normalised* raw patch ``(N, in_channels, D, H, W)``
(float32), its output what ``unet3d predict`` writes per patch, the probabilities after the final activation
(``softmax`` over the channels, per-channel ``sigmoid``, or none: raw outputs). A 2D network (``spatial_dims=2``)
is applied to every z-slice, so the exported graph has the same 5D interface in both cases.

This module imports only torch and :mod:`.unet` / :mod:`.blocks`: ``unet3d export`` writes these three files as one
self-contained source file into a bioimage.io package (:func:`standalone_source`), so that bioimage.io tools build
the network without this package installed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .unet import UNet

# model.architecture -> UNet's block type (the registry's builders in networks/__init__.py, as plain data).
ARCHITECTURE_BLOCKS = {"unet": "double_conv", "residual_unet": "residual", "residual_se_unet": "residual_se"}
ACTIVATIONS = ("softmax", "sigmoid", None)


class PackagedUNet(nn.Module):
    """A U-Net and its final activation, on 5D input.

    Args:
        architecture: ``"unet"``, ``"residual_unet"`` or ``"residual_se_unet"`` (see
            :mod:`unet3d_lightning.networks`). Default ``"unet"``.
        activation: ``"softmax"`` (over dim 1), ``"sigmoid"`` or None (raw outputs, e.g. regression). Default
            ``"softmax"``.
        spatial_dims: 3, or 2 for a 2D network applied to every z-slice. Default 3.
        **network_args: the other arguments of :class:`~unet3d_lightning.networks.unet.UNet` (``in_channels``,
            ``out_channels``, ``f_maps``, ``num_levels``, ``layer_order``, ``num_groups``, ``upsample``,
            ``variant``, ...), with UNet's defaults.

    The parameters are those of the U-Net under the prefix ``net.``, as in a unet3d checkpoint's ``state_dict``.
    """

    def __init__(
        self, architecture: str = "unet", activation: str | None = "softmax", spatial_dims: int = 3,
        **network_args: Any,
    ) -> None:
        super().__init__()
        if architecture not in ARCHITECTURE_BLOCKS:
            raise ValueError(f"architecture {architecture!r} is not one of {list(ARCHITECTURE_BLOCKS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {list(ACTIVATIONS)}")
        self.activation = activation
        self.spatial_dims = spatial_dims
        self.net = UNet(block=ARCHITECTURE_BLOCKS[architecture], spatial_dims=spatial_dims, **network_args)

    def forward(self, x: Tensor) -> Tensor:
        if self.spatial_dims == 2:
            b, c, d, h, w = x.shape
            out = self.net(x.transpose(1, 2).reshape(b * d, c, h, w))
            out = out.reshape(b, d, out.shape[1], h, w).transpose(1, 2)
        else:
            out = self.net(x)
        if self.activation == "softmax":
            return torch.softmax(out, dim=1)
        if self.activation == "sigmoid":
            return torch.sigmoid(out)
        return out


def standalone_source() -> str:
    """The source of this module and of the modules of this folder it imports (:mod:`.unet`, :mod:`.blocks`, and
    theirs), each after those it imports, as one file that imports only torch and the standard library (the
    ``from .x import`` statements dropped; the ``from __future__`` import once, at the top)."""
    import re
    from pathlib import Path

    here = Path(__file__).parent
    relative = re.compile(r"^from \.(\w+) import")
    order: list[str] = []
    bodies: dict[str, list[str]] = {}

    def add(name: str) -> None:
        if name in bodies:
            return
        bodies[name] = []
        kept, skipping = [], False
        for line in (here / f"{name}.py").read_text(encoding="utf-8").splitlines():
            if skipping:
                skipping = not line.rstrip().endswith(")")
                continue
            if line.startswith("from __future__"):
                continue
            found = relative.match(line)
            if found:
                add(found.group(1))
                skipping = line.rstrip().endswith("(")
                continue
            kept.append(line)
        bodies[name] = kept
        order.append(name)

    add("packaged")
    parts = ['"""unet3d-lightning\'s U-Net (networks/' + ".py, networks/".join(order) + '.py) as one file, for '
             'bioimage.io tools; build it with PackagedUNet(**kwargs)."""', "", "from __future__ import annotations"]
    for name in order:
        parts += ["", f"# ---- networks/{name}.py", *bodies[name]]
    return "\n".join(parts) + "\n"
