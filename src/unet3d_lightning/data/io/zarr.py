"""Zarr volumes: a ``*.zarr`` directory, or any directory holding ``zarr.json``/``.zgroup``/``.zarray`` (a store of
format 2 or 3).

The internal path is an array of the store's group (``raw``), or for OME-Zarr (NGFF 0.4/0.5) a level of a multiscale
image (``0``, the full resolution) or the image's group (``""`` for the root, ``labels/cells``), which stands for its
level 0. Length-1 time and channel axes of an OME-Zarr level are dropped. Reads go through a cache of decoded chunks
(:class:`~unet3d_lightning.data.io.chunks.CachedChunks`). Needs the optional ``formats`` extra.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigurationError
from ..spacing import UNIT_METRES, VoxelSize, unit_name, voxel_size_or_none
from .base import (
    FORMAT_READ_ERRORS,
    AxisView,
    VolumeFile,
    error_summary,
    one_slice,
    require_formats_extra,
    voxel_size_from_attributes,
)
from .chunks import CachedChunks, MissingChunks

SUFFIXES = (".zarr",)
# Files inside a directory that make it a Zarr store (v3: zarr.json; v2: .zgroup / .zarray).
MARKERS = ("zarr.json", ".zgroup", ".zarray")


class ZarrFile(VolumeFile):
    """A Zarr store (format 2 or 3), opened read-only; arrays by their path in the store's root group."""

    format = "zarr"
    suffixes = SUFFIXES
    is_directory = True

    @classmethod
    def recognises(cls, path: Path) -> bool:
        """A ``*.zarr`` path, or a directory that holds a store's metadata whatever its name."""
        return path.suffix.lower() in SUFFIXES or (path.is_dir() and any((path / m).is_file() for m in MARKERS))

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
                f"{role} volume {path}: cannot be read as a Zarr store ({error_summary(err)}); it may be "
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
                f"{self.role} volume {self.path}: dataset '{key}' cannot be read ({error_summary(err)}); "
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
            array = AxisView(array, keep, tuple(range(len(keep))))
        return one_slice(array)

    def voxel_size(self, key: str) -> VoxelSize | None:
        """For a level of an OME-Zarr image: its ``scale`` (the level's ``coordinateTransformations``, times the
        multiscale's own, NGFF 0.4/0.5) on the ``space`` axes z, y, x, in their ``unit``; the group's ``""`` stands
        for level 0. For another array: the attribute ``element_size_um`` or ``resolution`` of the array or of a
        group above it."""
        node, name = self._node(key)
        parent = name.rpartition("/")[0]
        groups: list[Any] = []
        try:
            group: Any = self.root[parent] if parent else self.root
            groups.append(group)
            size = _ngff_voxel_size(group, name.rpartition("/")[2])
            if size is not None:
                return size
            parts = parent.split("/") if parent else []
            for i in range(len(parts) - 1, -1, -1):
                groups.append(self.root["/".join(parts[:i])] if i else self.root)
        except FORMAT_READ_ERRORS:
            pass
        return voxel_size_from_attributes([node.attrs] + [g.attrs for g in groups if hasattr(g, "attrs")])

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


def _multiscales(group: Any) -> Any:
    # OME-NGFF 0.4 keeps ``multiscales`` among the group's attributes, 0.5 under ``attributes["ome"]``.
    attrs = dict(group.attrs)
    return attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")


def _ngff_voxel_size(group: Any, level: str) -> VoxelSize | None:
    """The voxel size of the level ``level`` of the OME-Zarr image ``group``, or None (not an image; no scale)."""
    try:
        multiscale = _multiscales(group)[0]
        axes = multiscale["axes"]
        dataset = next(d for d in multiscale["datasets"] if str(d["path"]) == level)
    except (TypeError, KeyError, IndexError, StopIteration):
        return None
    scale = [1.0] * len(axes)
    found = False
    for transforms in (dataset.get("coordinateTransformations"), multiscale.get("coordinateTransformations")):
        for transform in transforms or []:
            if isinstance(transform, dict) and transform.get("type") == "scale" and \
                    len(transform.get("scale") or []) == len(axes):
                scale = [a * float(b) for a, b in zip(scale, transform["scale"])]
                found = True
    if not found:
        return None
    names = [str(a.get("name", "")).lower() if isinstance(a, dict) else str(a).lower() for a in axes]
    kinds = [a.get("type") if isinstance(a, dict) else None for a in axes]
    zyx = []
    units = []
    for wanted in "zyx":
        if wanted not in names:
            return None
        i = names.index(wanted)
        if kinds[i] not in (None, "space"):
            return None
        zyx.append(scale[i])
        units.append(unit_name(axes[i].get("unit")) if isinstance(axes[i], dict) else None)
    # NGFF allows a unit per axis; a voxel size here has one: the x axis's, the others converted to it.
    unit = units[-1]
    if len(set(units)) > 1:
        if None in units:
            unit = None
        else:
            zyx = [v * UNIT_METRES[u] / UNIT_METRES[unit] for v, u in zip(zyx, units)]
    return voxel_size_or_none(zyx, unit)


def multiscale_level0(group: Any) -> str | None:
    """The path of the full-resolution array of an OME-Zarr multiscale image group, or None for another group:
    the first dataset of the group's first multiscale."""
    try:
        return str(_multiscales(group)[0]["datasets"][0]["path"])
    except (TypeError, KeyError, IndexError):
        return None
