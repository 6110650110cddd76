"""One reader interface over the volume formats: HDF5, Zarr (v2, v3, OME-Zarr) and TIFF stacks.

A volume lives in a *file* (an HDF5 file, a Zarr store directory, a TIFF file) at an *internal path* (an HDF5
dataset, a Zarr array inside the store's group; a TIFF file holds one image, so TIFF ignores internal paths).
:func:`open_file` opens a file read-only and returns a :class:`VolumeFile`, whose :meth:`VolumeFile.array` gives an
array with ``shape``, ``dtype``, ``ndim``, ``chunks`` (None when the data is not chunked) and region reads by
slices (``array[zs]``, ``array[:, zs, ys, xs]``). The checks and messages of
:mod:`~unet3d_lightning.data.volumes` then apply to every format alike.

The format comes from the path:

- ``*.h5``, ``*.hdf5``, ``*.hdf`` (and any other file, as before other formats were read): HDF5; the internal path
  is a dataset, e.g. ``raw``, ``volumes/raw``.
- a ``*.zarr`` directory, or any directory holding ``zarr.json``/``.zgroup``/``.zarray``: a Zarr store (format 2
  or 3); the internal path is an array of the store's group (``raw``), or for OME-Zarr (NGFF 0.4/0.5) a level of
  a multiscale image (``0``, the full resolution) or the image's group (``""`` for the root, ``labels/cells``),
  which stands for its level 0. Length-1 time and channel axes of an OME-Zarr level are dropped.
- ``*.tif``, ``*.tiff``: TIFF; the internal path is ignored: the file's image series is a ``(D, H, W)`` stack or,
  by its axes metadata, ``(C, D, H, W)``/``(D, C, H, W)``, read as ``(C, D, H, W)``. A file of several series (several
  images, or pages of different shapes) is refused: only one could be read.

Chunks that a file does not store read as the array's fill value; :meth:`VolumeFile.missing_chunks` finds them (from
the store's listing or HDF5's chunk index, without reading data), so that the checks can refuse or announce them.

Zarr and TIFF need the optional ``formats`` extra (``pip install 'unet3d-lightning[formats]'``).
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from . import volumes

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
ZARR_SUFFIXES = (".zarr",)
TIFF_SUFFIXES = (".tif", ".tiff")
# Files inside a directory that make it a Zarr store (v3: zarr.json; v2: .zgroup / .zarray).
ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")
# Suffixes stripped from an input's name to name its outputs (image.ome.zarr -> image_predictions.zarr).
COMPOUND_SUFFIXES = (".ome.zarr", ".ome.tiff", ".ome.tif")
# What the Zarr and TIFF libraries raise for damaged stores and files, besides h5py's (volumes.READ_ERRORS): bad JSON
# metadata (ValueError, of which JSONDecodeError and TiffFileError are subclasses), failed codecs (RuntimeError).
FORMAT_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError)


def volume_format(path: str | os.PathLike) -> str:
    """``"hdf5"``, ``"zarr"`` or ``"tiff"`` for a volume path, by its suffix (a directory: Zarr when it is a store).

    Any other file is HDF5, as every path was before the other formats were read.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in ZARR_SUFFIXES or (p.is_dir() and any((p / m).is_file() for m in ZARR_MARKERS)):
        return "zarr"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    return "hdf5"


def is_volume(path: Path) -> bool:
    """Whether ``path``, found inside a directory or by a glob pattern, is a volume: an HDF5 or TIFF file by its
    suffix, or a Zarr store directory."""
    if path.is_dir():
        return volume_format(path) == "zarr"
    return path.is_file() and path.suffix.lower() in HDF5_SUFFIXES + TIFF_SUFFIXES


def volume_stem(path: str | os.PathLike) -> str:
    """The name of a volume without its format suffix: ``a.h5`` -> ``a``, ``image.ome.zarr`` -> ``image``."""
    name = Path(path).name
    for suffix in COMPOUND_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def require_formats_extra(what: str) -> None:
    """Raise a one-line error naming the ``formats`` extra when zarr or tifffile is not installed."""
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

    Use as a context manager or call :meth:`close`. Subclasses: :class:`HDF5File`, :class:`ZarrFile`,
    :class:`TiffFile`.
    """

    format = ""

    def __init__(self, path: Path, role: str) -> None:
        self.path = path
        self.role = role

    def array(self, key: str) -> Any:
        raise NotImplementedError

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


class HDF5File(VolumeFile):
    """An HDF5 file opened by :func:`~unet3d_lightning.data.volumes.open_h5` (read-only, large chunk cache)."""

    format = "hdf5"

    def __init__(self, path: Path, role: str) -> None:
        super().__init__(path, role)
        self.file = volumes.open_h5(path, role)

    def array(self, key: str) -> Any:
        return volumes._dataset(self.file, key, self.path, self.role)

    def missing_chunks(self, key: str) -> MissingChunks | None:
        view = self.array(key)
        dataset = view.dataset if isinstance(view, volumes.OneSlice) else view
        if dataset.chunks is None or dataset.is_virtual or dataset.external:
            return None  # contiguous, virtual (sources checked on opening) or external storage: no chunk index
        grid = tuple(math.ceil(n / c) for n, c in zip(dataset.shape, dataset.chunks))
        try:
            count = dataset.id.get_num_chunks()
            if count == math.prod(grid):
                return None
            stored = np.zeros(grid, bool)

            def mark(info: Any) -> None:
                stored[tuple(o // c for o, c in zip(info.chunk_offset, dataset.chunks))] = True

            if hasattr(dataset.id, "chunk_iter"):  # HDF5 >= 1.12.3: one pass over the chunk index
                dataset.id.chunk_iter(mark)
            else:
                for i in range(count):
                    mark(dataset.id.get_chunk_info(i))
        except volumes.READ_ERRORS:
            return None  # an unreadable chunk index: the scan that reads the data reports the damage
        one_slice = isinstance(view, volumes.OneSlice)
        return MissingChunks(
            stored=stored[None] if one_slice else stored, shape=tuple(dataset.shape), chunks=tuple(dataset.chunks),
            view_axes=((None,) if one_slice else ()) + tuple(range(dataset.ndim)), fill_value=dataset.fillvalue,
            # HDF5 stores every chunk a writer writes, chunks of fill values too: one not stored was never written.
            may_be_omitted=False,
        )

    def __getattr__(self, name: str) -> Any:
        # The rest of h5py.File's interface (mode, id, filename), for code written against an open HDF5 file.
        if name == "file":
            raise AttributeError(name)
        return getattr(self.file, name)

    def close(self) -> None:
        self.file.close()


class ZarrFile(VolumeFile):
    """A Zarr store (format 2 or 3), opened read-only; arrays by their path in the store's root group."""

    format = "zarr"

    def __init__(self, path: Path, role: str) -> None:
        super().__init__(path, role)
        require_formats_extra(f"{role} volume {path}")
        import zarr

        if not path.exists():
            raise ConfigurationError(f"{role} volume {path}: file does not exist")
        try:
            # mode="r": the store itself refuses writes, so an input can never be modified.
            self.root = zarr.open(store=str(path), mode="r")
        except FORMAT_READ_ERRORS + (zarr.errors.BaseZarrError,) as err:
            raise ConfigurationError(
                f"{role} volume {path}: cannot be read as a Zarr store ({volumes.error_summary(err)}); it may be "
                "damaged or not Zarr"
            ) from None

    def _arrays(self) -> list[str]:
        import zarr

        if isinstance(self.root, zarr.Array):
            return ["/"]  # a store that is one array: its internal path is "/" (or "")
        try:
            return sorted(name for name, node in self.root.members(max_depth=None) if isinstance(node, zarr.Array))
        except FORMAT_READ_ERRORS:
            return []  # a damaged store may not list; the message still names the missing array

    def _node(self, key: str) -> tuple[Any, str]:
        """The ``zarr.Array`` at ``key`` (for an OME-Zarr image group: its level 0) and its path in the store."""
        import zarr

        node: Any = self.root
        name = key.strip("/")
        try:
            if name:
                if isinstance(self.root, zarr.Array):
                    raise KeyError(name)
                node = self.root[name]
        except KeyError:
            raise self._missing(key, "does not exist", self._arrays()) from None
        except FORMAT_READ_ERRORS + (zarr.errors.BaseZarrError,) as err:
            raise ConfigurationError(
                f"{self.role} volume {self.path}: dataset '{key}' cannot be read ({volumes.error_summary(err)}); "
                "the file may be corrupt"
            ) from None
        if isinstance(node, zarr.Group):
            level0 = multiscale_level0(node)
            if level0 is None:
                raise self._missing(key, "is not a dataset", self._arrays())
            return self._node(f"{name}/{level0}" if name else level0)
        return node, name

    def array(self, key: str) -> Any:
        node, name = self._node(key)
        keep = self._kept_axes(node, name)
        array: Any = CachedChunks(node)
        if keep is not None:
            array = _AxisView(array, keep, tuple(range(len(keep))))
        return _one_slice(array)

    def missing_chunks(self, key: str) -> MissingChunks | None:
        """Compares the chunk files under the array's directory with the chunk grid (for a sharded array: the
        shards, the objects the store holds); reads no chunk."""
        node, name = self._node(key)
        objects = tuple(int(n) for n in (node.shards or node.chunks))
        grid = tuple(math.ceil(n / c) for n, c in zip(node.shape, objects))
        directory = self.path / node.path if node.path else self.path
        present = set()
        for folder, _, files in os.walk(directory):
            relative = Path(folder).relative_to(directory)
            present.update((relative / f).as_posix() for f in files)
        stored = np.zeros(grid, bool)
        for index in itertools.product(*(range(n) for n in grid)):
            stored[index] = node.metadata.encode_chunk_key(index) in present
        if stored.all():
            return None
        keep = self._kept_axes(node, name)
        keep = list(range(node.ndim)) if keep is None else keep
        view = stored[tuple(slice(None) if i in keep else 0 for i in range(node.ndim))]
        return MissingChunks(
            stored=view[None] if view.ndim == 2 else view, shape=tuple(int(n) for n in node.shape), chunks=objects,
            view_axes=(None,) * (view.ndim == 2) + tuple(keep), fill_value=node.fill_value,
            encode=node.metadata.encode_chunk_key,
            # Zarr defines a chunk that is not stored as one of fill values, and zarr-python 3 (like other writers)
            # leaves such chunks out by default; without a fill value their content is undefined.
            may_be_omitted=node.fill_value is not None,
        )

    def _kept_axes(self, array: Any, name: str) -> list[int] | None:
        """The axes of a level of an OME-Zarr image that remain once its length-1 time and channel axes are
        dropped; None to keep every axis (other arrays are read as stored).

        NGFF images are often 5D ``(t, c, z, y, x)`` with one time point and one channel; without those axes the
        image is the ``(D, H, W)`` volume it stands for, and a label image the ``(D, H, W)`` class ids (as a TIFF
        stack's length-1 axes are dropped).
        """
        parent = name.rpartition("/")[0]
        try:
            group = self.root[parent] if parent else self.root
            axes = _multiscales(group)[0]["axes"]
            kinds = [axis.get("type") if isinstance(axis, dict) else axis for axis in axes]
        except (TypeError, KeyError, IndexError, AttributeError):
            return None  # not a level of a multiscale image (or one without axes): as stored
        if len(kinds) != array.ndim:
            return None
        keep = [i for i, kind in enumerate(kinds) if kind not in ("time", "channel") or array.shape[i] != 1]
        return None if len(keep) == array.ndim else keep


@dataclass(frozen=True)
class MissingChunks:
    """The chunks of an array that its file does not store; they read as ``fill_value``.

    ``stored`` flags every chunk (for a sharded Zarr array: every shard, the objects a store holds) in the axes of
    the array as read, ``(D, H, W)`` or ``(C, D, H, W)``; ``view_axes`` gives the stored axis of each of those axes
    (None: the added axis of a 2D image); ``shape`` and ``chunks`` are the stored array's. ``may_be_omitted``: the
    format lets writers leave out chunks that hold only the fill value (Zarr with a fill value), so missing chunks
    may be intended. ``encode`` gives the storage key of a chunk by its stored grid index (None: HDF5, no keys).
    """

    stored: np.ndarray
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    view_axes: tuple[int | None, ...]
    fill_value: Any
    may_be_omitted: bool
    encode: Callable[[tuple[int, ...]], str] | None = None

    @property
    def count(self) -> int:
        return int((~self.stored).sum())

    @property
    def total(self) -> int:
        return int(self.stored.size)

    @property
    def view_chunks(self) -> tuple[int, ...]:
        """The chunk shape in the axes of the array as read."""
        return tuple(1 if a is None else self.chunks[a] for a in self.view_axes)

    def describe(self, view_index: Sequence[int]) -> str:
        """``"'c/0/1/0' at [0:4, 8:16, 0:8]"``: the chunk at ``view_index`` of ``stored``, by its key and the region
        of the stored array it covers."""
        index = [0] * len(self.shape)
        for i, a in zip(view_index, self.view_axes):
            if a is not None:
                index[a] = int(i)
        region = ", ".join(f"{i * c}:{min((i + 1) * c, n)}" for i, c, n in zip(index, self.chunks, self.shape))
        return f"'{self.encode(tuple(index))}' at [{region}]" if self.encode else f"[{region}]"

    def describe_first(self) -> str:
        """The first missing chunk, as :meth:`describe` names it."""
        return self.describe(np.argwhere(~self.stored)[0])


class CachedChunks:
    """A Zarr array (a store's, or tifffile's view of a TIFF's pages) read through a per-reader cache of decoded
    chunks (least recently used dropped first).

    HDF5 keeps the decoded chunks of each open dataset (``CHUNK_CACHE_BYTES``), so the chunks that overlapping
    patches share are read and decompressed once; zarr-python reads and decodes every chunk a region touches, on
    every read, each read through its asynchronous store layer. Here a region read fetches the chunk-aligned box
    around it in one zarr read when any of its chunks is missing, keeps those chunks, and is served from memory
    when all of them are cached. Regions larger than half the cache (the z-slabs of the setup scan) bypass it.

    Args:
        array: the ``zarr.Array``.
        max_bytes: the cache's size. Default ``volumes.CHUNK_CACHE_BYTES`` (64 MiB).
    """

    def __init__(self, array: Any, max_bytes: int | None = None) -> None:
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(array.dtype)
        self.chunks = tuple(int(c) for c in array.chunks)
        self.max_bytes = volumes.CHUNK_CACHE_BYTES if max_bytes is None else max_bytes
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._bytes = 0

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        simple = len(index) == self.ndim and all(
            (isinstance(i, slice) and i.step in (None, 1)) or isinstance(i, (int, np.integer)) for i in index
        )
        if not simple:
            return np.asarray(self.array[index])
        bounds = []
        for i, n in zip(index, self.shape):
            if isinstance(i, slice):
                start, stop, _ = i.indices(n)
            else:
                start = int(i) + n if i < 0 else int(i)
                stop = start + 1
            bounds.append((start, stop))
        if any(stop <= start for start, stop in bounds):
            return np.asarray(self.array[index])
        first = [start // c for (start, _), c in zip(bounds, self.chunks)]
        last = [(stop - 1) // c for (_, stop), c in zip(bounds, self.chunks)]
        box = [slice(f * c, min((l + 1) * c, n)) for f, l, c, n in zip(first, last, self.chunks, self.shape)]
        if math.prod(b.stop - b.start for b in box) * self.dtype.itemsize > self.max_bytes // 2:
            return np.asarray(self.array[index])
        keys = list(itertools.product(*(range(f, l + 1) for f, l in zip(first, last))))
        drop = tuple(0 if isinstance(i, (int, np.integer)) else slice(None) for i in index)
        if all(k in self._cache for k in keys):
            out = np.empty([stop - start for start, stop in bounds], self.dtype)
            for key in keys:
                self._cache.move_to_end(key)
                chunk = self._cache[key]
                source, target = [], []
                for k, c, (start, stop) in zip(key, self.chunks, bounds):
                    lo, hi = max(start, k * c), min(stop, (k + 1) * c)
                    source.append(slice(lo - k * c, hi - k * c))
                    target.append(slice(lo - start, hi - start))
                out[tuple(target)] = chunk[tuple(source)]
            return out[drop]
        block = np.asarray(self.array[tuple(box)])
        for key in keys:
            if key not in self._cache:
                part = tuple(slice((k - f) * c, (k - f + 1) * c) for k, f, c in zip(key, first, self.chunks))
                chunk = self._cache[key] = block[part].copy()
                self._bytes += chunk.nbytes
            self._cache.move_to_end(key)
        while self._bytes > self.max_bytes:
            self._bytes -= self._cache.popitem(last=False)[1].nbytes
        region = tuple(slice(start - b.start, stop - b.start) for (start, stop), b in zip(bounds, box))
        return block[region][drop].copy()


def _one_slice(array: Any) -> Any:
    """A 2D ``(H, W)`` image as the one-slice volume ``(1, H, W)``, as HDF5 datasets are read."""
    return volumes.OneSlice(array) if array.ndim == 2 else array


def _multiscales(group: Any) -> Any:
    # OME-NGFF 0.4 keeps ``multiscales`` among the group's attributes, 0.5 under ``attributes["ome"]``.
    attrs = dict(group.attrs)
    return attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")


def multiscale_level0(group: Any) -> str | None:
    """The path of the full-resolution array of an OME-Zarr multiscale image group, or None for another group:
    the first dataset of the group's first multiscale."""
    try:
        return str(_multiscales(group)[0]["datasets"][0]["path"])
    except (TypeError, KeyError, IndexError):
        return None


class _AxisView:
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


class TiffFile(VolumeFile):
    """The image series of a TIFF file, as ``(D, H, W)`` or ``(C, D, H, W)``; a file of several series is refused.

    Read lazily page by page through tifffile's Zarr view where the file allows it; otherwise (layouts the view
    does not support) read whole into memory, with a warning stating how much. Internal paths are ignored: a TIFF
    file holds one volume, so labels come from a second file (``data.label_paths``).
    """

    format = "tiff"
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
                f"{role} volume {path}: cannot be read as a TIFF file ({volumes.error_summary(err)}); it may be "
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
                f"{where}: holds no readable image ({volumes.error_summary(err)}); it may be truncated"
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
                    f"{where}: cannot be read ({volumes.error_summary(read_err)}); the file may be corrupt"
                ) from None
            warnings.warn(
                f"{where}: its layout cannot be read piece by piece ({volumes.error_summary(err)}); it is read whole "
                f"into memory, {whole.nbytes / 2**20:,.0f} MiB in each reading process", stacklevel=2,
            )
            stored = whole
        return _one_slice(_AxisView(stored, keep, order))

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


def open_file(path: str | os.PathLike, role: str = "input") -> VolumeFile:
    """Open a volume file read-only, choosing the format by the path (see the module's table).

    Args:
        path: an HDF5 file, a Zarr store directory or a TIFF file.
        role: ``"train"``, ``"val"``, ``"test"`` or ``"predict"``; only used to name the file in error messages.
            Default ``"input"``.

    Raises:
        ConfigurationError: the file does not exist or cannot be read in its format; the optional extra a format
        needs is missing.
    """
    path = Path(path)
    kind = volume_format(path)
    if kind == "zarr":
        return ZarrFile(path, role)
    if kind == "tiff":
        return TiffFile(path, role)
    return HDF5File(path, role)
