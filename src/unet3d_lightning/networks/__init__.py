"""The networks of ``model.architecture``: one U-Net family (:class:`~unet3d_lightning.networks.unet.UNet`) and a
registry of its builders, in the pattern of segment-anything's ``build_sam.py``.

===================  =====================================================================================
``unet``             Çiçek et al. 2016 (arXiv:1606.06650): two convolutions per level, decoder joins the skip
                     connection by concatenation.
``residual_unet``    residual blocks, Lee et al. 2017 (arXiv:1706.00120): each level is a 1×1 projection to the
                     level's channels followed by two convolutions whose result is added back to the projection;
                     the decoder upsamples with a transposed convolution to the skip connection's channels and
                     joins by summation.
``residual_se_unet`` ``residual_unet`` whose blocks end in a concurrent spatial-and-channel squeeze-excitation
                     (scSE, Roy et al. 2018, arXiv:1803.02579): ``max(x · σ(fc(avgpool(x))), x · σ(conv1x1(x)))``.
===================  =====================================================================================

These are the structures of pytorch-3dunet's ``UNet3D`` / ``ResidualUNet3D`` / ``ResidualUNetSE3D`` and their 2D
counterparts, so its trained models can be expressed here (``unet3d import-pytorch3dunet``, ``variant
"pytorch3dunet"``). A new architecture is a builder registered here, and its name added to
``module.Architecture`` (the choices the command line offers)::

    @register("my_unet")
    def build_my_unet(**network_args) -> nn.Module:
        return UNet(block="residual", joining="concat", **network_args)

2D networks (``spatial_dims=2``) take ``(B, C, H, W)``; :func:`slice_wise` applies one to every z-slice of a
``(B, C, D, H, W)`` batch, which is how the module trains and predicts on 3D volumes slice by slice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from .blocks import (
    DEFAULT_DROPOUT,
    LAYER_LETTERS,
    SPATIAL_DIMS,
    VARIANTS,
    DoubleConv,
    ResidualBlock,
    SingleConv,
    SqueezeExcitation,
    check_spatial_dims,
    conv_class,
    parse_layer_order,
)
from .kernels import KernelSetting, conv_kernels, patch_divisor, pool_kernels, receptive_field
from .unet import (
    BLOCKS,
    JOININGS,
    UPSAMPLE_MODES,
    DecoderLevel,
    UNet,
    UNet3D,
    check_input,
    has_forward_hooks,
    level_channels,
)

Builder = Callable[..., nn.Module]
# architecture name -> builder taking the network arguments of UNet (in_channels ... variant) as keywords
ARCHITECTURE_BUILDERS: dict[str, Builder] = {}


def register(architecture: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``architecture`` a value of ``model.architecture``, built by the decorated function."""

    def add(builder: Builder) -> Builder:
        ARCHITECTURE_BUILDERS[architecture] = builder
        return builder

    return add


@register("unet")
def build_unet(**network_args) -> nn.Module:
    return UNet(block="double_conv", **network_args)


@register("residual_unet")
def build_residual_unet(**network_args) -> nn.Module:
    return UNet(block="residual", **network_args)


@register("residual_se_unet")
def build_residual_se_unet(**network_args) -> nn.Module:
    return UNet(block="residual_se", **network_args)


ARCHITECTURES = tuple(ARCHITECTURE_BUILDERS)


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
    pool_kernel_size: KernelSetting = 2,
    conv_kernel_size: KernelSetting = 3,
    dropout: float | Sequence[float] = DEFAULT_DROPOUT,
) -> nn.Module:
    """The network of ``model.architecture``; every other argument as in :class:`UNet`.

    Args:
        architecture: a name of :data:`ARCHITECTURE_BUILDERS`: ``"unet"``, ``"residual_unet"`` or
            ``"residual_se_unet"``. Default ``"unet"``.
        spatial_dims: 3 or 2. Default 3.
        variant: ``"native"`` or ``"pytorch3dunet"`` (see :mod:`unet3d_lightning.networks.unet`). Default
            ``"native"``.
        pool_kernel_size, conv_kernel_size: per-level, per-axis pooling factors and convolution kernels (an int, one
            ``[z, y, x]``, or one per level; :mod:`~unet3d_lightning.networks.kernels`). Default 2 and 3.
        dropout: probability of the layer order's ``d``/``D`` layers. Default 0.1.

    Raises:
        ValueError: an unknown architecture or variant, or arguments the network rejects.
    """
    builder = ARCHITECTURE_BUILDERS.get(architecture)
    if builder is None:
        raise ValueError(f"architecture {architecture!r} is not one of {list(ARCHITECTURE_BUILDERS)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {list(VARIANTS)}")
    return builder(
        in_channels=in_channels, out_channels=out_channels, f_maps=f_maps, num_levels=num_levels,
        layer_order=layer_order, num_groups=num_groups, upsample=upsample, spatial_dims=spatial_dims,
        variant=variant, pool_kernel_size=pool_kernel_size, conv_kernel_size=conv_kernel_size, dropout=dropout,
    )


def slice_wise(net: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply the 2D network ``net`` to every z-slice of ``x`` ``(B, C, D, H, W)``; returns ``(B, C', D, H, W)``.

    The slices become one batch of ``B * D`` images (for the usual 1-slice patches a free reshape).
    """
    b, c, d, h, w = x.shape
    out = net(x.transpose(1, 2).reshape(b * d, c, h, w))
    return out.reshape(b, d, out.shape[1], h, w).transpose(1, 2)


__all__ = [
    "ARCHITECTURES", "ARCHITECTURE_BUILDERS", "BLOCKS", "DEFAULT_DROPOUT", "KernelSetting", "conv_kernels",
    "patch_divisor", "pool_kernels", "receptive_field", "JOININGS", "LAYER_LETTERS", "SPATIAL_DIMS",
    "UPSAMPLE_MODES", "VARIANTS", "DecoderLevel", "DoubleConv", "ResidualBlock", "SingleConv", "SqueezeExcitation",
    "UNet", "UNet3D", "build_network", "build_residual_se_unet", "build_residual_unet", "build_unet",
    "check_input", "check_spatial_dims", "conv_class", "has_forward_hooks", "level_channels", "parse_layer_order",
    "register", "slice_wise",
]
