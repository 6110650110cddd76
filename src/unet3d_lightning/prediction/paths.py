"""Where prediction outputs go, and the checks that keep them from touching anything that is not theirs.

Each input volume ``<dir>/<stem>.h5`` gets ``<output_dir>/<stem>_predictions.h5`` (``.zarr`` for Zarr outputs). An
output is written under a temporary name in the same directory, ``.<name>.tmp-<host>-<pid>``, and renamed when
complete, so an interrupted run never leaves a truncated output under the final name. A path already at the final
name is replaced only if it is recognisably an earlier output of the writer (:func:`previous_output_problem`);
anything else there — a user's folder, a text file, another tool's HDF5 file, a symbolic link — is refused before
any work, as are names longer than the file system allows and outputs that would be an input
(:func:`check_output_dir`). Temporary outputs left by processes of this machine that no longer run (``kill -9``, a
node crash) are removed when the next prediction into the directory starts (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py

from ..data.io import volume_stem
from ..errors import ConfigurationError, nearest_existing, one_line

OUTPUT_SUFFIX = "_predictions.h5"
OUTPUT_SUFFIXES = {"hdf5": OUTPUT_SUFFIX, "zarr": "_predictions.zarr", "nifti": "_predictions.nii.gz",
                   "ome-zarr": "_predictions.ome.zarr", "tiff": "_predictions.tif"}
# Files written beside the output of some formats (a TIFF holds one image: segmentation and instances get their own),
# by the dataset they hold; and the preview of prediction.preview, beside the output of every format.
SIDE_SUFFIXES = {"tiff": {"segmentation": "_segmentation.tif", "instances": "_instances.tif"}}
PREVIEW_SUFFIX = "_preview.png"
# What the TIFF and PNG files of the writer carry (the TIFF Software tag, the PNG "Software" text chunk).
SOFTWARE = "unet3d-lightning"
# The datasets (HDF5) or arrays (Zarr) the writer puts into an output, at its root. An existing output holding
# anything else is not (only) ours, and is never replaced.
OUTPUT_ARRAYS = ("predictions", "segmentation", "instances")
# Entries of one array of a Zarr (format 3) output: its metadata and the tree of its chunks (absent while every chunk
# equals the fill value).
_ZARR_ARRAY_ENTRIES = {"zarr.json", "c"}
_SUFFIX_PATTERN = "|".join(re.escape(suffix) for suffix in (
    *OUTPUT_SUFFIXES.values(), *(s for sides in SIDE_SUFFIXES.values() for s in sides.values()), PREVIEW_SUFFIX))
# Hidden names of unfinished outputs: the temporary one while a volume is written, and the previous Zarr output while
# it is moved aside to make room for the new one. They carry the host: on a file system shared by several machines a
# pid says nothing about another machine's processes.
_TEMPORARY_NAME = re.compile(rf"^\.(?P<final>.+(?:{_SUFFIX_PATTERN}))\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)$")
# The same names as releases before the host was recorded wrote them: whose they are cannot be told.
_UNHOSTED_TEMPORARY_NAME = re.compile(rf"^\.(?P<final>.+(?:{_SUFFIX_PATTERN}))\.(?:tmp|old)-(?P<pid>\d+)$")


def output_path(output_dir: str | os.PathLike, volume_path: str | os.PathLike, format: str = "hdf5") -> Path:
    """``<output_dir>/<input stem>_predictions.h5`` (``format="zarr"``: ``.zarr``); the stem drops the input's
    format suffix, ``.ome.zarr`` and ``.ome.tif`` included."""
    return Path(output_dir) / f"{volume_stem(volume_path)}{OUTPUT_SUFFIXES[format]}"


def side_path(final: Path, format: str, name: str) -> Path:
    """The file beside the output ``final`` holding dataset ``name`` (:data:`SIDE_SUFFIXES`), or the preview
    (``name="preview"``: ``<stem>_preview.png``)."""
    suffix = PREVIEW_SUFFIX if name == "preview" else SIDE_SUFFIXES[format][name]
    return final.with_name(final.name[: -len(OUTPUT_SUFFIXES[format])] + suffix)


def output_paths(output_dir: str | os.PathLike, volume_path: str | os.PathLike, format: str = "hdf5",
                 preview: bool = False) -> list[Path]:
    """Every path the run may write for one volume: its output (:func:`output_path`), the files beside it that its
    format writes (TIFF: ``<stem>_segmentation.tif``, ``<stem>_instances.tif``) and, with ``preview``, the preview."""
    final = output_path(output_dir, volume_path, format)
    names = [*SIDE_SUFFIXES.get(format, {}), *(["preview"] if preview else [])]
    return [final, *(side_path(final, format, name) for name in names)]


@functools.cache
def _host() -> str:
    """This machine's name as temporary names hold it: letters, digits, '.', '_' and '-' only, at most 64."""
    try:
        name = socket.gethostname()
    except OSError:
        name = ""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "localhost"


def temporary_path(final: Path) -> Path:
    """The hidden name a volume's output has while it is written: this process's own, by host and pid."""
    return final.with_name(f".{final.name}.tmp-{_host()}-{os.getpid()}")


def aside_path(final: Path) -> Path:
    """The hidden name of the previous Zarr output while the new one is renamed into its place."""
    return final.with_name(f".{final.name}.old-{_host()}-{os.getpid()}")


def remove_path(path: Path) -> None:
    """Remove the file or (Zarr store) directory ``path`` if it is there; a symbolic link itself, never its target."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _name_max(directory: Path) -> int:
    """The longest file name, in bytes, that the file system of ``directory`` takes (NAME_MAX; 255 if unknown)."""
    try:
        limit = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255
    return limit if isinstance(limit, int) and limit > 0 else 255


# ------------------------------------------------------------------------------------------------ what is ours
def previous_output_problem(final: Path, format: str = "hdf5") -> str | None:
    """None if nothing is at ``final`` or it is recognisably an earlier output of this writer (which may be
    replaced), else what is there instead, for the error message.

    Ours are: an HDF5 file, or a Zarr (format 3) group directory, holding only the datasets of
    :data:`OUTPUT_ARRAYS` at its root, ``predictions`` among them with its ``scale`` attribute — what every release
    of the writer has written; an OME-Zarr (format 2) image with the writer's ``unet3d`` attribute holding only
    numbered levels and its label images; a TIFF file, or a PNG preview, carrying :data:`SOFTWARE`. A symbolic link
    is never ours: the writer writes none.
    """
    try:
        info = os.lstat(final)
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"it cannot be examined ({err.strerror or err})"
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link"
    if final.name.endswith(PREVIEW_SUFFIX):
        return _png_problem(final, info)
    if format == "tiff":
        return _tiff_problem(final, info)
    if format == "ome-zarr":
        if not stat.S_ISDIR(info.st_mode):
            return "it is a file, not an OME-Zarr store"
        return _ome_zarr_output_problem(final)
    if format == "zarr":
        if not stat.S_ISDIR(info.st_mode):
            return "it is a file, not a Zarr store"
        return _zarr_output_problem(final)
    if format == "nifti":
        return _nifti_outputs_problem(final)
    if stat.S_ISDIR(info.st_mode):
        return "it is a directory, not an HDF5 file"
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    try:
        if not h5py.is_hdf5(final):
            return "it is not an HDF5 file"
        with h5py.File(final, "r") as file:
            others = []
            for name in file:
                link = file.get(name, getlink=True)
                if name not in OUTPUT_ARRAYS or not isinstance(link, h5py.HardLink) or \
                        not isinstance(file[name], h5py.Dataset):
                    others.append(name)
            if others:
                return f"it holds {sorted(others)[:3]}, which the writer never writes"
            if "predictions" not in file or "scale" not in file["predictions"].attrs:
                return "it has no 'predictions' dataset with the writer's 'scale' attribute"
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        return f"it cannot be read as HDF5 ({one_line(str(err)) or type(err).__name__})"
    return None


def _zarr_metadata(path: Path) -> dict[str, Any] | None:
    try:
        with open(path / "zarr.json", encoding="utf-8") as document:
            metadata = json.load(document)
    except (OSError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) and metadata.get("zarr_format") == 3 else None


def _zarr_output_problem(store: Path) -> str | None:
    group = _zarr_metadata(store)
    if group is None or group.get("node_type") != "group":
        return "it is a directory, not a Zarr (format 3) group with the writer's arrays"
    try:
        entries = set(os.listdir(store))
    except OSError as err:
        return f"it cannot be examined ({err.strerror or err})"
    others = entries - {"zarr.json", *OUTPUT_ARRAYS}
    for name in sorted(entries & set(OUTPUT_ARRAYS)):
        array = store / name
        metadata = _zarr_metadata(array)
        try:
            plain = array.is_dir() and not array.is_symlink() and set(os.listdir(array)) <= _ZARR_ARRAY_ENTRIES
        except OSError:
            plain = False
        if not plain or metadata is None or metadata.get("node_type") != "array":
            others.add(name)
    if others:
        return f"it holds {sorted(others)[:3]}, which the writer never writes"
    if "predictions" not in entries or "scale" not in (_zarr_metadata(store / "predictions") or {}).get(
            "attributes", {}):
        return "it has no 'predictions' array with the writer's 'scale' attribute"
    return None


def _json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as document:
            return json.load(document)
    except (OSError, ValueError):
        return None


# Entries of a level (a Zarr format 2 array): metadata documents and the chunk tree ("/"-separated keys).
_ZARR2_ARRAY_META = {".zarray", ".zattrs"}


def _zarr2_array_ok(path: Path) -> bool:
    try:
        if path.is_symlink() or not path.is_dir() or not isinstance(_json(path / ".zarray"), dict):
            return False
        return all(name in _ZARR2_ARRAY_META or name.isdigit() for name in os.listdir(path))
    except OSError:
        return False


def _zarr2_image_problem(group: Path, extra: set[str]) -> str | None:
    """None if ``group`` is a Zarr format 2 group whose entries are its metadata, numbered levels (arrays) and
    ``extra``; else the names that do not belong."""
    try:
        entries = set(os.listdir(group))
    except OSError as err:
        return f"it cannot be examined ({err.strerror or err})"
    if not isinstance(_json(group / ".zgroup"), dict) or "0" not in entries:
        return "it is not a Zarr (format 2) image with a level 0"
    others = {name for name in entries - {".zgroup", ".zattrs"} - extra
              if not (name.isdigit() and _zarr2_array_ok(group / name))}
    return f"it holds {sorted(others)[:3]}, which the writer never writes" if others else None


def _ome_zarr_output_problem(store: Path) -> str | None:
    """Ours: a Zarr format 2 group with our ``unet3d`` entry and ``multiscales`` in its attributes, holding only
    numbered levels and ``labels`` with only ``segmentation``/``instances`` label images of numbered levels."""
    attributes = _json(store / ".zattrs")
    if not isinstance(attributes, dict) or "multiscales" not in attributes or \
            not isinstance(attributes.get("unet3d"), dict):
        return "it is a directory, not an OME-Zarr output of unet3d (no 'unet3d' entry in its .zattrs)"
    problem = _zarr2_image_problem(store, {"labels"})
    if problem is None and (store / "labels").exists():
        labels = store / "labels"
        try:
            entries = set(os.listdir(labels)) if labels.is_dir() and not labels.is_symlink() else None
        except OSError:
            entries = None
        if entries is None:
            return "its 'labels' is not a directory"
        others = entries - {".zgroup", ".zattrs", "segmentation", "instances"}
        if others:
            return f"its labels hold {sorted(others)[:3]}, which the writer never writes"
        for name in sorted(entries & {"segmentation", "instances"}):
            inner = _zarr2_image_problem(labels / name, set())
            if inner is not None:
                return f"its label image {name}: {inner}"
    return problem


def _tiff_problem(path: Path, info: os.stat_result) -> str | None:
    """Ours: a regular TIFF file whose first page's Software tag is :data:`SOFTWARE`."""
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    try:
        import tifffile

        with tifffile.TiffFile(path) as tiff:
            software = tiff.pages[0].software if len(tiff.pages) else ""
    except Exception as err:  # noqa: BLE001 - whatever the reader says, the file is not one we can vouch for
        return f"it cannot be read as TIFF ({one_line(str(err)) or type(err).__name__})"
    if software != SOFTWARE:
        return f"it is a TIFF file not written by unet3d (Software tag {software!r})"
    return None


def _png_problem(path: Path, info: os.stat_result) -> str | None:
    """Ours: a regular PNG file whose "Software" text chunk is :data:`SOFTWARE`."""
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    try:
        from PIL import Image

        with Image.open(path) as image:
            software = image.info.get("Software") if image.format == "PNG" else None
    except Exception as err:  # noqa: BLE001 - whatever the reader says, the file is not one we can vouch for
        return f"it cannot be read as PNG ({one_line(str(err)) or type(err).__name__})"
    if software != SOFTWARE:
        return "it is an image not written by unet3d"
    return None


def _nifti_outputs_problem(final: Path) -> str | None:
    """A NIfTI output is ours when it is a regular NIfTI file whose header's ``descrip`` starts with ``unet3d``;
    the files of the other datasets beside it (``<stem>_segmentation.nii.gz``, ``<stem>_instances.nii.gz``),
    which the same run replaces, must be ours too (``final`` was checked to exist or be absent by the caller)."""
    from .outputs.nifti import DESCRIP_PREFIX, sibling_path

    for path in (final, *(sibling_path(final, name) for name in OUTPUT_ARRAYS if name != "predictions")):
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as err:
            return f"{path.name} cannot be examined ({err.strerror or err})"
        if stat.S_ISLNK(info.st_mode):
            return f"{path.name} is a symbolic link"
        if not stat.S_ISREG(info.st_mode):
            return f"{path.name} is not a regular file"
        try:
            import nibabel

            descrip = bytes(nibabel.load(str(path)).header["descrip"]).split(b"\0")[0].decode("utf-8", "replace")
        except Exception as err:  # noqa: BLE001 - whatever the file is, it is not an output of ours
            return f"{path.name} cannot be read as NIfTI ({one_line(str(err)) or type(err).__name__})"
        if not descrip.startswith(DESCRIP_PREFIX):
            return f"{path.name} is a NIfTI file that the writer did not write (its description is {descrip!r})"
    return None


def not_ours_message(final: Path, problem: str, volume: Any = None) -> str:
    """The error message for a path at an output's name that :func:`previous_output_problem` refuses."""
    of = f" (of predict volume {volume})" if volume is not None else ""
    return (
        f"prediction output {final}{of} already exists and is not an earlier output of unet3d ({problem}); it is "
        "never replaced: move or rename it, or choose another prediction.output_dir"
    )


# ------------------------------------------------------------------------------------------------ checks
def check_outputs(output_dir: str | os.PathLike, volumes: Sequence[str | os.PathLike], format: str = "hdf5",
                  preview: bool = False) -> None:
    """Refuse, before any work, outputs the run could not write or may not replace.

    Each name the run creates — the directories of ``output_dir`` still missing, each volume's output and its
    temporary name — must fit the file system's limit on name length; a path already at an output's name must be an
    earlier output (:func:`previous_output_problem`).

    Raises:
        ConfigurationError: naming the directory or volume, what is wrong and what to do.
    """
    path = Path(output_dir).expanduser()
    existing = nearest_existing(path)
    limit = _name_max(existing)
    for part in [p for p in (path, *path.parents) if p.is_relative_to(existing) and p != existing]:
        size = len(os.fsencode(part.name))
        if size > limit:
            raise ConfigurationError(
                f"prediction.output_dir {path}: its directory name {part.name!r} is {size} bytes, over the file "
                f"system's limit of {limit} bytes per name; choose a shorter prediction.output_dir"
            )
    for volume in volumes:
        final = max(output_paths(path, volume, format, preview), key=lambda p: len(os.fsencode(p.name)))
        size = max(len(os.fsencode(final.name)), len(os.fsencode(temporary_path(final).name)))
        if size > limit:
            raise ConfigurationError(
                f"predict volume {volume}: its output {final.name} needs a file name of {size} bytes (while it is "
                f"written, as {temporary_path(final).name}), over the file system's limit of {limit} bytes per name "
                f"in {existing}; give the volume a shorter name (a link with a shorter name will do)"
            )
    if not path.is_dir():
        return  # no output exists yet
    for volume in volumes:
        for final in output_paths(path, volume, format, preview):
            problem = previous_output_problem(final, format)
            if problem is not None:
                raise ConfigurationError(not_ours_message(final, problem, volume))


def check_output_dir(
    output_dir: str | os.PathLike,
    volumes: Sequence[str | os.PathLike] = (),
    create: bool = True,
    other_inputs: Sequence[str | os.PathLike] = (),
    format: str = "hdf5",
    preview: bool = False,
) -> list[Path]:
    """Check that prediction can write into ``output_dir`` without touching any input; create it if ``create``.

    Args:
        output_dir: the directory of the output files.
        volumes: the volumes to predict. No output file (``<output_dir>/<stem>_predictions.h5`` for each) may be
            an input (a volume or one of ``other_inputs``) under any spelling: the same resolved path, or the same
            file through a symbolic or hard link; nor may two volumes share one. Default: none.
        create: create the missing directories and probe that a file can be written there. Default True. With False
            (checks before the run, which must leave nothing behind) only the nearest existing ancestor is checked.
        other_inputs: further files the run reads (the checkpoint). Default: none.
        format: the output format, a name of ``OUTPUT_SUFFIXES`` (see :func:`output_path`). Default ``"hdf5"``.
        preview: the run writes ``<stem>_preview.png`` files too (checked like the outputs). Default False.

    Returns:
        The directories that were created, deepest first (empty with ``create=False``); remove them with
        :func:`remove_created_dirs` if the run fails.

    Raises:
        ConfigurationError: the directory is not writable or is a file, two volumes would be written to the same
        file, an output would overwrite an input or a path that is not an earlier output, or a name is too long
        (see :func:`check_outputs`).
    """
    path = Path(output_dir).expanduser()
    check_collisions(path, [Path(p) for p in volumes], [Path(p) for p in other_inputs], format)
    check_outputs(path, volumes, format, preview)
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise ConfigurationError(
            f"prediction.output_dir {path}: not writable ({existing} is a file, not a directory); choose a directory"
        )
    if not create:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigurationError(f"prediction.output_dir {path}: not writable (permission denied in {existing})")
        return []
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".unet3d-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        remove_created_dirs(created)
        reason = err.strerror or type(err).__name__
        raise ConfigurationError(f"prediction.output_dir {path}: not writable ({reason})") from None
    return created


def remove_created_dirs(created: Sequence[Path]) -> None:
    """Remove the directories :func:`check_output_dir` created, deepest first, as far as they are empty."""
    for directory in created:
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (or already gone): it and its parents stay


def _file_key(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def check_collisions(
    output_dir: Path, volumes: Sequence[Path], other_inputs: Sequence[Path] = (), format: str = "hdf5"
) -> None:
    """Raise if two volumes share an output file, or an output file (or ``output_dir``) is an input: the same
    resolved path, or the same inode (a hard link, or a symbolic link that ``resolve`` follows too)."""
    inputs = [*volumes, *other_inputs]
    by_path = {p.resolve(): p for p in inputs}
    by_inode = {key: p for p in inputs if (key := _file_key(p)) is not None}
    target = output_dir.resolve()
    for resolved, given in by_path.items():
        # A directory input is a Zarr store: outputs written into it would change the input.
        if target == resolved or (given.is_dir() and target.is_relative_to(resolved)):
            raise ConfigurationError(
                f"prediction.output_dir {output_dir} is or lies inside the input {given}; inputs are never "
                "written to: choose another directory"
            )
    outputs: dict[Path, Path] = {}
    for volume in volumes:
        final = output_path(output_dir, volume, format)
        resolved = final.resolve()
        if resolved in outputs:
            raise ConfigurationError(
                f"predict volumes {outputs[resolved]} and {volume} would both be written to {final}; rename one or "
                "predict them in separate runs"
            )
        outputs[resolved] = volume
        clash = by_path.get(resolved)
        if clash is None and (key := _file_key(final)) is not None:
            clash = by_inode.get(key)
        if clash is not None:
            raise ConfigurationError(
                f"prediction.output_dir {output_dir}: the prediction of {volume} would be written to {final}, which "
                f"is the input {clash}; inputs are never overwritten: choose another prediction.output_dir"
            )
        for side in output_paths(output_dir, volume, format)[1:]:  # the files beside a TIFF output
            side_clash = by_path.get(side.resolve())
            if side_clash is None and (key := _file_key(side)) is not None:
                side_clash = by_inode.get(key)
            if side_clash is not None:
                raise ConfigurationError(
                    f"prediction.output_dir {output_dir}: the prediction of {volume} would write {side}, which is "
                    f"the input {side_clash}; inputs are never overwritten: choose another prediction.output_dir"
                )


# ------------------------------------------------------------------------------------------------ temporaries
def _process_exists(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine; True when that cannot be told (then nothing is removed)."""
    if os.name != "posix":
        return True  # os.kill would terminate it, not probe it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # EPERM: it exists, run by another user
    return True


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[str]:
    """Remove the unfinished outputs in ``output_dir`` that processes of this machine left when they were killed, and
    return one note per removal (and per unfinished output of an older release, which is left: its host is unknown).

    Only names of the writer's scheme (``.<stem>_predictions.h5.tmp-<host>-<pid>``, ``.zarr``, and the ``.old-``
    names of previous Zarr outputs being replaced) are considered, and only those of this host whose process no
    longer exists (or is this process: it writes nothing before this runs). A pid reused by an unrelated process
    keeps its file, which is the safe side.
    """
    path = Path(output_dir).expanduser()
    notes: list[str] = []
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return notes
    for name in names:
        found = _TEMPORARY_NAME.match(name)
        if found is not None and found["host"] == _host():
            pid = int(found["pid"])
            if pid != os.getpid() and _process_exists(pid):
                continue
            stale = path / name
            try:
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
            except OSError as err:
                notes.append(f"could not remove {stale}, left by process {pid} of this machine, which has ended "
                             f"({err.strerror or err})")
                continue
            notes.append(f"removed {stale}: the unfinished output of process {pid} of this machine, which has ended")
        elif found is None and (old := _UNHOSTED_TEMPORARY_NAME.match(name)) is not None:
            notes.append(f"{path / name} looks like the unfinished output of an interrupted earlier run (process "
                         f"{old['pid']}, machine unknown); remove it if no prediction is writing it")
    return notes


def remove_own_temporaries(output_dir: str | os.PathLike, volumes: Sequence[str | os.PathLike],
                           format: str = "hdf5") -> None:
    """Remove this process's temporary outputs of ``volumes`` by name: a stop signal may arrive between creating a
    file and recording it, so what was recorded is not enough."""
    for volume in volumes:
        for final in output_paths(output_dir, volume, format, preview=True):
            remove_path(temporary_path(final))
