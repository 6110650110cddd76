"""TIFF volumes (``*.tif``, ``*.tiff``): the file's image series is a ``(D, H, W)`` stack or, by its axes metadata,
``(C, D, H, W)``/``(D, C, H, W)``, read as ``(C, D, H, W)``.

The internal path is ignored: a TIFF file holds one image, so labels come from a second file (``data.label_paths``).
A file of several series (several images, or pages of different shapes) is refused: only one could be read. Needs
the optional ``formats`` extra.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ...errors import ConfigurationError
from ..spacing import VoxelSize, unit_name, voxel_size_or_none
from .base import FORMAT_READ_ERRORS, AxisView, VolumeFile, error_summary, one_slice, require_formats_extra
from .chunks import CachedChunks

SUFFIXES = (".tif", ".tiff")


class TiffFile(VolumeFile):
    """The image series of a TIFF file, as ``(D, H, W)`` or ``(C, D, H, W)``; a file of several series is refused.

    Read lazily page by page through tifffile's Zarr view where the file allows it; otherwise (layouts the view
    does not support) read whole into memory, with a warning stating how much. Internal paths are ignored: a TIFF
    file holds one volume, so labels come from a second file (``data.label_paths``).
    """

    format = "tiff"
    suffixes = SUFFIXES
    # Axis letters tifffile uses for a stack's depth: Z, or the generic Q/I (plain multi-page files), or T.
    DEPTH_AXES = "ZQIT"
    CHANNEL_AXES = "CS"

    def __init__(self, path: Path, role: str) -> None:
        super().__init__(path, role)
        require_formats_extra(f"{role} volume {path}")
        import tifffile

        if not path.is_file():
            raise ConfigurationError(f"{role} volume {path}: file does not exist")
        self._array: Any = None
        try:
            self.file = tifffile.TiffFile(path)  # opened "rb": read-only
        except FORMAT_READ_ERRORS as err:
            raise ConfigurationError(
                f"{role} volume {path}: cannot be read as a TIFF file ({error_summary(err)}); it may be "
                "truncated or not TIFF"
            ) from None

    def array(self, key: str) -> Any:
        if self._array is None:
            self._array = self._open_series()
        return self._array

    def _open_series(self) -> Any:
        import zarr

        where = f"{self.role} volume {self.path}"
        try:
            # Reduced-resolution copies (thumbnails, pyramid levels stored as pages of their own) repeat the image;
            # every other series is data of its own.
            images = [s for s in self.file.series if not s.keyframe.is_reduced]
            series = images[0]
            shape, axes = tuple(int(n) for n in series.shape), series.axes.upper()
        except (IndexError,) + FORMAT_READ_ERRORS as err:
            raise ConfigurationError(
                f"{where}: holds no readable image ({error_summary(err)}); it may be truncated"
            ) from None
        if len(images) > 1:
            shapes = ", ".join(f"{tuple(int(n) for n in s.shape)} {s.axes.upper()}" for s in images)
            raise ConfigurationError(
                f"{where}: the TIFF file holds {len(images)} image series ({shapes}): several images, or pages of "
                "different shapes; one volume is read per file and the others would be left out: split the file, "
                "one series per file (e.g. tifffile.imwrite(f'part{i}.tif', tifffile.imread(path, series=i)))"
            )
        # Length-1 axes other than y, x (a single time point, a single channel) carry no information.
        keep = [i for i, (n, a) in enumerate(zip(shape, axes)) if n > 1 or a in "YX"]
        kept_axes = "".join(axes[i] for i in keep)
        order = self._order(kept_axes, shape, axes)
        try:
            stored = CachedChunks(zarr.open(series.aszarr(), mode="r"))  # chunks: pages or tiles
        except Exception as err:  # noqa: BLE001 - any layout the Zarr view refuses is read whole instead
            try:
                whole = series.asarray()
            except FORMAT_READ_ERRORS as read_err:
                raise ConfigurationError(
                    f"{where}: cannot be read ({error_summary(read_err)}); the file may be corrupt"
                ) from None
            warnings.warn(
                f"{where}: its layout cannot be read piece by piece ({error_summary(err)}); it is read whole "
                f"into memory, {whole.nbytes / 2**20:,.0f} MiB in each reading process", stacklevel=2,
            )
            stored = whole
        return one_slice(AxisView(stored, keep, order))

    def voxel_size(self, key: str) -> VoxelSize | None:
        """An OME-TIFF's ``PhysicalSizeZ/Y/X`` (in their ``PhysicalSize*Unit``, µm by OME's default); else an
        ImageJ file's ``spacing`` (z) and the first page's ``XResolution``/``YResolution`` (pixels per ``unit``;
        without ``spacing``, z is 1 unit, as ImageJ reads it). None when the file records none (a plain TIFF's
        resolution tags give no z size, and ImageJ's unit "pixel" no physical size)."""
        try:
            if self.file.is_ome:
                size = _ome_voxel_size(self.file.ome_metadata or "")
                if size is not None:
                    return size
            page = self.file.pages.first
            x_res, y_res = page.resolution
            imagej = self.file.imagej_metadata or {}
        except FORMAT_READ_ERRORS + (AttributeError, TypeError):
            return None
        if imagej:
            unit = unit_name(imagej.get("unit"))
            if unit is None or not x_res or not y_res:
                return None  # ImageJ's "pixel": no physical size recorded
            return voxel_size_or_none((imagej.get("spacing", 1.0), 1 / y_res, 1 / x_res), unit)
        return None

    def _order(self, kept_axes: str, shape: tuple[int, ...], axes: str) -> tuple[int, ...]:
        """The stored axis of each axis of the ``(D, H, W)`` or ``(C, D, H, W)`` view."""
        n = len(kept_axes)
        spatial_yx = [kept_axes.find("Y"), kept_axes.find("X")]
        channel = [i for i, a in enumerate(kept_axes) if a in self.CHANNEL_AXES]
        depth = [i for i, a in enumerate(kept_axes) if a not in self.CHANNEL_AXES + "YX"]
        if n <= 3 and not channel and spatial_yx == [n - 2, n - 1]:
            return tuple(range(n))  # (H, W) or (D, H, W): a plain stack, whatever its depth axis is called
        if n == 4 and len(channel) == 1 and len(depth) == 1 and min(spatial_yx) >= 0 and \
                kept_axes[depth[0]] in self.DEPTH_AXES and spatial_yx[0] < spatial_yx[1]:
            return (channel[0], depth[0], *spatial_yx)
        raise ConfigurationError(
            f"{self.role} volume {self.path}: the TIFF image has axes {axes} and shape {shape}; expected a 3D stack "
            "(D, H, W), or a 4D stack with one channel axis (C, D, H, W) or (D, C, H, W)"
        )

    def close(self) -> None:
        self.file.close()


def _ome_voxel_size(xml: str) -> VoxelSize | None:
    """``PhysicalSizeZ/Y/X`` of the first image's ``Pixels`` in OME-XML, converted to the x axis's unit; None when
    any of the three is missing."""
    import xml.etree.ElementTree as ElementTree

    from ..spacing import UNIT_METRES

    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    values, units = [], []
    for axis in "ZYX":
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            return None
        values.append(value)
        units.append(unit_name(pixels.get(f"PhysicalSize{axis}Unit", "µm")))
    unit = units[-1]
    if None in units:
        return None
    try:
        zyx = [float(v) * UNIT_METRES[u] / UNIT_METRES[unit] for v, u in zip(values, units)]  # type: ignore[index]
    except ValueError:
        return None
    return voxel_size_or_none(zyx, unit)
