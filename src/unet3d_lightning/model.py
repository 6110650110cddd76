"""The 3D U-Net of Çiçek et al. 2016 ("3D U-Net: Learning Dense Volumetric Segmentation from Sparse Annotation",
arXiv:1606.06650), with the configurable layer order of the original pytorch-3dunet.

Architecture, for ``f_maps=64, num_levels=4``::

    level 0:  in ─► DoubleConv(in → 32 → 64) ─────────────────────────────► concat ─► DoubleConv(→ 64) ─► 1×1×1 conv ─► logits
    level 1:        MaxPool ─► DoubleConv(64 → 128) ──────────────► concat ─► DoubleConv(→ 128) ─┘ up
    level 2:              MaxPool ─► DoubleConv(128 → 256) ──► concat ─► DoubleConv(→ 256) ─┘ up
    level 3:                    MaxPool ─► DoubleConv(256 → 512) ─┘ up

As in the paper, the first convolution of each encoder level goes to half the level's channels (never fewer than
its input), and each decoder level concatenates the upsampled deeper features with the skip connection.

Any input size works: pooling uses ``ceil_mode`` (a level of odd size ``2k+1`` pools to ``k+1``), and upsampling
targets the exact size of the skip connection (``ConvTranspose3d`` with ``output_size``, or ``interpolate`` with
``size``). Nothing is padded or cropped, so the output has exactly the input's spatial size, and a size of ``n``
along an axis needs no multiple of ``2**(num_levels - 1)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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
}
UPSAMPLE_MODES = ("deconv", "interpolate")
SPATIAL_DIMS = (2, 3)
# Layer details: ours, or those of pytorch-3dunet (for networks imported from it; see ``architectures.py``).
VARIANTS = ("native", "pytorch3dunet")


def parse_layer_order(layer_order: str) -> str:
    """Validate a layer-order string such as ``"crg"`` (conv, ReLU, GroupNorm) and return it lower-cased.

    Letters: ``c`` conv, ``r`` ReLU, ``l`` LeakyReLU, ``e`` ELU, ``g`` GroupNorm, ``b`` BatchNorm. Exactly one ``c``,
    at most one activation and at most one normalisation, no letter twice.
    """
    valid = ", ".join(f"'{k}' {v}" for k, v in LAYER_LETTERS.items())
    order = str(layer_order).lower()
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


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs oneDNN's kernels on the CPU also where PyTorch's choice would not.

    PyTorch picks oneDNN for a CPU convolution by a rule written for 2D images: a batch of one, a kernel of at most
    3 and ``batch * channels * depth * height <= 20480`` go to its own im2col convolution instead. For 3D patches
    that catches the first, few-channel layers at full resolution: with a batch of 1 (the default) a 4 → 8 channel
    3×3×3 convolution of a 32×128×128 patch took 214 ms instead of 16 ms on the benchmark machine, and the U-Net's
    forward pass 0.72 s per patch instead of 0.23 s. Float32 convolutions with a kernel larger than 1 outside
    autocast go to oneDNN here (same result up to float32 rounding, gradients included); everything else, any
    run with ``torch.backends.mkldnn`` disabled and ``torch.compile``'s tracing take ``nn.Conv3d``'s own path. Parameters and state-dict keys are
    ``nn.Conv3d``'s.
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (
            input.device.type == "cpu"
            and input.dtype == torch.float32
            and weight.dtype == torch.float32
            and input.dim() == 5
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and self.kernel_size != (1, 1, 1)
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()  # the compiler chooses its own kernels (and traces fake tensors)
        ):
            return torch.ops.aten.mkldnn_convolution(
                input, weight, bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super()._conv_forward(input, weight, bias)


def conv_class(spatial_dims: int) -> type[nn.Module]:
    """:class:`Conv3d` or ``nn.Conv2d``."""
    return Conv3d if spatial_dims == 3 else nn.Conv2d


def check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims {spatial_dims!r} must be 3 (volumes) or 2 (slice by slice)")
    return int(spatial_dims)


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
    """

    def __init__(
        self, in_channels: int, out_channels: int, layer_order: str = "crg", num_groups: int = 8,
        spatial_dims: int = 3, variant: str = "native",
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
                conv = conv_class(spatial_dims)(in_channels, out_channels, kernel_size=3, padding=1, bias=bias)
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


class DoubleConv(nn.Sequential):
    """Two :class:`SingleConv`; ``mid_channels`` is the first one's output."""

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, layer_order: str, num_groups: int,
        spatial_dims: int = 3, variant: str = "native",
    ) -> None:
        super().__init__(
            SingleConv(in_channels, mid_channels, layer_order, num_groups, spatial_dims, variant),
            SingleConv(mid_channels, out_channels, layer_order, num_groups, spatial_dims, variant),
        )


class Decoder(nn.Module):
    """Upsample the deeper features to the skip connection's size, concatenate, then :class:`DoubleConv`."""

    def __init__(
        self, deep_channels: int, skip_channels: int, layer_order: str, num_groups: int, upsample: str,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        self.upsample = upsample
        if upsample == "deconv":
            # kernel 3, stride 2, padding 1 gives 2n-1 or 2n voxels (output_size picks); with ceil-mode pooling
            # that is always the skip connection's size.
            transposed = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
            self.up = transposed(deep_channels, deep_channels, kernel_size=3, stride=2, padding=1)
        self.conv = DoubleConv(
            deep_channels + skip_channels, skip_channels, skip_channels, layer_order, num_groups, spatial_dims
        )

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        return self.conv(self.join(deep, skip))

    def join(self, deep: Tensor, skip: Tensor) -> Tensor:
        """The convolutions' input: the skip connection, then the upsampled deeper features, along channels.

        The upsampled features are only an input of the concatenation: no name keeps them alive while the
        convolutions run (at full resolution they are the largest tensor of the decoder after the concatenation)."""
        return torch.cat([skip, self._upsample(deep, skip.shape[2:])], dim=1)

    def layers(self) -> Iterator[nn.Module]:
        """The layers of :attr:`conv` in the order they run (what :meth:`forward` applies after :meth:`join`)."""
        for block in self.conv:
            yield from block

    def _upsample(self, deep: Tensor, size: torch.Size) -> Tensor:
        if self.upsample == "deconv":
            return self.up(deep, output_size=size)
        return F.interpolate(deep, size=size, mode="nearest")


class UNet3D(nn.Module):
    """3D U-Net returning logits of the input's spatial size (or its 2D counterpart with ``spatial_dims=2``).

    Args:
        in_channels: channels of the raw input (1 for a grey-scale volume). Default 1.
        out_channels: output channels: number of classes for class-id labels, number of masks for binary labels.
            Default 2.
        f_maps: an int gives the first level's channels, doubled at each deeper level
            (``64`` → ``[64, 128, 256, 512]``); a list gives every level's channels explicitly (and then
            ``num_levels`` must be its length or left at its default). Default 64, as the original.
        num_levels: depth of the U (number of resolution levels). Default 4.
        layer_order: order of the layers in each convolution block, e.g. ``"crg"`` (conv, ReLU, GroupNorm — the
            original's default), ``"gcr"``, ``"cbr"``; see :func:`parse_layer_order`. Default ``"crg"``.
        num_groups: groups of every GroupNorm; each level's channel count must be divisible by it (a GroupNorm
            that sees fewer channels than groups, e.g. before the first conv, uses one group). Default 8.
        upsample: ``"deconv"`` (learned ``ConvTranspose3d``, the original's default) or ``"interpolate"``
            (nearest-neighbour ``F.interpolate``, the original's ``--interpolate``). Default ``"deconv"``.
        spatial_dims: 3 for volumes ``(B, C, D, H, W)``, 2 for images ``(B, C, H, W)`` (every layer its 2D
            counterpart: ``Conv2d``, ``BatchNorm2d``, 2D pooling). Default 3.

    Example::

        >>> net = UNet3D(in_channels=1, out_channels=3, f_maps=8, num_levels=3)
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
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be at least 1")
        self.channels = level_channels(f_maps, num_levels)
        order = parse_layer_order(layer_order)
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample {upsample!r} is not one of {list(UPSAMPLE_MODES)}")

        self.encoders = nn.ModuleList()
        previous = in_channels
        for channels in self.channels:
            self.encoders.append(
                DoubleConv(previous, max(channels // 2, previous), channels, order, num_groups, spatial_dims)
            )
            previous = channels
        self.decoders = nn.ModuleList(
            Decoder(deep, skip, order, num_groups, upsample, spatial_dims)
            for deep, skip in zip(self.channels[:0:-1], self.channels[-2::-1])
        )
        self.final_conv = conv_class(spatial_dims)(self.channels[0], out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.spatial_dims)
        pool = F.max_pool3d if self.spatial_dims == 3 else F.max_pool2d
        skips = []
        for i, encoder in enumerate(self.encoders):
            if i > 0:
                x = pool(x, kernel_size=2, ceil_mode=True)
            x = encoder(x)
            skips.append(x)
        skips.pop()  # the deepest level's output is x itself
        if torch.is_grad_enabled() or any(has_forward_hooks(d) for d in self.decoders):
            for decoder in self.decoders:
                x = decoder(x, skips.pop())
            return self.final_conv(x)
        # Inference (prediction, validation): the same layers, run one by one so that every tensor is released as
        # soon as the next layer has read it. Calling a decoder module would keep its arguments (the skip connection
        # and the deeper features) and its concatenation alive until its last convolution: at full resolution that
        # is about as much memory again as the convolutions need (a third less peak memory for a small U-Net).
        # Only without forward hooks on the decoders and their blocks, which would not run here.
        for decoder in self.decoders:
            x = decoder.join(x, skips.pop())  # pop: no name but the concatenation keeps the skip connection
            for layer in decoder.layers():
                x = layer(x)
        return self.final_conv(x)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether forward (pre-)hooks are registered on ``module`` or on a non-leaf module inside it (or globally)."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks for m in module.modules() if next(m.children(), None) is not None
    )


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
