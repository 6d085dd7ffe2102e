"""planning: fingerprint figures, nnU-Net rules for spacing, strides and depth, memory-fitted patch and batch,
and the network's size measured on the network itself."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from unetpp3d.config import Preprocessing, config_from_dict, load_config
from unetpp3d.data.fingerprint import combine_fingerprints, fingerprint, label_histogram
from unetpp3d.data.manifest import Case
from unetpp3d.errors import UserError
from unetpp3d.model.network import UNetPlusPlus3D
from unetpp3d.model.planning import compute_strides, minimum_patch, plan, target_spacing
from unetpp3d.model.sizing import estimate_memory_gb, parameter_count, saved_activations

REPO = Path(__file__).resolve().parents[1]
PERMUTED = (0, 0, 1, 1, 0, 0, 0, 1, 0)  # index x -> physical y, y -> z, z -> x


def test_label_histogram():
    lab = np.zeros((4, 5, 6), np.uint8)
    lab[0, 0, :3] = 2
    assert label_histogram(lab) == {0: 117, 2: 3}
    assert label_histogram(np.array([[[-1, 3]]], np.int16)) == {-1: 1, 3: 1}
    assert label_histogram(np.array([[[0, 100000]]], np.int32)) == {0: 1, 100000: 1}


def test_target_spacing_median_and_anisotropic_rule():
    iso = np.array([[1.0, 1.0, 1.0], [0.8, 0.8, 1.2], [0.9, 0.9, 0.9]])
    assert target_spacing(iso) == ([0.9, 0.9, 1.0], "median")
    # thick slices in most scans: z takes its 10th percentile, not the median
    aniso = np.array([[0.8, 0.8, 5.0]] * 8 + [[0.7, 0.7, 1.0], [0.75, 0.75, 1.5]])
    spacing, why = target_spacing(aniso)
    assert spacing[:2] == [0.8, 0.8]
    assert spacing[2] == pytest.approx(np.percentile(aniso[:, 2], 10))
    assert "anisotropic" in why
    # ...but never finer than the in-plane axes
    assert target_spacing(np.array([[0.8, 0.8, 5.0]] * 9 + [[0.8, 0.8, 0.5]]))[0][2] >= 0.8


def test_strides_wait_for_thick_axes_and_stop_at_small_feature_maps():
    assert compute_strides([1.0, 1.0, 1.0], [64, 64, 64], 4) == [[2, 2, 2]] * 4
    s = compute_strides([0.8, 0.8, 2.5], [160, 160, 48], 4)
    assert s[0] == [2, 2, 1] and s[1] == [2, 2, 2]  # z joins once x, y reach 1.6 mm
    # a 32-voxel axis pools 32 -> 16 -> 8 -> 4 and then stops: three levels, not a fourth that pools nothing
    assert compute_strides([1.0, 1.0, 1.0], [32, 32, 32], 4) == [[2, 2, 2]] * 3
    # once x and y stop, a thick z no longer waits for them
    assert compute_strides([0.7, 0.7, 2.0], [16, 16, 32], 4) == [[2, 2, 1], [2, 2, 2], [1, 1, 2], [1, 1, 2]]


def test_strides_for_small_crops_never_hold_a_level_that_does_not_downsample():
    # The LIDC crops' median shape at their median spacing (issue 15): the old planner gave
    # [[2, 2, 1], [2, 2, 1], [1, 1, 1], [1, 1, 1]].
    for shape in ([44, 44, 7], [44, 44, 2], [9, 9, 9], [8, 300, 3], [256, 256, 1]):
        strides = compute_strides([0.7031, 0.7031, 1.25], shape, 4)
        assert all(max(level) == 2 for level in strides), (shape, strides)
    assert compute_strides([0.7031, 0.7031, 1.25], [44, 44, 7], 4) == [[2, 2, 1]] * 3
    assert compute_strides([1.0, 1.0, 1.0], [7, 7, 7], 4) == []
    assert minimum_patch([0.7031, 0.7031, 1.25]) == [16, 16, 8] and minimum_patch([1, 1, 1]) == [16, 16, 16]


@pytest.mark.parametrize("upsample", ["deconv", "trilinear"])
def test_parameter_count_is_the_networks_own(upsample):
    args = dict(in_channels=1, out_channels=3, features=[4, 8, 16, 24], strides=[[2, 2, 1], [2, 2, 2], [1, 2, 2]],
                upsample=upsample, deep_supervision=True)
    assert parameter_count(args) == sum(p.numel() for p in UNetPlusPlus3D(**args).parameters())
    no_ds = {**args, "deep_supervision": False}
    assert parameter_count(no_ds) == sum(p.numel() for p in UNetPlusPlus3D(**no_ds).parameters())


def _saved_in_a_real_forward(net, x) -> int:
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = max(saved.get(ptr, 0), t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return sum(saved.values())


@pytest.mark.parametrize("upsample", ["deconv", "trilinear"])
def test_saved_activations_match_a_real_forward(upsample):
    """The meta-device count equals what autograd keeps in a real CPU forward pass, weights excluded."""
    args = dict(in_channels=1, out_channels=2, features=[4, 8, 16], strides=[[2, 2, 2], [2, 2, 1]], upsample=upsample)
    net = UNetPlusPlus3D(**args).train()
    x = torch.randn(1, 1, 24, 16, 6)  # not one of the two sizes the count is fitted on
    counted = saved_activations(args, [24, 16, 6])
    net.fused = False
    assert counted == _saved_in_a_real_forward(net, x)
    # The default fused path keeps the same tensors; only the norms' per-channel statistics differ.
    net.fused = True
    assert counted == pytest.approx(_saved_in_a_real_forward(net, x), rel=1e-3)
    # Interpolation then a 1x1x1 conv keeps a full-resolution copy of the lower level's channels.
    other = {**args, "upsample": "deconv" if upsample == "trilinear" else "trilinear"}
    assert saved_activations(other, [24, 16, 6]) != counted
    with pytest.raises(ValueError, match="multiple of"):
        saved_activations(args, [16, 16, 9])


def test_memory_estimate_behaves():
    args = dict(in_channels=1, out_channels=2, features=[32, 64, 128, 256, 320], strides=[[2, 2, 2]] * 4)
    one = estimate_memory_gb(args, [128] * 3, 1)
    two = estimate_memory_gb(args, [128] * 3, 2)
    assert two > one and 12 < two < 20  # the documented ~15 GB for two 128^3 patches
    assert estimate_memory_gb(args, [128] * 3, 2, amp=False) > two
    assert estimate_memory_gb(args, [96] * 3, 2) < two
    assert estimate_memory_gb({**args, "upsample": "trilinear"}, [128] * 3, 2) > two


def make_case(make_image, name, shape=(16, 16, 12), spacing=(1.0, 1.0, 2.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
              fg_values=None):
    """An image of -1000 with a foreground box whose intensities are ``fg_values``; label 1 on the box."""
    img = np.full(shape, -1000.0, np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[4:8, 4:8, 2:6] = 1
    values = fg_values if fg_values is not None else np.arange(64, dtype=np.float32)
    img[lab == 1] = values
    return Case(name,
                make_image(f"{name}.nii.gz", img, spacing=spacing, direction=direction),
                make_image(f"{name}_seg.nii.gz", lab, spacing=spacing, direction=direction))


def test_fingerprint_figures(make_image):
    cases = [make_case(make_image, "a"), make_case(make_image, "b", spacing=(1.0, 2.0, 3.0), direction=PERMUTED)]
    fp = fingerprint(cases, {0: "background", 1: "liver"})
    a, b = fp["cases"]
    assert a["spacing"] == [1.0, 1.0, 2.0] and a["size"] == [16, 16, 12]
    # RAS order: physical x is index z (3 mm, 12 voxels), y is index x, z is index y
    assert b["spacing"] == [3.0, 1.0, 2.0] and b["size"] == [12, 16, 16]
    assert a["label_volumes_ml"] == {"1": pytest.approx(64 * 2.0 / 1000)}
    assert b["label_volumes_ml"] == {"1": pytest.approx(64 * 6.0 / 1000)}
    it = fp["intensity"]
    assert it["source"] == "foreground" and it["n_samples"] == 128
    assert it["percentile_00_5"] == pytest.approx(np.percentile(np.tile(np.arange(64), 2), 0.5))
    assert it["percentile_99_5"] == pytest.approx(np.percentile(np.tile(np.arange(64), 2), 99.5))
    assert it["mean"] == pytest.approx(31.5)
    assert fp["median_spacing"] == [2.0, 1.0, 2.0]
    assert fp["label_volumes_ml"]["1"]["name"] == "liver"
    json.dumps(fp)  # plain JSON types only
    assert fingerprint(cases, {0: "background", 1: "liver"}) == fp  # seeded


def test_fingerprint_samples_at_most_10k_per_case(make_image):
    rng = np.random.default_rng(0)
    img = rng.normal(100, 20, (32, 32, 32)).astype(np.float32)
    lab = np.ones((32, 32, 32), np.uint8)
    case = Case("big", make_image("big.nii.gz", img), make_image("big_seg.nii.gz", lab))
    fp = fingerprint([case], {0: "background", 1: "liver"})
    assert fp["intensity"]["n_samples"] == 10_000
    assert fp["intensity"]["mean"] == pytest.approx(100, abs=1.0)
    assert fingerprint([case], {0: "background", 1: "liver"}, seed=1) != fp


def synthetic_fp(spacing=(0.8, 0.8, 2.5), size=(512, 512, 120), n=10) -> dict:
    entries = [{"name": f"c{i}", "spacing": list(spacing), "size": list(size), "axcodes": "LPS",
                "intensity_min": -1024.0, "intensity_max": 2000.0, "label_volumes_ml": {"1": 1500.0}}
               for i in range(n)]
    samples = [np.random.default_rng(i).normal(100, 30, 1000) for i in range(n)]
    return combine_fingerprints(entries, samples, {0: "background", 1: "liver"})


def test_plan_resolves_every_auto(capsys):
    cfg = load_config(None)
    fp = synthetic_fp()
    out, prep = plan(cfg, fp)
    assert cfg.data.patch_size == "auto"  # input untouched
    assert prep.target_spacing == [0.8, 0.8, 2.5]
    assert prep.intensity_range == [pytest.approx(fp["intensity"]["percentile_00_5"], abs=0.01),
                                    pytest.approx(fp["intensity"]["percentile_99_5"], abs=0.01)]
    assert prep.intensity_stats[0] == pytest.approx(100, abs=2) and prep.intensity_stats[1] == pytest.approx(30, abs=2)
    strides = out.model.strides
    assert strides[0] == [2, 2, 1]  # 2.5 mm slices wait until x, y reach 1.6 mm
    div = np.prod(strides, axis=0)
    assert all(p % d == 0 for p, d in zip(prep.patch_size, div))
    assert out.data.batch_size >= 2
    args = dict(in_channels=1, out_channels=2, features=out.model.features, strides=strides)
    mem = estimate_memory_gb(args, prep.patch_size, out.data.batch_size)
    assert mem <= out.data.gpu_memory_gb
    assert out.train.head_weights == [0.25] * 4
    assert out.data.patch_size == prep.patch_size
    printed = capsys.readouterr().out
    assert "target spacing" in printed and "patch" in printed and "batch size" in printed
    # the resolved config is a valid config, and the preprocessing survives its dict
    assert config_from_dict(out.to_dict()).data.patch_size == prep.patch_size
    assert Preprocessing.from_dict(prep.to_dict()) == prep


def test_plan_patch_shrinks_with_the_budget():
    fp = synthetic_fp(spacing=(1.0, 1.0, 1.0), size=(300, 300, 300))
    big = plan(load_config(None, ["data.gpu_memory_gb=40"]), fp, echo=None)[1].patch_size
    small = plan(load_config(None, ["data.gpu_memory_gb=8"]), fp, echo=None)[1].patch_size
    assert np.prod(small) < np.prod(big)
    assert max(big) <= 256
    with pytest.raises(UserError, match="gpu_memory_gb"):
        plan(load_config(None, ["data.gpu_memory_gb=1"]), fp, echo=None)


def test_plan_keeps_explicit_values():
    cfg = load_config(None, ["data.target_spacing=[1.0, 1.0, 1.0]", "data.patch_size=[64, 64, 32]",
                             "data.batch_size=3", "data.intensity_range=[0, 150]",
                             "model.strides=[[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]",
                             "train.head_weights=[0.1, 0.2, 0.3, 0.4]"])
    out, prep = plan(cfg, synthetic_fp(), echo=None)
    assert prep.target_spacing == [1.0, 1.0, 1.0] and prep.patch_size == [64, 64, 32]
    assert out.data.batch_size == 3 and prep.intensity_range == [0.0, 150.0]
    assert out.model.strides == [[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert out.train.head_weights == [0.1, 0.2, 0.3, 0.4]
    # stats follow the explicit clip range (mean of N(100, 30) clipped to [0, 150])
    assert 90 < prep.intensity_stats[0] < 100 and 20 < prep.intensity_stats[1] < 30


def test_plan_refuses_a_patch_that_does_not_divide():
    cfg = load_config(None, ["data.patch_size=[60, 64, 64]", "data.target_spacing=[1, 1, 1]"])
    with pytest.raises(UserError, match="multiple of"):
        plan(cfg, synthetic_fp(), echo=None)
    with pytest.raises(UserError, match="needs 4 entries"):
        plan(load_config(None, ["model.strides=[2, 2]"]), synthetic_fp(), echo=None)


def test_plan_small_images_from_real_fingerprint(make_image):
    cases = [make_case(make_image, f"c{i}") for i in range(3)]
    cfg, prep = plan(load_config(None), fingerprint(cases, {0: "background", 1: "liver"}), echo=None)
    # median shape 16x16x24 at 1x1x2 -> target spacing; patch covers it, in whole divisor steps
    div = np.prod(cfg.model.strides, axis=0)
    assert all(p % d == 0 and p >= 12 for p, d in zip(prep.patch_size, div))
    assert cfg.data.batch_size == 2  # tiny dataset: 5% cap, floored at 2


def test_plan_for_lidc_sized_crops_picks_a_shallow_network_that_pools_at_every_level():
    """Issue 15: 44x44x7 crops at 0.70x0.70x1.25 mm used to plan a 44x44x7 patch with strides
    [[2, 2, 1], [2, 2, 1], [1, 1, 1], [1, 1, 1]] and 256/320 channels at 11x11x7."""
    fp = synthetic_fp(spacing=(0.7031, 0.7031, 1.25), size=(44, 44, 7), n=40)
    out, prep = plan(load_config(None, ["task=lung_nodule", "data.intensity_range=[-1000, 400]"]), fp, echo=None)
    assert prep.patch_size == [48, 48, 8]  # z padded to 8 so that it can pool once
    assert out.model.strides == [[2, 2, 2], [2, 2, 1], [2, 2, 1]]
    assert out.model.features == [32, 64, 128, 256]  # the depth took the first four widths
    assert out.train.head_weights == pytest.approx([1 / 3] * 3)
    args = dict(in_channels=1, out_channels=2, features=out.model.features, strides=out.model.strides)
    UNetPlusPlus3D(**args).check_input_size(prep.patch_size)
    assert out.data.batch_size == 2 + int(0.05 * 40 * 44 * 44 * 7 / (48 * 48 * 8)) - 2 or out.data.batch_size >= 2
    assert prep.body_mask == "filled"
    # the resolved config replans to itself
    again, prep2 = plan(out, fp, echo=None)
    assert again.model.features == out.model.features and prep2.patch_size == prep.patch_size


@pytest.mark.parametrize("size, overrides", [
    ((64, 64, 1), ["model.features=[4, 8, 16, 32, 32]"]),  # single slices: z used to stay 1 voxel thick all the way down
    ((3, 3, 3), ["model.features=[4, 8, 16]", "model.strides=[2, 2]"]),  # used to round up to 4: bottleneck 1
    ((40, 40, 2), ["model.features=[4, 8, 16]", "model.strides=[[2, 2, 1], [2, 2, 2]]"]),
])
def test_plan_never_leaves_a_one_voxel_bottleneck(size, overrides):
    out, prep = plan(load_config(None, overrides), synthetic_fp(spacing=(1.0, 1.0, 2.0), size=size), echo=None)
    div = np.prod([[s] * 3 if isinstance(s, int) else s for s in out.model.strides], axis=0)
    assert all(p % d == 0 and p // d >= 2 for p, d in zip(prep.patch_size, div)), (prep.patch_size, div)
    args = dict(in_channels=1, out_channels=2, features=out.model.features, strides=out.model.strides)
    net = UNetPlusPlus3D(**args).train()
    net.fused = False  # the reference path, which refuses a single-voxel instance norm
    net(torch.zeros(1, 1, *prep.patch_size))


def test_plan_refuses_explicit_values_that_cannot_work():
    fp = synthetic_fp()
    with pytest.raises(UserError, match="entry 2 .* does not downsample"):
        plan(load_config(None, ["model.features=[4, 8, 16]", "model.strides=[[2, 2, 2], [1, 1, 1]]"]), fp, echo=None)
    with pytest.raises(UserError, match="under 2 along z"):
        plan(load_config(None, ["model.features=[4, 8, 16]", "model.strides=[[2, 2, 2], [2, 2, 1]]",
                                "data.patch_size=[32, 32, 2]"]), fp, echo=None)
    with pytest.raises(UserError, match="too small to downsample"):
        plan(load_config(None, ["data.patch_size=[4, 4, 4]"]), fp, echo=None)
    with pytest.raises(UserError, match="needs 3 weights .* 3-level network"):
        plan(load_config(None, ["data.patch_size=[32, 32, 32]", "data.target_spacing=[1, 1, 1]",
                                "train.head_weights=[0.25, 0.25, 0.25, 0.25]"]), fp, echo=None)


def test_plan_picks_the_body_mask_per_task():
    fp = synthetic_fp(size=(64, 64, 32))
    assert plan(load_config(None, ["task=liver"]), fp, echo=None)[1].body_mask == "threshold"
    assert plan(load_config(None, ["task=lung_nodule"]), fp, echo=None)[1].body_mask == "filled"
    assert plan(load_config(None, ["task=lung_nodule", "data.body_mask=threshold"]), fp, echo=None)[1].body_mask \
        == "threshold"


def test_lidc_config_plans_what_its_comments_say():
    path = REPO / "configs" / "lidc_nodule.yaml"
    cfg = load_config(path)
    assert set(yaml.safe_load(path.read_text())["data"]) == {f.name for f in dataclasses.fields(cfg.data)}
    fp = synthetic_fp(spacing=(0.703125, 0.703125, 1.25), size=(44, 44, 7), n=801)
    out, prep = plan(cfg, fp, echo=None)
    assert prep.patch_size == [48, 48, 8] and prep.body_mask == "filled"
    assert out.model.strides == [[2, 2, 2], [2, 2, 1], [2, 2, 1]] and out.model.features == [32, 64, 128, 256]
    assert len(out.train.head_weights) == 3
