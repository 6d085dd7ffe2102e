"""UNet3D, the baseline from the UNet++'s own blocks: shapes, heads, paths, widths matched to a UNet++."""

from __future__ import annotations

import pytest
import torch

from unetpp3d.model.network import ConvBlock, UNetPlusPlus3D
from unetpp3d.model.unet import UNet3D, count_parameters, matched_features
from unetpp3d.training.loss import DeepSupervisionLoss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FEATURES = (4, 8, 16, 32)
STRIDES = [[2, 2, 1], [2, 2, 1], [2, 2, 2]]


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 1, 16, 16, 8)


def tiny(**kwargs) -> UNet3D:
    torch.manual_seed(0)
    return UNet3D(**{"in_channels": 1, "out_channels": 3, "features": FEATURES, "strides": STRIDES, **kwargs})


def test_one_full_resolution_output_without_deep_supervision(x):
    net = tiny()
    assert net.train()(x).shape == (2, 3, 16, 16, 8)
    assert net.eval()(x).shape == (2, 3, 16, 16, 8)


def test_deep_supervision_gives_one_full_size_head_per_decoder_level(x):
    net = tiny(deep_supervision=True).train()
    heads = net(x)
    assert isinstance(heads, list) and len(heads) == len(FEATURES) - 1
    assert all(h.shape == (2, 3, 16, 16, 8) for h in heads)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), heads[0])  # eval: the full-resolution head
    loss = DeepSupervisionLoss(3)(net.train()(x), torch.randint(0, 3, (2, 1, 16, 16, 8)))
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_same_blocks_and_encoder_as_the_unetplusplus():
    unet, pp = tiny(), UNetPlusPlus3D(1, 3, FEATURES, strides=STRIDES)
    assert all(isinstance(b, ConvBlock) for b in [*unet.encoder, *unet.decoder])
    assert [p.shape for p in unet.encoder.parameters()] == [p.shape for p in pp.encoder.parameters()]
    assert unet.size_divisor == pp.size_divisor == (8, 8, 2)
    # The decoder of a U-Net is the UNet++'s outer pathway: one node per level, no nested ones.
    assert len(unet.decoder) == unet.depth and sum(len(row) for row in pp.nodes) > unet.depth


@pytest.mark.parametrize("upsample", ["deconv", "trilinear"])
def test_fused_and_plain_paths_agree(x, upsample):
    net = tiny(deep_supervision=True, upsample=upsample).train()
    fused = net(x)
    net.fused = False
    plain = net(x)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_wrong_input_size_names_the_multiple(x):
    with pytest.raises(ValueError, match=r"\(8, 8, 2\)"):
        tiny()(torch.zeros(1, 1, 12, 16, 8))


def test_save_and_rebuild(tmp_path, x):
    net = tiny().eval()
    net.save(tmp_path / "unet.pt")
    again = UNet3D.from_checkpoint(torch.load(tmp_path / "unet.pt", weights_only=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x))


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_wide_unet_matches_the_unetplusplus_parameter_count(norm):
    features = (8, 16, 32, 64)
    target = count_parameters(lambda: UNetPlusPlus3D(1, 2, features, strides=STRIDES, norm=norm))
    plain = count_parameters(lambda: UNet3D(1, 2, features, strides=STRIDES, norm=norm))
    assert plain < 0.95 * target  # the nested nodes cost parameters: there is something to match
    widths, count = matched_features(target, features, in_channels=1, out_channels=2, strides=STRIDES, norm=norm)
    assert abs(count - target) <= 0.03 * target
    assert count == count_parameters(lambda: UNet3D(1, 2, widths, strides=STRIDES, norm=norm))
    assert all(w >= f for w, f in zip(widths, features)) and sum(widths) > sum(features)
    if norm == "group":
        assert all(w % 8 == 0 for w in widths)


def test_unreachable_match_is_refused():
    with pytest.raises(ValueError, match="from 1000"):
        matched_features(1000, (8, 16), tolerance=0.001, in_channels=1, out_channels=2, norm="group")
