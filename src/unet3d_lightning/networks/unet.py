"""The U-Net: one class for the 3D U-Net of Çiçek et al. 2016 ("3D U-Net: Learning Dense Volumetric Segmentation
from Sparse Annotation", arXiv:1606.06650), its residual and squeeze-excitation relatives, their 2D counterparts
and the networks imported from pytorch-3dunet.

Architecture, for ``f_maps=64, num_levels=4`` and double-convolution blocks::

    level 0:  in ─► DoubleConv(in → 32 → 64) ─────────────────────────────► concat ─► DoubleConv(→ 64) ─► 1×1×1 conv ─► logits
    level 1:        MaxPool ─► DoubleConv(64 → 128) ──────────────► concat ─► DoubleConv(→ 128) ─┘ up
    level 2:              MaxPool ─► DoubleConv(128 → 256) ──► concat ─► DoubleConv(→ 256) ─┘ up
    level 3:                    MaxPool ─► DoubleConv(256 → 512) ─┘ up

As in the paper, the first convolution of each encoder level goes to half the level's channels (never fewer than
its input), and each decoder level concatenates the upsampled deeper features with the skip connection. With
residual blocks (Lee et al. 2017, arXiv:1706.00120; see :class:`~unet3d_lightning.networks.blocks.ResidualBlock`)
each level is one block, and the decoder upsamples with a transposed convolution to the skip connection's channels
and joins by summation, as pytorch-3dunet's ``ResidualUNet3D``.

Pooling and convolution kernels may differ per level and axis (``pool_kernel_size``, ``conv_kernel_size``; see
:mod:`~unet3d_lightning.networks.kernels`): e.g. ``[1, 2, 2]`` pooling for anisotropic voxels, each decoder undoing
its level's factors. The defaults, 2 and 3 everywhere, build the classic network module for module.

Any input size works: pooling uses ``ceil_mode`` (a level of size ``f k + r`` pools to ``k + 1``), and upsampling
targets the exact size of the skip connection (``ConvTranspose3d`` of kernel ``2f - 1``, stride ``f`` and padding
``f - 1`` with ``output_size``, which reaches every size ceil-mode pooling came from, or ``interpolate`` with
``size``). Nothing is padded or cropped, so the output has exactly the input's spatial size, and a size of ``n``
along an axis needs no multiple of the axis' pooling factors multiplied (the patch-size rule of the data asks only
for at least that many voxels, so that no level pools an axis already down to one voxel).

pytorch-3dunet's layer details differ from ours in a few places, recorded in the checkpoint as ``variant``:

- ``"native"`` (training here): ceil-mode pooling and exact-size upsampling, so any input size works and nothing is
  resized; a convolution has a bias unless a normalisation follows it; the transposed convolution of a
  double-convolution U-Net keeps the deeper level's channels (the concatenation then has deep + skip channels).
- ``"pytorch3dunet"`` (imported models): floor-mode pooling, then the upsampled features resized to the skip
  connection with nearest-neighbour interpolation (odd sizes come out as pytorch-3dunet computes them); bias-free
  transposed convolutions to the skip connection's channels; a convolution has a bias only when the layer order has
  no normalisation at all; LeakyReLU slope 0.01 inside convolution layers.

Without gradients (prediction, validation) the decoders run layer by layer, each tensor released as soon as the next
layer has read it (:meth:`UNet.forward`); the result is bit-identical to calling the modules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .blocks import (
    DEFAULT_DROPOUT,
    VARIANTS,
    DoubleConv,
    ResidualBlock,
    check_spatial_dims,
    conv_class,
    dropout_pair,
    parse_layer_order,
)
from .kernels import KernelSetting, conv_kernels, pool_kernels

UPSAMPLE_MODES = ("deconv", "interpolate")
BLOCKS = ("double_conv", "residual", "residual_se")
JOININGS = ("concat", "sum")
# Before the networks were one family, the U-Net of double convolutions named its decoder blocks ``conv``.
_OLD_DECODER_BLOCK = re.compile(r"decoders\.(\d+)\.conv\.")


def check_input(x: Tensor, spatial_dims: int) -> None:
    """Raise unless ``x`` is ``(B, C, D, H, W)`` for a 3D network or ``(B, C, H, W)`` for a 2D one."""
    if x.dim() != spatial_dims + 2:
        axes = "z, y, x" if spatial_dims == 3 else "y, x"
        raise ValueError(
            f"a {spatial_dims}D network expects a {spatial_dims + 2}D input (batch, channels, {axes}), got shape "
            f"{tuple(x.shape)}"
        )


def level_channels(f_maps: int | Sequence[int], num_levels: int = 4) -> list[int]:
    """Channels of each level: ``f_maps * 2**i`` for an int, or the explicit list."""
    if isinstance(f_maps, int):
        if f_maps < 1 or num_levels < 1:
            raise ValueError(f"f_maps ({f_maps}) and num_levels ({num_levels}) must be at least 1")
        return [f_maps * 2**i for i in range(num_levels)]
    channels = [int(c) for c in f_maps]
    if not channels or min(channels) < 1:
        raise ValueError(f"f_maps {list(f_maps)} must be a non-empty list of positive channel counts")
    if num_levels not in (len(channels), 4):
        raise ValueError(f"f_maps lists {len(channels)} levels but num_levels is {num_levels}; drop one of them")
    return channels


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether forward (pre-)hooks are registered on ``module`` or on a non-leaf module inside it (or globally)."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks for m in module.modules() if next(m.children(), None) is not None
    )


class DecoderLevel(nn.Module):
    """Upsample the deeper features to the skip connection's size, join them (concatenate or add), then one block.

    Args:
        deep_channels, skip_channels: channels of the deeper level and of the skip connection.
        make_block: ``(in_channels, out_channels) -> block``.
        upsample: ``"deconv"`` (a transposed convolution of stride ``scale``) or ``"interpolate"`` (nearest).
            Default ``"deconv"``.
        joining: ``"concat"`` (skip first, as pytorch-3dunet) or ``"sum"``. Default ``"concat"``.
        spatial_dims: 3 or 2. Default 3.
        variant: ``"native"`` (exact-size transposed convolution with bias) or ``"pytorch3dunet"`` (bias-free, then
            nearest resizing to the skip's size). Default ``"native"``.
        up_channels: output channels of the transposed convolution. Default None: ``skip_channels``.
        scale: the pooling factor per axis between this level and the deeper one, which the transposed convolution
            undoes with that stride: native, kernel ``2f - 1`` and padding ``f - 1`` per axis (3 and 1 for the
            classic ``f = 2``; a 1×1 kernel along an axis that is not pooled), which reaches every size that
            ceil-mode pooling came from; pytorch-3dunet's, kernel 3 and padding 1. Default 2 on every axis.
    """

    def __init__(
        self, deep_channels: int, skip_channels: int, make_block: Callable[[int, int], nn.Module],
        upsample: str = "deconv", joining: str = "concat", spatial_dims: int = 3, variant: str = "native",
        up_channels: int | None = None, scale: int | Sequence[int] = 2,
    ) -> None:
        super().__init__()
        self.variant = variant
        self.up: nn.Module | None = None
        if upsample == "deconv":
            up_channels = skip_channels if up_channels is None else up_channels
            # kernel 2f-1, stride f, padding f-1 gives f n - f + 1 ... f n voxels (output_size picks): every size
            # that ceil-mode pooling by f brings down to n. For f = 2: kernel 3, stride 2, padding 1, as ever.
            transposed = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
            factors = (scale,) * spatial_dims if isinstance(scale, int) else tuple(scale)
            if variant == "native":
                kernel, padding = tuple(2 * f - 1 for f in factors), tuple(f - 1 for f in factors)
            else:
                kernel, padding = (3,) * spatial_dims, (1,) * spatial_dims
            self.up = transposed(
                deep_channels, up_channels, kernel_size=kernel, stride=factors, padding=padding,
                bias=variant == "native",
            )
        else:
            up_channels = deep_channels
        if joining == "sum" and up_channels != skip_channels:
            raise ValueError("summation joining needs upsample 'deconv' (to bring the channels to the skip's)")
        self.joining = joining
        self.block = make_block(skip_channels + up_channels if joining == "concat" else skip_channels, skip_channels)

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        return self.block(self.join(deep, skip))

    def join(self, deep: Tensor, skip: Tensor) -> Tensor:
        """The block's input: the upsampled deeper features joined to the skip connection (skip first).

        The upsampled features are only an input of the join: no name keeps them alive while the block runs (at
        full resolution they are the largest tensor of the decoder after the concatenation)."""
        size = skip.shape[2:]
        if self.up is None:
            up = F.interpolate(deep, size=size, mode="nearest")
        elif self.variant == "native":
            up = self.up(deep, output_size=size)
        else:
            up = F.interpolate(self.up(deep), size=size, mode="nearest")
        return torch.cat([skip, up], dim=1) if self.joining == "concat" else skip + up

    def layers(self) -> Iterator[nn.Module]:
        """What :meth:`forward` applies after :meth:`join`, as modules to call one after the other: a double
        convolution layer by layer (so each input can be freed once read), a residual block as a whole."""
        if isinstance(self.block, DoubleConv):
            for single in self.block:
                yield from single
        else:
            yield self.block


def _rename_old_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # Runs before the keys are checked, on the dict load_state_dict works on (its own shallow copy): renaming in
    # place makes a strict load of an old checkpoint succeed.
    for key in [k for k in state_dict if k.startswith(prefix)]:
        match = _OLD_DECODER_BLOCK.match(key, len(prefix))
        if match:
            state_dict[f"{prefix}decoders.{match.group(1)}.block.{key[match.end():]}"] = state_dict.pop(key)


class UNet(nn.Module):
    """U-Net of double-convolution, residual or residual squeeze-excitation blocks, 3D or 2D, with native or
    pytorch-3dunet layer details; returns logits of the input's spatial size.

    Args:
        in_channels: channels of the raw input (1 for a grey-scale volume). Default 1.
        out_channels: output channels: number of classes for class-id labels, number of masks for binary labels.
            Default 2.
        f_maps: an int gives the first level's channels, doubled at each deeper level
            (``64`` → ``[64, 128, 256, 512]``); a list gives every level's channels explicitly (and then
            ``num_levels`` must be its length or left at its default). Default 64, as the original.
        num_levels: depth of the U (number of resolution levels). Default 4.
        layer_order: order of the layers in each convolution block, e.g. ``"crg"`` (conv, ReLU, GroupNorm — the
            original's default), ``"gcr"``, ``"cbr"``; see :func:`~unet3d_lightning.networks.blocks.parse_layer_order`.
            Default ``"crg"``.
        num_groups: groups of every GroupNorm; each level's channel count must be divisible by it (a GroupNorm
            that sees fewer channels than groups, e.g. before the first conv, uses one group). Default 8.
        upsample: ``"deconv"`` (learned ``ConvTranspose3d``, the original's default) or ``"interpolate"``
            (nearest-neighbour ``F.interpolate``, the original's ``--interpolate``). Default ``"deconv"``.
        spatial_dims: 3 for volumes ``(B, C, D, H, W)``, 2 for images ``(B, C, H, W)`` (every layer its 2D
            counterpart: ``Conv2d``, ``BatchNorm2d``, 2D pooling). Default 3.
        block: ``"double_conv"`` (Çiçek et al.; pytorch-3dunet's ``UNet3D``), ``"residual"`` or ``"residual_se"``
            (its ``ResidualUNet3D`` / ``ResidualUNetSE3D``). Default ``"double_conv"``.
        variant: ``"native"`` or ``"pytorch3dunet"`` (see the module docstring). Default ``"native"``.
        joining: how a decoder joins the skip connection, ``"concat"`` or ``"sum"``. Default None: as
            pytorch-3dunet by default, summation for residual blocks with ``deconv`` upsampling, else concatenation.
        pool_kernel_size: pooling factor (max-pooling window = stride) of each level: an int for every axis and
            level, one ``[z, y, x]`` (``[y, x]`` in 2D) for every level, or ``num_levels - 1`` of them, one per
            pooling (see :mod:`~unet3d_lightning.networks.kernels`). The decoders upsample by the same factors.
            Default 2.
        conv_kernel_size: kernel of every convolution of a level (encoder and decoder), in the same forms with
            ``num_levels`` entries; odd sizes only, padded to keep the size. Default 3.
        dropout: probability of the ``d``/``D`` layers of ``layer_order``, one value or ``[first, second]`` per
            block's two convolutions; no effect without those letters, nor in eval mode (prediction, validation).
            Default 0.1 (pytorch-3dunet's ``dropout_prob``).

    Example::

        >>> net = UNet(in_channels=1, out_channels=3, f_maps=8, num_levels=3)
        >>> net(torch.zeros(2, 1, 20, 33, 31)).shape
        torch.Size([2, 3, 20, 33, 31])
        >>> UNet(1, 3, f_maps=8, num_levels=3, block="residual_se")(torch.zeros(2, 1, 20, 33, 31)).shape
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
        spatial_dims: int = 3,
        block: str = "double_conv",
        variant: str = "native",
        joining: str | None = None,
        pool_kernel_size: KernelSetting = 2,
        conv_kernel_size: KernelSetting = 3,
        dropout: float | Sequence[float] = DEFAULT_DROPOUT,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be at least 1")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample {upsample!r} is not one of {list(UPSAMPLE_MODES)}")
        if block not in BLOCKS:
            raise ValueError(f"block {block!r} is not one of {', '.join(BLOCKS)}")
        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r} is not one of {list(VARIANTS)}")
        if joining is None:
            joining = "sum" if block != "double_conv" and upsample == "deconv" else "concat"
        if joining not in JOININGS:
            raise ValueError(f"joining {joining!r} is not one of {list(JOININGS)}")
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.block = block
        self.variant = variant
        self.channels = level_channels(f_maps, num_levels)
        order = parse_layer_order(layer_order)
        # Per level and axis; plain tuples, no modules: the classic network's modules and weights stay as they were.
        self.pool_kernels = pool_kernels(pool_kernel_size, len(self.channels), spatial_dims)
        self.conv_kernels = conv_kernels(conv_kernel_size, len(self.channels), spatial_dims)
        drop = dropout_pair(dropout)

        def block_at(level: int, cin: int, cout: int, mid: int) -> nn.Module:
            kernel = self.conv_kernels[level]
            if block == "double_conv":
                return DoubleConv(cin, mid, cout, order, num_groups, spatial_dims, variant, kernel, drop)
            return ResidualBlock(cin, cout, order, num_groups, spatial_dims, variant, block == "residual_se",
                                 kernel, drop)

        def encoder_block(level: int, cin: int, cout: int) -> nn.Module:
            # The first convolution goes to half the level's channels, never below its input (Çiçek et al.).
            return block_at(level, cin, cout, max(cout // 2, cin))

        def decoder_block(level: int) -> Callable[[int, int], nn.Module]:
            return lambda cin, cout: block_at(level, cin, cout, cout)

        # The native double-convolution U-Net's transposed convolution keeps the deeper level's channels; every
        # other one goes to the skip connection's (which summation needs, and pytorch-3dunet does).
        keep_deep = block == "double_conv" and variant == "native" and joining == "concat"
        self.encoders = nn.ModuleList()
        previous = in_channels
        for level, channels in enumerate(self.channels):
            self.encoders.append(encoder_block(level, previous, channels))
            previous = channels
        levels = range(len(self.channels) - 2, -1, -1)  # the skip connection's level of each decoder, deepest first
        self.decoders = nn.ModuleList(
            DecoderLevel(deep, skip, decoder_block(level), upsample, joining, spatial_dims, variant,
                         up_channels=deep if keep_deep else skip, scale=self.pool_kernels[level])
            for deep, skip, level in zip(self.channels[:0:-1], self.channels[-2::-1], levels)
        )
        self.final_conv = conv_class(spatial_dims)(self.channels[0], out_channels, kernel_size=1)
        # torch < 2.5 has only the private name of the same registration.
        register = getattr(self, "register_load_state_dict_pre_hook", None)
        if register is not None:
            register(_rename_old_keys)
        else:
            self._register_load_state_dict_pre_hook(_rename_old_keys, with_module=True)

    @property
    def patch_divisor(self) -> tuple[int, ...]:
        """Per axis of the input (``(z, y, x)``, or ``(y, x)`` for a 2D network), the product of the pooling factors:
        the fewest voxels an input should have along it (:func:`~unet3d_lightning.networks.kernels.patch_divisor`)."""
        return tuple(math.prod(level[axis] for level in self.pool_kernels) for axis in range(self.spatial_dims))

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.spatial_dims)
        pool = F.max_pool3d if self.spatial_dims == 3 else F.max_pool2d
        # Native: ceil mode keeps every voxel of an odd-sized level; pytorch-3dunet floors (and resizes on the way up).
        ceil_mode = self.variant == "native"
        skips = []
        for i, encoder in enumerate(self.encoders):
            if i > 0:
                x = pool(x, kernel_size=self.pool_kernels[i - 1], ceil_mode=ceil_mode)
            x = encoder(x)
            skips.append(x)
        skips.pop()  # the deepest level's output is x itself
        if torch.is_grad_enabled() or any(has_forward_hooks(d) for d in self.decoders):
            for decoder in self.decoders:
                x = decoder(x, skips.pop())  # each skip connection is released once its decoder has used it
            return self.final_conv(x)
        # Inference (prediction, validation): the same layers, run one by one so that every tensor is released as
        # soon as the next layer has read it. Calling a decoder module would keep its arguments (the skip connection
        # and the deeper features) and its concatenation alive until its last convolution: at full resolution that
        # is about as much memory again as the convolutions need (a third less peak memory for a small U-Net).
        # Only without forward hooks on the decoders and their blocks, which would not run here.
        for decoder in self.decoders:
            x = decoder.join(x, skips.pop())  # pop: no name but the join's result keeps the skip connection
            for layer in decoder.layers():
                x = layer(x)
        return self.final_conv(x)


# The public name of the network since the first version; it builds every U-Net of the family, 2D ones included.
UNet3D = UNet
