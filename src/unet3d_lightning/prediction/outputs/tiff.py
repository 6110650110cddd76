"""TIFF outputs: ImageJ hyperstacks that Fiji opens at the right scale (needs the ``formats`` extra).

Each dataset is a file of its own (a TIFF holds one image): ``<stem>_predictions.tif`` (``ZCYX``),
``<stem>_segmentation.tif`` (``ZYX`` class ids, or ``ZCYX`` masks) and ``<stem>_instances.tif`` (``ZYX``), each
under a temporary name until the volume is complete, then all renamed.

- **ImageJ metadata**: the description holds ``spacing`` (the z voxel size) and ``unit``; the XResolution and
  YResolution tags hold pixels per unit in x and y (1 / voxel size), as ImageJ writes them. Without a known voxel
  size: spacing 1, resolution 1, no unit.
- **Types**: ImageJ stores uint8, uint16 and float32 only. Predictions are float32 or uint8 (``prediction.dtype
  float16`` is refused for TIFF); segmentations are uint8/uint16. Instance ids are uint32 (a watershed may find more
  than 65535 objects), which ImageJ cannot hold: ``<stem>_instances.tif`` is a plain multi-page TIFF (tifffile's
  shaped description, ``axes: ZYX``, ``spacing``, ``unit``, and the same resolution tags) that Fiji opens through
  Bio-Formats (File > Import > Bio-Formats) and tifffile, napari and scikit-image read directly.
- **Above 4 GB**: a classic TIFF ends at 4 GB. tifffile's choice for ImageJ files beyond that (ImageJ's own) is to
  store every plane contiguously after ONE page, which only readers that parse the ImageJ description see whole;
  this writer instead writes a BigTIFF (64-bit offsets, every plane a page of its own) with the same ImageJ
  description, once the data exceed :data:`BIGTIFF_ABOVE` (4 GB less 32 MB for metadata, tifffile's own margin).
  tifffile and Fiji's Bio-Formats importer read such a file with its spacing; ImageJ's plain File > Open does not
  read BigTIFF (use Bio-Formats, or the OME-Zarr output for volumes this large).
- **Writing** is streaming: the file's pages are laid out uncompressed and contiguous when it is created
  (:func:`tifffile.memmap`), and each row of chunks is copied into its planes and flushed to disk as it arrives, so
  the process holds one chunk row, not the volume (the pages it wrote are clean page cache the system reclaims).
  TIFF outputs are uncompressed (ImageJ's hyperstack layout): ``prediction.compression`` does not apply.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..paths import SOFTWARE, previous_output_problem, not_ours_message, remove_path, side_path, temporary_path

# Data beyond this many bytes go into a BigTIFF (tifffile's own threshold: 4 GB less 32 MB for the metadata).
BIGTIFF_ABOVE = 2**32 - 2**25
IMAGEJ_DTYPES = ("uint8", "uint16", "float32")
# Spellings of units -> what ImageJ's description takes ("um" is shown as µm).
_IMAGEJ_UNITS = {"micrometer": "um", "micrometre": "um", "µm": "um", "μm": "um", "micron": "um", "microns": "um",
                 "nanometer": "nm", "nanometre": "nm", "millimeter": "mm", "millimetre": "mm",
                 "centimeter": "cm", "meter": "m", "metre": "m"}


def imagej_unit(unit: str | None) -> str | None:
    """The unit as ImageJ's description spells it (``"micrometer"`` -> ``"um"``), or None."""
    if not unit:
        return None
    return _IMAGEJ_UNITS.get(unit.strip().lower(), unit.strip())


class TiffDataset:
    """One dataset as one TIFF file at a temporary name, filled by z-rows: ``(C, D, H, W)`` stored as ImageJ
    ``ZCYX`` pages, ``(D, H, W)`` as ``ZYX``.

    ``attrs`` set before the first rows (the ``scale`` of predictions) go into the description; the file is laid
    out at the first write. Reading (``dataset[...]``, for the watershed of instances) gives the complete array in
    ``(C, D, H, W)`` / ``(D, H, W)`` order.
    """

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: str,
                 voxel_size: tuple[float, float, float], unit: str | None) -> None:
        self.path = path
        self.name = name
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.attrs: dict[str, Any] = {}
        self.voxel_size = voxel_size
        self.unit = unit
        self._pages: Any = None

    @property
    def imagej(self) -> bool:
        return self.dtype.name in IMAGEJ_DTYPES

    def _open(self) -> Any:
        import tifffile

        channels = len(self.shape) == 4
        stored = (self.shape[1], self.shape[0], *self.shape[2:]) if channels else self.shape
        sz, sy, sx = self.voxel_size
        metadata: dict[str, Any] = {"axes": "ZCYX" if channels else "ZYX", "spacing": sz}
        if self.unit is not None:
            metadata["unit"] = self.unit
        # Only simple values: ImageJ's description is key=value lines.
        metadata.update({k: v for k, v in self.attrs.items() if isinstance(v, (int, float, str))})
        size = int(np.prod(stored)) * self.dtype.itemsize
        with warnings.catch_warnings():
            # "writing nonconformant BigTIFF ImageJ": the choice this module documents.
            warnings.filterwarnings("ignore", message=".*nonconformant BigTIFF ImageJ")
            pages = tifffile.memmap(
                self.path, shape=stored, dtype=self.dtype, imagej=self.imagej, bigtiff=size > BIGTIFF_ABOVE,
                resolution=(1.0 / sx, 1.0 / sy), metadata=metadata, software=SOFTWARE,
                # Grey planes: a depth of 3 or 4 must never be taken for the samples of an RGB(A) image.
                photometric="minisblack", planarconfig="contig",
            )
        return pages

    def __setitem__(self, index: Any, rows: np.ndarray) -> None:
        if self._pages is None:
            self._pages = self._open()
        z = index[1] if isinstance(index, tuple) else index
        if len(self.shape) == 4:
            self._pages[z] = np.moveaxis(rows, 0, 1)
        else:
            self._pages[z] = rows
        # Written pages become clean page cache once flushed; dropping them from the mapping keeps them out of the
        # process's resident memory too (the data are in the file), so memory stays one chunk row.
        self._pages.flush()
        mapping = getattr(self._pages, "_mmap", None)
        if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):
                mapping.madvise(mmap.MADV_DONTNEED)

    def __getitem__(self, index: Any) -> np.ndarray:
        import tifffile

        self.close()
        data = tifffile.imread(self.path)
        data = data.reshape(self.shape[1], self.shape[0], *self.shape[2:]) if len(self.shape) == 4 else \
            data.reshape(self.shape)
        return (np.moveaxis(data, 1, 0) if len(self.shape) == 4 else data)[index]

    def close(self) -> None:
        if self._pages is not None:
            self._pages.flush()
            del self._pages
            self._pages = None


class TiffStore:
    """The TIFF files of one volume's output while it is written (see the module).

    Args:
        path: the temporary path of ``<stem>_predictions.tif``; the other datasets' files take the temporary names
            of their own final names beside it.
        compression: ignored (TIFF outputs are uncompressed; see the module).
        voxel_size: ``(z, y, x)`` voxel size, or None when unknown (then 1.0 and no unit). Default None.
        unit: the voxel size's unit, or None. Default None.
    """

    encode = None
    physical = True  # takes voxel_size and unit

    def __init__(self, path: Path, compression: str | None, voxel_size: Sequence[float] | None = None,
                 unit: str | None = None) -> None:
        self.path = path
        self.voxel_size = tuple(float(s) for s in voxel_size) if voxel_size is not None else (1.0, 1.0, 1.0)
        self.unit = imagej_unit(unit) if voxel_size is not None else None
        self.datasets: dict[str, TiffDataset] = {}

    @staticmethod
    def encoder(compression: str | None) -> None:
        return None

    def _final(self, source: Path) -> Path:
        """The final name of the predictions behind the temporary ``source``."""
        name = source.name[1:]
        return source.with_name(name[: name.rindex(".tmp-")])

    def _file(self, name: str) -> Path:
        if name == "predictions":
            return self.path
        return temporary_path(side_path(self._final(self.path), "tiff", name))

    def create_dataset(self, name: str, *, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...]) -> Any:
        path = self._file(name)
        remove_path(path)  # left by a killed run of a process with our pid
        dataset = TiffDataset(path, name, shape, dtype, self.voxel_size, self.unit)
        self.datasets[name] = dataset
        return dataset

    @staticmethod
    def write_encoded(dataset: Any, offset: tuple[int, ...], data: bytes) -> None:
        raise NotImplementedError("TIFF outputs are written uncompressed, page by page")

    def close(self) -> None:
        for dataset in self.datasets.values():
            dataset.close()

    def replace(self, source: Path, final: Path) -> None:
        """Rename every file of the volume to its final name, each replacing an earlier output of ours there: the
        files beside the predictions first, so that the predictions' final name appears last, when all is done."""
        for name, dataset in self.datasets.items():
            if name == "predictions":
                continue
            target = side_path(final, "tiff", name)
            problem = previous_output_problem(target, "tiff")
            if problem is not None:
                from ...errors import ConfigurationError

                raise ConfigurationError(not_ours_message(target, problem))
            os.replace(dataset.path, target)
        os.replace(source, final)

    def discard(self) -> None:
        """Close and delete the files beside the predictions (the caller deletes the predictions' own)."""
        for name, dataset in self.datasets.items():
            with contextlib.suppress(Exception):
                dataset.close()
            if name != "predictions":
                with contextlib.suppress(OSError):
                    remove_path(dataset.path)
