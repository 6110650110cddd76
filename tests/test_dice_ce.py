"""Tests of the nnU-Net Dice + cross-entropy loss (``model.loss: dice_ce``).

Expected values come from a hand-worked case, from MONAI's ``DiceCELoss`` (the oracle, configured as nnU-Net:
softmax, batch Dice, background excluded) and from the formula written with plain torch ops — never from the code
under test.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from unet3d_lightning.losses import DiceCELoss, create_loss, final_activation_name
from unet3d_lightning.module import UNet3DModule

LN2 = math.log(2.0)


def _reference(logits, labels, weight=None, valid=None, eps=1e-5):
    """CE (weighted mean over valid voxels) + 1 - mean over classes 1.. of the batch soft Dice, plain torch."""
    if valid is None:
        valid = torch.ones_like(labels, dtype=torch.bool)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    w = torch.ones(logits.shape[1]) if weight is None else torch.tensor(weight)
    per_voxel = -torch.log_softmax(logits, 1).gather(1, safe.unsqueeze(1)).squeeze(1)
    factor = valid.float() * w[safe]
    ce = (factor * per_voxel).sum() / factor.sum()
    p = torch.softmax(logits, 1) * valid.unsqueeze(1)
    r = F.one_hot(safe, logits.shape[1]).movedim(-1, 1).float() * valid.unsqueeze(1)
    dims = [0, 2, 3, 4]
    dice = (2 * (p * r).sum(dims) + eps) / ((p + r).sum(dims) + eps)
    return ce + 1 - dice[1:].mean()


def test_dice_ce_hand_worked():
    # Two voxels, two classes. Voxel 0: logits (0, 0) -> p = (1/2, 1/2), label 1; voxel 1: logits (0, ln 3) ->
    # p = (1/4, 3/4), label 0. CE = (ln 2 + ln 4) / 2 = 1.5 ln 2. Class 1 (class 0 is excluded): intersection 1/2,
    # Σp + Σr = 5/4 + 1 = 9/4, Dice = (1 + ε) / (9/4 + ε) ≈ 4/9. Loss = 1.5 ln 2 + 5/9.
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]]).view(1, 2, 1, 1, 2)
    labels = torch.tensor([1, 0]).view(1, 1, 1, 2)
    assert DiceCELoss()(logits, labels).item() == pytest.approx(1.5 * LN2 + 5 / 9, abs=1e-5)
    assert DiceCELoss(alpha=2.0, beta=0.5)(logits, labels).item() == pytest.approx(3 * LN2 + 5 / 18, abs=1e-5)


def test_dice_ce_equals_monai():
    monai = pytest.importorskip("monai.losses")
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 3, 5, 6, generator=g) * 2
    labels = torch.randint(0, 4, (2, 3, 5, 6), generator=g)
    oracle = monai.DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                              smooth_nr=1e-5, smooth_dr=1e-5)
    expected = oracle(logits, labels.unsqueeze(1))
    torch.testing.assert_close(DiceCELoss()(logits, labels), expected, rtol=1e-5, atol=1e-6)


def test_dice_ce_ignore_index_and_weights():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 2, 4, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 2, 4, 4), generator=g)
    labels[0, 0] = 255
    loss = DiceCELoss(weight=[1.0, 2.0, 0.5], ignore_index=255)(logits, labels)
    expected = _reference(logits.detach(), labels.clamp(max=2), weight=[1.0, 2.0, 0.5], valid=labels != 255)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    # Ignored voxels get no gradient, from either term.
    assert float(logits.grad[0, :, 0].abs().max()) == 0.0 and float(logits.grad.abs().sum()) > 0


def test_dice_ce_weights_only_the_ce_term_and_takes_voxel_weights():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 3, 2, 3, 4, generator=g)
    labels = torch.randint(0, 3, (1, 2, 3, 4), generator=g)
    plain = _reference(logits, labels)
    weighted = _reference(logits, labels, weight=[3.0, 1.0, 1.0])
    assert not torch.isclose(plain, weighted)
    torch.testing.assert_close(DiceCELoss(weight=[3.0, 1.0, 1.0])(logits, labels), weighted, rtol=1e-5, atol=1e-6)
    # Voxel weights of 1 everywhere change nothing; zero weights on half the voxels change only the CE term.
    ones = torch.ones(1, 2, 3, 4)
    torch.testing.assert_close(DiceCELoss()(logits, labels, ones), plain, rtol=1e-5, atol=1e-6)


def test_dice_ce_absent_class_and_all_ignored_are_finite():
    logits = torch.zeros(1, 3, 1, 1, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1]).view(1, 1, 1, 4)  # class 2 absent but predicted with p = 1/3
    loss = DiceCELoss()(logits, labels)
    # class 1: I = 2/3, S = 4/3 + 2 = 10/3 -> 2/5; class 2: I = 0, S = 4/3 -> ~0. CE = ln 3.
    assert loss.item() == pytest.approx(math.log(3.0) + 1 - (0.4 + 1e-5 / (4 / 3 + 1e-5)) / 2, abs=1e-5)
    everything_ignored = DiceCELoss(ignore_index=7)(logits, torch.full((1, 1, 1, 4), 7))
    assert torch.isfinite(everything_ignored)
    everything_ignored.backward()
    assert torch.isfinite(logits.grad).all()


def test_dice_ce_factory_and_module():
    loss = create_loss("dice_ce", multiclass=True, weight=[1.0, 2.0], ignore_index=255, out_channels=2)
    assert isinstance(loss, DiceCELoss) and loss.ce.weight.tolist() == [1.0, 2.0] and loss.ignore_index == 255
    assert final_activation_name("dice_ce", multiclass=True) == "softmax"
    with pytest.raises(ValueError, match="needs class-index labels"):
        create_loss("dice_ce", multiclass=False)
    module = UNet3DModule(out_channels=3, f_maps=4, num_levels=2, num_groups=2, loss="dice_ce")
    assert module.multiclass is True and isinstance(module.loss_fn, DiceCELoss)
    with pytest.raises(ValueError, match="at least 2 output channels"):
        DiceCELoss()(torch.zeros(1, 1, 1, 1, 2), torch.zeros(1, 1, 1, 2, dtype=torch.long))
