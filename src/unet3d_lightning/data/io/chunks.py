"""Chunks: the cache of decoded chunks that Zarr and TIFF reads go through, the chunks a file does not store, and
what to do about those (``data.missing_chunks``).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ...errors import ConfigurationError

# h5py's default chunk cache is 1 MiB: too small to hold the chunks that overlapping patches share, so neighbouring
# patches would read and decompress the same chunks again. The size applies to every open *dataset* (HDF5) or array
# (Zarr, TIFF: :class:`CachedChunks`), and HDF5 drops a dataset's cache when the dataset is closed, so readers must
# keep their datasets open (:class:`~unet3d_lightning.data.io.handles.FileCache`).
CHUNK_CACHE_BYTES = 64 * 1024**2


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
        max_bytes: the cache's size. Default ``CHUNK_CACHE_BYTES`` (64 MiB).
    """

    def __init__(self, array: Any, max_bytes: int | None = None) -> None:
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(array.dtype)
        self.chunks = tuple(int(c) for c in array.chunks)
        self.max_bytes = CHUNK_CACHE_BYTES if max_bytes is None else max_bytes
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


MissingChunksPolicy = Literal["auto", "error", "fill"]
MISSING_CHUNKS_POLICIES = ("auto", "error", "fill")


class ChunkAudit:
    """What to do with the chunks an array's file does not store (``data.missing_chunks``), which every reader
    returns as the array's fill value without a word.

    ``"error"``: refuse the array. ``"fill"``: read them as the fill value, with one warning. ``"auto"``: refuse
    them unless they can be the writer's intent: Zarr lets writers leave out a chunk that holds only the fill value
    (zarr-python 3 does so by default, as does this package's Zarr output), so the chunks an array lacks are read as
    its fill value, with one warning, unless the array shows that its writer stores such chunks (it holds a stored
    chunk of only fill values: the missing ones were lost), or has no fill value (their content is undefined).
    HDF5 stores every chunk its writer writes, fill values or not, so a chunk it lacks was never written: refused.

    Created before the scan (refusals that need no data are raised there); :meth:`update` sees each slab the scan
    reads, :meth:`finish` decides at its end.

    Args:
        missing: from :meth:`~unet3d_lightning.data.io.base.VolumeFile.missing_chunks`; None: nothing to audit.
        where: the file and dataset, as messages name them.
        policy: ``"auto"``, ``"error"`` or ``"fill"``.
    """

    def __init__(self, missing: MissingChunks | None, where: str, policy: str) -> None:
        self.missing = missing
        self.where = where
        self.holds_data: np.ndarray | None = None  # per stored chunk: a value other than the fill value seen
        if missing is None:
            return
        m = missing
        # zarr reads the chunks of an array without a fill value as 0
        value = 0 if m.fill_value is None else getattr(m.fill_value, "item", lambda: m.fill_value)()
        self.fill = f"{value:g}" if isinstance(value, float) else str(value)
        self.head = f"{where} lacks {m.count} of {m.total} chunk(s) (the first {m.describe_first()})"
        self.fix = (f"restore them (an interrupted write or copy?), or set data.missing_chunks: fill to read them as "
                    f"{self.fill}")
        if policy == "fill":
            self._warn(f"{self.head}; they are read as the fill value {self.fill} (data.missing_chunks: fill)")
        elif policy == "error":
            raise ConfigurationError(f"{self.head}, which would be read as the fill value {self.fill}; {self.fix}")
        elif not m.may_be_omitted:
            why = ("HDF5 stores every chunk that is written, so these were never written"
                   if m.encode is None else "the array has no fill value, so their content is undefined")
            raise ConfigurationError(f"{self.head}: {why}; {self.fix}")
        else:
            self.holds_data = np.zeros(m.stored.shape, bool)

    @property
    def watching(self) -> bool:
        """Whether :meth:`update` needs the array's slabs."""
        return self.holds_data is not None

    def update(self, block: np.ndarray, zs: slice) -> None:
        """Note which chunks of the slab ``block`` (the array's z rows ``zs``) hold a value other than the fill
        value."""
        if self.holds_data is None:
            return
        fill = self.missing.fill_value  # type: ignore[union-attr]
        isnan = isinstance(fill, float) and math.isnan(fill)
        flags = ~np.isnan(block) if isnan else block != fill
        index = []
        for axis, size in enumerate(self.missing.view_chunks):  # type: ignore[union-attr]
            start = zs.start if axis == block.ndim - 3 else 0
            positions = start + np.arange(flags.shape[axis])
            cuts = np.flatnonzero((positions % size == 0) | (positions == start))
            flags = np.logical_or.reduceat(flags, cuts, axis=axis)
            index.append(slice(start // size, start // size + len(cuts)))
        self.holds_data[tuple(index)] |= flags

    def finish(self) -> None:
        """After the scan: refuse the array when a stored chunk held only fill values, else warn."""
        if self.holds_data is None:
            return
        empty = self.missing.stored & ~self.holds_data  # type: ignore[union-attr]
        if empty.any():
            raise ConfigurationError(
                f"{self.head}, but it stores chunks that hold only the fill value {self.fill} (the first "
                f"{self.missing.describe(np.argwhere(empty)[0])}): its writer keeps such chunks, so the missing ones "
                f"were lost; {self.fix}"
            )
        self._warn(
            f"{self.head}; they are read as the fill value {self.fill}, as Zarr defines for the chunks that writers "
            "(zarr-python 3 by default) leave out because they hold only that value; if they were lost instead, "
            "restore them (data.missing_chunks: error refuses such arrays)"
        )

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(message, MissingChunksWarning, stacklevel=4)


class MissingChunksWarning(UserWarning):
    """Chunks that an input array's file does not store are read as its fill value."""
