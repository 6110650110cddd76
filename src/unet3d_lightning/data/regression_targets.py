"""Float targets of regression models (``model.loss`` ``mse``, ``l1``, ``smooth_l1``): how they are scaled before
the loss sees them (``data.target_normalization``). numpy only: the datasets import it in every reader process."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

#: ``data.target_normalization``: how a regression target is scaled before the loss sees it.
TargetNormalization = Literal["none", "like_raw"]
TARGET_NORMALIZATIONS = ("none", "like_raw")


def normalize_target(
    target: np.ndarray, stats: Any, raw_normalization: str, mode: str, ignore_index: float | None = None
) -> np.ndarray:
    """A regression target ``(C, ...)`` as float32, scaled by ``data.target_normalization`` ``mode``.

    ``"none"``: the stored values (cast only). ``"like_raw"``: the affine map the raw volume's normalisation applies,
    with the raw's statistics ``stats`` (:class:`~unet3d_lightning.data.volumes.IntensityStats`): ``(y - mean_c) /
    std_c`` for ``standardize``, ``(y - low_c) / (high_c - low_c)`` for ``percentile`` (without the raw's clipping to
    ``[low, high]``: the target keeps its range, the network is to learn it), nothing for ``none``. Raw channel
    ``c`` scales target channel ``c``; a single raw channel scales every target channel. Elements equal to
    ``ignore_index`` keep that value, so the loss still recognises them.
    """
    y = target.astype(np.float32, copy=True)
    if mode == "none" or stats is None or raw_normalization == "none":
        return y
    shape = (-1,) + (1,) * (y.ndim - 1)
    if raw_normalization == "standardize":
        offset = np.asarray(stats.mean, np.float64)
        scale = np.maximum(np.asarray(stats.std, np.float64), 1e-8)
    else:
        offset = np.asarray(stats.low, np.float64)
        scale = np.maximum(np.asarray(stats.high, np.float64) - offset, 1e-8)
    ignored = y == ignore_index if ignore_index is not None else None
    y = ((y.astype(np.float64) - offset.reshape(shape)) / scale.reshape(shape)).astype(np.float32)
    if ignored is not None:
        y[ignored] = ignore_index
    return y
