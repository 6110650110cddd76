"""3D U-Net for volumetric segmentation (Çiçek et al. 2016) with the losses of Sudre et al. 2017, on Lightning.

Public API: :class:`UNet3D`, :class:`UNet3DModule`, :class:`HDF5DataModule` and :mod:`unet3d_lightning.losses`.
Attributes are imported lazily so that ``import unet3d_lightning.prediction.stitcher`` (pure torch) or the CLI's
``--help`` do not pay for importing Lightning and h5py before they need them.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "UNet3D": "unet3d_lightning.networks",
    "UNet3DModule": "unet3d_lightning.module",
    "HDF5DataModule": "unet3d_lightning.data.datamodule",
    "VolumeDataModule": "unet3d_lightning.data.datamodule",
    "losses": "unet3d_lightning.losses",
}

__all__ = ["UNet3D", "UNet3DModule", "VolumeDataModule", "HDF5DataModule", "losses", "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'unet3d_lightning' has no attribute {name!r}")
    module = import_module(_LAZY[name])
    value = module if name == "losses" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
