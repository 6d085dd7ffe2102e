"""The fused forward path (the default) against the plain reference path: same outputs, same
gradients, every mode. Speed is measured by bench/bench.py, never asserted here."""

from __future__ import annotations

import pytest
import torch

from unetpp3d import UNetPlusPlus3D

FEATURES = (4, 8, 16, 32)  # L = 3
SIZE = 32
FP32 = dict(rtol=1e-4, atol=1e-4)  # fp32 rounding: conv algorithms differ between layouts


def tiny(**kwargs) -> UNetPlusPlus3D:
    torch.manual_seed(0)
    args = dict(in_channels=1, out_channels=3, features=FEATURES)
    args.update(kwargs)
    return UNetPlusPlus3D(**args)


def both(net: UNetPlusPlus3D, x: torch.Tensor, **kwargs):
    """The network's output on the reference path, then on the fused path."""
    outs = []
    for fused in (False, True):
        net.fused = fused
        torch.manual_seed(2)  # the same dropout masks on both paths
        outs.append(net(x, **kwargs))
    return outs


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 1, SIZE, SIZE, SIZE)


@pytest.fixture
def small(x) -> torch.Tensor:
    """A smaller input for the backward passes, which dominate this file's run time."""
    return x[:1, :, :24, :24, :24].contiguous()


def test_fused_is_the_default():
    assert tiny().fused is True and tiny().checkpointing is False


def test_the_path_is_chosen_per_device_by_measurement():
    """Fused on the CPU; the plain path on CUDA, where it measured faster (bench/RESULTS.md)."""
    from unetpp3d.model.network import fused_pays

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert fused_pays(cpu) is True and fused_pays(cpu, dtype=torch.bfloat16) is True  # inference
    assert fused_pays(cpu, training=True) is True and fused_pays(cpu, training=True, dtype=torch.float32) is True
    assert fused_pays(cpu, training=True, dtype=torch.bfloat16) is False  # its bf16 backward is the slow part
    assert not any(fused_pays(cuda, t, d) for t in (False, True) for d in (None, torch.bfloat16, torch.float16))


def test_on_device_takes_the_fused_path_on_the_cpu_and_leaves_other_networks_alone():
    from monai.networks.nets import BasicUNet

    from unetpp3d.model.network import on_device
    from unetpp3d.model.unet import UNet3D

    for net in (tiny(), UNet3D(1, 2, features=[4, 8, 16])):
        net.fused = False
        net = net.to(memory_format=torch.contiguous_format)
        placed = on_device(net, "cpu")
        assert placed is net and net.fused is True
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    other = BasicUNet(3, 1, 2, features=(4, 4, 8, 16, 32, 4))
    assert on_device(other, "cpu") is other and not hasattr(other, "fused")


def test_off_the_cpu_the_plain_path_unless_checkpointing_needs_the_fused_one():
    """The meta device stands in for a GPU here: any device but the CPU gets the plain path."""
    from unetpp3d.model.network import on_device

    net = on_device(tiny(), "meta")
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    assert net.fused is False and conv.weight.is_meta and conv.weight.is_contiguous()
    asked = tiny()
    asked.checkpointing = True  # exists on the fused path only, and matters only with gradients
    assert on_device(asked, "meta", training=True).fused is True
    assert on_device(asked, "meta").fused is False
    cpu = tiny()
    cpu.checkpointing = True
    assert on_device(cpu, "cpu", training=True, dtype=torch.bfloat16).fused is True


@pytest.mark.gpu
def test_on_device_takes_the_plain_ncdhw_path_on_cuda(x):
    from unetpp3d.model.network import on_device

    net = tiny().eval()
    with torch.no_grad():
        expected = net(x)
        placed = on_device(net, "cuda")
        assert placed.fused is False
        conv = next(m for m in placed.modules() if isinstance(m, torch.nn.Conv3d))
        assert conv.weight.is_cuda and conv.weight.is_contiguous()
        torch.testing.assert_close(placed(x.cuda()).cpu(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(norm="group", upsample="trilinear"),
    dict(norm="batch", act="relu"),
    dict(deep_supervision=False, act="gelu"),
    dict(strides=[(2, 2, 1), 2, 2]),
], ids=["instance-deconv", "group-trilinear", "batch-relu", "single-head-gelu", "anisotropic"])
def test_training_heads_agree(x, kwargs):
    net = tiny(**kwargs).train()
    ref, fused = both(net, x)
    ref = ref if isinstance(ref, list) else [ref]
    fused = fused if isinstance(fused, list) else [fused]
    assert len(ref) == len(fused)
    for r, f in zip(ref, fused):
        torch.testing.assert_close(f, r, **FP32)


@pytest.mark.parametrize("norm", ["instance", "group", "batch"])
def test_eval_agrees_in_accurate_mode_and_at_every_prune_level(x, norm):
    net = tiny(norm=norm)
    with torch.no_grad():
        net.train()(x)  # gives batch norm running statistics that are not the initial ones
    net.eval()
    with torch.inference_mode():
        for level in (None, *range(1, net.depth + 1)):
            ref, fused = both(net, x, prune_level=level)
            torch.testing.assert_close(fused, ref, **FP32, msg=lambda m: f"prune_level={level}: {m}")


def test_outputs_keep_the_callers_memory_layout(x):
    """Channels-last is internal: callers get ordinary contiguous tensors back."""
    net = tiny().eval()
    with torch.inference_mode():
        assert net(x).is_contiguous()
        net.train()
        assert all(h.is_contiguous() for h in net(x))


def gradients(net: UNetPlusPlus3D, x: torch.Tensor, fused: bool, checkpointing: bool) -> dict[str, torch.Tensor]:
    """The input's and every parameter's gradient of a loss over all heads, on one path."""
    net.fused = fused
    net.checkpointing = checkpointing
    net.zero_grad(set_to_none=True)
    xin = x.clone().requires_grad_(True)
    torch.manual_seed(2)  # the same dropout masks on both paths
    heads = net(xin)
    loss = sum((k + 1) * h.square().mean() for k, h in enumerate(heads))
    loss.backward()
    # copies: converting the network's dtype later converts its .grad tensors too
    return {"input": xin.grad, **{n: p.grad.clone() for n, p in net.named_parameters()}}


_EXACT: dict[str, dict[str, torch.Tensor]] = {}


@pytest.fixture
def threads(request):
    """Run the test with ``request.param`` torch threads: reductions split differently per count."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2], indirect=True, ids=["1thread", "2threads"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
@pytest.mark.parametrize("kwargs", [dict(), dict(norm="batch", upsample="trilinear", dropout=0.2)],
                         ids=["instance-deconv", "batch-trilinear-dropout"])
def test_gradients_agree(small, kwargs, checkpointing, threads):
    """Elementwise in float64; only loosely in float32, where agreement depends on the input.

    The networks are piecewise linear: the activation's slope jumps (1 to 0.01 for leaky ReLU,
    to 0 for ReLU) at 0. A pre-activation within float32 rounding of 0 (~1e-7) takes either
    slope depending on summation order, which differs between paths and thread counts, and that
    one voxel moves some gradients by a few percent of their maximum (with torch.manual_seed(1)
    inputs and one thread: the input's by 3%; other seeds flip voxels on the reference path
    too). So the maths is compared in float64, where no pre-activation is that close to 0, and
    float32 (the kernels training uses) against float64 to a bound that such a flip stays under
    but a wrong kernel (layout, reduction, aliasing: errors of order 1) does not.
    """
    net = tiny(**kwargs).train().double()
    key = repr(sorted(kwargs.items()))
    if key not in _EXACT:  # the float64 reference path's gradients, one per network
        _EXACT[key] = gradients(net, small.double(), fused=False, checkpointing=False)
    exact = _EXACT[key]
    fused64 = gradients(net, small.double(), fused=True, checkpointing=checkpointing)
    fused32 = gradients(net.float(), small, fused=True, checkpointing=checkpointing)
    assert exact.keys() == fused64.keys() == fused32.keys()
    for name, ref in exact.items():
        scale = ref.abs().max().item() or 1.0
        torch.testing.assert_close(fused64[name], ref, rtol=1e-7, atol=1e-9 * scale, msg=lambda m: f"{name}: {m}")
        error = ((fused32[name].double() - ref).norm() / (ref.norm() or 1.0)).item()
        assert error < 0.1, f"{name}: float32 gradient off by {error:.1e} of its norm"


def test_checkpointing_changes_nothing_in_eval_or_without_grad(x):
    net = tiny().eval()
    net.checkpointing = True
    with torch.no_grad():
        ref = net(x)
        net.checkpointing = False
        torch.testing.assert_close(net(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bf16_autocast_agrees_loosely(x, mode):
    """Under bf16 autocast both paths round differently; they must still agree to bf16 precision."""
    net = tiny().train(mode == "train")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, fused = both(net, x)
    ref = ref if isinstance(ref, list) else [ref]
    fused = fused if isinstance(fused, list) else [fused]
    for r, f in zip(ref, fused):
        r, f = r.float(), f.float()
        scale = r.abs().max().item()
        assert (f - r).abs().max().item() <= 0.05 * scale
        # and the segmentation they imply is the same almost everywhere
        assert (f.argmax(1) == r.argmax(1)).float().mean().item() >= 0.98


def test_bf16_fused_gradients_lose_no_more_than_the_reference_path(small):
    """bf16 gradients of a random network are noisy on either path; the fused one must be as
    close to the fp32 gradients as the reference path's are."""
    net = tiny().train()

    def grads(fused: bool, bf16: bool) -> dict[str, torch.Tensor]:
        net.fused = fused
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            heads = net(small)
        sum(h.float().square().mean() for h in heads).backward()
        return {n: p.grad.flatten().double() for n, p in net.named_parameters()}

    exact, ref, fused = grads(False, False), grads(False, True), grads(True, True)
    cos = torch.nn.functional.cosine_similarity
    for name, g in exact.items():
        c_ref, c_fused = cos(ref[name], g, dim=0).item(), cos(fused[name], g, dim=0).item()
        assert c_fused > 0.9 and c_fused >= c_ref - 0.03, (name, c_ref, c_fused)


def test_trace_of_the_fused_path_matches_the_reference(x):
    net = tiny().eval()
    with torch.no_grad():
        traced = torch.jit.trace(net, x[:1], check_trace=False)
        net.fused = False
        torch.testing.assert_close(traced(x[:1]), net(x[:1]), **FP32)


def test_checkpointing_recomputes_only_the_upsampling_convolutions(small):
    """Checkpointing recomputes the cheap ops and the Up() transposed convolutions, never a
    3x3x3 convolution: the step costs exactly the Up() forward FLOPs more."""
    import re

    from torch.utils.flop_counter import FlopCounterMode

    net = tiny().train()
    flops = []
    for checkpointing in (False, True):
        net.checkpointing = checkpointing
        with FlopCounterMode(display=False) as counter:
            sum(h.sum() for h in net(small)).backward()
        flops.append(counter.get_total_flops())
    net.fused = False  # module calls, so that the counter attributes FLOPs to the Up() modules
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(small)
    up = sum(sum(v.values()) for k, v in counter.get_flop_counts().items() if re.fullmatch(r".*\.up\.\d+\.\d+", k))
    assert up > 0 and flops[1] - flops[0] == up


def test_weights_are_channels_last_and_load_from_contiguous_ones(x):
    """The weights' layout is internal: a state_dict from contiguous weights loads, and gives the
    same outputs on both paths."""
    net = tiny().eval()
    assert net.encoder[1][0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    plain = tiny().eval().to(memory_format=torch.contiguous_format)
    net.load_state_dict(plain.state_dict())
    with torch.inference_mode():
        plain.fused = False
        torch.testing.assert_close(net(x), plain(x), **FP32)
        plain.fused = True  # weights that are not channels-last are converted on the fly
        torch.testing.assert_close(net(x), plain(x), **FP32)
