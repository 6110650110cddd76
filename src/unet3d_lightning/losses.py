"""Segmentation losses of Sudre et al. 2017 for the 3D U-Net, computed from logits in float32.

Source: C. H. Sudre, W. Li, T. Vercauteren, S. Ourselin, M. J. Cardoso, "Generalised Dice overlap as a deep
learning loss function for highly unbalanced segmentations", DLMIA 2017, arXiv:1707.03237.

Every loss takes the network's raw **logits** of shape ``(B, C, D, H, W)`` and one of two target kinds:

* **class-index** targets, shape ``(B, D, H, W)``, integer dtype: one label in ``[0, C)`` per voxel
  (a 3D label volume per sample; mutually exclusive classes, softmax);
* **binary** targets, shape ``(B, C, D, H, W)``, values 0/1 in a float, integer or bool dtype: one mask per output
  channel (a 4D label volume per sample; channels may overlap, sigmoid).

Every loss disables autocast and casts logits to float32 inside ``forward``: log-softmax, the sigmoid saturation
and the voxel sums over whole 3D batches (millions of terms) lose too much precision in bf16/fp16. Every loss
returns a float32 scalar.

Targets are checked on every call (label range, 0/1 masks, shapes); this costs one device synchronisation per
call and turns a silent mislabelling (masks stored as 0/255, labels beyond ``C``) into an error naming the value.

Regression (denoising, restoration) losses take a third target kind, **float** targets of the output's shape
``(B, C, D, H, W)``: :class:`MSELoss`, :class:`L1Loss` and :class:`SmoothL1Loss`, over the functional core
:func:`regression_loss`; their network has no final activation (``"none"``).

Public names: :class:`CrossEntropyLoss`, :class:`WeightedCrossEntropyLoss`, :class:`BCELoss`,
:class:`GeneralizedDiceLoss`, :class:`BCEDiceLoss`, :class:`MSELoss`, :class:`L1Loss`, :class:`SmoothL1Loss`,
:data:`LOSS_NAMES`, :data:`REGRESSION_LOSS_NAMES`, :func:`regression_loss`, :func:`create_loss`,
:func:`final_activation_name`, :func:`apply_final_activation`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LOSS_NAMES",
    "BCEDiceLoss",
    "BCELoss",
    "CrossEntropyLoss",
    "GeneralizedDiceLoss",
    "L1Loss",
    "MSELoss",
    "REGRESSION_LOSS_NAMES",
    "SmoothL1Loss",
    "WeightedCrossEntropyLoss",
    "regression_loss",
    "apply_final_activation",
    "create_loss",
    "final_activation_name",
]

#: Losses of regression tasks (float targets, no final activation): mean squared error, mean absolute error, Huber.
REGRESSION_LOSS_NAMES = ("mse", "l1", "smooth_l1")
LOSS_NAMES = ("ce", "wce", "bce", "dice", "bce_dice", *REGRESSION_LOSS_NAMES)

_MULTICLASS_ONLY = ("ce", "wce")
_BINARY_ONLY = ("bce", "bce_dice")
_USES_WEIGHT = ("ce", "bce", "bce_dice", *REGRESSION_LOSS_NAMES)
_NORMALIZATIONS = ("sigmoid", "softmax", "none")
_ACTIVATIONS = ("softmax", "sigmoid", "none")


# ---------------------------------------------------------------------------------------------------------------
# Shared checks and helpers
# ---------------------------------------------------------------------------------------------------------------


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    # torch.autocast raises for device types without autocast support (e.g. "meta"); nothing to disable there.
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _check_ignore_index(ignore_index: int | None) -> int | None:
    # bool is an int subclass; `ignore_index=True` is a mistake, not label 1.
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}.")
    return ignore_index


def _weight_tensor(weight: Sequence[float] | Tensor | None) -> Tensor | None:
    if weight is None:
        return None
    values = torch.as_tensor(weight, dtype=torch.float32).detach().clone().flatten()
    if values.numel() == 0:
        raise ValueError("weight must list one value per class/channel, got an empty sequence.")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"weight must contain finite numbers, got {values.tolist()}.")
    if bool((values < 0).any()):
        raise ValueError(f"weight must be non-negative, got {values.tolist()}.")
    if not bool((values > 0).any()):
        raise ValueError(f"weight must have at least one positive entry, got {values.tolist()}.")
    return values


def _check_weight_length(weight: Tensor | None, channels: int) -> None:
    if weight is not None and weight.numel() != channels:
        raise ValueError(
            f"weight has {weight.numel()} entries but the logits have {channels} channels; give one weight per channel."
        )


def _check_logits(logits: Tensor) -> None:
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (B, C, ...), got shape {tuple(logits.shape)}.")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}.")


def _class_index_target(logits: Tensor, target: Tensor, ignore_index: int | None) -> tuple[Tensor, Tensor]:
    """Validate a class-index target; return it as int64 with ignored voxels set to 0, and the valid-voxel mask.

    Ignored voxels get label 0 so that indexing and one-hot never see an out-of-range value; the mask removes them.
    """
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"class-index target must have shape {expected} (logits {tuple(logits.shape)} without the channel "
            f"dimension), got {tuple(target.shape)}."
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"class-index target must be an integer tensor (torch.int64), got dtype {target.dtype}.")
    target = target.long()
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    safe = torch.where(valid, target, torch.zeros_like(target))
    if safe.numel() > 0:
        low, high = torch.aminmax(safe)
        num_classes = logits.shape[1]
        if int(low) < 0 or int(high) >= num_classes:
            bad = int(low) if int(low) < 0 else int(high)
            raise ValueError(
                f"class-index target contains label {bad}, outside [0, {num_classes}) for {num_classes} output "
                f"channels; fix the labels or set ignore_index={bad} to skip those voxels."
            )
    return safe, valid


def _binary_target(logits: Tensor, target: Tensor, ignore_index: int | None) -> tuple[Tensor, Tensor]:
    """Validate a binary target; return it as float32 with ignored voxels set to 0, and the valid-element mask."""
    if tuple(target.shape) != tuple(logits.shape):
        raise ValueError(
            f"binary target must have the logits' shape {tuple(logits.shape)} (one 0/1 mask per channel), "
            f"got {tuple(target.shape)}."
        )
    if ignore_index in (0, 1):
        raise ValueError(
            f"ignore_index={ignore_index} collides with the binary label values 0/1; use a value outside them, "
            "e.g. -1 or 255."
        )
    if ignore_index is not None:
        valid = target != ignore_index
    else:
        valid = torch.ones_like(target, dtype=torch.bool)
    safe = torch.where(valid, target, torch.zeros_like(target)).float()
    if safe.numel() > 0:
        low, high = torch.aminmax(safe)
        if float(low) < 0 or float(high) > 1:
            bad = float(low) if float(low) < 0 else float(high)
            raise ValueError(
                f"binary target contains value {bad:g}, outside [0, 1]; store masks as 0/1 (divide 0/255 masks by "
                "255) or set ignore_index to that value."
            )
    return safe, valid.to(torch.float32)


def _safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    # A zero denominator only occurs when the numerator is a sum over no voxels (all ignored / zero weight), so the
    # loss is 0. Dividing by a replaced denominator instead of masking a NaN keeps the backward pass NaN-free.
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return numerator / safe


def _weighted_cross_entropy(
    logits: Tensor, target: Tensor, valid: Tensor, weight: Tensor | None, voxel_weight: Tensor | None = None
) -> Tensor:
    """Σ_n v_n m_n w_{y_n} (−log softmax(x_n)_{y_n}) / Σ_n v_n m_n w_{y_n}; v = valid mask, w = class weights,
    m = per-voxel weights (each 1 when not given)."""
    per_voxel = F.cross_entropy(logits, target, reduction="none")
    factor = valid.to(torch.float32)
    if weight is not None:
        factor = factor * weight[target]
    if voxel_weight is not None:
        factor = factor * _voxel_weight(voxel_weight, per_voxel.shape)
    return _safe_ratio((factor * per_voxel).sum(), factor.sum())


def _voxel_weight(voxel_weight: Tensor, shape: torch.Size) -> Tensor:
    """Per-voxel weights as float32, broadcast to ``shape``: ``(B, D, H, W)`` or, for binary targets, also
    ``(B, C, D, H, W)``; a ``(B, D, H, W)`` map given for a 5D shape applies to every channel."""
    w = voxel_weight.float()
    if w.dim() == len(shape) - 1:
        w = w.unsqueeze(1)
    try:
        return w.expand(shape)
    except RuntimeError:
        raise ValueError(
            f"per-voxel weights of shape {tuple(voxel_weight.shape)} do not match the loss elements {tuple(shape)}."
        ) from None


class _Float32Loss(nn.Module):
    """Runs ``_loss`` with autocast disabled on float32 logits; subclasses implement ``_loss``."""

    #: whether ``voxel_weight`` is supported (the Dice losses are ratios of class volumes and take none)
    takes_voxel_weight = True

    def forward(self, logits: Tensor, target: Tensor, voxel_weight: Tensor | None = None) -> Tensor:
        """Compute the loss.

        Args:
            logits: raw network output, shape ``(B, C, D, H, W)`` (any float dtype; computed in float32).
            target: class-index ``(B, D, H, W)`` integer labels or binary ``(B, C, D, H, W)`` 0/1 masks, as the
                loss documents.
            voxel_weight: optional non-negative per-voxel weights ``(B, D, H, W)`` (or, for binary targets,
                ``(B, C, D, H, W)``), e.g. the dataset given by ``data.weight_internal_path``; they multiply each
                voxel's term as the class weights do. Default ``None``.

        Returns:
            float32 scalar loss.
        """
        _check_logits(logits)
        if voxel_weight is not None and not self.takes_voxel_weight:
            raise ValueError(f"{type(self).__name__} takes no per-voxel weights; use 'ce', 'wce', 'bce' or 'bce_dice'.")
        with _autocast_off(logits.device):
            return self._loss(logits.float(), target, voxel_weight).float()

    def _loss(self, logits: Tensor, target: Tensor, voxel_weight: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------


class CrossEntropyLoss(_Float32Loss):
    """Softmax cross-entropy for class-index targets, equal to ``torch.nn.functional.cross_entropy``.

    .. math::

        \\mathrm{CE} = \\frac{\\sum_n v_n\\, w_{y_n} \\left(-\\log \\operatorname{softmax}(x_n)_{y_n}\\right)}
                            {\\sum_n v_n\\, w_{y_n}}

    with ``x_n`` the C logits of voxel ``n``, ``y_n`` its label, ``w`` the class weights (all 1 without ``weight``)
    and ``v_n = 0`` for voxels labelled ``ignore_index``, 1 otherwise. Sums run over every voxel of the batch. This
    is the weighted mean of ``F.cross_entropy(..., weight=weight, ignore_index=ignore_index)``. Plain CE is the
    reference loss of Sudre et al. 2017 (arXiv:1707.03237).

    Target: class-index labels ``(B, D, H, W)`` of an integer dtype, values in ``[0, C)`` or ``ignore_index``.

    Args:
        weight: per-class weights ``w``, length C, non-negative with at least one positive entry. Default ``None``:
            every class weighs 1. Because the mean is weighted, only the weights' ratios matter.
        ignore_index: label whose voxels are left out of numerator and denominator (no gradient there). Default
            ``None``: every voxel counts and every label must be in ``[0, C)``. May be a class index in
            ``[0, C)`` to exclude that class.

    A batch in which every voxel is ignored (denominator 0) gives loss 0 with zero gradient, where
    ``F.cross_entropy`` gives NaN.
    """

    def __init__(self, weight: Sequence[float] | None = None, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = _check_ignore_index(ignore_index)
        # Not persistent: loss weights are configuration, and keeping them out of checkpoints lets a checkpoint be
        # reloaded with a different weighting.
        self.register_buffer("weight", _weight_tensor(weight), persistent=False)

    def _loss(self, logits: Tensor, target: Tensor, voxel_weight: Tensor | None) -> Tensor:
        target, valid = _class_index_target(logits, target, self.ignore_index)
        weight = None if self.weight is None else self.weight.float()
        _check_weight_length(weight, logits.shape[1])
        return _weighted_cross_entropy(logits, target, valid, weight, voxel_weight)


class WeightedCrossEntropyLoss(_Float32Loss):
    """Weighted cross-entropy (WCE) of Sudre et al. 2017, generalised to C classes, for class-index targets.

    For the batch at hand, with ``N`` non-ignored voxels and ``r_ln = 1`` when voxel ``n`` has reference label
    ``l`` (else 0), each class gets the weight

    .. math::

        w_l = \\frac{N - \\sum_n r_{ln}}{\\sum_n r_{ln}}

    and the loss is the weighted mean cross-entropy

    .. math::

        \\mathrm{WCE} = \\frac{\\sum_n v_n\\, w_{y_n} \\left(-\\log \\operatorname{softmax}(x_n)_{y_n}\\right)}
                             {\\sum_n v_n\\, w_{y_n}},

    sums over every voxel of the batch, ``v_n = 0`` on ``ignore_index`` voxels. Source: Sudre et al. 2017,
    "Generalised Dice overlap as a deep learning loss function for highly unbalanced segmentations",
    arXiv:1707.03237, Sec. 2 (two-class WCE with ``w = (N - Σ_n r_n) / Σ_n r_n``, here applied to every class).

    Why the weights come from the **reference labels**, not from the predictions:

    * stable: they do not depend on the network's current output, which early in training can put almost no
      mass on a rare class and make a prediction-based ``(N − Σp)/Σp`` explode;
    * it is the intent of the paper: rebalance classes by their frequency in the ground truth;
    * they are constants (detached): no gradient flows through the weights, so the network cannot lower the loss
      by changing its class volumes instead of its voxel-wise predictions;
    * deterministic for a given batch.

    Why a weighted mean (as ``F.cross_entropy`` with ``weight``) rather than Sudre's division by ``N``: the
    weights range from ~1 to ~N (1e6 for a 3D batch with a rare class) and change from batch to batch; dividing by
    ``Σ_n w_{y_n}`` makes the loss a mean of per-voxel CEs whatever the weights' scale, so the learning rate means
    the same on every batch, and WCE equals ``F.cross_entropy`` called with these weights.

    Edge cases (never NaN/Inf):

    * a class absent from the batch (``Σ_n r_ln = 0``) gets weight 0; it labels no voxel, so the weight is never
      used (its logits are still trained down through the softmax of the other classes' voxels);
    * a class that is the only non-ignored label of the batch (``Σ_n r_ln = N``, so ``w_l = 0``) gets weight 1:
      the loss is then the plain mean CE, which is what any positive weight gives under the weighted mean; with
      weight 0 the batch would silently contribute nothing (common for all-background patches);
    * a batch with every voxel ignored gives loss 0 with zero gradient.

    Target: class-index labels ``(B, D, H, W)`` of an integer dtype, values in ``[0, C)`` or ``ignore_index``.

    Args:
        ignore_index: label whose voxels are left out of ``N``, of the class counts and of the loss. Default
            ``None``: every voxel counts.
    """

    def __init__(self, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = _check_ignore_index(ignore_index)

    def class_weights(self, logits: Tensor, target: Tensor) -> Tensor:
        """Return the detached float32 weights ``w_l`` (length C) this loss uses for ``target``.

        Args:
            logits: network output ``(B, C, D, H, W)``; only its shape is used.
            target: class-index labels ``(B, D, H, W)``.
        """
        _check_logits(logits)
        target, valid = _class_index_target(logits, target, self.ignore_index)
        return self._weights(target, valid, logits.shape[1])

    @staticmethod
    def _weights(target: Tensor, valid: Tensor, num_classes: int) -> Tensor:
        # Counting by comparison avoids bincount/scatter_add, which are flagged non-deterministic on CUDA.
        classes = torch.arange(num_classes, device=target.device)
        one_hot = (target.reshape(-1, 1) == classes) & valid.reshape(-1, 1)
        counts = one_hot.sum(dim=0).to(torch.float32)
        total = valid.sum().to(torch.float32)
        weights = _safe_ratio(total - counts, counts)
        sole_class = (counts > 0) & (counts == total)
        weights = torch.where(sole_class, torch.ones_like(weights), weights)
        return weights.detach()

    def _loss(self, logits: Tensor, target: Tensor, voxel_weight: Tensor | None) -> Tensor:
        target, valid = _class_index_target(logits, target, self.ignore_index)
        weight = self._weights(target, valid, logits.shape[1])
        return _weighted_cross_entropy(logits, target, valid, weight, voxel_weight)


class BCELoss(_Float32Loss):
    """Binary cross-entropy on sigmoid(logits) for per-channel 0/1 masks, with channel weights and an ignore value.

    .. math::

        \\mathrm{BCE} = \\frac{1}{\\sum_{c,n} v_{cn}} \\sum_{c,n} v_{cn}\\, w_c
            \\left[-r_{cn} \\log \\sigma(x_{cn}) - (1 - r_{cn}) \\log\\left(1 - \\sigma(x_{cn})\\right)\\right]

    with ``σ`` the sigmoid, ``r`` the target, ``w_c`` the channel weight (1 without ``weight``) and ``v_cn = 0``
    where the target equals ``ignore_index``, else 1. Sums run over the batch, every channel and every voxel. The
    bracket is computed by ``F.binary_cross_entropy_with_logits`` (log-sum-exp form, stable for large ``|x|``).

    Normalisation: the mean over non-ignored elements (channel-voxel pairs) of the weighted per-element loss —
    the weight rescales elements as in ``F.binary_cross_entropy_with_logits(weight=...)``, it is **not** a
    weighted mean; with no ignored element this equals ``F.binary_cross_entropy_with_logits(x, r, weight=w_c)``.
    A batch with every element ignored gives loss 0 with zero gradient. BCE is the per-channel counterpart of the
    CE baseline of Sudre et al. 2017 (arXiv:1707.03237).

    Target: binary masks ``(B, C, D, H, W)`` (same shape as the logits), float, integer or bool dtype, values in
    ``[0, 1]`` (soft labels are accepted) or ``ignore_index``.

    Args:
        weight: per-channel weights ``w_c``, length C, non-negative with at least one positive entry. Default
            ``None``: every channel weighs 1.
        ignore_index: target value whose elements are excluded from the sum and from the count. Default ``None``:
            every element counts. Must not be 0 or 1 (those are labels); typical values are -1 or 255.
    """

    def __init__(self, weight: Sequence[float] | None = None, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = _check_ignore_index(ignore_index)
        if ignore_index in (0, 1):
            raise ValueError(
                f"ignore_index={ignore_index} collides with the binary label values 0/1; use a value outside them, "
                "e.g. -1 or 255."
            )
        self.register_buffer("weight", _weight_tensor(weight), persistent=False)

    def _loss(self, logits: Tensor, target: Tensor, voxel_weight: Tensor | None) -> Tensor:
        target, valid = _binary_target(logits, target, self.ignore_index)
        per_element = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self.weight is not None:
            weight = self.weight.float()
            _check_weight_length(weight, logits.shape[1])
            per_element = per_element * weight.view(1, -1, *([1] * (logits.dim() - 2)))
        if voxel_weight is not None:
            per_element = per_element * _voxel_weight(voxel_weight, per_element.shape)
        return _safe_ratio((valid * per_element).sum(), valid.sum())


class GeneralizedDiceLoss(_Float32Loss):
    """Generalised Dice loss (GDL) of Sudre et al. 2017 for binary or class-index targets.

    .. math::

        \\mathrm{GDL} = 1 - \\frac{2 \\sum_l w_l \\sum_n r_{ln}\\, p_{ln} + \\epsilon}
                                  {\\sum_l w_l \\sum_n (r_{ln} + p_{ln}) + \\epsilon},
        \\qquad w_l = \\frac{1}{\\left(\\sum_n r_{ln}\\right)^2}

    with ``r_ln`` the reference (one-hot of the label, or the binary mask) and ``p_ln`` the prediction of class /
    channel ``l`` at voxel ``n``; ``n`` runs over every voxel of the **whole batch** (one Dice per batch, not a
    mean of per-sample Dice). Source: Sudre et al. 2017, "Generalised Dice overlap as a deep learning loss
    function for highly unbalanced segmentations", arXiv:1707.03237, Eq. (2)–(3).

    Prediction ``p`` from the logits ``x`` by ``normalization``: ``'sigmoid'`` → ``σ(x)`` per channel (binary,
    possibly overlapping masks); ``'softmax'`` → softmax over the channel dimension (mutually exclusive classes,
    needs C ≥ 2); ``'none'`` → ``x`` used as is (the caller already passes probabilities in [0, 1]).

    Weights. ``w_l`` is computed in float32 from the reference only and detached (no gradient through it). An
    empty class (``Σ_n r_ln = 0``) would get ``w_l = ∞``; it gets the **largest finite weight of the batch**
    instead, so its false positives (``p_ln`` in the denominator) are still penalised as strongly as those of the
    rarest present class, and neither the loss nor its gradient can be NaN/Inf. If every class is empty, every
    weight is 1. The weights are then divided by their maximum; GDL (without ε) is a ratio of two sums linear in
    ``w``, so this rescaling leaves it unchanged, while keeping the sums of the order of a voxel count so that ε is
    a negligible smoothing term rather than competing with ``1/count²``-sized weighted sums.

    ``epsilon`` enters numerator and denominator as written above: it keeps the ratio defined when both sums are 0
    (every class empty and nothing predicted, or every voxel ignored), where the loss is then 0.

    Ignored voxels (``target == ignore_index``) are zeroed in both ``r`` and ``p`` before the sums, so they change
    neither the weights nor the loss and receive no gradient. For class-index targets the one-hot is built with the
    ignored voxels mapped to a valid label first, so the ignore value (e.g. 255 or -1) never reaches one-hot.

    Target: class-index labels ``(B, D, H, W)`` (integer dtype, values in ``[0, C)`` or ``ignore_index``) or binary
    masks ``(B, C, D, H, W)`` (same shape as the logits, values in ``[0, 1]`` or ``ignore_index``).

    Args:
        normalization: ``'sigmoid'`` (default), ``'softmax'`` or ``'none'``, see above.
        epsilon: smoothing term ε > 0 added to numerator and denominator. Default ``1e-6``.
        ignore_index: target value whose voxels are excluded. Default ``None``: every voxel counts. With binary
            targets it must not be 0 or 1.
    """

    def __init__(self, normalization: str = "sigmoid", epsilon: float = 1e-6, ignore_index: int | None = None) -> None:
        super().__init__()
        if normalization not in _NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}.")
        if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be a finite number > 0 (it keeps 0/0 defined), got {epsilon!r}.")
        self.normalization = normalization
        self.epsilon = float(epsilon)
        self.ignore_index = _check_ignore_index(ignore_index)

    takes_voxel_weight = False

    def _loss(self, logits: Tensor, target: Tensor, voxel_weight: Tensor | None) -> Tensor:
        num_classes = logits.shape[1]
        if self.normalization == "softmax" and num_classes < 2:
            raise ValueError(
                "normalization='softmax' over a single channel is the constant 1; use 'sigmoid' for one channel."
            )
        if target.dim() == logits.dim() - 1:
            labels, valid = _class_index_target(logits, target, self.ignore_index)
            classes = torch.arange(num_classes, device=labels.device).view(1, -1, *([1] * (labels.dim() - 1)))
            valid = valid.unsqueeze(1).to(torch.float32)
            reference = (labels.unsqueeze(1) == classes).to(torch.float32) * valid
        elif target.dim() == logits.dim():
            reference, valid = _binary_target(logits, target, self.ignore_index)
        else:
            raise ValueError(
                f"target must be class-index {(logits.shape[0], *logits.shape[2:])} or binary "
                f"{tuple(logits.shape)} for logits {tuple(logits.shape)}, got {tuple(target.shape)}."
            )

        if self.normalization == "sigmoid":
            prediction = torch.sigmoid(logits)
        elif self.normalization == "softmax":
            prediction = torch.softmax(logits, dim=1)
        else:
            prediction = logits
        prediction = prediction * valid

        sum_dims = [0, *range(2, logits.dim())]
        intersection = (reference * prediction).sum(dim=sum_dims)
        total = (reference + prediction).sum(dim=sum_dims)
        weights = self._weights(reference.sum(dim=sum_dims))

        numerator = 2.0 * (weights * intersection).sum() + self.epsilon
        denominator = (weights * total).sum() + self.epsilon
        return 1.0 - numerator / denominator

    @staticmethod
    def _weights(counts: Tensor) -> Tensor:
        counts = counts.detach().to(torch.float32)
        present = counts > 0
        if not bool(present.any()):
            return torch.ones_like(counts)
        # w_l / max_l w_l = (min present count / count_l)^2, computed as a ratio so it never under/overflows; the
        # empty classes take the largest finite weight, which is 1 after this normalisation.
        smallest = counts[present].min()
        safe_counts = torch.where(present, counts, torch.ones_like(counts))
        return torch.where(present, (smallest / safe_counts) ** 2, torch.ones_like(counts))


class BCEDiceLoss(_Float32Loss):
    """``alpha · BCE + beta · GDL`` with sigmoid, for binary per-channel masks.

    .. math::

        \\mathcal{L} = \\alpha\\, \\mathrm{BCE}(x, r) + \\beta\\, \\mathrm{GDL}_{\\sigma}(x, r)

    ``BCE`` is :class:`BCELoss` (per-channel ``weight``, mean over non-ignored elements) and ``GDL_σ`` is
    :class:`GeneralizedDiceLoss` with ``normalization='sigmoid'`` and its default ε; both see the same
    ``ignore_index``. The voxel-wise BCE gives well-scaled gradients early in training, the batch-level GDL of
    Sudre et al. 2017 (arXiv:1707.03237) counters class imbalance.

    Target: binary masks ``(B, C, D, H, W)``, values in ``[0, 1]`` or ``ignore_index``.

    Args:
        alpha: factor of the BCE term, finite and ≥ 0. Default ``1.0``.
        beta: factor of the GDL term, finite and ≥ 0. Default ``1.0``.
        weight: per-channel BCE weights, length C (see :class:`BCELoss`); the GDL term is not weighted by it.
            Default ``None``. Per-voxel weights passed to ``forward`` likewise weight the BCE term only.
        ignore_index: target value excluded from both terms; must not be 0 or 1. Default ``None``.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        weight: Sequence[float] | None = None,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.bce = BCELoss(weight=weight, ignore_index=ignore_index)
        self.dice = GeneralizedDiceLoss(normalization="sigmoid", ignore_index=ignore_index)

    def _loss(self, logits: Tensor, target: Tensor, voxel_weight: Tensor | None) -> Tensor:
        # Per-voxel weights apply to the BCE term; the Dice term is a ratio of class volumes.
        return self.alpha * self.bce(logits, target, voxel_weight) + self.beta * self.dice(logits, target)


# ---------------------------------------------------------------------------------------------------------------
# Regression losses (float targets, no final activation)
# ---------------------------------------------------------------------------------------------------------------


def _regression_target(prediction: Tensor, target: Tensor) -> Tensor:
    """A float target of the prediction's shape ``(B, C, ...)``; a ``(B, ...)`` target is taken for ``C == 1``."""
    if target.dim() == prediction.dim() - 1 and prediction.shape[1] == 1:
        target = target.unsqueeze(1)
    if tuple(target.shape) != tuple(prediction.shape):
        raise ValueError(
            f"regression target must have the output's shape {tuple(prediction.shape)} (one target channel per "
            f"output channel), got {tuple(target.shape)}."
        )
    if target.is_complex():
        raise ValueError(f"regression target must be real, got dtype {target.dtype}.")
    return target.float()


def regression_loss(
    prediction: Tensor,
    target: Tensor,
    kind: str = "mse",
    *,
    weight: Tensor | Sequence[float] | None = None,
    ignore_index: float | None = None,
    voxel_weight: Tensor | None = None,
    beta: float = 1.0,
) -> Tensor:
    """Weighted mean of an element-wise regression loss, the functional core of :class:`MSELoss`, :class:`L1Loss`
    and :class:`SmoothL1Loss`.

    .. math::

        \\mathcal{L} = \\frac{\\sum_{c,n} v_{cn}\\, w_c\\, m_{cn}\\, \\ell(x_{cn} - y_{cn})}
                            {\\sum_{c,n} v_{cn}\\, w_c\\, m_{cn}}

    over every channel ``c`` and voxel ``n`` of the batch, with ``x`` the network output (no activation), ``y`` the
    target, ``w_c`` the channel weights, ``m`` the per-voxel weights (each 1 when not given) and ``v_cn = 0`` where
    the target equals ``ignore_index`` (else 1). The element loss ``ℓ(d)`` is

    * ``"mse"``: ``d²`` (squared error; with no weights and nothing ignored, ``F.mse_loss``);
    * ``"l1"``: ``|d|`` (absolute error, ``F.l1_loss``);
    * ``"smooth_l1"``: ``0.5 d² / β`` for ``|d| < β``, else ``|d| − 0.5 β`` (Girshick, "Fast R-CNN", ICCV 2015,
      Eq. 3, with the transition point ``β`` of ``F.smooth_l1_loss``; for ``β = 1`` it is the Huber loss).

    A weighted *mean*: the weights' scale does not change the loss, only their ratios; a voxel of weight 2 counts as
    two voxels of weight 1. A batch whose weights are all 0 (or whose every element is ignored) gives 0 with zero
    gradient rather than NaN.

    Args:
        prediction: network output ``(B, C, D, H, W)`` (or any ``(B, C, ...)``), float.
        target: float target of the same shape; ``(B, D, H, W)`` is accepted when ``C == 1``.
        kind: ``"mse"``, ``"l1"`` or ``"smooth_l1"``. Default ``"mse"``.
        weight: per-channel weights ``w_c``, length C, non-negative. Default None (all 1).
        ignore_index: target value whose elements are left out (e.g. ``-1`` marking voxels without a clean
            target); compared exactly, so store it exactly (any integer up to 2^24 is exact in float32). Default
            None: every element counts.
        voxel_weight: non-negative per-voxel weights ``(B, D, H, W)`` (every channel) or ``(B, C, D, H, W)``.
            Default None.
        beta: the ``smooth_l1`` transition point, > 0. Default 1.0 (``F.smooth_l1_loss``'s).

    Returns:
        float32 scalar.

    Raises:
        ValueError: an unknown ``kind``, shapes that do not match, non-finite target values, a bad ``beta``.
    """
    if kind not in REGRESSION_LOSS_NAMES:
        raise ValueError(f"kind must be one of {', '.join(REGRESSION_LOSS_NAMES)}, got {kind!r}.")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}.")
    _check_logits(prediction)
    target = _regression_target(prediction, target)
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    # Ignored elements may hold anything; the values that count must be finite, or the mean is NaN.
    safe = torch.where(valid, target, prediction.detach().to(target.dtype))
    if safe.numel() and not bool(torch.isfinite(safe).all()):
        raise ValueError(
            "regression target contains NaN or Inf; clean the target or mark such voxels with ignore_index."
        )
    prediction = prediction.float()
    if kind == "mse":
        per_element = F.mse_loss(prediction, safe, reduction="none")
    elif kind == "l1":
        per_element = F.l1_loss(prediction, safe, reduction="none")
    else:
        per_element = F.smooth_l1_loss(prediction, safe, reduction="none", beta=float(beta))
    factor = valid.to(torch.float32)
    weights = _weight_tensor(weight) if weight is not None and not isinstance(weight, Tensor) else weight
    if weights is not None:
        weights = weights.float().to(prediction.device)
        _check_weight_length(weights, prediction.shape[1])
        factor = factor * weights.view(1, -1, *([1] * (prediction.dim() - 2)))
    if voxel_weight is not None:
        factor = factor * _voxel_weight(voxel_weight.to(prediction.device), per_element.shape)
    return _safe_ratio((factor * per_element).sum(), factor.sum())


class _RegressionLoss(_Float32Loss):
    """A regression loss module over :func:`regression_loss`; ``kind`` names the element loss."""

    kind = "mse"

    def __init__(self, weight: Sequence[float] | None = None, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = _check_ignore_index(ignore_index)
        # Not persistent, as the class weights of the segmentation losses: configuration, not state.
        self.register_buffer("weight", _weight_tensor(weight), persistent=False)

    def _loss(self, logits: Tensor, target: Tensor, voxel_weight: Tensor | None) -> Tensor:
        return regression_loss(
            logits, target, self.kind, weight=self.weight, ignore_index=self.ignore_index, voxel_weight=voxel_weight,
            **self._options(),
        )

    def _options(self) -> dict[str, float]:
        return {}


class MSELoss(_RegressionLoss):
    """Mean squared error of the raw network output against a float target (denoising, restoration).

    .. math::

        \\mathrm{MSE} = \\frac{\\sum_{c,n} v_{cn} w_c m_{cn} (x_{cn} - y_{cn})^2}{\\sum_{c,n} v_{cn} w_c m_{cn}}

    see :func:`regression_loss` for the symbols; without weights and ignored elements it equals ``F.mse_loss``.
    The loss of pytorch-3dunet's ``MSELoss`` regression models.

    Target: float ``(B, C, D, H, W)`` of the output's shape (``(B, D, H, W)`` for one channel).

    Args:
        weight: per-channel weights, length C, non-negative. Default None (all 1).
        ignore_index: target value whose elements are left out. Default None.
    """

    kind = "mse"


class L1Loss(_RegressionLoss):
    """Mean absolute error of the raw network output against a float target.

    .. math::

        \\mathrm{L1} = \\frac{\\sum_{c,n} v_{cn} w_c m_{cn} |x_{cn} - y_{cn}|}{\\sum_{c,n} v_{cn} w_c m_{cn}}

    see :func:`regression_loss`; without weights and ignored elements it equals ``F.l1_loss``. Less swayed by
    outliers than MSE (its minimiser is the median, not the mean, of the noisy targets).

    Args:
        weight: per-channel weights, length C, non-negative. Default None (all 1).
        ignore_index: target value whose elements are left out. Default None.
    """

    kind = "l1"


class SmoothL1Loss(_RegressionLoss):
    """Smooth L1 (Huber) loss of the raw network output against a float target (Girshick, "Fast R-CNN", ICCV 2015).

    .. math::

        \\ell(d) = \\begin{cases} 0.5\\, d^2 / \\beta & |d| < \\beta \\\\
                              |d| - 0.5\\, \\beta & \\text{otherwise}\\end{cases}

    averaged as in :func:`regression_loss`; without weights and ignored elements it equals
    ``F.smooth_l1_loss(x, y, beta=beta)``: quadratic for small errors, linear (robust) for large ones.

    Args:
        weight: per-channel weights, length C, non-negative. Default None (all 1).
        ignore_index: target value whose elements are left out. Default None.
        beta: transition point between the quadratic and the linear part, > 0. Default 1.0 (torch's and
            pytorch-3dunet's ``SmoothL1Loss``).
    """

    kind = "smooth_l1"

    def __init__(
        self, weight: Sequence[float] | None = None, ignore_index: int | None = None, beta: float = 1.0
    ) -> None:
        super().__init__(weight=weight, ignore_index=ignore_index)
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}.")
        self.beta = float(beta)

    def _options(self) -> dict[str, float]:
        return {"beta": self.beta}


# ---------------------------------------------------------------------------------------------------------------
# Factory and final activation
# ---------------------------------------------------------------------------------------------------------------


def _check_name(name: str, multiclass: bool) -> None:
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}.")
    if name in REGRESSION_LOSS_NAMES:
        if multiclass:
            raise ValueError(
                f"loss {name!r} is a regression loss for float targets, not for class-index labels; use 'ce', 'wce' "
                "or 'dice' for 3D class-index labels."
            )
        return
    if not multiclass and name in _MULTICLASS_ONLY:
        raise ValueError(
            f"loss {name!r} needs class-index labels (3D label volume); use 'bce', 'dice' or 'bce_dice' for 4D "
            "binary labels."
        )
    if multiclass and name in _BINARY_ONLY:
        raise ValueError(
            f"loss {name!r} needs binary per-channel labels (4D label volume); use 'ce', 'wce' or 'dice' for 3D "
            "class-index labels."
        )


def create_loss(
    name: str,
    *,
    multiclass: bool,
    weight: Sequence[float] | None = None,
    ignore_index: int | None = None,
    out_channels: int | None = None,
) -> nn.Module:
    """Build the loss called ``name`` for the label kind of the data.

    ============  ==============================================  ===============  ================
    ``name``      loss                                            labels           final activation
    ============  ==============================================  ===============  ================
    ``ce``        :class:`CrossEntropyLoss`                       class-index      softmax
    ``wce``       :class:`WeightedCrossEntropyLoss`               class-index      softmax
    ``bce``       :class:`BCELoss`                                binary           sigmoid
    ``dice``      :class:`GeneralizedDiceLoss` (softmax/sigmoid)  either           softmax/sigmoid
    ``bce_dice``  :class:`BCEDiceLoss`                            binary           sigmoid
    ``mse``       :class:`MSELoss`                                float target     none
    ``l1``        :class:`L1Loss`                                 float target     none
    ``smooth_l1`` :class:`SmoothL1Loss`                           float target     none
    ============  ==============================================  ===============  ================

    Args:
        name: one of :data:`LOSS_NAMES`.
        multiclass: ``True`` for class-index labels (one 3D label volume per sample, softmax over classes);
            ``False`` for binary per-channel masks (one 4D volume ``(C, D, H, W)`` per sample, sigmoid) and for the
            float targets of the regression losses (which refuse ``True``). Selects ``'softmax'`` or ``'sigmoid'``
            normalisation for ``dice`` and rules out mismatched losses.
        weight: per-class (ce) or per-channel (bce, bce_dice, mse, l1, smooth_l1) weights, non-negative. Default
            ``None``. Rejected
            for ``wce`` (weights come from the batch) and ``dice`` (weights come from the class volumes).
        ignore_index: label value excluded from the loss. Default ``None``. For binary labels it must not be 0 or 1;
            for regression targets any value (compared exactly with the target).
        out_channels: number of network output channels; when given, ``weight`` must have this length and
            multiclass losses need at least 2 channels. Default ``None``: checked at the first forward instead.

    Returns:
        The loss module, taking ``(logits, target)``.

    Raises:
        ValueError: unknown ``name``, a loss that does not fit the label kind, ``weight`` given to a loss that
            does not use it, a ``weight`` of the wrong length or with negative entries, an ``ignore_index`` that
            collides with binary labels.
    """
    _check_name(name, multiclass)
    weight_tensor = _weight_tensor(weight)
    if weight_tensor is not None and name not in _USES_WEIGHT:
        raise ValueError(
            f"loss {name!r} computes its own class weights and takes no weight; drop "
            f"weight={weight_tensor.tolist()} or use 'ce', 'bce' or 'bce_dice'."
        )
    if out_channels is not None:
        if multiclass and out_channels < 2:
            raise ValueError(
                f"class-index labels need out_channels >= 2 (one per class, background included), got {out_channels}."
            )
        if weight_tensor is not None and weight_tensor.numel() != out_channels:
            raise ValueError(
                f"weight has {weight_tensor.numel()} entries but out_channels={out_channels}; give one weight per "
                "output channel."
            )
    _check_ignore_index(ignore_index)
    if name in REGRESSION_LOSS_NAMES:
        return {"mse": MSELoss, "l1": L1Loss, "smooth_l1": SmoothL1Loss}[name](weight=weight, ignore_index=ignore_index)
    if not multiclass and ignore_index in (0, 1):
        raise ValueError(
            f"ignore_index={ignore_index} collides with the binary label values 0/1; use a value outside them, "
            "e.g. -1 or 255."
        )

    if name == "ce":
        return CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
    if name == "wce":
        return WeightedCrossEntropyLoss(ignore_index=ignore_index)
    if name == "bce":
        return BCELoss(weight=weight, ignore_index=ignore_index)
    if name == "dice":
        normalization = "softmax" if multiclass else "sigmoid"
        return GeneralizedDiceLoss(normalization=normalization, ignore_index=ignore_index)
    return BCEDiceLoss(weight=weight, ignore_index=ignore_index)


def final_activation_name(name: str, *, multiclass: bool) -> str:
    """Return the activation (``'softmax'``, ``'sigmoid'`` or ``'none'``) that turns logits into the probabilities
    ``name`` models, or, for regression losses, ``'none'``: their output is used as it is.

    ``ce``/``wce`` → ``'softmax'``; ``bce``/``bce_dice`` → ``'sigmoid'``; ``dice`` → ``'softmax'`` if
    ``multiclass`` else ``'sigmoid'``; ``mse``/``l1``/``smooth_l1`` → ``'none'``.

    Args:
        name: one of :data:`LOSS_NAMES`.
        multiclass: ``True`` for class-index labels, ``False`` for binary per-channel masks.

    Raises:
        ValueError: unknown ``name`` or a loss that does not fit the label kind (as :func:`create_loss`).
    """
    _check_name(name, multiclass)
    if name in REGRESSION_LOSS_NAMES:
        return "none"
    if name in _MULTICLASS_ONLY:
        return "softmax"
    if name in _BINARY_ONLY:
        return "sigmoid"
    return "softmax" if multiclass else "sigmoid"


def apply_final_activation(logits: Tensor, activation: str) -> Tensor:
    """Apply ``activation`` to ``logits`` in float32 (autocast disabled) and return a float32 tensor.

    Args:
        logits: network output ``(B, C, ...)`` of any float dtype.
        activation: ``'softmax'`` (over dim 1, the channels), ``'sigmoid'`` (element-wise) or ``'none'`` (the
            logits as they are, in float32: regression outputs).

    Raises:
        ValueError: ``activation`` is not ``'softmax'``, ``'sigmoid'`` or ``'none'``.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be 'softmax', 'sigmoid' or 'none', got {activation!r}.")
    with _autocast_off(logits.device):
        logits = logits.float()
        if activation == "none":
            return logits
        if activation == "softmax":
            return torch.softmax(logits, dim=1)
        return torch.sigmoid(logits)
