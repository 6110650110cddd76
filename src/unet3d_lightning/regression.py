"""Regression (denoising, restoration) tasks: the validation metrics of a model trained with ``mse``, ``l1`` or
``smooth_l1`` on float targets (:func:`regression_metrics`).

The losses are in :mod:`unet3d_lightning.losses` (:func:`~unet3d_lightning.losses.regression_loss`), the rules for
the targets in :mod:`unet3d_lightning.data.regression_targets` (:func:`normalize_target`, re-exported here).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanSquaredError, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio

from .data.regression_targets import TARGET_NORMALIZATIONS, TargetNormalization, normalize_target  # noqa: F401


class TargetRangePSNR(PeakSignalNoiseRatio):
    """Peak signal-to-noise ratio with the peak taken from the targets' range:

    .. math::

        \\mathrm{PSNR} = 10 \\log_{10} \\frac{R^2}{\\mathrm{MSE}}, \\qquad R = \\max_n y_n - \\min_n y_n,
        \\qquad \\mathrm{MSE} = \\frac{1}{N} \\sum_n (x_n - y_n)^2

    over every element ``n`` given to :meth:`update` since the last reset (one validation epoch; across ranks, the
    range by min/max reductions, the squared errors by sums). torchmetrics' ``PeakSignalNoiseRatio`` takes a fixed
    ``data_range``; normalised intensities have no fixed one, so ``R`` is the targets' own range, as scikit-image's
    ``peak_signal_noise_ratio(..., data_range=target.max() - target.min())`` computes it for one image. A constant
    target (``R = 0``) gives ``-inf``; a perfect prediction (``MSE = 0``) ``+inf``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(data_range=1.0, **kwargs)  # replaced by the targets' range at compute()
        self.add_state("target_min", default=torch.tensor(float("inf")), dist_reduce_fx="min")
        self.add_state("target_max", default=torch.tensor(float("-inf")), dist_reduce_fx="max")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if target.numel():
            low, high = torch.aminmax(target.detach().float())
            self.target_min = torch.minimum(self.target_min, low)
            self.target_max = torch.maximum(self.target_max, high)
        super().update(preds.float(), target.float())

    def compute(self) -> Tensor:
        from torchmetrics.functional.image.psnr import _psnr_compute

        return _psnr_compute(self.sum_squared_error, self.total, self.target_max - self.target_min, base=self.base)


def regression_metrics(stage: str) -> MetricCollection:
    """``<stage>/psnr`` (:class:`TargetRangePSNR`) and ``<stage>/mse`` (torchmetrics' ``MeanSquaredError``) of a
    regression model's outputs against its targets, accumulated over one epoch.

    Both count the elements whose target is not ``ignore_index`` (see :func:`update_regression_metrics`) and are
    unweighted: per-voxel and per-channel loss weights shape ``<stage>/loss`` only.
    """
    return MetricCollection({"psnr": TargetRangePSNR(), "mse": MeanSquaredError()}, prefix=f"{stage}/")


def update_regression_metrics(
    metrics: MetricCollection, prediction: Tensor, target: Tensor, ignore_index: float | None = None
) -> None:
    """Add a batch to :func:`regression_metrics`: ``prediction`` ``(B, C, ...)`` and its float ``target`` (``(B,
    ...)`` for one channel), the elements whose target equals ``ignore_index`` left out."""
    prediction = prediction.detach().float()
    target = target.float()
    if target.dim() == prediction.dim() - 1:
        target = target.unsqueeze(1)
    if ignore_index is not None:
        keep = target != ignore_index
        prediction, target = prediction[keep], target[keep]
    if target.numel() == 0:
        return
    metrics.update(prediction.reshape(-1), target.reshape(-1))
