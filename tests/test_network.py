"""UNetPlusPlus3D: shapes, heads, pruning, gradients, input checks, save/load and export."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import flop_registry

from unetpp3d import UNetPlusPlus3D, UserError, load_model
from unetpp3d.model.fused import flop_counter_mode

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
    with torch.no_grad():
        assert torch.count_nonzero(net.eval()(x, prune_level=1)) == 0


def test_eval_returns_the_mean_of_the_heads_probabilities(x):
    net = tiny()
    with torch.no_grad():
        heads = net.train()(x)
        out = net.eval()(x)
        logits = net(x, combine="logits")
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, SIZE, SIZE, SIZE)
    mean_probs = torch.stack([h.softmax(1) for h in heads]).mean(0)
    torch.testing.assert_close(out.softmax(1), mean_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, mean_probs.log(), rtol=1e-5, atol=1e-5)  # log-probabilities, exactly
    torch.testing.assert_close(logits, torch.stack(heads).mean(0), rtol=1e-5, atol=1e-5)


class ConstantHead(nn.Module):
    """A hand-made head: the same logits at every voxel, whatever its input."""

    def __init__(self, *logits: float):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits).view(1, -1, 1, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(features.shape[0], -1, *features.shape[2:])


@pytest.mark.parametrize("fused", [True, False])
def test_accurate_mode_averages_probabilities_not_logits(x, fused):
    """Two heads fairly sure of class 0 and one head very sure of class 1 (the paper's average
    of outputs says 0; an average of logits, a normalised geometric mean, lets the one confident
    head win)."""
    net = tiny(out_channels=2).eval()
    net.fused = fused
    net.heads = nn.ModuleList([ConstantHead(2.0, 0.0), ConstantHead(2.0, 0.0), ConstantHead(0.0, 20.0)])
    p_sure, p_confident = torch.tensor([2.0, 0.0]).softmax(0), torch.tensor([0.0, 20.0]).softmax(0)
    expected = (2 * p_sure + p_confident) / 3
    with torch.no_grad():
        probs = net(x).softmax(1)
        by_logits = net(x, combine="logits").softmax(1)
    torch.testing.assert_close(probs[0, :, 0, 0, 0], expected)
    assert (probs.argmax(1) == 0).all()  # mean probability of class 0: 0.59
    torch.testing.assert_close(by_logits[0, :, 0, 0, 0], torch.tensor([4 / 3, 20 / 3]).softmax(0))
    assert (by_logits.argmax(1) == 1).all()
    with pytest.raises(ValueError, match="combine"):
        net(x, combine="geometric")


@pytest.mark.parametrize("norm", ["instance", "group"])  # batch norm differs between train and eval
def test_pruned_output_equals_the_full_networks_head(x, norm):
    net = tiny(norm=norm)
    with torch.no_grad():
        heads = net.train()(x)
        net.eval()
        for level in range(1, net.depth + 1):
            torch.testing.assert_close(net(x, prune_level=level), heads[level - 1], rtol=1e-5, atol=1e-5)


def test_flops_strictly_increase_with_prune_level(x):
    net = tiny().eval()
    flops = []
    for level in range(1, net.depth + 1):
        with flop_counter_mode(display=False) as counter, torch.no_grad():
            net(x[:1], prune_level=level)
        flops.append(counter.get_total_flops())
    with flop_counter_mode(display=False) as counter, torch.no_grad():
        net(x[:1])
    assert all(a < b for a, b in zip(flops, flops[1:])), flops
    assert flops[-1] <= counter.get_total_flops()  # accurate mode adds only the extra heads


def test_flop_counting_registers_nothing_in_torch_and_counts_both_paths(x):
    """The fused path's direct oneDNN convolutions are counted by flop_counter_mode alone;
    importing the network leaves torch's process-wide FLOP registry as it was."""
    assert torch.ops.aten.mkldnn_convolution not in flop_registry  # this module imported the network above
    net = tiny().eval()
    counts = []
    for fused in (True, False):
        net.fused = fused
        with flop_counter_mode(display=False) as counter, torch.no_grad():
            net(x[:1])  # fp32, batch 1, no grad: the fused path calls oneDNN directly
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_bad_prune_level_is_refused(x):
    net = tiny().eval()
    with pytest.raises(ValueError, match="prune_level"):
        net(x, prune_level=4)
    single = tiny(deep_supervision=False).eval()
    with pytest.raises(ValueError, match="deep supervision"):
        single(x, prune_level=1)
    with pytest.raises(ValueError, match="inference"):
        tiny().train()(x, prune_level=1)


def test_without_deep_supervision_there_is_one_head(x):
    net = tiny(deep_supervision=False)
    assert len(net.heads) == 1
    assert net.train()(x).shape == (2, 3, SIZE, SIZE, SIZE)
    # pruning to the full depth is the full network
    assert net.eval()(x, prune_level=net.depth).shape == (2, 3, SIZE, SIZE, SIZE)


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


@pytest.mark.parametrize("fused", [True, False])
def test_a_single_voxel_bottleneck_is_refused_on_both_paths(fused):
    """8^3 through three stride-2 steps leaves X^{3,0} one voxel, which instance norm turns into a
    constant. The reference path raised PyTorch's error, the fused path ran silently; both now
    give the same message, saying what to do."""
    net = tiny()
    net.fused = fused
    for mode in (net.train, net.eval):
        mode()
        with pytest.raises(ValueError, match=r"single voxel.*instance norm.*\(16, 8, 8\)"):
            net(torch.randn(1, 1, 8, 8, 8))
    with torch.no_grad():
        net.eval()(torch.randn(1, 1, 16, 8, 8))  # two voxels along one axis: fine
        # Norms whose statistics span several values stay allowed: group norm with 4 channels a
        # group (32 channels, 8 groups), batch norm (the batch in training, running averages in eval).
        for norm in ("group", "batch"):
            other = tiny(norm=norm).eval()
            other.fused = fused
            other(torch.randn(1, 1, 8, 8, 8))


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
    with pytest.raises(UserError, match="no such checkpoint"):
        load_model(tmp_path / "absent.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a unetpp3d checkpoint"):
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
