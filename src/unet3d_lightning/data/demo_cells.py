"""``python -m unet3d_lightning.data.demo_cells [data_dir]``: the cells demo set, as the command of earlier versions;
the generators live in :mod:`unet3d_lightning.demo` (``python -m unet3d_lightning.demo cells [data_dir]``)."""

from ..demo.cells import cells_volume, generate, main  # noqa: F401

if __name__ == "__main__":
    main()
