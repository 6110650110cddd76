"""What every format's reader shares: the :class:`VolumeFile` interface, the read errors, the lazy array views.

A reader's :meth:`VolumeFile.array` returns an array with ``shape``, ``dtype``, ``ndim``, ``chunks`` (None when the
data is not chunked) and region reads by slices (``array[zs]``, ``array[:, zs, ys, xs]``); the checks of
:mod:`~unet3d_lightning.data.volumes` then apply to every format alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import ConfigurationError
from ..spacing import VoxelSize, voxel_size_or_none

if TYPE_CHECKING:
    from .chunks import MissingChunks

# What h5py raises for damaged files: OSError for unreadable bytes or failed filters (gzip, ...), RuntimeError and
# KeyError for broken object headers or links. The other formats' region reads raise OSError for damage too
# (:class:`AxisView`), so this is what every region read is guarded with.
READ_ERRORS = (OSError, RuntimeError, KeyError)
# What the Zarr and TIFF libraries raise for damaged stores and files, besides h5py's: bad JSON metadata
# (ValueError, of which JSONDecodeError and TiffFileError are subclasses), failed codecs (RuntimeError).
FORMAT_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError)


def error_summary(err: BaseException) -> str:
    """The first line of an exception's message (h5py's carry long HDF5 error stacks), or its type name."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def require_formats_extra(what: str) -> None:
    """Raise a one-line error naming the ``formats`` extra when zarr or tifffile is not installed.

    Args:
        what: what needs the extra, as the message starts (``"train volume a.zarr"``).
    """
    missing = []
    for module in ("zarr", "tifffile"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigurationError(
            f"{what} needs {' and '.join(missing)}, from the optional 'formats' extra: "
            "pip install 'unet3d-lightning[formats]'"
        )


class VolumeFile:
    """An open, read-only volume file; ``array(key)`` returns its array at internal path ``key``.

    Use as a context manager or call :meth:`close`. A format's reader subclasses it and sets ``format`` (its name in
    the registry, :mod:`unet3d_lightning.data.io`) and ``suffixes`` (the file names it claims); :meth:`recognises`
    decides by them.
    """

    format = ""
    suffixes: tuple[str, ...] = ()
    # Whether a volume of this format is a directory (a Zarr store) rather than a file.
    is_directory = False

    def __init__(self, path: Path, role: str) -> None:
        self.path = path
        self.role = role

    @classmethod
    def recognises(cls, path: Path) -> bool:
        """Whether ``path`` names a volume of this format (by its suffix; a format may also look inside)."""
        return path.suffix.lower() in cls.suffixes

    def array(self, key: str) -> Any:
        raise NotImplementedError

    def voxel_size(self, key: str) -> VoxelSize | None:
        """The voxel size ``(z, y, x)`` the file records for ``array(key)``, with its unit, or None when it records
        none. Formats override it (see each reader); the default is None."""
        return None

    def missing_chunks(self, key: str) -> MissingChunks | None:
        """The chunks of ``array(key)`` that the file does not store, or None when it stores all of them (or has
        no chunks: TIFF pages are always there)."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> VolumeFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _missing(self, key: str, what: str, found: list[str]) -> ConfigurationError:
        # The same sentence for every format, so that users (and the tests) meet one message.
        return ConfigurationError(
            f"{self.role} volume {self.path}: dataset '{key}' {what}; datasets in the file: {found or 'none'}"
        )


# Attributes of an HDF5 dataset or a Zarr array (or of a group above it) that record its voxel size, in the order
# they are looked for: PlantSeg's and ilastik's ``element_size_um`` ((z, y, x) in micrometres; ilastik may add a
# channel entry), and ``resolution`` (CREMI and others, in the unit of a ``unit``/``units`` attribute, if any).
VOXEL_SIZE_ATTRIBUTES = ("element_size_um", "resolution")


def voxel_size_from_attributes(attribute_sets: list[Any]) -> VoxelSize | None:
    """The voxel size recorded in the first of ``attribute_sets`` (the array's attributes, then its groups', up to
    the root) that has ``element_size_um`` or ``resolution``; None when none has a usable one.

    ``element_size_um`` is in micrometres; ``resolution`` in the unit its holder's ``unit`` (or ``units``) attribute
    names, else of unknown unit. Only the last three entries count, (z, y, x): a leading channel entry is dropped.
    """
    for attrs in attribute_sets:
        for name in VOXEL_SIZE_ATTRIBUTES:
            try:
                value = attrs.get(name)
            except (*READ_ERRORS, ValueError, TypeError):
                continue
            if value is None:
                continue
            values = np.asarray(value).ravel().tolist()
            if len(values) < 3:
                continue
            unit = "micrometer" if name == "element_size_um" else (attrs.get("unit") or attrs.get("units"))
            if isinstance(unit, (list, tuple, np.ndarray)):
                unit = np.asarray(unit).ravel()[-1]
            size = voxel_size_or_none(values[-3:], unit)
            if size is not None:
                return size
    return None


class OneSlice:
    """A 2D ``(H, W)`` array seen as the volume ``(1, H, W)``: indexed like the volume, read from the image."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.shape = (1, *dataset.shape)
        self.ndim = 3
        self.dtype = dataset.dtype
        self.chunks = (1, *dataset.chunks) if dataset.chunks else None

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        z, rest = (index[0], index[1:]) if index and index[0] is not Ellipsis else (slice(None), ())
        image = self.dataset[rest] if rest else self.dataset[()]
        return image[None][z]


def one_slice(array: Any) -> Any:
    """A 2D ``(H, W)`` image as the one-slice volume ``(1, H, W)``, as HDF5 datasets are read."""
    return OneSlice(array) if array.ndim == 2 else array


class AxisView:
    """A lazy ``(D, H, W)`` or ``(C, D, H, W)`` view of a stored array (a TIFF series, an OME-Zarr level): its
    stored axes ``keep`` (the others have length 1) in the order ``order`` (a ``ZCYX`` stack read as ``CZYX``).

    Region reads (slices only) are mapped onto the stored axes and the result transposed: nothing is read whole.
    tifffile reports damaged pages as ValueError (TiffFileError); they become OSError, the read error every format
    shares, so the caller names the file and the region.
    """

    def __init__(self, array: Any, keep: list[int], order: tuple[int, ...]) -> None:
        self.array = array
        self.axes = [keep[a] for a in order]  # stored axis of each view axis
        self.shape = tuple(int(array.shape[a]) for a in self.axes)
        self.ndim = len(self.axes)
        self.dtype = np.dtype(array.dtype)
        chunks = getattr(array, "chunks", None)
        self.chunks = None if chunks is None else tuple(chunks[a] for a in self.axes)

    def __getitem__(self, index: Any) -> np.ndarray:
        index = () if index is Ellipsis else index
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        stored: list[Any] = [0] * len(self.array.shape)
        for view_axis, stored_axis in enumerate(self.axes):
            stored[stored_axis] = index[view_axis]
        try:
            region = np.asarray(self.array[tuple(stored)])
        except ValueError as err:
            raise OSError(str(err)) from None
        if isinstance(self.array, np.ndarray):
            # A file read whole: the region is a view of it, and readers may normalise a region in place.
            region = region.copy()
        # region's axes are the stored axes that remain, in stored order; put them in view order
        remaining = sorted(self.axes)
        return region.transpose([remaining.index(a) for a in self.axes])
