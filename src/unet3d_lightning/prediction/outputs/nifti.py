"""NIfTI outputs (``--prediction.format nifti``): ``<stem>_predictions.nii.gz`` holding ``(x, y, z, C)``
probabilities and, with ``save_segmentation``, ``<stem>_segmentation.nii.gz`` (``(x, y, z)`` class ids, uint8), each
dataset of the writer (``predictions``, ``segmentation``, ``instances``) in a file of its own.

Each file carries the input's affine and header (qform and sform with their codes, units, orientation, extensions)
when the input is NIfTI; for other inputs the affine is built from the voxel size (``diag(x, y, z, 1)``, sform and
qform code 2, "aligned"), or is the identity when the voxel size is unknown. The header's ``descrip`` reads
``unet3d <dataset>``: that is how an earlier output of ours is told from another file.

NIfTI cannot be written in pieces in z order (its gzip stream and its ``(x, y, z, C)`` layout want the whole
array), so rows are gathered in memory-mapped ``.npy`` files inside the temporary directory of the output (disk, not
memory: the writer's memory stays what it is for the other formats) and each NIfTI file is written from them at the
end, block by block, through gzip (level 1). ``(C, D, H, W)`` in C order is ``(x, y, z, C)`` in NIfTI's Fortran order,
so the blocks are copied as they lie. Only when every file is complete are they renamed to their final names; an
interrupted run leaves nothing under them. Probabilities stored as uint8 get ``scl_slope = 1/255``, so NIfTI readers
read probabilities; float16 is stored as float32 (NIfTI-1 has no half-precision type).
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

# Output datasets per file: the suffix that replaces "_predictions.nii.gz" in the final name.
OUTPUT_SUFFIX = "_predictions.nii.gz"
DESCRIP_PREFIX = "unet3d "
GZIP_LEVEL = 1
# Bytes copied from the gathered array into the gzip stream at a time (bounds the memory of the final pass).
BLOCK_BYTES = 64 * 2**20
# NIfTI spatial units by NGFF name (others are converted to micrometres).
_NIFTI_UNITS = {"millimeter": "mm", "micrometer": "micron", "meter": "meter"}


def sibling_path(final: Path, name: str) -> Path:
    """The final path of dataset ``name`` beside the predictions file ``final``: ``a_predictions.nii.gz`` ->
    ``a_segmentation.nii.gz``."""
    base = final.name[: -len(OUTPUT_SUFFIX)] if final.name.endswith(OUTPUT_SUFFIX) else final.name
    return final.with_name(f"{base}_{name}.nii.gz")


class _Gathered:
    """One dataset being gathered: a memory-mapped ``.npy`` of the writer's ``(C, D, H, W)`` or ``(D, H, W)``."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: str) -> None:
        self.name = name
        self.path = path
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
        self.dtype = self.array.dtype
        self.shape = shape
        self.attrs: dict[str, Any] = {}

    def __setitem__(self, index: Any, values: np.ndarray) -> None:
        self.array[index] = values

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.array[index]


class NiftiStore:
    """The temporary directory of one volume's NIfTI outputs, as :class:`~.volume.VolumeOutput` writes them.

    Args:
        path: the temporary directory (created here).
        compression: ignored: NIfTI outputs are always gzip-compressed (level :data:`GZIP_LEVEL`).
        volume: the input :class:`~unet3d_lightning.data.volumes.Volume`, whose NIfTI header (or voxel size) the
            outputs take. Default None: identity affine.
    """

    encode = None
    takes_volume = True

    def __init__(self, path: Path, compression: str | None, volume: Any = None) -> None:
        import nibabel

        self.nibabel = nibabel
        self.path = path
        path.mkdir()
        self.datasets: dict[str, _Gathered] = {}
        self.header, self.affine = _source_header(nibabel, volume)

    @staticmethod
    def encoder(compression: str | None) -> None:
        return None

    def create_dataset(self, name: str, *, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...]) -> Any:
        dtype = "float32" if dtype == "float16" else dtype
        dataset = self.datasets[name] = _Gathered(self.path / f"{name}.npy", name, tuple(shape), dtype)
        return dataset

    @staticmethod
    def write_encoded(dataset: Any, offset: tuple[int, ...], data: bytes) -> None:
        raise NotImplementedError("NIfTI outputs are gathered, not written by chunks")

    def close(self) -> None:
        """Write every gathered dataset as ``<name>.nii.gz`` in the temporary directory, and drop the ``.npy``."""
        for dataset in self.datasets.values():
            dataset.array.flush()
            self._write(dataset, self.path / f"{dataset.name}.nii.gz")
            del dataset.array
            dataset.path.unlink()

    def _write(self, dataset: _Gathered, target: Path) -> None:
        array = np.load(dataset.path, mmap_mode="r")
        header = self.header.copy()
        shape = tuple(reversed(array.shape[-3:])) + ((array.shape[0],) if array.ndim == 4 else ())
        header.set_data_shape(shape)
        header.set_data_dtype(array.dtype)
        scale = float(dataset.attrs.get("scale", 1.0))
        header.set_slope_inter(1.0 / scale if scale != 1.0 else 1.0, 0.0)
        header["descrip"] = f"{DESCRIP_PREFIX}{dataset.name}".encode()[:79]
        header["cal_min"] = header["cal_max"] = 0
        if array.ndim == 4:
            header["intent_code"] = 1007  # NIFTI_INTENT_VECTOR: the 4th axis holds a value per output channel
        header["vox_offset"] = 0  # recomputed by write_to for the extensions this header carries
        stored = header.get_data_dtype()  # the header's byte order
        with gzip.open(target, "wb", compresslevel=GZIP_LEVEL) as out:
            header.write_to(out)
            out.write(b"\0" * (int(header.get_data_offset()) - out.tell()))
            # (C, D, H, W) in C order is (x, y, z, C) in NIfTI's Fortran order: copied in z blocks as they lie.
            rows = max(1, BLOCK_BYTES // max(1, int(np.prod(array.shape[-2:])) * array.dtype.itemsize))
            channels = array[None] if array.ndim == 3 else array
            for c in range(channels.shape[0]):
                for z in range(0, channels.shape[1], rows):
                    out.write(np.ascontiguousarray(channels[c, z : z + rows], dtype=stored).tobytes())
        del array

    def discard(self) -> None:
        for dataset in self.datasets.values():
            if hasattr(dataset, "array"):
                del dataset.array

    @staticmethod
    def replace(source: Path, final: Path) -> None:
        """Rename each complete file of the temporary directory ``source`` to its final name beside ``final``
        (the predictions last: while it is absent or old, the output is not complete), then remove ``source``."""
        names = sorted(p.name[: -len(".nii.gz")] for p in source.glob("*.nii.gz"))
        for name in sorted(names, key=lambda n: n == "predictions"):
            target = final if name == "predictions" else sibling_path(final, name)
            os.replace(source / f"{name}.nii.gz", target)
        # An earlier run's segmentation or instances beside the new predictions would not match them; they were
        # checked to be ours (paths.previous_output_problem) before this rename.
        for name in ("segmentation", "instances"):
            if name not in names:
                sibling_path(final, name).unlink(missing_ok=True)
        shutil.rmtree(source, ignore_errors=True)


def _source_header(nibabel: Any, volume: Any) -> tuple[Any, np.ndarray]:
    """The header the outputs start from and its affine: a NIfTI input's own (qform/sform and codes kept), else a
    new NIfTI-1 header with the affine of the voxel size."""
    path = getattr(volume, "path", None)
    if path is not None and str(path).lower().endswith((".nii", ".nii.gz")):
        image = nibabel.load(str(path))
        return image.header.copy(), image.affine
    header = nibabel.Nifti1Header()
    size = getattr(volume, "voxel_size", None)
    affine = np.eye(4)
    if size is not None:
        unit = size.unit if size.unit in _NIFTI_UNITS else None
        if size.unit is not None and unit is None:
            size, unit = size.to("micrometer"), "micrometer"
        z, y, x = size.zyx
        affine = np.diag([x, y, z, 1.0])
        header.set_xyzt_units(_NIFTI_UNITS.get(unit, "unknown") if unit else "unknown")
    header.set_qform(affine, code=2)
    header.set_sform(affine, code=2)
    return header, affine
