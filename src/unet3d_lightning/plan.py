"""``unet3d plan``: read the training volumes once, and write a complete, commented ``fit`` config that fits them and
the device — nnU-Net's way of choosing (F. Isensee, P. F. Jaeger, S. A. A. Kohl, J. Petersen, K. H. Maier-Hein,
"nnU-Net: a self-configuring method for deep learning-based biomedical image segmentation", Nature Methods 18,
203–211, 2021), with this tool's keys.

What it does, in order:

1. **Fingerprint** (:func:`fingerprint`): per volume its shape, voxel size and channels; per channel the intensity
   mean/std over all voxels and mean, std, 0.5 and 99.5 percentiles inside the foreground (a random subsample of at
   most :data:`FOREGROUND_SAMPLES` voxels per volume); per class its voxel count; for instance labels the object
   count and median object size. The labels and raw are read in z-slabs, read-only.
2. **Task**: class-id labels → ``out_channels`` = largest id + 1 and ``loss: dice_ce``; 4D masks → one channel per
   mask and ``loss: bce_dice``; instance labels with ``data.label_transform`` → its target channels and ``bce_dice``.
3. **Normalisation**: CT-like raw (integer intensities reaching below −500, as Hounsfield units do) is clipped to
   its 0.5/99.5 percentiles and scaled (``percentile``); anything else is standardised per volume.
4. **Topology** from the median voxel size (:func:`topology`): along an axis whose spacing is more than twice the
   finest, convolutions are ``1`` and pooling skipped until pooling the other axes has brought the spacings
   together; an axis is pooled while its feature map is at least 8 voxels; at most 5 levels; widths
   ``base · 2^level`` capped at 320 (``base`` 32 on a GPU, 16 on a CPU).
5. **Patch and batch** (:func:`fit_patch`): start from the smallest volume's shape (a patch must fit every volume),
   capped at ``max_patch_voxels`` (on a CPU 64³ by default: there step time, not memory, is the limit), rounded to
   the pooling's divisor; measure the peak memory of one real forward + backward + optimizer step at batch 2 and
   the chosen precision (CUDA: the allocator's peak; CPU: the peak resident-set growth of a forked process); shrink
   the longest physical axis and measure again until it fits ``memory_gb`` (default: 90 % of the GPU's memory, or
   half of the free RAM); then raise the batch while it fits and a batch holds at most 5 % of the training voxels.
6. **Schedule**: the step time measured at the chosen size turns the time budget (``trainer.max_time``) into
   ``max_steps`` (at most nnU-Net's 250 000) and the PolynomialLR's ``total_iters``; epochs of 250 steps (fewer for
   short budgets, so that at least 10 validations run).
7. The recipe: ``dice_ce``/``bce_dice``, deep supervision, SGD (Nesterov, momentum 0.99, lr 0.01, weight decay
   3e-5), poly schedule, random patches with one third centred on foreground, nnU-Net's augmentations; and the
   matching prediction settings (the same patch, 50 % overlap, gaussian blending).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigurationError

FOREGROUND_SAMPLES = 200_000
MIN_FEATURE_MAP = 8  # an axis is pooled while its feature map is at least this long (nnU-Net: 4 after pooling)
MAX_LEVELS = 5
MAX_WIDTH = 320
CPU_MAX_PATCH_VOXELS = 64**3
MAX_STEPS = 250_000  # nnU-Net: 1000 epochs of 250 iterations
STEPS_PER_EPOCH = 250
# The fewest optimizer steps a plan leaves the budget: below it the patch (and with it the network's depth) shrinks,
# since a network trained for a few dozen steps learns little however well it fits the memory.
MIN_STEPS = 1000
MIN_PATCH_AXIS = 8  # the step-budget shrinking stops at this length along every axis it shrinks
_SLAB = 16


# ------------------------------------------------------------------------------------------------ fingerprint
@dataclasses.dataclass
class Fingerprint:
    """What :func:`fingerprint` learned about the training volumes."""

    shapes: list[tuple[int, int, int]]
    voxel_sizes: list[tuple[float, float, float] | None]
    unit: str | None
    channels: int
    label_kind: str
    mean: list[float]
    std: list[float]
    minimum: list[float]
    maximum: list[float]
    integer_raw: bool
    foreground_mean: list[float]
    foreground_std: list[float]
    foreground_p005: list[float]
    foreground_p995: list[float]
    class_voxels: dict[int, int]
    objects: int | None = None
    median_object_voxels: float | None = None

    @property
    def median_voxel_size(self) -> tuple[float, float, float] | None:
        known = [v for v in self.voxel_sizes if v is not None]
        if not known:
            return None
        return tuple(float(np.median([v[a] for v in known])) for a in range(3))  # type: ignore[return-value]

    @property
    def total_voxels(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))


def fingerprint(volumes: Sequence[Any], ignore_index: int | None = None, seed: int = 0) -> Fingerprint:
    """Read ``volumes`` (labelled :class:`~unet3d_lightning.data.volumes.Volume`\\ s, scanned) once, slab by slab.

    Args:
        volumes: the training volumes.
        ignore_index: label value left out of the class counts and of the foreground. Default None.
        seed: seed of the foreground intensity subsample. Default 0.
    """
    from .data.io.handles import FileCache
    from .data.volumes import read_region

    rng = np.random.default_rng(seed)
    channels = volumes[0].channels
    kind = volumes[0].label_kind
    counts: dict[int, int] = {}
    objects: dict[tuple[int, int], int] = {}
    samples: list[list[np.ndarray]] = [[] for _ in range(channels)]
    minimum, maximum = [math.inf] * channels, [-math.inf] * channels
    integer_raw = True
    cache = FileCache()
    try:
        for v, volume in enumerate(volumes):
            depth = volume.spatial_shape[0]
            per_slab = max(1, FOREGROUND_SAMPLES * _SLAB // max(depth, 1))
            for z0 in range(0, depth, _SLAB):
                region = (slice(z0, min(z0 + _SLAB, depth)), slice(None), slice(None))
                raw = read_region(volume, cache, "raw", region, volume.raw_is_4d)
                integer_raw &= bool(np.issubdtype(raw.dtype, np.integer))
                raw = raw if volume.raw_is_4d else raw[None]
                label = read_region(volume, cache, "label", region, volume.label_kind == "binary")
                if label.ndim == 4:  # masks: class c + 1 for channel c
                    usable = ((label != ignore_index).all(0) if ignore_index is not None
                              else np.ones(label.shape[1:], bool))
                    foreground = (label == 1).any(0) & usable
                    for c in range(label.shape[0]):
                        counts[c + 1] = counts.get(c + 1, 0) + int(((label[c] == 1) & usable).sum())
                    counts[0] = counts.get(0, 0) + int((~(label == 1).any(0) & usable).sum())
                else:
                    usable = label != ignore_index if ignore_index is not None else np.ones(label.shape, bool)
                    foreground = (label != 0) & usable
                    if kind == "instances":
                        ids, n = np.unique(label[foreground], return_counts=True)
                        for i, c in zip(ids.tolist(), n.tolist()):
                            objects[(v, i)] = objects.get((v, i), 0) + c
                        counts[1] = counts.get(1, 0) + int(foreground.sum())
                        counts[0] = counts.get(0, 0) + int((usable & ~foreground).sum())
                    else:
                        ids, n = np.unique(label[usable], return_counts=True)
                        for i, c in zip(ids.tolist(), n.tolist()):
                            counts[int(i)] = counts.get(int(i), 0) + int(c)
                where = np.flatnonzero(foreground)
                if len(where) > per_slab:
                    where = rng.choice(where, per_slab, replace=False)
                for c in range(channels):
                    values = raw[c].reshape(-1)
                    minimum[c] = min(minimum[c], float(values.min()))
                    maximum[c] = max(maximum[c], float(values.max()))
                    samples[c].append(values[where].astype(np.float64))
    finally:
        cache.close()
    fg = [np.concatenate(s) if s else np.zeros(0) for s in samples]
    if not all(len(f) for f in fg):  # no foreground at all: the whole volume stands in
        fg = [np.array([m]) for m in (volumes[0].stats.mean if volumes[0].stats else [0.0] * channels)]
    stats = [v.stats for v in volumes]
    weights = np.array([math.prod(v.spatial_shape) for v in volumes], np.float64)
    mean = [float(np.average([s.mean[c] for s in stats], weights=weights)) for c in range(channels)]
    std = [float(np.sqrt(np.average([s.std[c] ** 2 + (s.mean[c] - mean[c]) ** 2 for s in stats], weights=weights)))
           for c in range(channels)]
    sizes = list(objects.values())
    return Fingerprint(
        shapes=[tuple(v.spatial_shape) for v in volumes],
        voxel_sizes=[tuple(v.voxel_size.zyx) if v.voxel_size is not None else None for v in volumes],
        unit=next((v.voxel_size.unit for v in volumes if v.voxel_size is not None), None),
        channels=channels, label_kind=kind, mean=mean, std=std, minimum=minimum, maximum=maximum,
        integer_raw=integer_raw,
        foreground_mean=[float(f.mean()) for f in fg], foreground_std=[float(f.std()) for f in fg],
        foreground_p005=[float(np.percentile(f, 0.5)) for f in fg],
        foreground_p995=[float(np.percentile(f, 99.5)) for f in fg],
        class_voxels=dict(sorted(counts.items())),
        objects=len(sizes) if kind == "instances" else None,
        median_object_voxels=float(np.median(sizes)) if sizes else None,
    )


# ------------------------------------------------------------------------------------------------ topology
def topology(patch: Sequence[int], spacing: Sequence[float], max_levels: int = MAX_LEVELS
             ) -> tuple[list[list[int]], list[list[int]]]:
    """nnU-Net's per-axis kernels for ``patch`` at voxel ``spacing``: ``(pool kernels, conv kernels)``, one pool
    entry per pooling and one conv entry per level (so ``num_levels = len(conv)``).

    An axis whose current spacing is more than twice the finest current spacing gets conv kernel 1 and is not
    pooled; other axes get kernel 3 and are pooled (factor 2, doubling their spacing) while their feature map is at
    least :data:`MIN_FEATURE_MAP` long; it stops when no axis can be pooled or at ``max_levels``.
    """
    current = [float(s) for s in spacing]
    size = [int(p) for p in patch]
    pools: list[list[int]] = []
    convs: list[list[int]] = []
    for level in range(max_levels):
        finest = min(current)
        similar = [s <= 2 * finest for s in current]
        convs.append([3 if ok else 1 for ok in similar])
        if level == max_levels - 1:
            break
        pool = [2 if ok and n >= MIN_FEATURE_MAP else 1 for ok, n in zip(similar, size)]
        if pool == [1, 1, 1]:
            break
        pools.append(pool)
        size = [math.ceil(n / p) for n, p in zip(size, pool)]
        current = [s * p for s, p in zip(current, pool)]
    return pools, convs


def divisor(pools: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """The product of the pooling factors per axis: every patch axis a multiple of it pools without rounding."""
    return tuple(math.prod(p[a] for p in pools) for a in range(3)) if pools else (1, 1, 1)  # type: ignore[return-value]


def widths(levels: int, base: int) -> list[int]:
    """``base · 2^level``, at most :data:`MAX_WIDTH` (nnU-Net's 32 … 320)."""
    return [min(base * 2**i, MAX_WIDTH) for i in range(levels)]


# ------------------------------------------------------------------------------------------------ measuring
def model_settings(fp: Fingerprint, out_channels: int, loss: str, pools: list[list[int]], convs: list[list[int]],
                   base: int, ignore_index: int | None) -> dict[str, Any]:
    """The ``model`` section for a topology (without optimizer and schedule)."""
    levels = len(convs)
    settings = {
        "in_channels": fp.channels, "out_channels": out_channels, "f_maps": widths(levels, base),
        "num_levels": levels, "layer_order": "cgl", "num_groups": 8, "loss": loss,
        "pool_kernel_size": pools if pools else 1, "conv_kernel_size": convs,
        "deep_supervision": levels >= 3,
    }
    if ignore_index is not None:
        settings["ignore_index"] = ignore_index
    return settings


def _one_step(settings: dict[str, Any], patch: Sequence[int], batch: int, precision: str, device: str,
              multiclass: bool, steps: int = 1) -> float:
    """One (or ``steps``) real training step(s) — forward, deep-supervised loss, backward, SGD step — of the model
    ``settings`` on random data; returns the seconds of the last one."""
    import torch

    from .module import UNet3DModule

    module = UNet3DModule(**settings)
    module.use_memory_format(device)
    module.to(device)
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    raw = torch.randn(batch, settings["in_channels"], *patch, device=device)
    if multiclass:
        label = torch.randint(0, settings["out_channels"], (batch, *patch), device=device)
    else:
        label = (torch.rand(batch, settings["out_channels"], *patch, device=device) > 0.5).float()
    raw = module.input_to_memory_format(raw)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    seconds = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss = module._training_loss({"raw": raw, "label": label})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds


def _fresh_memory_baseline() -> int | None:
    """In a forked child: give the free heap memory inherited from the parent back to the system and restart the
    peak resident-set count, so that the step's allocations are page-faulted in and counted (a parent that had freed
    memory would otherwise lend the child resident pages, and its high-water mark would be the child's). Returns the
    resident set in bytes, or None where ``/proc`` cannot reset the peak (then ``ru_maxrss`` is used)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)  # glibc: every arena, since 2.8
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current VmRSS (Linux 4.0+)
            f.write("5")
        return _proc_status("VmRSS")
    except OSError:
        return None


def _current_rss() -> int:
    """The resident set in bytes where ``/proc`` is missing: ``ru_maxrss`` is the best the system offers."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _measure_in_child(conn: Any, args: tuple) -> None:
    import resource

    import torch

    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool; memory barely depends on it
    try:
        baseline = _fresh_memory_baseline()
        start = baseline if baseline is not None else _current_rss()
        _one_step(*args)
        if baseline is not None:
            peak = _proc_status("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        conn.send(("ok", max(0, peak - start)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


def measure_peak(settings: dict[str, Any], patch: Sequence[int], batch: int, precision: str, device: str,
                 multiclass: bool) -> int:
    """Peak memory in bytes of one training step at ``patch`` and ``batch``.

    CUDA: ``torch.cuda.max_memory_allocated`` over the step, less what was allocated before. CPU: the growth of the
    peak resident set of a forked process running the step (its starting resident set is the parent's), so that
    every measurement starts from the same state whatever was measured before.
    """
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        try:
            _one_step(settings, patch, batch, precision, device, multiclass)
        except torch.cuda.OutOfMemoryError:
            return torch.cuda.get_device_properties(device).total_memory * 2
        finally:
            torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    import multiprocessing

    from . import module  # noqa: F401 - imported before the fork, so that the child's growth is the step's alone

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_measure_in_child,
                              args=(child, (settings, patch, batch, precision, device, multiclass)))
    process.start()
    child.close()
    try:
        status, value = parent.recv()
    except EOFError:
        status, value = "error", f"the measuring process ended with status {process.exitcode} (out of memory?)"
    process.join()
    if status != "ok":
        raise RuntimeError(f"measuring patch {list(patch)} x batch {batch} failed: {value}")
    return int(value)


# ------------------------------------------------------------------------------------------------ patch search
@dataclasses.dataclass
class PatchChoice:
    patch: list[int]
    batch: int
    pools: list[list[int]]
    convs: list[list[int]]
    peak_bytes: int
    measurements: list[tuple[list[int], int, int]]  # (patch, batch, peak bytes)
    reason: str


def _round_to(patch: Sequence[int], div: Sequence[int], limit: Sequence[int]) -> list[int]:
    return [max(d, (min(p, n) // d) * d) if n >= d else n for p, d, n in zip(patch, div, limit)]


def _shrink(patch: list[int], spacing: Sequence[float], target_voxels: float, div: Sequence[int]) -> list[int]:
    """Shrink the axis of the longest physical extent, step by step, until at most ``target_voxels``."""
    patch = list(patch)
    while math.prod(patch) > target_voxels:
        candidates = [a for a in range(3) if patch[a] > div[a]]
        if not candidates:
            break
        a = max(candidates, key=lambda i: patch[i] * spacing[i])
        patch[a] = max(div[a], patch[a] - div[a] if patch[a] * 0.9 < div[a] else int(patch[a] * 0.9) // div[a] * div[a])
    return patch


def fit_patch(fp: Fingerprint, spacing: Sequence[float], base: int, out_channels: int, loss: str,
              ignore_index: int | None, budget_bytes: int, precision: str, device: str, multiclass: bool,
              max_patch_voxels: int | None, measure: Any = measure_peak) -> PatchChoice:
    """The largest patch (at batch 2), then the largest batch, whose measured peak stays within ``budget_bytes``."""
    limit = [min(s[a] for s in fp.shapes) for a in range(3)]
    patch = list(limit)
    why = ["the smallest volume's shape (a patch must fit every volume)"]
    if max_patch_voxels is not None and math.prod(patch) > max_patch_voxels:
        patch = _shrink(patch, spacing, max_patch_voxels, (1, 1, 1))
        why.append(f"shrunk to at most {max_patch_voxels} voxels (max_patch_voxels)")
    measurements: list[tuple[list[int], int, int]] = []

    def settle(candidate: list[int]) -> tuple[list[int], list[list[int]], list[list[int]]]:
        for _ in range(4):  # the topology depends on the patch, the rounding on the topology
            pools, convs = topology(candidate, spacing)
            rounded = _round_to(candidate, divisor(pools), limit)
            if rounded == candidate:
                break
            candidate = rounded
        pools, convs = topology(candidate, spacing)
        return candidate, pools, convs

    patch, pools, convs = settle(patch)
    batch = 2
    shrunk = False
    for _ in range(8):
        settings = model_settings(fp, out_channels, loss, pools, convs, base, ignore_index)
        peak = measure(settings, patch, batch, precision, device, multiclass)
        measurements.append((list(patch), batch, peak))
        if peak <= budget_bytes:
            break
        if math.prod(patch) <= math.prod(divisor(pools)) or all(p <= 8 for p in patch):
            if batch > 1:
                batch = 1
                continue
            raise ConfigurationError(
                f"plan: even patch {patch} at batch 1 needs {peak / 2**30:.2f} GiB, above the memory budget of "
                f"{budget_bytes / 2**30:.2f} GiB; give a larger --memory_gb"
            )
        # Memory grows about linearly with the voxels: aim below the budget, then measure again.
        target = math.prod(patch) * budget_bytes / peak * 0.9
        patch, pools, convs = settle(_shrink(patch, spacing, target, divisor(pools)))
        shrunk = True
    else:
        raise ConfigurationError(f"plan: no patch within the memory budget of {budget_bytes / 2**30:.2f} GiB found")
    if shrunk:
        why.append(f"shrunk along the longest physical axis until one measured training step fits "
                   f"{budget_bytes / 2**30:.2f} GiB")
    best_peak = measurements[-1][2]
    # A larger batch only where the patch was not limited by memory; at most 5 % of the training voxels per batch.
    if not shrunk:
        cap = max(2, int(0.05 * fp.total_voxels / math.prod(patch)))
        per_sample = best_peak / batch
        while batch < cap and per_sample * (batch * 2) <= budget_bytes * 0.9:
            trial = min(cap, batch * 2)
            settings = model_settings(fp, out_channels, loss, pools, convs, base, ignore_index)
            peak = measure(settings, patch, trial, precision, device, multiclass)
            measurements.append((list(patch), trial, peak))
            if peak > budget_bytes:
                break
            batch, best_peak, per_sample = trial, peak, peak / trial
        if batch > 2:
            why.append(f"batch raised to {batch} (memory left; a batch holds at most 5 % of the training voxels)")
    return PatchChoice(patch, batch, pools, convs, best_peak, measurements, "; ".join(why))


# ------------------------------------------------------------------------------------------------ the plan
def _device(accelerator: str, devices: Any) -> tuple[str, int]:
    import torch

    kind = str(accelerator or "auto")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "gpu":
        kind = "cuda"
    if kind not in ("cpu", "cuda"):
        raise ConfigurationError(f"plan: trainer.accelerator {accelerator!r}: plan measures on cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("plan: trainer.accelerator cuda but no CUDA device is visible here")
    count = 1
    if isinstance(devices, int) and devices > 0:
        count = devices
    elif isinstance(devices, (list, tuple)):
        count = len(devices)
    elif str(devices).isdigit():
        count = int(str(devices))
    elif kind == "cuda":
        count = torch.cuda.device_count()
    return kind, max(1, count)


def _budget(kind: str, memory_gb: float | None) -> tuple[int, str]:
    if memory_gb is not None:
        if not memory_gb > 0:
            raise ConfigurationError(f"plan: --memory_gb {memory_gb} must be > 0")
        return int(memory_gb * 2**30), f"--memory_gb {memory_gb:g}"
    if kind == "cuda":
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        return int(total * 0.9), f"90 % of the GPU's {total / 2**30:.1f} GiB"
    import torch

    from .prediction.memory import available_memory

    free = available_memory(torch.device("cpu"))  # MemAvailable, or a container's limit when tighter
    if free is None:
        raise ConfigurationError("plan: this system does not say how much memory is free; give --memory_gb")
    return int(free * 0.5), f"half of the {free / 2**30:.1f} GiB of free RAM"


def _seconds(max_time: str) -> float:
    parts = [float(p) for p in str(max_time).split(":")]
    if len(parts) != 4 or min(parts) < 0:
        raise ConfigurationError(f"plan: trainer.max_time {max_time!r} must be DD:HH:MM:SS, e.g. 00:12:00:00")
    days, hours, minutes, seconds = parts
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def make_plan(data: Any, given_data: dict[str, Any], accelerator: str = "auto", devices: Any = "auto",
              precision: str | None = None, memory_gb: float | None = None, max_time: str | None = None,
              max_patch_voxels: int | None = None, measure: Any = measure_peak) -> tuple[dict, list[str]]:
    """The fit config (nested dict of ``(value, reason)`` leaves) and the summary lines.

    Args:
        data: the :class:`~unet3d_lightning.data.datamodule.VolumeDataModule` of the ``data.*`` keys given.
        given_data: those keys as given (copied into the config).
        accelerator, devices, precision: what the plan is for. Defaults: this machine (a GPU if there is one),
            its devices, ``bf16-mixed`` on a GPU with bfloat16 and ``32-true`` otherwise.
        memory_gb: the memory budget per device. Default: 90 % of the GPU's memory or half of the free RAM.
        max_time: the training time budget ``DD:HH:MM:SS``. Default ``00:12:00:00`` on a GPU, ``00:01:00:00`` on a
            CPU.
        max_patch_voxels: the largest patch in voxels. Default 64³ on a CPU, none on a GPU.
        measure: the measuring function (:func:`measure_peak`).
    """
    import torch

    from .data.targets import LabelTransform

    kind, count = _device(accelerator, devices)
    if precision is None:
        precision = "bf16-mixed" if kind == "cuda" and torch.cuda.is_bf16_supported() else "32-true"
    budget, budget_reason = _budget(kind, memory_gb)
    if max_patch_voxels is None and kind == "cpu":
        max_patch_voxels = CPU_MAX_PATCH_VOXELS
    max_time = max_time or ("00:12:00:00" if kind == "cuda" else "00:01:00:00")
    budget_seconds = _seconds(max_time)
    if not data.paths["train"]:
        raise ConfigurationError("plan: data.train_paths is empty; give the training volumes")
    ignore = given_data.get("__ignore_index")
    spec = {"in_channels": None, "out_channels": None, "ignore_index": ignore, "spatial_dims": None}
    volumes = data._load_volumes("train", spec)
    if any(v.label_internal_path is None for v in volumes):
        raise ConfigurationError(f"plan: the training volumes need labels (data.label_internal_path "
                                 f"{data.label_internal_path!r})")
    fp = fingerprint(volumes, ignore_index=ignore, seed=int(data.seed or 0))
    summary = [f"fingerprint of {len(volumes)} training volume(s), {fp.total_voxels:,} voxels:"]
    for volume, shape, size in zip(volumes, fp.shapes, fp.voxel_sizes):
        summary.append(f"  {volume.path}: shape {list(shape)}, voxel size {list(size) if size else 'unknown'}")
    for c in range(fp.channels):
        summary.append(
            f"  channel {c}: mean {fp.mean[c]:.4g}, std {fp.std[c]:.4g}, range [{fp.minimum[c]:.4g}, "
            f"{fp.maximum[c]:.4g}]; foreground mean {fp.foreground_mean[c]:.4g}, std {fp.foreground_std[c]:.4g}, "
            f"0.5-99.5 % [{fp.foreground_p005[c]:.4g}, {fp.foreground_p995[c]:.4g}]"
        )
    total = sum(fp.class_voxels.values()) or 1
    summary.append("  classes: " + ", ".join(f"{c}: {n / total:.2%}" for c, n in fp.class_voxels.items()))
    if fp.objects is not None:
        summary.append(f"  instances: {fp.objects} objects, median {fp.median_object_voxels:.0f} voxels")

    # Task
    if fp.label_kind == "class_ids":
        out_channels, loss, multiclass = max(fp.class_voxels) + 1, "dice_ce", True
        task_reason = f"class ids 0..{out_channels - 1} in the labels: softmax classes, nnU-Net's Dice + CE"
        if out_channels < 2:
            out_channels = 2
    elif fp.label_kind == "binary":
        out_channels, loss, multiclass = volumes[0].label_channels, "bce_dice", False
        task_reason = f"{out_channels} binary mask channel(s) in the labels: sigmoid masks, BCE + Dice"
    else:
        out_channels = LabelTransform(data.label_transform, data.target_options).channels
        loss, multiclass = "bce_dice", False
        task_reason = f"instance labels with data.label_transform {data.label_transform}: {out_channels} target maps"

    # Normalisation
    ct_like = fp.integer_raw and min(fp.minimum) < -500
    if ct_like:
        normalization = ("percentile", "integer intensities below -500 look like CT (Hounsfield units): clipped "
                         "to the 0.5/99.5 percentiles and scaled, as nnU-Net's CT normalisation")
    else:
        normalization = ("standardize", "not CT-like: each volume standardised by its mean and std (nnU-Net's "
                         "default z-score)")

    spacing = fp.median_voxel_size
    spacing_reason = f"median voxel size {list(spacing)}" if spacing else "no voxel size recorded: taken as isotropic"
    spacing = spacing or (1.0, 1.0, 1.0)
    base = 32 if kind == "cuda" else 16
    choice = fit_patch(fp, spacing, base, out_channels, loss, ignore, budget, precision, kind, multiclass,
                       max_patch_voxels, measure)
    levels = len(choice.convs)
    settings = model_settings(fp, out_channels, loss, choice.pools, choice.convs, base, ignore)
    # Step time at the chosen size, in this process (its own threads), for the schedule.
    step_seconds = _one_step(settings, choice.patch, choice.batch, precision, kind, multiclass, steps=2)
    # A budget that leaves fewer than MIN_STEPS steps: a smaller patch (step time follows the voxels), whose
    # topology then has fewer levels; memory only goes down, so the measured fit still holds.
    for _ in range(4):
        steps = budget_seconds * 0.85 / max(step_seconds, 1e-3)
        if steps >= MIN_STEPS:
            break
        floor = [min(MIN_PATCH_AXIS, p) for p in choice.patch]
        target = max(math.prod(choice.patch) * steps / MIN_STEPS, math.prod(floor))
        patch = _shrink(choice.patch, spacing, target, floor)
        pools, convs = topology(patch, spacing)
        patch = _round_to(patch, divisor(pools), choice.patch)
        if patch == choice.patch:
            break
        previous = list(choice.patch)
        choice = dataclasses.replace(
            choice, patch=patch, pools=pools, convs=convs,
            reason=f"{choice.reason}; shrunk from {previous} so that the time budget holds at least {MIN_STEPS} "
                   f"steps ({steps:.0f} at {step_seconds:.2f} s per step)",
        )
        levels = len(choice.convs)
        settings = model_settings(fp, out_channels, loss, choice.pools, choice.convs, base, ignore)
        step_seconds = _one_step(settings, choice.patch, choice.batch, precision, kind, multiclass, steps=2)
    max_steps = int(min(MAX_STEPS, max(50, budget_seconds * 0.85 / max(step_seconds, 1e-3))))
    steps_per_epoch = min(STEPS_PER_EPOCH, max(5, max_steps // 10))
    patches_per_epoch = steps_per_epoch * choice.batch * count
    max_epochs = math.ceil(max_steps / steps_per_epoch)
    anisotropy = max(spacing) / min(spacing)
    z_degrees = 30.0 if anisotropy < 3 else 0.0
    val = bool(data.paths["val"])
    plan: dict[str, Any] = {
        "seed_everything": (int(data.seed) if data.seed is not None else 42, "fixed, so the run can be repeated"),
        "trainer": {
            "accelerator": (kind, "what the plan measured on"),
            "devices": (count, "devices the plan is for (batch_size is per device)"),
            "precision": (precision, "bfloat16 mixed precision on a GPU that has it, else float32"),
            "max_time": (max_time, "the training time budget"),
            "max_steps": (max_steps, f"budget / measured step time {step_seconds:.3f} s (at most 250 000, "
                                     "nnU-Net's 1000 x 250)"),
            "max_epochs": (max_epochs, f"epochs of {steps_per_epoch} steps until max_steps"),
            "log_every_n_steps": (min(50, steps_per_epoch), "about once per epoch or more often"),
        },
        "model": {
            "in_channels": (fp.channels, "raw channels of the volumes"),
            "out_channels": (out_channels, task_reason),
            "loss": (loss, "nnU-Net's loss for this label kind"),
            "f_maps": (settings["f_maps"], f"{base} doubled per level, at most {MAX_WIDTH} "
                                           f"({'GPU' if kind == 'cuda' else 'CPU: half the GPU widths'})"),
            "num_levels": (levels, "poolings while every pooled axis is at least 8 voxels, at most 5 levels"),
            "layer_order": ("cgl", "conv, GroupNorm, LeakyReLU (nnU-Net: conv, instance norm, LeakyReLU)"),
            "num_groups": (8, "GroupNorm groups, dividing every width"),
            "pool_kernel_size": (settings["pool_kernel_size"],
                                 f"{spacing_reason}: an axis is pooled when its spacing is at most twice the finest"),
            "conv_kernel_size": (choice.convs, "kernel 1 along an axis more than twice as coarse as the finest"),
            "deep_supervision": (settings["deep_supervision"], "auxiliary losses on the decoder levels (nnU-Net)"),
            "learning_rate": (0.01, "nnU-Net's initial learning rate"),
            "weight_decay": (3e-5, "nnU-Net's weight decay"),
            "optimizer": ({"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.99, "nesterov": True}},
                          "SGD with Nesterov momentum 0.99 (nnU-Net)"),
            "lr_scheduler": ({"class_path": "torch.optim.lr_scheduler.PolynomialLR",
                              "init_args": {"total_iters": max_steps, "power": 0.9}},
                             "the poly schedule lr0 * (1 - step / max_steps)^0.9 (nnU-Net)"),
            "lr_scheduler_interval": ("step", "the poly schedule steps every optimizer step"),
        },
        "data": {},
        "early_stopping": {"patience": (1000, "the poly schedule runs to its end (nnU-Net does not stop early)")},
        "prediction": {"blend": ("gaussian", "patch borders weigh less (nnU-Net's gaussian importance)")},
    }
    if ignore is not None:
        plan["model"]["ignore_index"] = (ignore, "as given")
    if val:
        plan["checkpoint"] = {"monitor": ("val/dice", "keep the checkpoint of the best validation Dice")}
    for key, value in given_data.items():
        if not key.startswith("__"):
            plan["data"][key] = (value, "as given")
    data_plan = {
        "train_patch_shape": (choice.patch, f"{choice.reason}; measured peak {choice.peak_bytes / 2**30:.3f} GiB "
                                            f"of {budget / 2**30:.2f} GiB ({budget_reason})"),
        "batch_size": (choice.batch, "nnU-Net's batch of 2, larger when memory is left"),
        "normalization": normalization,
        "sampling": ("random", "random patch positions each epoch (nnU-Net)"),
        "patches_per_epoch": (patches_per_epoch, f"{steps_per_epoch} steps x batch x devices"),
        "foreground_oversampling": (0.33, "one third of the patches centred on foreground (nnU-Net)"),
        "augmentation": ({
            "flip": True, "rotate90": False, "intensity": False, "noise_sigma": 0.1,
            "rotation_p": 0.2, "rotation_degrees": 180.0, "rotation_z_degrees": z_degrees,
            "scale_p": 0.2, "scale_range": [0.7, 1.4], "gamma_p": 0.3, "gamma_range": [0.7, 1.5],
            "brightness_p": 0.15, "brightness_range": [0.75, 1.25], "contrast_p": 0.15,
            "contrast_range": [0.75, 1.25], "blur_p": 0.2, "blur_sigma": [0.5, 1.0],
            "low_resolution_p": 0.25, "low_resolution_zoom": [0.5, 1.0],
        }, "nnU-Net's augmentations and probabilities; rotations tilting z only for near-isotropic voxels "
           f"(anisotropy {anisotropy:.1f})"),
        "predict_patch_shape": (choice.patch, "the training patch"),
        "predict_stride_shape": ([max(1, p // 2) for p in choice.patch], "50 % overlap (nnU-Net)"),
    }
    if ct_like:
        data_plan["percentiles"] = ([0.5, 99.5], "nnU-Net's CT clipping percentiles")
    if val:
        data_plan["val_patch_shape"] = (choice.patch, "validate on the training patch")
    for key, value in data_plan.items():
        if key not in plan["data"]:
            plan["data"][key] = value
    summary.append("choices:")
    for section, entries in plan.items():
        for key, leaf in (entries.items() if isinstance(entries, dict) else [(None, entries)]):
            name = f"{section}.{key}" if key else section
            value, reason = leaf
            if reason != "as given":
                summary.append(f"  {name}: {_flow(value)}  ({reason})")
    summary.append("measurements (patch x batch: peak): " + ", ".join(
        f"{p} x {b}: {m / 2**20:.0f} MiB" for p, b, m in choice.measurements))
    return plan, summary


def _flow(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def render(plan: dict[str, Any], header: list[str]) -> str:
    """The plan as YAML with each key's reason as a comment; every value on the line of its key."""
    lines = [f"# {h}" if h else "#" for h in header]
    for section, entries in plan.items():
        if isinstance(entries, tuple):
            value, reason = entries
            lines.append(f"{section}: {_flow(value)}  # {reason}")
            continue
        lines.append(f"{section}:")
        for key, (value, reason) in entries.items():
            lines.append(f"  {key}: {_flow(value)}  # {reason}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ command
def build_parser() -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from .data.datamodule import VolumeDataModule

    parser = ArgumentParser(
        prog="unet3d plan",
        description="Read the training volumes once and write a complete, commented fit config fitted to them and "
                    "to the device (nnU-Net's choices): unet3d fit --config plan.yaml runs it.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of the keys below")
    parser.add_class_arguments(VolumeDataModule, "data")
    parser.add_argument("--model.ignore_index", type=int | None, default=None,
                        help="label value left out of the class counts and the loss")
    parser.add_argument("--trainer.accelerator", type=str, default="auto", help="cpu, cuda/gpu or auto")
    parser.add_argument("--trainer.devices", type=int | str, default="auto", help="devices the run will use")
    parser.add_argument("--trainer.precision", type=str | None, default=None,
                        help="32-true, bf16-mixed, 16-mixed (default: bf16-mixed on a GPU that has it)")
    parser.add_argument("--trainer.max_time", type=str | None, default=None,
                        help="training time budget DD:HH:MM:SS (default 00:12:00:00 on a GPU, 00:01:00:00 on a CPU)")
    parser.add_argument("--memory_gb", type=float | None, default=None,
                        help="memory budget per device in GiB (default: 90 %% of the GPU's, half of the free RAM)")
    parser.add_argument("--max_patch_voxels", type=int | None, default=None,
                        help="largest patch in voxels (default: 64^3 on a CPU, none on a GPU)")
    parser.add_argument("--output", type=str, required=True, help="the config file to write, e.g. plan.yaml")
    return parser


def main(args: list[str] | None = None) -> None:
    """``unet3d plan``; ``args`` replaces the arguments after the subcommand."""
    from .data.datamodule import VolumeDataModule

    parser = build_parser()
    config = parser.parse_args(args)
    defaults = parser.get_defaults()
    try:
        data_config = config.data.as_dict() if hasattr(config.data, "as_dict") else dict(vars(config.data))
        default_data = defaults.data.as_dict() if hasattr(defaults.data, "as_dict") else dict(vars(defaults.data))
        given = {k: v for k, v in data_config.items() if v != default_data.get(k)}
        given.pop("train_patch_shape", None)
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse >= 4.49
        instantiated = instantiate(config)
        data = instantiated.data
        if not isinstance(data, VolumeDataModule):
            data = VolumeDataModule(**data_config)
        given["__ignore_index"] = config.model.ignore_index
        output = Path(config.output)
        if output.suffix not in (".yaml", ".yml"):
            raise ConfigurationError(f"plan: --output {output} must end in .yaml or .yml")
        plan, summary = make_plan(
            data, given, accelerator=config.trainer.accelerator, devices=config.trainer.devices,
            precision=config.trainer.precision, memory_gb=config.memory_gb, max_time=config.trainer.max_time,
            max_patch_voxels=config.max_patch_voxels,
        )
        fingerprint_lines = summary[:summary.index("choices:")] + summary[-1:]
        header = ["written by unet3d plan (nnU-Net's choices for these volumes and this device); every key can be",
                  "edited, each says why it has its value. Run: unet3d fit --config " + str(output), ""]
        header += fingerprint_lines
        text = render(plan, header)
        output.parent.mkdir(parents=True, exist_ok=True)
        temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        temporary.write_text(text)
        os.replace(temporary, output)
    except ConfigurationError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join(summary))
    print(f"wrote {output}; train with: unet3d fit --config {output}")
