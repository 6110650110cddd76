"""The building blocks of the U-Nets: layer-order parsing, the single and double convolution, the residual block of
Lee et al. 2017 and the concurrent spatial-and-channel squeeze-excitation of Roy et al. 2018. Standard torch
modules only (``nn.Conv3d``, ``nn.GroupNorm``, ...), so every network built from them traces, compiles and exports.

Layer details differ between networks trained here and networks imported from pytorch-3dunet; a block takes them
from ``variant`` (see :mod:`unet3d_lightning.networks.unet`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

LAYER_LETTERS = {
    "c": "3D convolution",
    "r": "ReLU",
    "l": "LeakyReLU",
    "e": "ELU",
    "g": "GroupNorm",
    "b": "BatchNorm3d",
    "d": "Dropout (model.dropout)",
    "D": "channel Dropout (whole feature maps; pytorch-3dunet's Dropout2d)",
}
# pytorch-3dunet's dropout probability where a config gives none (its dropout_prob default).
DEFAULT_DROPOUT = 0.1
SPATIAL_DIMS = (2, 3)
# Layer details: ours, or those of pytorch-3dunet (for networks imported from it).
VARIANTS = ("native", "pytorch3dunet")


def parse_layer_order(layer_order: str) -> str:
    """Validate a layer-order string such as ``"crg"`` (conv, ReLU, GroupNorm) and return it lower-cased.

    Letters: ``c`` conv, ``r`` ReLU, ``l`` LeakyReLU, ``e`` ELU, ``g`` GroupNorm, ``b`` BatchNorm, and as in
    pytorch-3dunet ``d`` dropout (``nn.Dropout``: each element zeroed with the dropout probability) and ``D``
    channel dropout (whole feature maps zeroed: pytorch-3dunet's ``nn.Dropout2d``, which on a 3D network's 5D
    features computes what ``nn.Dropout3d`` does). Exactly one ``c``, at most one activation and at most one
    normalisation, no letter twice. Letters are case-insensitive except ``d``/``D``.
    """
    valid = ", ".join(f"'{k}' {v}" for k, v in LAYER_LETTERS.items())
    order = "".join(letter if letter in "dD" else letter.lower() for letter in str(layer_order))
    unknown = sorted(set(order) - set(LAYER_LETTERS))
    if unknown or not order:
        raise ValueError(f"layer_order {layer_order!r} has unknown letters {unknown}; valid letters are {valid}")
    if order.count("c") != 1:
        raise ValueError(f"layer_order {layer_order!r} must contain exactly one 'c' (the convolution); valid letters are {valid}")
    if len(set(order)) != len(order):
        raise ValueError(f"layer_order {layer_order!r} repeats a letter; valid letters are {valid}")
    if sum(order.count(a) for a in "rle") > 1:
        raise ValueError(f"layer_order {layer_order!r} has more than one activation (choose one of 'r', 'l', 'e')")
    if sum(order.count(n) for n in "gb") > 1:
        raise ValueError(f"layer_order {layer_order!r} has more than one normalisation (choose 'g' or 'b')")
    return order


def check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims {spatial_dims!r} must be 3 (volumes) or 2 (slice by slice)")
    return int(spatial_dims)


def conv_class(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv3d`` or ``nn.Conv2d``."""
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def _group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    # A normalisation placed before the first convolution sees the raw input's channel count (often 1); like the
    # original tool, fewer channels than groups fall back to one group instead of failing.
    groups = num_groups if channels >= num_groups else 1
    if channels % groups != 0:
        raise ValueError(
            f"GroupNorm cannot split {channels} channels into num_groups={num_groups}; choose num_groups dividing "
            "every block's channel count (each level's channels and half of them) or a layer_order without 'g'"
        )
    return nn.GroupNorm(groups, channels)


def same_padding(kernel_size: int | tuple[int, ...]) -> int | tuple[int, ...]:
    """``k // 2`` per axis: the padding that keeps the size for an odd kernel ``k``."""
    return kernel_size // 2 if isinstance(kernel_size, int) else tuple(k // 2 for k in kernel_size)


class SingleConv(nn.Sequential):
    """A 3×3×3 (or 3×3) convolution with its activation and normalisation, in the order given by ``layer_order``.

    Args:
        in_channels, out_channels: channels before and after the convolution.
        layer_order: see :func:`parse_layer_order`. Default ``"crg"``.
        num_groups: groups of a GroupNorm. Default 8.
        spatial_dims: 3 (``Conv3d``, ``BatchNorm3d``) or 2 (``Conv2d``, ``BatchNorm2d``). Default 3.
        variant: ``"native"``: the convolution has a bias unless a normalisation follows it, LeakyReLU has slope
            0.1. ``"pytorch3dunet"``: as pytorch-3dunet builds it, a bias only when the layer order has no
            normalisation at all, LeakyReLU slope 0.01 (torch's default). Default ``"native"``.
        kernel_size: the convolution's kernel, an odd int or one odd size per axis; padded by ``k // 2`` so the
            output keeps the input's size. Default 3.
        dropout: probability of the ``d``/``D`` layers of ``layer_order`` (none without them). Default 0.1.
    """

    def __init__(
        self, in_channels: int, out_channels: int, layer_order: str = "crg", num_groups: int = 8,
        spatial_dims: int = 3, variant: str = "native", kernel_size: int | tuple[int, ...] = 3,
        dropout: float = DEFAULT_DROPOUT,
    ) -> None:
        super().__init__()
        order = parse_layer_order(layer_order)
        conv_at = order.index("c")
        if variant == "pytorch3dunet":
            bias = not ("g" in order or "b" in order)
            slope = 0.01
        else:
            # A normalisation right after the convolution subtracts the mean anyway, so its bias would be wasted.
            bias = not ("g" in order[conv_at:] or "b" in order[conv_at:])
            slope = 0.1
        batch_norm = nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d
        for i, letter in enumerate(order):
            channels = in_channels if i < conv_at else out_channels
            if letter == "c":
                conv = conv_class(spatial_dims)(
                    in_channels, out_channels, kernel_size=kernel_size, padding=same_padding(kernel_size), bias=bias
                )
                self.add_module("conv", conv)
            elif letter == "r":
                self.add_module("relu", nn.ReLU(inplace=True))
            elif letter == "l":
                self.add_module("leakyrelu", nn.LeakyReLU(negative_slope=slope, inplace=True))
            elif letter == "e":
                self.add_module("elu", nn.ELU(inplace=True))
            elif letter == "g":
                self.add_module("groupnorm", _group_norm(channels, num_groups))
            elif letter == "b":
                self.add_module("batchnorm", batch_norm(channels))
            elif letter == "d":
                self.add_module("dropout", nn.Dropout(p=dropout))
            elif letter == "D":
                channel_dropout = nn.Dropout3d if spatial_dims == 3 else nn.Dropout2d
                self.add_module("channel_dropout", channel_dropout(p=dropout))


def dropout_pair(dropout: float | Sequence[float]) -> tuple[float, float]:
    """The dropout probabilities of a block's two convolutions: one for both, or ``[first, second]`` (the pair form
    of pytorch-3dunet's ``dropout_prob``); each in ``[0, 1]``."""
    pair = (dropout, dropout) if isinstance(dropout, (int, float)) else tuple(dropout)
    if len(pair) != 2 or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in pair):
        raise ValueError(
            f"dropout {dropout!r} must be a probability in [0, 1], or two of them [first, second convolution]"
        )
    return float(pair[0]), float(pair[1])


class DoubleConv(nn.Sequential):
    """Two :class:`SingleConv`; ``mid_channels`` is the first one's output. ``kernel_size`` (default 3) is both
    convolutions' kernel; ``dropout`` (default 0.1) the probability of their ``d``/``D`` layers, one value or one per
    convolution."""

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, layer_order: str, num_groups: int,
        spatial_dims: int = 3, variant: str = "native", kernel_size: int | tuple[int, ...] = 3,
        dropout: float | Sequence[float] = DEFAULT_DROPOUT,
    ) -> None:
        first, second = dropout_pair(dropout)
        super().__init__(
            SingleConv(in_channels, mid_channels, layer_order, num_groups, spatial_dims, variant, kernel_size, first),
            SingleConv(mid_channels, out_channels, layer_order, num_groups, spatial_dims, variant, kernel_size, second),
        )


class SqueezeExcitation(nn.Module):
    """Concurrent spatial and channel squeeze-excitation (scSE, Roy et al. 2018, arXiv:1803.02579), 2D or 3D.

    ``out = max(x · σ(W2 relu(W1 mean(x))), x · σ(conv1x1(x)))``: the channel branch rescales each channel by a
    weight computed from the global average of all channels, the spatial branch each voxel by a weight computed from
    its channels. Like pytorch-3dunet's ``ResNetBlockSE``, the hidden width of the channel branch is the channel
    count itself (reduction ratio 1) and the branches are joined by their element-wise maximum.

    Args:
        channels: channels of the features.
        spatial_dims: 3 or 2. Default 3.
    """

    def __init__(self, channels: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels)
        self.fc2 = nn.Linear(channels, channels)
        self.spatial = conv_class(spatial_dims)(channels, 1, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        squeezed = x.mean(dim=tuple(range(2, x.dim())))
        channel_weight = torch.sigmoid(self.fc2(F.relu(self.fc1(squeezed))))
        channel_weight = channel_weight.view(*channel_weight.shape, *([1] * (x.dim() - 2)))
        return torch.maximum(x * channel_weight, x * torch.sigmoid(self.spatial(x)))


class ResidualBlock(nn.Module):
    """Residual block of Lee et al. 2017 (arXiv:1706.00120) as pytorch-3dunet builds it, optionally with scSE.

    With ``o`` the layer order and ``o'`` the same without its activation::

        p = project(x)                       1×1 conv to the block's channels (identity when they already match)
        y = act(p + conv2_o'(conv1_o(p)))    act: the order's activation (ReLU when it has none)
        y = scSE(y)                          with squeeze_excitation only

    Args:
        in_channels, out_channels: channels before and after the block.
        layer_order: order of each convolution's layers; the second convolution drops the activation, which
            follows the addition instead. Default ``"crg"``.
        num_groups: groups of every GroupNorm. Default 8.
        spatial_dims: 3 or 2. Default 3.
        variant: ``"native"`` or ``"pytorch3dunet"`` (convolution bias and LeakyReLU slope; see
            :class:`SingleConv`). Default ``"native"``.
        squeeze_excitation: end with :class:`SqueezeExcitation`. Default False.
        kernel_size: both convolutions' kernel (odd, "same" padding). Default 3.
        dropout: probability of the ``d``/``D`` layers, one value or one per convolution; both convolutions keep the
            order's dropout letters (the second drops only the activation). Default 0.1.
    """

    def __init__(
        self, in_channels: int, out_channels: int, layer_order: str = "crg", num_groups: int = 8,
        spatial_dims: int = 3, variant: str = "native", squeeze_excitation: bool = False,
        kernel_size: int | tuple[int, ...] = 3, dropout: float | Sequence[float] = DEFAULT_DROPOUT,
    ) -> None:
        super().__init__()
        order = parse_layer_order(layer_order)
        if in_channels != out_channels:
            self.project: nn.Module = conv_class(spatial_dims)(in_channels, out_channels, kernel_size=1)
        else:
            self.project = nn.Identity()
        first, second = dropout_pair(dropout)
        self.conv1 = SingleConv(
            out_channels, out_channels, order, num_groups, spatial_dims, variant, kernel_size, first
        )
        no_activation = "".join(letter for letter in order if letter not in "rle")
        self.conv2 = SingleConv(
            out_channels, out_channels, no_activation, num_groups, spatial_dims, variant, kernel_size, second
        )
        # The activation after the sum, as in pytorch-3dunet: the order's own, ReLU when it has none; its LeakyReLU
        # slope is 0.1 in both variants.
        if "l" in order:
            self.activation: nn.Module = nn.LeakyReLU(negative_slope=0.1, inplace=True)
        elif "e" in order:
            self.activation = nn.ELU(inplace=True)
        else:
            self.activation = nn.ReLU(inplace=True)
        self.se = SqueezeExcitation(out_channels, spatial_dims) if squeeze_excitation else None

    def forward(self, x: Tensor) -> Tensor:
        residual = self.project(x)
        out = self.activation(self.conv2(self.conv1(residual)) + residual)
        return out if self.se is None else self.se(out)
