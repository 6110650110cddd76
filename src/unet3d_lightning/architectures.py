"""The U-Net architectures of ``model.architecture``, in 3D or 2D, and the networks imported from pytorch-3dunet.

===================  =====================================================================================
``unet``             :class:`~unet3d_lightning.model.UNet3D`, Çiçek et al. 2016 (arXiv:1606.06650): two
                     convolutions per level, decoder joins the skip connection by concatenation.
``residual_unet``    :class:`UNet` with residual blocks, Lee et al. 2017 (arXiv:1706.00120): each level is a
                     1×1 projection to the level's channels followed by two convolutions whose result is added
                     back to the projection; the decoder upsamples with a transposed convolution to the skip
                     connection's channels and joins by summation.
``residual_se_unet`` ``residual_unet`` whose blocks end in a concurrent spatial-and-channel squeeze-excitation
                     (scSE, Roy et al. 2018, arXiv:1803.02579): ``max(x · σ(fc(avgpool(x))), x · σ(conv1x1(x)))``.
===================  =====================================================================================

The residual block (``layer_order`` ``o``, e.g. ``"gcr"``; ``o'`` is ``o`` without its activation)::

    p = project(x)                       1×1 conv to the block's channels (identity when they already match)
    y = act(p + conv2_o'(conv1_o(p)))    act: the order's activation (ReLU when it has none)
    y = scSE(y)                          residual_se_unet only

These are the structures of pytorch-3dunet's ``ResidualUNet3D`` / ``ResidualUNetSE3D`` / ``ResidualUNet2D``, so its
trained models can be expressed here (``unet3d import-pytorch3dunet``). Their layer details differ from ours in a
few places, recorded in the checkpoint as ``variant``:

- ``"native"`` (training here): ceil-mode pooling and exact-size upsampling (a transposed convolution with
  ``output_size``), so any input size works and nothing is resized; a convolution has a bias unless a
  normalisation follows it.
- ``"pytorch3dunet"`` (imported models): floor-mode pooling, then the upsampled features resized to the skip
  connection with nearest-neighbour interpolation (odd sizes come out as pytorch-3dunet computes them); bias-free
  transposed convolutions; a convolution has a bias only when the layer order has no normalisation at all;
  LeakyReLU slope 0.01 inside convolution layers. ``unet`` in this variant is :class:`UNet` with double
  convolutions (pytorch-3dunet's ``UNet3D`` / ``UNet2D``), whose transposed convolutions go to the skip
  connection's channels.

2D networks (``spatial_dims=2``) take ``(B, C, H, W)``; :func:`slice_wise` applies one to every z-slice of a
``(B, C, D, H, W)`` batch, which is how the module trains and predicts on 3D volumes slice by slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .model import (
    UPSAMPLE_MODES,
    VARIANTS,
    DoubleConv,
    SingleConv,
    UNet3D,
    check_input,
    check_spatial_dims,
    conv_class,
    has_forward_hooks,
    level_channels,
    parse_layer_order,
)

ARCHITECTURES = ("unet", "residual_unet", "residual_se_unet")
_BLOCKS = {"unet": "double_conv", "residual_unet": "residual", "residual_se_unet": "residual_se"}


def build_network(
    architecture: str = "unet",
    in_channels: int = 1,
    out_channels: int = 2,
    f_maps: int | Sequence[int] = 64,
    num_levels: int = 4,
    layer_order: str = "crg",
    num_groups: int = 8,
    upsample: str = "deconv",
    spatial_dims: int = 3,
    variant: str = "native",
) -> nn.Module:
    """The network of ``model.architecture``; every argument as in :class:`~unet3d_lightning.model.UNet3D`.

    Args:
        architecture: ``"unet"``, ``"residual_unet"`` or ``"residual_se_unet"``. Default ``"unet"``.
        spatial_dims: 3 or 2. Default 3.
        variant: ``"native"`` or ``"pytorch3dunet"`` (see the module docstring). Default ``"native"``.

    Raises:
        ValueError: an unknown architecture or variant, or arguments the network rejects.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not one of {list(ARCHITECTURES)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {list(VARIANTS)}")
    if architecture == "unet" and variant == "native":
        # Today's network, unchanged: checkpoints written before other architectures existed load into it.
        return UNet3D(in_channels, out_channels, f_maps, num_levels, layer_order, num_groups, upsample, spatial_dims)
    return UNet(
        in_channels, out_channels, f_maps, num_levels, layer_order, num_groups, upsample,
        block=_BLOCKS[architecture], spatial_dims=spatial_dims, variant=variant,
    )


def slice_wise(net: nn.Module, x: Tensor) -> Tensor:
    """Apply the 2D network ``net`` to every z-slice of ``x`` ``(B, C, D, H, W)``; returns ``(B, C', D, H, W)``.

    The slices become one batch of ``B * D`` images (for the usual 1-slice patches a free reshape).
    """
    b, c, d, h, w = x.shape
    out = net(x.transpose(1, 2).reshape(b * d, c, h, w))
    return out.reshape(b, d, out.shape[1], h, w).transpose(1, 2)


class SqueezeExcitation(nn.Module):
    """Concurrent spatial and channel squeeze-excitation (scSE, Roy et al. 2018), 2D or 3D.

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
    """Residual block of Lee et al. 2017 as pytorch-3dunet builds it, optionally with scSE (see the module docstring).

    Args:
        in_channels, out_channels: channels before and after the block.
        layer_order: order of each convolution's layers; the second convolution drops the activation, which
            follows the addition instead. Default ``"crg"``.
        num_groups: groups of every GroupNorm. Default 8.
        spatial_dims: 3 or 2. Default 3.
        variant: ``"native"`` or ``"pytorch3dunet"`` (convolution bias and LeakyReLU slope; see
            :class:`~unet3d_lightning.model.SingleConv`). Default ``"native"``.
        squeeze_excitation: end with :class:`SqueezeExcitation`. Default False.
    """

    def __init__(
        self, in_channels: int, out_channels: int, layer_order: str = "crg", num_groups: int = 8,
        spatial_dims: int = 3, variant: str = "native", squeeze_excitation: bool = False,
    ) -> None:
        super().__init__()
        order = parse_layer_order(layer_order)
        if in_channels != out_channels:
            self.project: nn.Module = conv_class(spatial_dims)(in_channels, out_channels, kernel_size=1)
        else:
            self.project = nn.Identity()
        self.conv1 = SingleConv(out_channels, out_channels, order, num_groups, spatial_dims, variant)
        no_activation = "".join(letter for letter in order if letter not in "rle")
        self.conv2 = SingleConv(out_channels, out_channels, no_activation, num_groups, spatial_dims, variant)
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


class DecoderLevel(nn.Module):
    """Upsample the deeper features to the skip connection, join them (concatenate or add), then one block.

    Args:
        deep_channels, skip_channels: channels of the deeper level and of the skip connection.
        make_block: ``(in_channels, out_channels) -> block``.
        upsample: ``"deconv"`` (transposed convolution to ``skip_channels``) or ``"interpolate"`` (nearest).
        joining: ``"concat"`` (skip first, as pytorch-3dunet) or ``"sum"``.
        spatial_dims: 3 or 2. Default 3.
        variant: ``"native"`` (exact-size transposed convolution with bias) or ``"pytorch3dunet"`` (bias-free, then
            nearest resizing to the skip's size). Default ``"native"``.
    """

    def __init__(
        self, deep_channels: int, skip_channels: int, make_block, upsample: str, joining: str,
        spatial_dims: int = 3, variant: str = "native",
    ) -> None:
        super().__init__()
        self.variant = variant
        self.up: nn.Module | None = None
        up_channels = deep_channels
        if upsample == "deconv":
            transposed = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
            self.up = transposed(
                deep_channels, skip_channels, kernel_size=3, stride=2, padding=1, bias=variant == "native"
            )
            up_channels = skip_channels
        if joining == "sum" and up_channels != skip_channels:
            raise ValueError("summation joining needs upsample 'deconv' (to bring the channels to the skip's)")
        self.joining = joining
        self.block = make_block(skip_channels + up_channels if joining == "concat" else skip_channels, skip_channels)

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        return self.block(self.join(deep, skip))

    def join(self, deep: Tensor, skip: Tensor) -> Tensor:
        """The block's input: the upsampled deeper features joined to the skip connection."""
        size = skip.shape[2:]
        if self.up is None:
            up = F.interpolate(deep, size=size, mode="nearest")
        elif self.variant == "native":
            up = self.up(deep, output_size=size)
        else:
            up = F.interpolate(self.up(deep), size=size, mode="nearest")
        # The upsampled features are not kept alive through the block: at full resolution they are one of the
        # largest tensors.
        return torch.cat([skip, up], dim=1) if self.joining == "concat" else skip + up

    def run_inference(self, joined: list[Tensor]) -> Tensor:
        """:attr:`block` applied to ``joined.pop()`` without keeping it alive longer than the block needs: a
        double convolution layer by layer (each input freed once read), a residual block as a whole."""
        if isinstance(self.block, DoubleConv):
            x = joined.pop()
            for single in self.block:
                for layer in single:
                    x = layer(x)
            return x
        return self.block(joined.pop())


class UNet(nn.Module):
    """U-Net of double-convolution or residual blocks, 2D or 3D, with native or pytorch-3dunet layer details.

    Args:
        in_channels, out_channels, f_maps, num_levels, layer_order, num_groups, upsample: as in
            :class:`~unet3d_lightning.model.UNet3D`. Defaults 1, 2, 64, 4, ``"crg"``, 8, ``"deconv"``.
        block: ``"double_conv"`` (pytorch-3dunet's ``UNet3D``), ``"residual"`` or ``"residual_se"`` (its
            ``ResidualUNet3D`` / ``ResidualUNetSE3D``). Default ``"residual"``.
        spatial_dims: 3 (input ``(B, C, D, H, W)``) or 2 (``(B, C, H, W)``). Default 3.
        variant: ``"native"`` or ``"pytorch3dunet"`` (see the module docstring). Default ``"native"``.
        joining: how a decoder joins the skip connection, ``"concat"`` or ``"sum"``. Default None: as
            pytorch-3dunet by default, summation for residual blocks with ``deconv`` upsampling, else concatenation.

    Example::

        >>> net = UNet(1, 3, f_maps=8, num_levels=3, block="residual_se")
        >>> net(torch.zeros(2, 1, 20, 33, 31)).shape
        torch.Size([2, 3, 20, 33, 31])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        f_maps: int | Sequence[int] = 64,
        num_levels: int = 4,
        layer_order: str = "crg",
        num_groups: int = 8,
        upsample: str = "deconv",
        block: str = "residual",
        spatial_dims: int = 3,
        variant: str = "native",
        joining: str | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be at least 1")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample {upsample!r} is not one of {list(UPSAMPLE_MODES)}")
        if block not in ("double_conv", "residual", "residual_se"):
            raise ValueError(f"block {block!r} is not one of double_conv, residual, residual_se")
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.variant = variant
        self.channels = level_channels(f_maps, num_levels)
        order = parse_layer_order(layer_order)
        if joining is None:
            joining = "sum" if block != "double_conv" and upsample == "deconv" else "concat"

        def encoder_block(cin: int, cout: int) -> nn.Module:
            if block == "double_conv":
                # The first convolution goes to half the level's channels, never below its input (Çiçek et al.).
                return DoubleConv(cin, max(cout // 2, cin), cout, order, num_groups, spatial_dims, variant)
            return ResidualBlock(cin, cout, order, num_groups, spatial_dims, variant, block == "residual_se")

        def decoder_block(cin: int, cout: int) -> nn.Module:
            if block == "double_conv":
                return DoubleConv(cin, cout, cout, order, num_groups, spatial_dims, variant)
            return ResidualBlock(cin, cout, order, num_groups, spatial_dims, variant, block == "residual_se")

        self.encoders = nn.ModuleList()
        previous = in_channels
        for channels in self.channels:
            self.encoders.append(encoder_block(previous, channels))
            previous = channels
        self.decoders = nn.ModuleList(
            DecoderLevel(deep, skip, decoder_block, upsample, joining, spatial_dims, variant)
            for deep, skip in zip(self.channels[:0:-1], self.channels[-2::-1])
        )
        self.final_conv = conv_class(spatial_dims)(self.channels[0], out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.spatial_dims)
        pool = F.max_pool3d if self.spatial_dims == 3 else F.max_pool2d
        # Native: ceil mode keeps every voxel of an odd-sized level; pytorch-3dunet floors (and resizes on the way up).
        ceil_mode = self.variant == "native"
        skips = []
        for i, encoder in enumerate(self.encoders):
            if i > 0:
                x = pool(x, kernel_size=2, ceil_mode=ceil_mode)
            x = encoder(x)
            skips.append(x)
        skips.pop()  # the deepest level's output is x itself
        if torch.is_grad_enabled() or any(has_forward_hooks(d) for d in self.decoders):
            for decoder in self.decoders:
                x = decoder(x, skips.pop())  # each skip connection is released once its decoder has used it
            return self.final_conv(x)
        # Inference: as model.UNet3D, the decoders' inputs are released as soon as they are read.
        for decoder in self.decoders:
            joined = [decoder.join(x, skips.pop())]
            del x  # the deeper features: read
            x = decoder.run_inference(joined)
        return self.final_conv(x)
