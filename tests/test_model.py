import pytest
import torch
from torch.nn import functional as F

from unet3d_lightning import UNet3D
from unet3d_lightning.model import level_channels, parse_layer_order


@pytest.mark.parametrize("upsample", ["deconv", "interpolate"])
@pytest.mark.parametrize("layer_order", ["crg", "gcr", "cbr", "cl", "ecg"])
@pytest.mark.parametrize("num_levels", [1, 2, 3])
def test_output_has_input_spatial_size(upsample, layer_order, num_levels):
    net = UNet3D(2, 3, f_maps=8, num_levels=num_levels, layer_order=layer_order, num_groups=4, upsample=upsample)
    for shape in [(8, 8, 8), (5, 7, 9), (1, 3, 2), (17, 12, 3)]:
        out = net(torch.randn(2, 2, *shape))
        assert out.shape == (2, 3, *shape)


def test_four_levels_odd_sizes_and_logits():
    net = UNet3D(1, 2, f_maps=4, num_levels=4, num_groups=2)
    out = net(torch.randn(1, 1, 13, 21, 9))
    assert out.shape == (1, 2, 13, 21, 9)
    # logits, not probabilities: nothing squashes them into [0, 1] summing to one
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))


def test_channels_per_level():
    assert level_channels(8, 3) == [8, 16, 32]
    assert level_channels([4, 12, 20]) == [4, 12, 20]
    net = UNet3D(1, 1, f_maps=[4, 12, 20], num_groups=2)
    assert [e[1].conv.out_channels for e in net.encoders] == [4, 12, 20]
    # the first encoder conv goes to half the level's channels, never below the input's (Çiçek et al.)
    assert net.encoders[0][0].conv.out_channels == 2
    with pytest.raises(ValueError, match="num_levels"):
        UNet3D(1, 1, f_maps=[4, 8], num_levels=3)


@pytest.mark.parametrize("bad", ["xcr", "cc", "rg", "crr", "clr", "cgb", ""])
def test_invalid_layer_order_lists_valid_letters(bad):
    with pytest.raises(ValueError) as info:
        UNet3D(1, 2, f_maps=8, layer_order=bad)
    message = str(info.value)
    assert repr(bad) in message
    if bad in ("xcr", ""):
        for letter in "crlegb":
            assert f"'{letter}'" in message


def test_layer_order_builds_that_order():
    net = UNet3D(1, 2, f_maps=8, num_levels=2, layer_order="gcr", num_groups=4)
    block = net.encoders[1][0]
    assert [type(m).__name__ for m in block] == ["GroupNorm", "Conv3d", "ReLU"]
    # a norm after the conv makes the conv's bias redundant; a norm before it does not
    assert net.encoders[1][0].conv.bias is not None
    assert UNet3D(1, 2, f_maps=8, layer_order="crg", num_groups=4).encoders[0][0].conv.bias is None
    assert parse_layer_order("CBR") == "cbr"


def test_group_norm_divisibility_error():
    with pytest.raises(ValueError, match="num_groups=3"):
        UNet3D(1, 2, f_maps=8, layer_order="crg", num_groups=3)
    # a GroupNorm seeing fewer channels than groups (the raw input before the first conv) uses one group
    net = UNet3D(1, 2, f_maps=8, layer_order="gcr", num_groups=4)
    assert net.encoders[0][0].groupnorm.num_groups == 1


def test_rejects_bad_upsample_and_input_rank():
    with pytest.raises(ValueError, match="upsample"):
        UNet3D(1, 2, upsample="bilinear")
    with pytest.raises(ValueError, match="5D input"):
        UNet3D(1, 2, f_maps=4, num_levels=2, num_groups=2)(torch.zeros(1, 8, 8, 8))


def test_overfits_one_patch():
    """An honest learning test: the loss on one small patch must fall by at least 90 %."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 12, 12, 12)
    target = (F.avg_pool3d(x, 3, stride=1, padding=1) > 0).long()[:, 0]
    net = UNet3D(1, 2, f_maps=8, num_levels=2, num_groups=4)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), target)
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    assert loss.item() <= 0.1 * first, (first, loss.item())
