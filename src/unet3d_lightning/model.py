"""Former home of the 3D U-Net, kept so that ``from unet3d_lightning.model import UNet3D`` (and the other names it
held) keep working. The network lives in :mod:`unet3d_lightning.networks`."""

from torch.nn import Conv3d  # formerly a CPU-routing subclass; the routing is now prediction.engine's

from .networks.blocks import (
    LAYER_LETTERS,
    SPATIAL_DIMS,
    VARIANTS,
    DoubleConv,
    SingleConv,
    check_spatial_dims,
    conv_class,
    parse_layer_order,
)
from .networks.unet import UPSAMPLE_MODES, UNet3D, check_input, has_forward_hooks, level_channels

__all__ = [
    "LAYER_LETTERS", "SPATIAL_DIMS", "UPSAMPLE_MODES", "VARIANTS", "Conv3d", "DoubleConv", "SingleConv", "UNet3D",
    "check_input", "check_spatial_dims", "conv_class", "has_forward_hooks", "level_channels", "parse_layer_order",
]
