"""Resumable prediction (``prediction.resume``): the record an unfinished Zarr output keeps of its finished rows and
of the settings that made it.

A resumable output is written into ``.<name>.partial`` (beside the final ``<name>``, a name of its own that does
not depend on the process, so that a later run finds it) and renamed when complete, like every output. Beside it,
``.<name>.partial-progress/`` holds

- ``settings.json``: what changes the numbers — the model's weights (a SHA-256 of its state dict), the volume
  (path, shape), the patch grid (patch shape, padded shape, the starts along each axis), normalisation, blend, halo,
  storage dtype, compression, segmentation, test-time augmentation, instances — written once, atomically, when the
  store is created;
- ``rows-<z0>-<z1>.json``, one per finished row of chunks, written (to a temporary name, then renamed: atomic)
  only after every dataset's chunks of those rows are in the store. A run killed while it writes rows leaves no
  marker for them, so they are predicted and written again.

A run with ``resume`` reads the records of its volumes at setup: a record whose settings differ from the run's is
refused with one ``error:`` line; the finished rows are left out of the rank assignment
(:func:`~.distributed.assign_rows`), so only the patches meeting unfinished rows are predicted. A run without
``resume`` removes such leftovers of its volumes (with a note) and starts afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .paths import output_path

__all__ = [
    "Progress", "check_settings", "finished_rows", "partial_path", "progress_path", "remove_partials",
    "run_settings", "state_dict_digest",
]

_MARKER = re.compile(r"^rows-(\d+)-(\d+)\.json$")


def partial_path(final: Path) -> Path:
    """The temporary name of a resumable output: ``.<name>.partial``."""
    return final.with_name(f".{final.name}.partial")


def progress_path(final: Path) -> Path:
    """The directory of a resumable output's record: ``.<name>.partial-progress``."""
    return final.with_name(f".{final.name}.partial-progress")


def _write_json(path: Path, content: Any) -> None:
    """Write ``content`` to ``path`` atomically: a temporary name in the same directory, flushed, then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(content, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def state_dict_digest(module: Any) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in name order): the model's identity,
    whatever file it was loaded from."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def run_settings(plan: Any, normalization: str, writer: Any, model_digest: str, channels: int) -> dict[str, Any]:
    """The settings of one volume's prediction that change its output, as recorded in ``settings.json``."""
    grid = plan.grid
    starts = [sorted({s[axis].start for s in grid}) for axis in range(3)]
    return {
        "model": model_digest,
        "out_channels": int(channels),
        "volume": str(Path(plan.volume.path).resolve()),
        "shape": list(plan.volume.spatial_shape),
        "patch": [s.stop - s.start for s in grid[0]],
        "padded": list(getattr(plan, "padded_shape", None) or [max(s[a].stop for s in grid) for a in range(3)]),
        "starts": starts,
        "normalization": normalization,
        "blend": writer.blend,
        "halo": list(writer.halo),
        "dtype": writer.dtype,
        "compression": writer.compression,
        "save_segmentation": bool(writer.save_segmentation),
        "tta": bool(writer.tta),
        "instances": repr(writer.watershed) if writer.instances else None,
    }


# What a differing setting is called in the error message.
_NAMES = {
    "model": "model weights (checkpoint, SHA-256 of the state dict)", "out_channels": "model.out_channels",
    "volume": "volume path", "shape": "volume shape", "patch": "data.predict_patch_shape",
    "padded": "data.predict_patch_shape",
    "starts": "patch grid (data.predict_patch_shape / data.predict_stride_shape)",
    "normalization": "data.normalization", "blend": "prediction.blend", "halo": "prediction.halo",
    "dtype": "prediction.dtype", "compression": "prediction.compression",
    "save_segmentation": "prediction.save_segmentation", "tta": "prediction.tta", "instances": "prediction.instances",
}


def check_settings(final: Path, settings: dict[str, Any]) -> bool:
    """Whether a resumable record of ``final`` exists (True) or not (False, the run starts this volume afresh);
    raise when its settings differ from ``settings``."""
    record = progress_path(final) / "settings.json"
    if not partial_path(final).is_dir() or not record.is_file():
        return False
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigurationError(
            f"prediction.resume: the record {record} of the interrupted output cannot be read ({err}); remove "
            f"{partial_path(final)} and {progress_path(final)}, or run without prediction.resume to start afresh"
        ) from None
    for key, value in settings.items():
        if recorded.get(key) != value:
            def short(v: Any) -> str:
                text = json.dumps(v)
                return text if len(text) <= 60 else text[:57] + "..."

            raise ConfigurationError(
                f"prediction.resume: the interrupted output {partial_path(final)} was written with different "
                f"{_NAMES.get(key, key)}: {short(recorded.get(key))}, this run has {short(value)}; resume with the "
                "settings and checkpoint of the interrupted run, or run without prediction.resume to start afresh"
            )
    return True


def finished_rows(final: Path) -> set[tuple[int, int]]:
    """The chunk rows ``(z0, z1)`` the record of ``final`` marks finished."""
    try:
        names = os.listdir(progress_path(final))
    except OSError:
        return set()
    return {(int(m[1]), int(m[2])) for name in names if (m := _MARKER.match(name))}


def start_record(final: Path, settings: dict[str, Any]) -> None:
    """A fresh record for the new store at :func:`partial_path`: the old one removed, ``settings.json`` written."""
    progress = progress_path(final)
    shutil.rmtree(progress, ignore_errors=True)
    progress.mkdir()
    _write_json(progress / "settings.json", settings)


def finish_record(final: Path) -> None:
    """Remove the record once the output is at its final name."""
    shutil.rmtree(progress_path(final), ignore_errors=True)


class Progress:
    """The markers of one rank's chunk rows of one volume: :meth:`update` marks each row of ``units`` once the
    store holds every row below ``flushed``.

    Args:
        final: the volume's final output path.
        units: the chunk rows ``(z0, z1)`` this rank writes, in increasing order.
    """

    def __init__(self, final: Path, units: Sequence[tuple[int, int]]) -> None:
        self.directory = progress_path(final)
        self.pending = list(units)

    def update(self, flushed: int) -> None:
        while self.pending and self.pending[0][1] <= flushed:
            z0, z1 = self.pending.pop(0)
            self.mark(z0, z1)

    def mark(self, z0: int, z1: int) -> None:
        _write_json(self.directory / f"rows-{z0}-{z1}.json", {"rows": [z0, z1]})


def remove_partials(output_dir: str | os.PathLike, volumes: Sequence[str | os.PathLike], format: str) -> list[str]:
    """Remove the resumable leftovers (``.partial`` store and record) of ``volumes``' outputs; one note each."""
    notes = []
    for volume in volumes:
        final = output_path(Path(output_dir).expanduser(), volume, format)
        for path in (partial_path(final), progress_path(final)):
            if path.exists():
                with contextlib.suppress(OSError):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                if path == partial_path(final):
                    notes.append(f"removed {path}, the unfinished output of an interrupted run (pass "
                                 "--prediction.resume true to continue such an output instead)")
    return notes
