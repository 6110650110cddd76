"""Kernel sizes of the U-Nets per level and axis: the forms ``model.pool_kernel_size`` and
``model.conv_kernel_size`` take, the patch-size divisor they imply and the receptive field. Pure Python, no torch.

A kernel setting is one of

- an int: every axis of every level (``2`` pooling, ``3`` convolution: the classic 3D U-Net of Çiçek et al. 2016);
- one ``[z, y, x]`` list (``[y, x]`` for a 2D network): every level;
- a list of such lists, one per level: ``num_levels - 1`` entries for the pooling (entry ``i`` pools level ``i`` down
  to level ``i + 1``), ``num_levels`` for the convolutions (entry ``i`` is the kernel of every convolution of level
  ``i``, encoder and decoder alike), as nnU-Net's plans (``pool_op_kernel_sizes``, ``conv_kernel_sizes``; Isensee et
  al. 2021, "nnU-Net", Nature Methods 18:203) and MONAI's ``DynUNet`` (``strides``, ``kernel_size``) take them.

Convolutions are padded by ``k // 2`` ("same" padding), so their kernels must be odd; pooling windows equal their
strides (no overlap).

Usage::

    pool = pool_kernels([1, 2, 2], num_levels=3)          # ((1, 2, 2), (1, 2, 2))
    patch_divisor([[1, 2, 2], [2, 2, 2]], num_levels=3)   # (2, 4, 4)
    receptive_field(3, 2, num_levels=3)                   # (48, 48, 48)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

KernelSetting = Union[int, Sequence[int], Sequence[Sequence[int]]]
_AXES = {3: "z, y, x", 2: "y, x"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def level_kernels(
    value: KernelSetting, count: int, spatial_dims: int = 3, key: str = "kernel_size", entry: str = "level",
) -> tuple[tuple[int, ...], ...]:
    """``count`` per-level kernels of ``spatial_dims`` ints each, from any of the three forms (module docstring).

    Args:
        value: an int, one per-axis list, or a list of ``count`` per-axis lists.
        count: levels the setting must cover.
        spatial_dims: 3 (``[z, y, x]``) or 2 (``[y, x]``). Default 3.
        key: the setting's name for the messages. Default ``"kernel_size"``.
        entry: what one entry of the per-level form stands for, in the messages. Default ``"level"``.

    Raises:
        ValueError: a non-positive or non-integer size, or lists of the wrong length; one line naming ``key``.
    """
    axes = _AXES.get(spatial_dims)
    if axes is None:
        raise ValueError(f"spatial_dims {spatial_dims!r} must be 3 or 2")
    form = (f"an int, one [{axes}] for every {entry}, or a list of {count} [{axes}], one per {entry}"
            if count else f"an int or one list per {entry}")
    if _is_int(value):
        per_level = [[value] * spatial_dims] * count
    elif isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value):
        if len(value) != spatial_dims:
            raise ValueError(
                f"{key} {list(value)} has {len(value)} value(s) but a {spatial_dims}D network needs {spatial_dims} "
                f"([{axes}]); give {form}"
            )
        per_level = [list(value)] * count
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (list, tuple)) for v in value):
        per_level = [list(v) for v in value]
        if len(per_level) != count:
            raise ValueError(f"{key} {_plain(value)} lists {len(per_level)} entries, but this network needs "
                             f"{count}, one per {entry}; give {form}")
        for entry in per_level:
            if len(entry) != spatial_dims or not all(_is_int(v) for v in entry):
                raise ValueError(
                    f"{key} {_plain(value)}: entry {entry} is not {spatial_dims} ints [{axes}]; give {form}"
                )
    else:
        raise ValueError(f"{key} {value!r} is not {form}")
    for entry in per_level:
        if min(entry) < 1:
            raise ValueError(f"{key} {_plain(value)} has a size below 1; every kernel size must be a positive int")
    return tuple(tuple(int(v) for v in entry) for entry in per_level)


def pool_kernels(
    pool_kernel_size: KernelSetting = 2, num_levels: int = 4, spatial_dims: int = 3,
) -> tuple[tuple[int, ...], ...]:
    """The ``num_levels - 1`` pooling factors (window = stride), per axis. Default 2 everywhere."""
    return level_kernels(pool_kernel_size, num_levels - 1, spatial_dims, "pool_kernel_size", "pooling")


def conv_kernels(
    conv_kernel_size: KernelSetting = 3, num_levels: int = 4, spatial_dims: int = 3,
) -> tuple[tuple[int, ...], ...]:
    """The ``num_levels`` convolution kernels, per axis; each must be odd ("same" padding ``k // 2``). Default 3.

    Raises:
        ValueError: as :func:`level_kernels`, or an even size.
    """
    kernels = level_kernels(conv_kernel_size, num_levels, spatial_dims, "conv_kernel_size", "level")
    for entry in kernels:
        if any(k % 2 == 0 for k in entry):
            raise ValueError(
                f"conv_kernel_size {_plain(conv_kernel_size)} has an even size; convolutions keep the size with "
                "padding k // 2, which needs odd kernels (1, 3, 5, ...)"
            )
    return kernels


def patch_divisor(
    pool_kernel_size: KernelSetting = 2, num_levels: int = 4, spatial_dims: int = 3,
) -> tuple[int, int, int]:
    """The per-axis divisor of a network's patches, ``(z, y, x)``: each axis' pooling factors multiplied.

    A patch must be at least this long along every axis, so that every pooling has voxels to pool (the patch-size
    rule checked at setup); ``2 ** (num_levels - 1)`` on every axis for the default pooling. For a 2D network
    (``spatial_dims=2``, patches ``[1, y, x]``) the z divisor is 1.

    Args:
        pool_kernel_size: the network's ``pool_kernel_size`` setting (any of its forms). Default 2.
        num_levels: the network's levels. Default 4.
        spatial_dims: 3 or 2. Default 3.
    """
    factors = pool_kernels(pool_kernel_size, num_levels, spatial_dims)
    divisor = tuple(math.prod(level[axis] for level in factors) for axis in range(spatial_dims))
    return divisor if spatial_dims == 3 else (1, *divisor)  # type: ignore[return-value]


def smallest_valid_patch(patch: Sequence[int], divisor: Sequence[int]) -> tuple[int, ...]:
    """``patch`` grown to the divisor along every axis where it is shorter (the smallest valid patch containing it)."""
    return tuple(max(int(p), int(d)) for p, d in zip(patch, divisor))


def receptive_field(
    conv_kernel_size: KernelSetting = 3,
    pool_kernel_size: KernelSetting = 2,
    num_levels: int = 4,
    spatial_dims: int = 3,
    upsample: str = "deconv",
) -> tuple[int, int, int]:
    """The receptive field of the native networks' output voxels: per axis ``(z, y, x)`` (1 along z for a 2D
    network), the most input voxels one output voxel depends on, over every phase of the pooling grid.

    The U-Net is followed along each axis separately (every kernel is a box), as the interval of input positions
    each position of each layer reads, away from the borders: a convolution of kernel ``k`` reads ``k // 2`` positions
    either side, a max-pooling of factor ``f`` its window ``[f c, f c + f - 1]``, the transposed convolution (kernel
    ``2f - 1``, stride ``f``, padding ``f - 1``) the coarse positions
    ``ceil((o - f + 1) / f) .. floor((o + f - 1) / f)``,
    nearest-neighbour upsampling ``o // f``, and a decoder the union of the upsampled path and its skip connection.
    Every block has two convolutions of its level's kernel (a residual block's 1×1 projection and shortcut read
    nothing more). Squeeze-excitation's global average is not counted. For the classic chain without skip
    connections this is Araujo et al. 2019 ("Computing Receptive Fields of Convolutional Neural Networks",
    Distill): each kernel ``k`` at a level whose voxels are ``j`` input voxels apart adds ``(k - 1) j``.

    Args:
        conv_kernel_size, pool_kernel_size: the network's settings, any of their forms. Defaults 3 and 2.
        num_levels: the network's levels. Default 4.
        spatial_dims: 3 or 2. Default 3.
        upsample: ``"deconv"`` or ``"interpolate"``. Default ``"deconv"``.
    """
    convs = conv_kernels(conv_kernel_size, num_levels, spatial_dims)
    pools = pool_kernels(pool_kernel_size, num_levels, spatial_dims)
    field = []
    for axis in range(spatial_dims):
        factors = [level[axis] for level in pools]
        kernels = [level[axis] for level in convs]
        field.append(_axis_field(kernels, factors, upsample))
    return tuple(field) if spatial_dims == 3 else (1, *field)  # type: ignore[return-value]


def _axis_field(kernels: Sequence[int], factors: Sequence[int], upsample: str) -> int:
    """:func:`receptive_field` along one axis: intervals ``(lo, hi)`` of input positions per position of a line
    long enough that its middle sees no border."""
    divisor = math.prod(factors)
    bound = 1 + sum(2 * (k - 1) for k in kernels) * divisor * 2 + 4 * divisor
    length = divisor * (2 * (bound // divisor) + 4)

    def conv(line: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
        h, n = k // 2, len(line)
        return [(line[max(i - h, 0)][0], line[min(i + h, n - 1)][1]) for i in range(n)]

    def block(line: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
        return conv(conv(line, k), k)

    line = [(i, i) for i in range(length)]
    skips = []
    for level, k in enumerate(kernels):
        if level:
            f = factors[level - 1]
            line = [(line[f * c][0], line[min(f * c + f - 1, len(line) - 1)][1]) for c in range(-(-len(line) // f))]
        line = block(line, k)
        skips.append(line)
    skips.pop()
    for level in range(len(kernels) - 2, -1, -1):
        skip, f, deep = skips.pop(), factors[level], line
        up = []
        for o in range(len(skip)):
            if upsample == "deconv":
                first, last = max(-((f - 1 - o) // f), 0), min((o + f - 1) // f, len(deep) - 1)
            else:
                first = last = min(o // f, len(deep) - 1)
            up.append((deep[first][0], deep[last][1]))
        joined = [(min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(skip, up)]
        line = block(joined, kernels[level])
    middle = line[length // 2 - divisor: length // 2 + divisor]
    return max(hi - lo + 1 for lo, hi in middle)


def context_halo(receptive: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
    """Voxels per axis to discard at each interior patch face so that every kept voxel saw its whole receptive field,
    ``(r - 1) // 2``, capped below half the patch (what ``prediction.halo`` accepts)."""
    return tuple(min((int(r) - 1) // 2, max(0, (int(p) - 1) // 2)) for r, p in zip(receptive, patch))


def activation_scale(channels: Sequence[int], pool_kernel_size: KernelSetting = 2, spatial_dims: int = 3) -> float:
    """How much more activation memory a network holds than the same channels with the classic 2× pooling on every
    axis: ``sum_l c_l / v_l`` over its levels (``c_l`` the level's channels, at least 16 as oneDNN pads them;
    ``v_l`` how many input voxels one of its voxels covers) divided by the same sum for ``v_l = 2**(l * dims)``.
    1.0 exactly for the classic pooling; about 1.4 for ``[1, 2, 2]`` pooling on four levels of doubling channels,
    whose coarser levels shrink four- instead of eightfold."""
    pools = pool_kernels(pool_kernel_size, len(channels), spatial_dims)
    covered, classic = [1], [1]
    for level in pools:
        covered.append(covered[-1] * math.prod(level))
        classic.append(classic[-1] * 2**spatial_dims)
    fmaps = [max(int(c), 16) for c in channels]
    return sum(c / v for c, v in zip(fmaps, covered)) / sum(c / v for c, v in zip(fmaps, classic))


def is_default(pool_kernel_size: KernelSetting, conv_kernel_size: KernelSetting) -> bool:
    """Whether the settings are the classic 2 / 3 on every axis and level (in any of the forms)."""
    flat = []
    for value in (pool_kernel_size, conv_kernel_size):
        stack = [value]
        values = []
        while stack:
            item = stack.pop()
            if isinstance(item, (list, tuple)):
                stack.extend(item)
            else:
                values.append(item)
        flat.append(set(values))
    return flat[0] <= {2} and flat[1] <= {3}


def _plain(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
