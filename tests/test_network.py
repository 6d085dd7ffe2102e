"""UNetPlusPlus3D: shapes, heads, pruning, gradients, input checks, save/load and export."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from unetpp3d import UNetPlusPlus3D, UserError, load_model

FEATURES = (4, 8, 16, 32)  # L = 3
SIZE = 32


def tiny(**kwargs) -> UNetPlusPlus3D:
    torch.manual_seed(0)
    args = dict(in_channels=1, out_channels=3, features=FEATURES)
    args.update(kwargs)
    return UNetPlusPlus3D(**args)


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 1, SIZE, SIZE, SIZE)


def test_training_returns_one_full_resolution_head_per_top_row_node(x):
    net = tiny().train()
    heads = net(x)
    assert isinstance(heads, list) and len(heads) == len(FEATURES) - 1
    for h in heads:
        assert h.shape == (2, 3, SIZE, SIZE, SIZE)


def test_head_order_is_x01_first(x):
    """Head j must be computed from node X^{0,j}: zeroing head j's weights zeroes output j only."""
    net = tiny().train()
    with torch.no_grad():
        net.heads[0].weight.zero_()
        net.heads[0].bias.zero_()
        heads = net(x)
    assert torch.count_nonzero(heads[0]) == 0
    assert all(torch.count_nonzero(h) > 0 for h in heads[1:])
    # and pruning at level 1 uses exactly that head
    net.eval().prune_level = 1
    with torch.no_grad():
        assert torch.count_nonzero(net(x)) == 0


def test_eval_returns_mean_of_heads(x):
    net = tiny()
    with torch.no_grad():
        heads = net.train()(x)
        out = net.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, SIZE, SIZE, SIZE)
    torch.testing.assert_close(out, torch.stack(heads).mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["instance", "group"])  # batch norm differs between train and eval
def test_pruned_output_equals_the_full_networks_head(x, norm):
    net = tiny(norm=norm)
    with torch.no_grad():
        heads = net.train()(x)
        net.eval()
        for level in range(1, net.depth + 1):
            net.prune_level = level
            torch.testing.assert_close(net(x), heads[level - 1], rtol=1e-5, atol=1e-5)


def test_flops_strictly_increase_with_prune_level(x):
    net = tiny().eval()
    flops = []
    for level in range(1, net.depth + 1):
        net.prune_level = level
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(x[:1])
        flops.append(counter.get_total_flops())
    net.prune_level = None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x[:1])
    assert all(a < b for a, b in zip(flops, flops[1:])), flops
    assert flops[-1] <= counter.get_total_flops()  # accurate mode adds only the extra heads


def test_bad_prune_level_is_refused(x):
    net = tiny().eval()
    net.prune_level = 4
    with pytest.raises(ValueError, match="prune_level"):
        net(x)
    single = tiny(deep_supervision=False).eval()
    single.prune_level = 1
    with pytest.raises(ValueError, match="deep supervision"):
        single(x)


def test_without_deep_supervision_there_is_one_head(x):
    net = tiny(deep_supervision=False)
    assert len(net.heads) == 1
    assert net.train()(x).shape == (2, 3, SIZE, SIZE, SIZE)
    net.eval().prune_level = net.depth  # pruning to the full depth is the full network
    assert net(x).shape == (2, 3, SIZE, SIZE, SIZE)


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
@pytest.mark.parametrize("upsample", ["deconv", "trilinear"])
def test_every_parameter_gets_a_gradient_under_deep_supervision(x, norm, upsample):
    net = tiny(norm=norm, upsample=upsample, dropout=0.1, act="relu").train()
    loss = sum(h.square().mean() for h in net(x))
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing


def test_wrong_input_size_names_the_multiple_needed():
    net = tiny()
    with pytest.raises(ValueError, match=r"multiple of \(8, 8, 8\)"):
        net(torch.zeros(1, 1, 32, 30, 32))
    with pytest.raises(ValueError, match="batch, channels"):
        net(torch.zeros(1, 32, 32, 32))


def test_anisotropic_strides_keep_thick_slices():
    net = tiny(strides=[(2, 2, 1), (2, 2, 2), (2, 2, 2)]).train()
    assert net.size_divisor == (8, 8, 4)
    x = torch.randn(1, 1, 32, 32, 12)
    heads = net(x)
    assert all(h.shape == (1, 3, 32, 32, 12) for h in heads)
    # the first encoder block after level 0 does not stride along z
    assert net.encoder[1][0].stride == (2, 2, 1)
    with pytest.raises(ValueError, match="strides needs 3 entries"):
        tiny(strides=[2, 2])


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path, x):
    net = tiny(norm="group", upsample="trilinear").eval()
    path = tmp_path / "model.pt"
    net.save(path)
    again = load_model(path).eval()
    assert again.model_args == net.model_args
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*part*")), "temporary file left behind"


def test_load_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="no such model file"):
        load_model(tmp_path / "absent.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a unetpp3d model"):
        load_model(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")


def test_torchscript_trace_round_trip(tmp_path, x):
    net = tiny().eval()
    with torch.no_grad():
        traced = torch.jit.trace(net, x[:1])
        path = tmp_path / "model.ts"
        traced.save(str(path))
        loaded = torch.jit.load(str(path))
        torch.testing.assert_close(loaded(x[:1]), net(x[:1]), rtol=1e-5, atol=1e-5)


def test_works_with_monai_sliding_window_inference():
    from monai.inferers import sliding_window_inference

    net = tiny().eval()
    volume = torch.randn(1, 1, 40, 36, 20)  # not a multiple of the roi: MONAI pads the windows
    with torch.no_grad():
        out = sliding_window_inference(volume, roi_size=(32, 32, 16), sw_batch_size=2, predictor=net,
                                       overlap=0.25, mode="gaussian")
    assert out.shape == (1, 3, 40, 36, 20)
