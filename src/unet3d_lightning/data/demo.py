"""``python -m unet3d_lightning.data.demo [data_dir]``: the spheres demo set, as the command of earlier versions;
the generators live in :mod:`unet3d_lightning.demo` (``python -m unet3d_lightning.demo spheres [data_dir]``)."""

from ..demo.common import run_generator, write_volume  # noqa: F401
from ..demo.spheres import generate, main, spheres_volume  # noqa: F401

_write = write_volume  # the name of earlier versions

if __name__ == "__main__":
    main()
