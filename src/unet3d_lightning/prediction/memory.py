"""How much memory prediction needs, how much there is, and the check that refuses a run before it starts.

Usage::

    estimate = estimate_predict_memory((64, 128, 128), (200, 1024, 1024), 1, 1, 2, 32)
    check_predict_memory(plans, model.hparams, model.device, batch_size=1)  # raises ConfigurationError if too big
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigurationError

# float32 values the network holds per voxel of a patch and per feature map of its first level, at the peak of an
# inference forward pass: the full-resolution encoder output kept for the skip connection, the decoder's
# concatenation of it with the upsampled features, each convolution's input, output and workspace, normalisation
# temporaries; the coarser levels add about a third (f_maps doubles while voxels shrink eightfold). Measured (peak
# resident memory of one forward on CPU, GroupNorm, 3 levels, the plain, residual and residual-SE U-Nets, batches of 1
# and 2, contiguous and channels-last, with the decoders' inputs released layer by layer and oneDNN convolutions also
# for batches of one): 3.6-6.0 values per voxel and feature map, the feature maps counted as at least FEATURE_BLOCK,
# since oneDNN's CPU convolutions pad channels to blocks of 16. Twice that leaves room for other kernels' workspaces.
ACTIVATION_VALUES_PER_FEATURE = 12
FEATURE_BLOCK = 16


def estimate_predict_memory(
    patch_shape: Sequence[int],
    padded_shape: Sequence[int],
    batch_size: int,
    in_channels: int,
    out_channels: int,
    f_maps: int,
    tta: bool = False,
    output_itemsize: int = 4,
    network_scale: float = 1.0,
) -> dict[str, int]:
    """A rough but conservative estimate, in bytes, of the memory prediction needs beyond the model's weights.

    With ``P = pz * py * px`` voxels per patch, ``B`` the batch size, ``C`` the output and ``C_in`` the input channels,
    ``H x W`` the padded volume's plane and float32 (4 bytes) everywhere:

    - ``stitcher`` (on the model's device): the accumulation band ``pz x (C + 1) x H x W``, the staging of one batch
      ``B x (C + 1) x P`` and one finished slab ``C x pz x H x W``;
    - ``patches`` (device): the batch ``B x C_in x P``, its logits and probabilities ``2 x B x C x P``, doubled with
      flip test-time augmentation (a flipped copy and the running sum);
    - ``network`` (device): ``B x P x max(f_maps, FEATURE_BLOCK) x ACTIVATION_VALUES_PER_FEATURE`` activations
      (measured, see there) times ``network_scale``;
    - ``writer`` (host): the output's chunk row ``C x 16 x H x W`` in the stored dtype, and up to three slabs
      ``C x pz x H x W`` queued for writing or in transfer.

    Args:
        patch_shape: ``(pz, py, px)``.
        padded_shape: ``(D, H, W)`` of the padded volume (the widest plane of the run).
        batch_size: patches per batch.
        in_channels, out_channels: the model's channels.
        f_maps: feature maps of the network's first level.
        tta: flip test-time augmentation. Default False.
        output_itemsize: bytes per stored prediction value. Default 4 (float32).
        network_scale: the network's activations relative to the classic 2× pooling on every axis
            (:func:`~unet3d_lightning.networks.kernels.activation_scale`: a network that pools z less keeps more
            voxels at its coarser levels). Default 1.0.

    Returns:
        ``{"stitcher", "patches", "network", "writer"}`` → bytes.
    """
    pz = int(patch_shape[0])
    voxels = math.prod(int(n) for n in patch_shape)
    plane = int(padded_shape[1]) * int(padded_shape[2])
    c, b = int(out_channels), int(batch_size)
    patches = 4 * b * voxels * (in_channels + 2 * c)
    return {
        "stitcher": 4 * (pz * (c + 1) * plane + b * (c + 1) * voxels + c * pz * plane),
        "patches": patches * (2 if tta else 1),
        "network": _scaled(4 * b * voxels * max(int(f_maps), FEATURE_BLOCK) * ACTIVATION_VALUES_PER_FEATURE,
                           network_scale),
        "writer": c * plane * (16 * output_itemsize + 3 * 4 * pz),
    }


def available_memory(device: torch.device) -> int | None:
    """Bytes that ``device`` can still allocate: free CUDA memory plus what PyTorch's cache holds unused, or the
    host's available memory (the tighter of ``/proc/meminfo``'s MemAvailable and a cgroup memory limit); None when
    unknown (other devices and systems: then nothing is refused)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as meminfo:
            found.append(1024 * int(next(line for line in meminfo if line.startswith("MemAvailable:")).split()[1]))
    if not found:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    # A container's limit is invisible in /proc/meminfo (cgroup v2 first, then v1).
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        with contextlib.suppress(OSError, ValueError):
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:
                found.append(int(limit) - int(Path(usage_file).read_text()))
                break
    return min(found) if found else None


def check_predict_memory(
    plans: Sequence[Any],
    hparams: Mapping[str, Any],
    device: torch.device,
    batch_size: int,
    tta: bool = False,
    output_itemsize: int = 4,
) -> None:
    """Refuse, before any patch is predicted, a run whose patches, network and stitcher cannot fit in memory
    (see :func:`estimate_predict_memory`). On an accelerator the writer's buffers are counted against host memory,
    everything else against the device's.

    Args:
        plans: the predict dataset's plans (``volume.path``, ``padded_shape``, ``grid`` of patch slices).
        hparams: the model's hyperparameters (``out_channels``; ``in_channels`` default 1, ``f_maps`` default 64).
        device: the model's device.
        batch_size: patches per batch.
        tta: flip test-time augmentation. Default False.
        output_itemsize: bytes per stored prediction value. Default 4 (float32).

    Raises:
        ConfigurationError: naming the patch shape, the batch size, the widest volume and what is available.
    """
    f_maps = hparams.get("f_maps", 64)
    patch = tuple(s.stop - s.start for s in plans[0].grid[0])
    widest = max(plans, key=lambda plan: _plane(plan.padded_shape))
    estimate = estimate_predict_memory(
        patch, widest.padded_shape, batch_size, int(hparams.get("in_channels", 1)), int(hparams["out_channels"]),
        int(f_maps if isinstance(f_maps, int) else f_maps[0]), tta=tta, output_itemsize=output_itemsize,
        network_scale=network_scale(hparams),
    )
    groups = [(device, [k for k in estimate if k != "writer"]), (torch.device("cpu"), ["writer"])]
    if device.type == "cpu":
        groups = [(device, list(estimate))]
    for memory, keys in groups:
        need = sum(estimate[k] for k in keys)
        have = available_memory(memory)
        if have is not None and need > have:
            parts = ", ".join(f"{k} {format_size(estimate[k])}" for k in keys)
            raise ConfigurationError(
                f"predicting patches of data.predict_patch_shape {list(patch)} in batches of data.batch_size "
                f"{batch_size} needs about {format_size(need)} of {memory} memory ({parts}; the stitcher holds "
                f"patch-depth bands of {widest.volume.path}, {widest.padded_shape[1]} x {widest.padded_shape[2]} "
                f"in y x) but {format_size(have)} is available; use a smaller data.predict_patch_shape or "
                "data.batch_size"
            )


def network_scale(hparams: Mapping[str, Any]) -> float:
    """The activation scale of the network ``hparams`` describe (``pool_kernel_size``, ``f_maps``, ``num_levels``,
    ``spatial_dims``): 1.0 for the classic pooling, or where the settings cannot be read."""
    pool = hparams.get("pool_kernel_size", 2)
    if pool == 2:
        return 1.0
    from ..networks.kernels import activation_scale
    from ..networks.unet import level_channels

    try:
        f_maps = hparams.get("f_maps", 64)
        levels = int(hparams.get("num_levels", 4))
        channels = level_channels(f_maps if isinstance(f_maps, int) else list(f_maps), levels)
        return activation_scale(channels, pool, int(hparams.get("spatial_dims", 3)))
    except (ValueError, TypeError):
        return 1.0


def _scaled(size: int, scale: float) -> int:
    return size if scale == 1.0 else int(math.ceil(size * scale))


def format_size(size: float) -> str:
    """``size`` bytes in GiB with one decimal from 1 GiB on, else in whole MiB."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def _plane(shape: Sequence[int]) -> int:
    return int(shape[1]) * int(shape[2])
