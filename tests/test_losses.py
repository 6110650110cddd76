"""Tests for unet3d_lightning.losses.

Expected values come from hand-worked tensors (literals derived on paper), from the formulas of Sudre et al. 2017
written with plain torch ops here, or from torch's own functional losses — never from the code under test.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from unet3d_lightning.losses import (
    LOSS_NAMES,
    BCEDiceLoss,
    BCELoss,
    CrossEntropyLoss,
    GeneralizedDiceLoss,
    WeightedCrossEntropyLoss,
    apply_final_activation,
    create_loss,
    final_activation_name,
)

LN2 = math.log(2.0)
LN3 = math.log(3.0)


def _logits(*values_per_channel):
    """Build (1, C, 1, 1, N) logits from C lists of N voxel values."""
    return torch.tensor(values_per_channel, dtype=torch.float32).view(1, len(values_per_channel), 1, 1, -1)


def _labels(*values):
    return torch.tensor(values, dtype=torch.int64).view(1, 1, 1, -1)


def _masks(*values_per_channel):
    return torch.tensor(values_per_channel, dtype=torch.float32).view(1, len(values_per_channel), 1, 1, -1)


def _gdl_reference(r, p):
    """Sudre et al. 2017 Eq. (2): 1 - 2 Σ_l w_l Σ_n r p / Σ_l w_l Σ_n (r + p), w_l = 1 / (Σ_n r)^2, whole batch."""
    dims = [0, *range(2, r.dim())]
    w = 1.0 / r.sum(dims) ** 2
    return 1.0 - 2.0 * (w * (r * p).sum(dims)).sum() / (w * (r + p).sum(dims)).sum()


def _one_hot(labels, num_classes):
    return F.one_hot(labels, num_classes).permute(0, 4, 1, 2, 3).float()


def _random_labels(shape, num_classes, generator):
    labels = torch.randint(0, num_classes, shape, generator=generator)
    labels.view(-1)[:num_classes] = torch.arange(num_classes)  # every class present
    return labels


def _random_masks(shape, generator):
    masks = (torch.rand(shape, generator=generator) > 0.7).float()
    masks[:, :, 0, 0, 0] = 1.0  # every channel non-empty
    return masks


# ---------------------------------------------------------------------------------------------------------------
# Hand-worked values
# ---------------------------------------------------------------------------------------------------------------


def test_ce_hand_worked():
    # voxel 0: logits (0, 0), label 0 -> -log(1/2) = ln 2; voxel 1: logits (ln 3, 0), label 1 -> -log(1/4) = 2 ln 2.
    logits = _logits([0.0, LN3], [0.0, 0.0])
    target = _labels(0, 1)
    assert CrossEntropyLoss()(logits, target).item() == pytest.approx(1.5 * LN2, rel=1e-6)
    # weights (1, 3): (1 * ln2 + 3 * 2 ln2) / (1 + 3) = 7/4 ln 2.
    assert CrossEntropyLoss(weight=[1.0, 3.0])(logits, target).item() == pytest.approx(1.75 * LN2, rel=1e-6)
    # ignoring label 1 leaves voxel 0 only.
    assert CrossEntropyLoss(ignore_index=1)(logits, target).item() == pytest.approx(LN2, rel=1e-6)


def test_wce_hand_worked():
    # labels (0, 0, 1): N = 3, w0 = (3 - 2) / 2 = 1/2, w1 = (3 - 1) / 1 = 2.
    # per-voxel CE: ln 2, -log(3/4) = 2 ln2 - ln3, -log(1/4) = 2 ln 2.
    # WCE = (1/2 ln2 + 1/2 (2 ln2 - ln3) + 2 * 2 ln2) / (1/2 + 1/2 + 2) = (5.5 ln2 - 0.5 ln3) / 3.
    logits = _logits([0.0, LN3, LN3], [0.0, 0.0, 0.0])
    target = _labels(0, 0, 1)
    expected = (5.5 * LN2 - 0.5 * LN3) / 3.0
    assert WeightedCrossEntropyLoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)
    weights = WeightedCrossEntropyLoss().class_weights(logits, target)
    assert weights.tolist() == pytest.approx([0.5, 2.0])
    assert not weights.requires_grad


def test_bce_hand_worked():
    # x = (0, ln 3), r = (1, 0): -log(1/2) = ln 2 and -log(1 - 3/4) = 2 ln 2; mean 1.5 ln 2.
    logits = _logits([0.0, LN3])
    target = _masks([1.0, 0.0])
    assert BCELoss()(logits, target).item() == pytest.approx(1.5 * LN2, rel=1e-6)
    # channel weight 2 rescales every element; mean over elements -> 3 ln 2.
    assert BCELoss(weight=[2.0])(logits, target).item() == pytest.approx(3.0 * LN2, rel=1e-6)
    # a third voxel marked 255 is excluded from sum and count.
    logits3 = _logits([0.0, LN3, 7.0])
    target3 = _masks([1.0, 0.0, 255.0])
    assert BCELoss(ignore_index=255)(logits3, target3).item() == pytest.approx(1.5 * LN2, rel=1e-6)


def test_bce_two_channel_weights_hand_worked():
    # channel 0: x = 0, r = 1 -> ln 2; channel 1: x = ln 3, r = 0 -> 2 ln 2. weights (1, 3):
    # (1 * ln 2 + 3 * 2 ln 2) / 2 elements = 3.5 ln 2.
    logits = _logits([0.0], [LN3])
    target = _masks([1.0], [0.0])
    assert BCELoss(weight=[1.0, 3.0])(logits, target).item() == pytest.approx(3.5 * LN2, rel=1e-6)


def test_gdl_hand_worked_none_normalization():
    # channel A: r = (1,0,0,0), p = (.5,0,0,0): count 1, w = 1, I = .5, S = 1.5
    # channel B: r = (1,1,0,0), p = (1,1,1,1):  count 2, w = 1/4, I = 2, S = 6
    # GDL = 1 - 2 (1 * .5 + .25 * 2) / (1 * 1.5 + .25 * 6) = 1 - 2 / 3 = 1/3.
    p = _logits([0.5, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0])
    r = _masks([1, 0, 0, 0], [1, 1, 0, 0])
    assert GeneralizedDiceLoss(normalization="none")(p, r).item() == pytest.approx(1.0 / 3.0, abs=1e-6)


def test_gdl_hand_worked_sigmoid():
    # logits (0, ln3, -ln3) -> p = (1/2, 3/4, 1/4); r = (1, 1, 0): I = 1.25, S = 2 + 1.5 = 3.5 -> 1 - 2.5/3.5 = 2/7.
    logits = _logits([0.0, LN3, -LN3])
    target = _masks([1, 1, 0])
    assert GeneralizedDiceLoss("sigmoid")(logits, target).item() == pytest.approx(2.0 / 7.0, abs=1e-6)


def test_gdl_empty_channel_takes_largest_finite_weight():
    # channel A: r = (1, 0), p = (.5, .5): w = 1, I = .5, S = 2. channel B empty: r = (0, 0), p = (.5, .5),
    # weight -> largest finite weight = 1, I = 0, S = 1. GDL = 1 - 2 * .5 / 3 = 2/3.
    logits = _logits([0.0, 0.0], [0.0, 0.0])
    target = _masks([1, 0], [0, 0])
    assert GeneralizedDiceLoss("sigmoid")(logits, target).item() == pytest.approx(2.0 / 3.0, abs=1e-6)


def test_gdl_class_index_softmax_hand_worked():
    # two classes, logits 0 -> p = 1/2 everywhere; labels (0, 0): class 0 count 2, w = 1/4, I = 1, S = 3;
    # class 1 empty -> w = 1/4 (largest finite), I = 0, S = 1. GDL = 1 - 2 * .25 / (.75 + .25) = 1/2.
    logits = _logits([0.0, 0.0], [0.0, 0.0])
    target = _labels(0, 0)
    assert GeneralizedDiceLoss("softmax")(logits, target).item() == pytest.approx(0.5, abs=1e-6)


def test_bce_dice_hand_worked():
    # logits (0, ln3, -ln3), r = (1, 1, 0): BCE = (ln 2 + 2 * log(4/3)) / 3, GDL = 2/7 (see above).
    logits = _logits([0.0, LN3, -LN3])
    target = _masks([1, 1, 0])
    bce = (LN2 + 2.0 * math.log(4.0 / 3.0)) / 3.0
    assert BCEDiceLoss()(logits, target).item() == pytest.approx(bce + 2.0 / 7.0, abs=1e-6)
    assert BCEDiceLoss(alpha=0.5, beta=2.0)(logits, target).item() == pytest.approx(0.5 * bce + 4.0 / 7.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Against formulas and torch's functional losses on random inputs
# ---------------------------------------------------------------------------------------------------------------


def test_gdl_matches_formula_binary_sigmoid():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6, generator=g) * 2
    target = _random_masks((2, 3, 4, 5, 6), g)
    expected = _gdl_reference(target, torch.sigmoid(logits))
    actual = GeneralizedDiceLoss("sigmoid")(logits, target)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_gdl_matches_formula_class_index_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 4, 5, 6, generator=g) * 2
    target = _random_labels((2, 4, 5, 6), 4, g)
    expected = _gdl_reference(_one_hot(target, 4), torch.softmax(logits, dim=1))
    actual = GeneralizedDiceLoss("softmax")(logits, target)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_gdl_sums_over_whole_batch_not_per_sample():
    # the two samples have very different class volumes; a per-sample mean would differ from the batch formula.
    logits = torch.zeros(2, 1, 1, 1, 4)
    target = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 1, 0]]).view(2, 1, 1, 1, 4)
    # batch: r sum 4, p = 1/2 everywhere: I = 2, S = 4 + 4 = 8 -> 1 - 4/8 = 1/2.
    assert GeneralizedDiceLoss("sigmoid")(logits, target).item() == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("weight", [None, [0.2, 1.0, 3.0]])
@pytest.mark.parametrize("ignore_index", [None, -1, 1])
def test_ce_equals_torch_cross_entropy(weight, ignore_index):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 3, 4, 5, generator=g)
    target = torch.randint(0, 3, (2, 3, 4, 5), generator=g)
    if ignore_index == -1:
        target[torch.rand(target.shape, generator=g) < 0.3] = -1
    kwargs = {} if ignore_index is None else {"ignore_index": ignore_index}
    w = None if weight is None else torch.tensor(weight)
    expected = F.cross_entropy(logits, target, weight=w, **kwargs)
    actual = CrossEntropyLoss(weight=weight, ignore_index=ignore_index)(logits, target)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_wce_equals_cross_entropy_with_label_frequency_weights():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, 4, 4, generator=g)
    target = torch.randint(0, 3, (2, 4, 4, 4), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    valid = target != 255
    n = valid.sum().float()
    counts = torch.stack([(target == c).sum() for c in range(3)]).float()
    w = (n - counts) / counts
    expected = F.cross_entropy(logits, target, weight=w, ignore_index=255)
    actual = WeightedCrossEntropyLoss(ignore_index=255)(logits, target)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight", [None, [0.5, 2.0]])
def test_bce_equals_torch_bce_on_non_ignored_voxels(weight):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 2, 3, 4, 5, generator=g) * 3
    target = (torch.rand(2, 2, 3, 4, 5, generator=g) > 0.5).float()
    ignored = torch.rand(target.shape, generator=g) < 0.25
    target_with_ignore = torch.where(ignored, torch.full_like(target, -1.0), target)
    keep = ~ignored
    channel_w = (
        torch.ones_like(logits) if weight is None else torch.tensor(weight).view(1, 2, 1, 1, 1).expand_as(logits)
    )
    expected = F.binary_cross_entropy_with_logits(logits[keep], target[keep], weight=channel_w[keep])
    actual = BCELoss(weight=weight, ignore_index=-1)(logits, target_with_ignore)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    # without ignored voxels: exactly torch's BCE with the channel weight.
    expected_all = F.binary_cross_entropy_with_logits(logits, target, weight=channel_w)
    torch.testing.assert_close(BCELoss(weight=weight)(logits, target), expected_all, rtol=1e-5, atol=1e-6)


def test_bce_is_stable_for_large_logits():
    logits = _logits([200.0, -200.0])
    target = _masks([0.0, 1.0])
    loss = BCELoss()(logits, target)
    assert loss.item() == pytest.approx(200.0, rel=1e-6)


def test_bce_accepts_integer_and_bool_masks():
    logits = _logits([0.0, LN3])
    for target in (torch.tensor([1, 0]).view(1, 1, 1, 1, 2), torch.tensor([True, False]).view(1, 1, 1, 1, 2)):
        assert BCELoss()(logits, target).item() == pytest.approx(1.5 * LN2, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Empty classes: finite loss and gradients
# ---------------------------------------------------------------------------------------------------------------


def _class_index_case_with_empty_class():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 3, 3, 3, 3, generator=g, requires_grad=True)
    target = torch.randint(0, 2, (1, 3, 3, 3), generator=g)  # class 2 never appears
    return logits, target


def _binary_case_with_empty_channel():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(1, 2, 3, 3, 3, generator=g, requires_grad=True)
    target = torch.zeros(1, 2, 3, 3, 3)
    target[0, 0, :2] = 1.0  # channel 1 empty
    return logits, target


@pytest.mark.parametrize(
    "loss, case",
    [
        (WeightedCrossEntropyLoss(), "index"),
        (GeneralizedDiceLoss("softmax"), "index"),
        (GeneralizedDiceLoss("sigmoid"), "index"),
        (GeneralizedDiceLoss("sigmoid"), "binary"),
        (BCEDiceLoss(), "binary"),
    ],
)
def test_empty_class_gives_finite_loss_and_gradients(loss, case):
    logits, target = _class_index_case_with_empty_class() if case == "index" else _binary_case_with_empty_channel()
    value = loss(logits, target)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_dice_penalises_false_positives_of_empty_channel():
    _, target = _binary_case_with_empty_channel()
    logits = torch.zeros(1, 2, 3, 3, 3, requires_grad=True)
    GeneralizedDiceLoss("sigmoid")(logits, target).backward()
    # raising the empty channel's logits (false positives) must raise the loss.
    assert (logits.grad[0, 1] > 0).all()


def test_wce_with_a_single_present_class_is_plain_cross_entropy():
    logits = torch.randn(1, 3, 2, 2, 2, generator=torch.Generator().manual_seed(7), requires_grad=True)
    target = torch.zeros(1, 2, 2, 2, dtype=torch.int64)  # only background
    value = WeightedCrossEntropyLoss()(logits, target)
    value.backward()
    torch.testing.assert_close(value, F.cross_entropy(logits.detach(), target), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    "loss, target",
    [
        (CrossEntropyLoss(ignore_index=-1), torch.full((1, 2, 2, 2), -1)),
        (WeightedCrossEntropyLoss(ignore_index=-1), torch.full((1, 2, 2, 2), -1)),
        (GeneralizedDiceLoss("softmax", ignore_index=-1), torch.full((1, 2, 2, 2), -1)),
        (BCELoss(ignore_index=-1), torch.full((1, 2, 2, 2, 2), -1.0)),
        (BCEDiceLoss(ignore_index=-1), torch.full((1, 2, 2, 2, 2), -1.0)),
    ],
)
def test_all_voxels_ignored_gives_zero_loss_and_zero_gradient(loss, target):
    logits = torch.randn(1, 2, 2, 2, 2, requires_grad=True)
    value = loss(logits, target)
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_dice_with_every_class_empty_is_finite():
    logits = torch.randn(1, 2, 2, 2, 2, requires_grad=True)
    value = GeneralizedDiceLoss("sigmoid")(logits, torch.zeros(1, 2, 2, 2, 2))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# ignore_index
# ---------------------------------------------------------------------------------------------------------------


def _index_case_with_ignore(ignore_value):
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 3, 4, 4, generator=g)
    target = _random_labels((2, 3, 4, 4), 3, g)
    ignored = torch.rand(target.shape, generator=g) < 0.3
    ignored.view(-1)[:3] = False  # keep every class present among the kept voxels
    target = torch.where(ignored, torch.full_like(target, ignore_value), target)
    return logits, target, ignored


def _binary_case_with_ignore(ignore_value):
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 2, 3, 4, 4, generator=g)
    target = _random_masks((2, 2, 3, 4, 4), g)
    ignored = torch.rand(target.shape, generator=g) < 0.3
    ignored[:, :, 0, 0, 0] = False
    target = torch.where(ignored, torch.full_like(target, float(ignore_value)), target)
    return logits, target, ignored


def _perturbed(logits, ignored_voxels):
    return torch.where(ignored_voxels, logits + 50.0 * torch.randn_like(logits), logits)


@pytest.mark.parametrize("ignore_value", [255, -1])
@pytest.mark.parametrize("name", ["ce", "wce", "dice"])
def test_ignore_index_class_index_targets(name, ignore_value):
    logits, target, ignored = _index_case_with_ignore(ignore_value)
    loss = create_loss(name, multiclass=True, ignore_index=ignore_value)
    value = loss(logits, target)
    # ignored voxels' logits do not matter.
    torch.testing.assert_close(loss(_perturbed(logits, ignored.unsqueeze(1)), target), value)

    keep = ~ignored
    kept_logits = logits.permute(0, 2, 3, 4, 1)[keep]  # (M, C)
    kept_target = target[keep]  # (M,)
    if name == "ce":
        expected = F.cross_entropy(kept_logits, kept_target)
    elif name == "wce":
        counts = torch.stack([(kept_target == c).sum() for c in range(3)]).float()
        expected = F.cross_entropy(kept_logits, kept_target, weight=(kept_target.numel() - counts) / counts)
    else:
        r = F.one_hot(kept_target, 3).float().T.unsqueeze(0)  # (1, C, M)
        p = torch.softmax(kept_logits, dim=1).T.unsqueeze(0)
        expected = _gdl_reference(r, p)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ignore_value", [255, -1])
@pytest.mark.parametrize("name", ["bce", "dice", "bce_dice"])
def test_ignore_index_binary_targets(name, ignore_value):
    logits, target, ignored = _binary_case_with_ignore(ignore_value)
    loss = create_loss(name, multiclass=False, ignore_index=ignore_value)
    value = loss(logits, target)
    torch.testing.assert_close(loss(_perturbed(logits, ignored), target), value)

    keep = ~ignored
    bce = F.binary_cross_entropy_with_logits(logits[keep], target[keep])
    # GDL over kept elements only: zero both r and p at ignored elements, then the formula.
    r = torch.where(keep, target, torch.zeros_like(target))
    p = torch.where(keep, torch.sigmoid(logits), torch.zeros_like(logits))
    gdl = _gdl_reference(r, p)
    expected = {"bce": bce, "dice": gdl, "bce_dice": bce + gdl}[name]
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


def test_ignore_index_may_be_a_class_label():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(1, 3, 2, 3, 4, generator=g)
    target = torch.randint(0, 3, (1, 2, 3, 4), generator=g)
    keep = target != 0
    kept_logits = logits.permute(0, 2, 3, 4, 1)[keep]
    r = F.one_hot(target[keep], 3).float().T.unsqueeze(0)[:, 1:]  # class 0 is empty among kept voxels
    p = torch.softmax(kept_logits, dim=1).T.unsqueeze(0)
    # class 0 empty -> weight = largest finite weight of the batch (classes 1, 2).
    dims = [0, 2]
    w12 = 1.0 / r.sum(dims) ** 2
    w = torch.cat([w12.max().view(1), w12])
    r = torch.cat([torch.zeros_like(r[:, :1]), r], dim=1)
    expected = 1 - 2 * (w * (r * p).sum(dims)).sum() / (w * (r + p).sum(dims)).sum()
    actual = GeneralizedDiceLoss("softmax", ignore_index=0)(logits, target)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        CrossEntropyLoss(ignore_index=0)(logits, target), F.cross_entropy(logits, target, ignore_index=0)
    )


# ---------------------------------------------------------------------------------------------------------------
# float32 under autocast
# ---------------------------------------------------------------------------------------------------------------


def _all_losses_with_targets():
    g = torch.Generator().manual_seed(11)
    labels = _random_labels((2, 4, 4, 4), 3, g)
    masks = _random_masks((2, 3, 4, 4, 4), g)
    return [
        (CrossEntropyLoss(weight=[1.0, 2.0, 0.5]), labels),
        (WeightedCrossEntropyLoss(), labels),
        (BCELoss(weight=[1.0, 2.0, 0.5]), masks),
        (GeneralizedDiceLoss("sigmoid"), masks),
        (GeneralizedDiceLoss("softmax"), labels),
        (BCEDiceLoss(), masks),
    ]


@pytest.mark.parametrize("index", range(6))
def test_autocast_bf16_returns_float32_matching_float32_value(index):
    loss, target = _all_losses_with_targets()[index]
    logits = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(12))
    reference = loss(logits, target)
    logits_bf16 = logits.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits_bf16, target)
    assert value.dtype == torch.float32
    # bf16 rounding of the logits (8 mantissa bits) is the only difference left.
    torch.testing.assert_close(value, reference, rtol=2e-2, atol=1e-2)
    # and the loss itself ran in float32 on those rounded logits.
    torch.testing.assert_close(value, loss(logits_bf16.float(), target), rtol=1e-6, atol=1e-6)


def test_autocast_logits_from_a_conv_backpropagate_in_float32():
    g = torch.Generator().manual_seed(13)
    conv = torch.nn.Conv3d(2, 3, kernel_size=1)
    x = torch.randn(1, 2, 4, 4, 4, generator=g)
    target = _random_labels((1, 4, 4, 4), 3, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        value = GeneralizedDiceLoss("softmax")(logits, target)
    assert logits.dtype == torch.bfloat16
    assert value.dtype == torch.float32
    value.backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("index", range(6))
def test_cuda_autocast_fp16_returns_float32_matching_float32_value(index):
    loss, target = _all_losses_with_targets()[index]
    loss, target = loss.cuda(), target.cuda()
    logits = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(12)).cuda()
    reference = loss(logits, target)
    with torch.autocast("cuda", dtype=torch.float16):
        value = loss(logits.half(), target)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference, rtol=5e-3, atol=5e-3)


def test_apply_final_activation_float32():
    logits = torch.tensor([[0.0, LN3]]).view(1, 2, 1, 1, 1).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        soft = apply_final_activation(logits, "softmax")
        sig = apply_final_activation(logits, "sigmoid")
    assert soft.dtype == torch.float32 and sig.dtype == torch.float32
    # bf16(ln 3) = 1.1015625: softmax = (1, 3) / 4 and sigmoid(ln3) = 3/4 up to that rounding.
    assert soft.flatten().tolist() == pytest.approx([0.25, 0.75], abs=2e-3)
    assert sig.flatten().tolist() == pytest.approx([0.5, 0.75], abs=2e-3)
    with pytest.raises(ValueError, match="'relu'"):
        apply_final_activation(logits, "relu")


# ---------------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------------


def test_loss_names():
    assert LOSS_NAMES == ("ce", "wce", "bce", "dice", "bce_dice", "mse", "l1", "smooth_l1")


@pytest.mark.parametrize(
    "name, multiclass, cls, activation",
    [
        ("ce", True, CrossEntropyLoss, "softmax"),
        ("wce", True, WeightedCrossEntropyLoss, "softmax"),
        ("bce", False, BCELoss, "sigmoid"),
        ("dice", True, GeneralizedDiceLoss, "softmax"),
        ("dice", False, GeneralizedDiceLoss, "sigmoid"),
        ("bce_dice", False, BCEDiceLoss, "sigmoid"),
    ],
)
def test_create_loss_mapping(name, multiclass, cls, activation):
    loss = create_loss(name, multiclass=multiclass)
    assert type(loss) is cls
    assert final_activation_name(name, multiclass=multiclass) == activation
    if name == "dice":
        assert loss.normalization == activation


def test_create_loss_passes_weight_and_ignore_index():
    loss = create_loss("ce", multiclass=True, weight=[1.0, 3.0], ignore_index=7, out_channels=2)
    assert loss.weight.tolist() == [1.0, 3.0] and loss.ignore_index == 7
    loss = create_loss("bce_dice", multiclass=False, weight=[2.0], ignore_index=255, out_channels=1)
    assert loss.bce.weight.tolist() == [2.0] and loss.dice.ignore_index == 255
    assert create_loss("dice", multiclass=False, ignore_index=-1).ignore_index == -1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "focal", "multiclass": True}, "unknown loss 'focal'.*ce, wce, bce, dice, bce_dice"),
        ({"name": "ce", "multiclass": False}, "loss 'ce' needs class-index labels.*'bce', 'dice' or 'bce_dice'"),
        ({"name": "wce", "multiclass": False}, "loss 'wce' needs class-index labels"),
        ({"name": "bce", "multiclass": True}, "loss 'bce' needs binary.*'ce', 'wce' or 'dice'"),
        ({"name": "bce_dice", "multiclass": True}, "loss 'bce_dice' needs binary"),
        ({"name": "wce", "multiclass": True, "weight": [1.0, 2.0]}, "'wce' computes its own class weights"),
        ({"name": "dice", "multiclass": False, "weight": [1.0]}, "'dice' computes its own class weights"),
        ({"name": "ce", "multiclass": True, "weight": [1.0, 2.0], "out_channels": 3}, "2 entries but out_channels=3"),
        ({"name": "bce", "multiclass": False, "weight": [1.0, -2.0]}, "non-negative.*-2.0"),
        ({"name": "ce", "multiclass": True, "weight": [0.0, 0.0]}, "at least one positive"),
        ({"name": "ce", "multiclass": True, "out_channels": 1}, "out_channels >= 2"),
        ({"name": "bce", "multiclass": False, "ignore_index": 1}, "ignore_index=1 collides"),
    ],
)
def test_create_loss_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_loss(**kwargs)


@pytest.mark.parametrize(
    "name, multiclass, message",
    [("focal", False, "unknown loss"), ("ce", False, "class-index"), ("bce_dice", True, "binary")],
)
def test_final_activation_name_errors(name, multiclass, message):
    with pytest.raises(ValueError, match=message):
        final_activation_name(name, multiclass=multiclass)


def test_constructor_errors():
    with pytest.raises(ValueError, match="normalization"):
        GeneralizedDiceLoss("relu")
    with pytest.raises(ValueError, match="epsilon"):
        GeneralizedDiceLoss(epsilon=0.0)
    with pytest.raises(ValueError, match="alpha"):
        BCEDiceLoss(alpha=-1.0)
    with pytest.raises(ValueError, match="ignore_index=0 collides"):
        BCELoss(ignore_index=0)


def test_target_errors_name_the_offending_value():
    logits = torch.zeros(1, 2, 1, 1, 2)
    with pytest.raises(ValueError, match="label 5, outside \\[0, 2\\)"):
        CrossEntropyLoss()(logits, _labels(0, 5))
    with pytest.raises(ValueError, match="label -1"):
        GeneralizedDiceLoss("softmax")(logits, _labels(0, -1))
    with pytest.raises(ValueError, match="integer tensor"):
        CrossEntropyLoss()(logits, _labels(0, 1).float())
    with pytest.raises(ValueError, match="value 255.*255"):
        BCELoss()(logits, torch.tensor([0.0, 255.0, 0.0, 255.0]).view(1, 2, 1, 1, 2))
    with pytest.raises(ValueError, match="shape"):
        BCELoss()(logits, torch.zeros(1, 1, 1, 1, 2))
    with pytest.raises(ValueError, match="2 entries but the logits have 3 channels"):
        CrossEntropyLoss(weight=[1.0, 1.0])(torch.zeros(1, 3, 1, 1, 2), _labels(0, 1))
    with pytest.raises(ValueError, match="single channel"):
        GeneralizedDiceLoss("softmax")(torch.zeros(1, 1, 1, 1, 2), torch.zeros(1, 1, 1, 1, 2))


# ---------------------------------------------------------------------------------------------------------------
# Optimisation: each loss drives learnable logits towards the target
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, multiclass",
    [("ce", True), ("wce", True), ("bce", False), ("dice", True), ("dice", False), ("bce_dice", False)],
)
def test_loss_decreases_under_adam(name, multiclass):
    g = torch.Generator().manual_seed(14)
    if multiclass:
        target = _random_labels((1, 4, 4, 4), 3, g)
    else:
        target = _random_masks((1, 3, 4, 4, 4), g)
    logits = torch.nn.Parameter(torch.randn(1, 3, 4, 4, 4, generator=g) * 0.1)
    loss_fn = create_loss(name, multiclass=multiclass)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    initial = loss_fn(logits, target).item()
    for _ in range(100):
        optimizer.zero_grad()
        loss = loss_fn(logits, target)
        loss.backward()
        optimizer.step()
    final = loss_fn(logits, target).item()
    assert final < 0.1 * initial
    # and the prediction now matches the target.
    probs = apply_final_activation(logits.detach(), final_activation_name(name, multiclass=multiclass))
    predicted = probs.argmax(1) if multiclass else (probs > 0.5).float()
    assert torch.equal(predicted, target)
