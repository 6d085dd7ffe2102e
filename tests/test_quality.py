"""Head disagreement as a quality signal: zero when the heads agree, growing with disagreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetpp3d.inference.quality import HeadQualityNet, dice_gap, disagreement, head_logits, head_spread
from unetpp3d.model.network import UNetPlusPlus3D

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _heads(*foreground: float) -> torch.Tensor:
    """(H, B=1, C=2, 2, 2, 2) probabilities with head h's foreground probability ``foreground[h]`` everywhere."""
    fg = torch.tensor(foreground, dtype=torch.float32).view(-1, 1, 1, 1, 1, 1).expand(-1, 1, 1, 2, 2, 2)
    return torch.cat([1 - fg, fg], dim=2)


def test_spread_is_zero_when_all_heads_agree():
    assert torch.count_nonzero(head_spread(_heads(0.8, 0.8, 0.8))) == 0


def test_spread_grows_with_disagreement():
    values = [float(head_spread(_heads(*p)).mean()) for p in [(0.8, 0.8, 0.8), (0.7, 0.8, 0.9), (0.5, 0.8, 1.0),
                                                              (0.0, 0.5, 1.0)]]
    assert values == sorted(values) and len(set(values)) == 4
    # Two classes: the mean absolute deviation of the foreground probability (|-0.5|, 0, |0.5| -> 1/3).
    assert values[-1] == pytest.approx(1 / 3)


def test_disagreement_is_measured_inside_the_mask_only():
    spread = np.zeros((4, 4, 4))
    spread[0] = 0.5  # disagreement outside the mask does not count
    mask = np.zeros((4, 4, 4), dtype=np.uint8)
    mask[2:, 2:, 2:] = 1
    assert disagreement(spread, mask) == 0.0
    spread[3, 3, 3] = 0.8
    assert disagreement(spread, mask) == pytest.approx(0.1)
    assert disagreement(spread, np.zeros_like(mask)) is None


def test_dice_gap():
    a = np.zeros((4, 4, 4), bool)
    a[:2] = True
    assert dice_gap(a, a) == 0.0
    assert dice_gap(a, ~a) == 1.0
    assert dice_gap(np.zeros_like(a), np.zeros_like(a)) == 0.0


def test_head_logits_equal_the_pruned_outputs_and_leave_the_network_as_it_was():
    torch.manual_seed(0)
    net = UNetPlusPlus3D(1, 2, (4, 8, 16), dropout=0.3).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        heads = head_logits(net, x)
        assert not net.training and all(not m.training for m in net.modules())
        for level, head in enumerate(heads, start=1):
            torch.testing.assert_close(head, net(x, prune_level=level), rtol=1e-5, atol=1e-5)  # dropout stayed off


def test_quality_net_gives_the_heads_mean_probability_and_their_spread():
    torch.manual_seed(0)
    net = UNetPlusPlus3D(1, 2, (4, 8, 16)).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        out = HeadQualityNet(net)(x)
        probs = torch.stack([torch.softmax(h, 1) for h in head_logits(net, x)])
        torch.testing.assert_close(out[:, :2], probs.mean(0))
        torch.testing.assert_close(out[:, 2], head_spread(probs))
        flipped = HeadQualityNet(net, tta=True)(x)
        assert flipped.shape == out.shape and float(flipped[:, 2].min()) >= 0
    with pytest.raises(ValueError, match="no deep-supervision heads"):
        HeadQualityNet(UNetPlusPlus3D(1, 2, (4, 8, 16), deep_supervision=False))


def _scan(tmp_path):
    from unetpp3d.geometry import Geometry
    from unetpp3d.imageio.writer import write_image

    rng = np.random.default_rng(0)
    image = rng.normal(-800, 200, (24, 24, 16)).astype(np.int16)
    image[8:16, 8:16, 4:12] = 40
    return write_image(image, Geometry((24, 24, 16), (1.0, 1.0, 1.5), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                       tmp_path / "scan.nii.gz")


def _prep():
    from unetpp3d.config import Preprocessing

    return Preprocessing(task="lung_nodule", labels={"0": "background", "1": "nodule"}, target_spacing=[1.0, 1.0, 1.5],
                         intensity_range=[-1000.0, 400.0], intensity_stats=[-300.0, 700.0], patch_size=[16, 16, 8],
                         crop_foreground=False)


def test_predictor_reports_the_disagreement_per_case_and_per_nodule(tmp_path):
    from unetpp3d.errors import UserError
    from unetpp3d.inference.predictor import Predictor

    torch.manual_seed(0)
    scan = _scan(tmp_path)
    net = UNetPlusPlus3D(1, 2, (4, 8, 16), strides=[[2, 2, 2], [2, 2, 1]])
    result = Predictor(net, _prep(), device="cpu", progress=False, amp=False).predict(scan)
    assert result.mask_xyz.any() and result.quality is not None and result.quality > 0  # untrained heads disagree
    assert result.spread_xyz.shape == result.mask_xyz.shape
    assert result.quality == pytest.approx(disagreement(result.spread_xyz, result.mask_xyz))
    assert result.probabilities.shape[0] == 2  # the spread channel is not a class
    assert all(n.head_disagreement is not None for n in result.nodules)
    # The mask is the accurate mode's: the argmax of the heads' mean probability.
    plain = Predictor(net, _prep(), device="cpu", progress=False, amp=False, quality=False).predict(scan)
    assert plain.quality is None and plain.spread_xyz is None
    fast = Predictor(net, _prep(), device="cpu", progress=False, amp=False, mode="fast", prune_level=1).predict(scan)
    assert fast.quality is None
    with pytest.raises(UserError, match="quality signal"):
        Predictor(net, _prep(), device="cpu", mode="fast", quality=True)
    no_ds = UNetPlusPlus3D(1, 2, (4, 8, 16), strides=[[2, 2, 2], [2, 2, 1]], deep_supervision=False)
    assert Predictor(no_ds, _prep(), device="cpu", progress=False, amp=False).predict(scan).quality is None


def test_infer_summary_and_nodule_report_carry_the_disagreement(tmp_path, capsys):
    import json

    from unetpp3d.commands.infer import run_inference
    from unetpp3d.config import Config

    torch.manual_seed(0)
    net = UNetPlusPlus3D(1, 2, (4, 8, 16), strides=[[2, 2, 2], [2, 2, 1]])
    ckpt = tmp_path / "best.pt"
    torch.save({"model_args": net.model_args, "state_dict": net.state_dict(), "preprocessing": _prep().to_dict(),
                "config": Config(task="lung_nodule").to_dict(), "epoch": 1}, ckpt)
    assert run_inference([_scan(tmp_path)], tmp_path / "out", model=ckpt, device="cpu") == 0
    text = capsys.readouterr().out
    assert "disagreement" in text.splitlines()[0] and "review the masks with the highest values first" in text
    report = json.loads((tmp_path / "out" / "scan.nodules.json").read_text())
    assert report["head_disagreement"] > 0
    assert all(n["head_disagreement"] is not None for n in report["nodules"])
    assert "head_disagreement" in (tmp_path / "out" / "scan.nodules.csv").read_text().splitlines()[0]
