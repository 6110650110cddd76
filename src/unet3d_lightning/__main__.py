"""``python -m unet3d_lightning``: the ``unet3d`` command (see :mod:`unet3d_lightning.launcher`)."""

from unet3d_lightning.launcher import run

if __name__ == "__main__":
    run()
