"""Former home of the architectures of ``model.architecture``, kept so that imports from it keep working. They
live in :mod:`unet3d_lightning.networks`."""

from .networks import ARCHITECTURES, build_network, slice_wise
from .networks.blocks import ResidualBlock, SqueezeExcitation
from .networks.unet import DecoderLevel, UNet

__all__ = [
    "ARCHITECTURES", "DecoderLevel", "ResidualBlock", "SqueezeExcitation", "UNet", "build_network", "slice_wise",
]
