"""Voxel size: the physical extent of one voxel along ``(z, y, x)``, with its unit (pure: no files, no torch).

Every reader (:mod:`unet3d_lightning.data.io`) reports the voxel size its file records, as a :class:`VoxelSize`, or
None when the file records none: NIfTI zooms, the OME-Zarr ``scale`` of a level, ImageJ TIFF ``spacing`` and
resolution tags, OME-TIFF ``PhysicalSize*``, the HDF5/Zarr attributes ``element_size_um`` (PlantSeg, ilastik) and
``resolution``. Units are the NGFF/UDUNITS names of space units (``"micrometer"``, ``"millimeter"``,
``"nanometer"``, ...), or None when the file does not say.

Two voxel sizes *differ* when one axis differs by more than a relative ``tolerance`` (10 %); sizes of different
known units are compared after conversion to one unit, sizes of which one has no unit as plain numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Relative difference on any axis above which two voxel sizes are told apart (warnings, rescaling).
TOLERANCE = 0.1

# NGFF space units (UDUNITS-2 names) in metres, and how a message writes them.
UNIT_METRES = {
    "angstrom": 1e-10, "attometer": 1e-18, "centimeter": 1e-2, "decimeter": 1e-1, "exameter": 1e18,
    "femtometer": 1e-15, "foot": 0.3048, "gigameter": 1e9, "hectometer": 1e2, "inch": 0.0254, "kilometer": 1e3,
    "megameter": 1e6, "meter": 1.0, "micrometer": 1e-6, "mile": 1609.344, "millimeter": 1e-3, "nanometer": 1e-9,
    "parsec": 3.0857e16, "petameter": 1e15, "picometer": 1e-12, "terameter": 1e12, "yard": 0.9144,
    "yoctometer": 1e-24, "yottameter": 1e24, "zeptometer": 1e-21, "zettameter": 1e21,
}
UNIT_SYMBOLS = {
    "angstrom": "Å", "centimeter": "cm", "meter": "m", "micrometer": "µm", "millimeter": "mm", "nanometer": "nm",
    "picometer": "pm", "kilometer": "km",
}
# How files spell units (ImageJ "micron" and "\\u00B5m", NIfTI "mm", OME "µm", ...), lower-cased, to NGFF names.
_ALIASES = {
    "um": "micrometer", "µm": "micrometer", "μm": "micrometer", "micron": "micrometer", "microns": "micrometer",
    "\\u00b5m": "micrometer", "micrometre": "micrometer", "mm": "millimeter", "millimetre": "millimeter",
    "nm": "nanometer", "nanometre": "nanometer", "m": "meter", "metre": "meter", "cm": "centimeter",
    "centimetre": "centimeter", "pm": "picometer", "å": "angstrom", "a": "angstrom", "km": "kilometer",
}


def unit_name(text: Any) -> str | None:
    """The NGFF name of a unit as a file spells it (``"micron"``, ``"µm"``, ``"um"``, ``"mm"``, ``"micrometer"``),
    or None for an unknown or absent one (``"pixel"``, ``"unknown"``, ``""``, None)."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    word = str(text).strip().lower()
    if word in UNIT_METRES:
        return word
    return _ALIASES.get(word)


@dataclass(frozen=True)
class VoxelSize:
    """The size of a voxel along ``(z, y, x)``, in ``unit`` (an NGFF space unit name, or None: not known).

    Example: ``VoxelSize((4.0, 1.0, 1.0), "micrometer")`` prints as ``(4.0, 1.0, 1.0) µm``.
    """

    zyx: tuple[float, float, float]
    unit: str | None = None

    def __post_init__(self) -> None:
        values = tuple(float(v) for v in self.zyx)
        if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"a voxel size is three positive finite numbers (z, y, x), not {tuple(self.zyx)}")
        object.__setattr__(self, "zyx", values)
        object.__setattr__(self, "unit", unit_name(self.unit) if self.unit is not None else None)

    def __str__(self) -> str:
        return describe(self)

    def to(self, unit: str) -> VoxelSize:
        """This size in another known ``unit``; a size without a unit is returned as it is."""
        target = unit_name(unit)
        if self.unit is None or target is None or target == self.unit:
            return self
        factor = UNIT_METRES[self.unit] / UNIT_METRES[target]
        return VoxelSize(tuple(v * factor for v in self.zyx), target)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint (``torch.load(weights_only=True)`` reads it): ``{"zyx": [...], "unit": ...}``."""
        return {"zyx": list(self.zyx), "unit": self.unit}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> VoxelSize | None:
        """The inverse of :meth:`as_dict`; None for None or for data that is not a voxel size."""
        if not isinstance(data, Mapping):
            return None
        try:
            return cls(tuple(data["zyx"]), data.get("unit"))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            return None


def voxel_size_or_none(zyx: Sequence[Any] | None, unit: Any = None) -> VoxelSize | None:
    """A :class:`VoxelSize` from values read in a file, or None when they are absent or not three positive finite
    numbers (a file that records ``(0, 0, 0)`` or ``NaN`` records no usable size)."""
    if zyx is None:
        return None
    try:
        values = [float(v) for v in zyx]
    except (TypeError, ValueError):
        return None
    if len(values) != 3:
        return None
    try:
        return VoxelSize(tuple(values), unit_name(unit))  # type: ignore[arg-type]
    except ValueError:
        return None


def describe(size: VoxelSize | None) -> str:
    """``"(4.0, 1.0, 1.0) µm"``; ``"(4.0, 1.0, 1.0)"`` without a unit; ``"unknown"`` for None."""
    if size is None:
        return "unknown"
    numbers = "(" + ", ".join(f"{v:g}" if v != int(v) or abs(v) >= 1e6 else f"{v:.1f}" for v in size.zyx) + ")"
    if size.unit is None:
        return numbers
    return f"{numbers} {UNIT_SYMBOLS.get(size.unit, size.unit)}"


def _comparable(a: VoxelSize, b: VoxelSize) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if a.unit is not None and b.unit is not None:
        return a.zyx, b.to(a.unit).zyx
    return a.zyx, b.zyx


def relative_differences(a: VoxelSize, b: VoxelSize) -> tuple[float, float, float]:
    """``|a - b| / b`` per axis ``(z, y, x)``, after converting ``b`` to ``a``'s unit (when both have one)."""
    x, y = _comparable(a, b)
    return tuple(abs(p - q) / q for p, q in zip(x, y))  # type: ignore[return-value]


def differs(a: VoxelSize | None, b: VoxelSize | None, tolerance: float = TOLERANCE) -> bool:
    """Whether two voxel sizes differ by more than ``tolerance`` (relative, default 10 %) on any axis; False when
    either is unknown (nothing to compare)."""
    if a is None or b is None:
        return False
    return max(relative_differences(a, b)) > tolerance


def scale_factors(source: VoxelSize, target: VoxelSize) -> tuple[float, float, float]:
    """Per axis, how many voxels of size ``target`` one voxel of size ``source`` spans: ``source / target`` (2.0
    where the target grid is twice as fine)."""
    x, y = _comparable(source, target)
    return tuple(p / q for p, q in zip(x, y))  # type: ignore[return-value]


def mismatch_warning(name: str, volume: VoxelSize | None, model: VoxelSize | None,
                     tolerance: float = TOLERANCE) -> str | None:
    """The one-line warning for a volume whose voxel size differs from the model's by more than ``tolerance`` on
    some axis, or None when they agree or either is unknown.

    Args:
        name: the volume, as the message names it (``"predict volume a.nii.gz"``).
        volume: the volume's voxel size.
        model: the voxel size of the model's training data (from its checkpoint).
        tolerance: relative difference allowed per axis. Default 0.1.
    """
    if not differs(volume, model, tolerance):
        return None
    return (
        f"{name}: voxel size {describe(volume)} differs from the model's {describe(model)} (trained on data of that "
        "voxel size) by more than 10 % on some axis; predictions at another scale are often poor: resample the "
        "volume, use --prediction.rescale true, or set data.voxel_size if the file's is wrong"
    )


def common_voxel_size(named: Iterable[tuple[str, VoxelSize | None]],
                      tolerance: float = TOLERANCE) -> tuple[VoxelSize | None, str | None]:
    """The voxel size of a run's volumes (that of the first one that has one) and a one-line warning naming the
    first volume that differs from it by more than ``tolerance``, or None when all agree.

    Args:
        named: ``(volume name, voxel size)`` pairs; volumes of unknown voxel size are left out of the comparison.
        tolerance: relative difference allowed per axis. Default 0.1.
    """
    first: tuple[str, VoxelSize] | None = None
    for name, size in named:
        if size is None:
            continue
        if first is None:
            first = (name, size)
        elif differs(size, first[1], tolerance):
            return first[1], (
                f"{name} has voxel size {describe(size)} but {first[0]} has {describe(first[1])}: the volumes of "
                "this run differ by more than 10 % on some axis, so the model learns objects at several scales; "
                "resample them to one voxel size, or set data.voxel_size if a file's is wrong"
            )
    return (None if first is None else first[1]), None
