"""Measured pruning: the table after training, the level fast mode picks from it, and its absence."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from unetpp3d.commands.train import run_training
from unetpp3d.config import FAST_PRUNE_LEVEL as DEFAULT_FAST_LEVEL
from unetpp3d.config import Config, Preprocessing
from unetpp3d.inference.predictor import Predictor
from unetpp3d.inference.pruning import (
    TABLE_NAME,
    choose_level,
    load_pruning_choice,
    measure_pruning,
    write_pruning_table,
)
from unetpp3d.model.network import UNetPlusPlus3D
from unetpp3d.synth.phantom import write_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


def table(*dice: float, accurate: float) -> dict:
    levels = [{"name": f"L{k}", "level": k, "dice": d, "ms_per_case": 10.0 * k} for k, d in enumerate(dice, start=1)]
    return {"levels": [*levels, {"name": "accurate", "level": None, "dice": accurate, "ms_per_case": 50.0}],
            "cases": 3, "timed_cases": 3, "device": "cpu"}


def test_the_smallest_level_within_the_tolerance_of_the_best_is_chosen():
    assert choose_level(table(0.70, 0.795, 0.80, 0.79, accurate=0.805))[0] == 2  # 0.795 >= 0.805 - 0.01
    assert choose_level(table(0.70, 0.79, 0.80, 0.79, accurate=0.805))[0] == 3
    assert choose_level(table(0.80, 0.79, 0.80, accurate=0.78))[0] == 1
    assert choose_level(table(0.70, 0.795, 0.80, accurate=0.805), tolerance=0.2)[0] == 1
    level, reason = choose_level(table(0.5, 0.6, 0.7, accurate=0.9))  # none close: the deepest level
    assert level == 3 and "no pruned level" in reason
    assert choose_level(table(math.nan, math.nan, accurate=math.nan))[0] is None


def _cases(n: int = 2) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    out = []
    for _ in range(n):
        label = torch.zeros(1, 1, 16, 16, 16)
        label[..., 4:10, 5:11, 3:9] = 1
        out.append({"image": label * 2 + 0.3 * torch.randn_like(label), "label": label})
    return out


def test_table_holds_every_level_and_accurate_mode_and_each_levels_dice_is_its_pruned_networks():
    torch.manual_seed(0)
    net = UNetPlusPlus3D(1, 2, (4, 8, 16, 32))
    result = measure_pruning(net, _cases(), [16, 16, 16], num_classes=2, timing_cases=1)
    assert [e["name"] for e in result["levels"]] == ["L1", "L2", "L3", "accurate"]
    assert result["cases"] == 2 and result["timed_cases"] == 1
    assert all(0.0 <= e["dice"] <= 1.0 and e["ms_per_case"] > 0 for e in result["levels"])
    # L^2's Dice, recomputed with the network actually pruned at level 2:
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    net.eval()
    with torch.no_grad():
        scores = [float(DiceMetric(include_background=False)(
            one_hot(net(c["image"], prune_level=2).argmax(1, keepdim=True), 2), one_hot(c["label"].long(), 2)))
            for c in _cases()]
    assert result["levels"][1]["dice"] == pytest.approx(sum(scores) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="no deep-supervision heads"):
        measure_pruning(UNetPlusPlus3D(1, 2, (4, 8), deep_supervision=False), _cases(1), [16, 16, 16], num_classes=2)


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    net = UNetPlusPlus3D(1, 2, (4, 8, 16, 32))
    prep = Preprocessing(task="lung_nodule", labels={"0": "background", "1": "nodule"},
                         target_spacing=[1.0, 1.0, 1.0], intensity_range=[-1000.0, 400.0],
                         intensity_stats=[-300.0, 700.0], patch_size=[16, 16, 16])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_args": net.model_args, "state_dict": net.state_dict(), "preprocessing": prep.to_dict(),
                "config": Config(task="lung_nodule").to_dict(), "epoch": 1}, path)
    return path


def test_fast_mode_without_a_level_uses_the_tables_choice_and_says_so(tmp_path, caplog):
    best = _checkpoint(tmp_path / "run" / "best.pt")
    assert load_pruning_choice(best) is None
    assert Predictor.from_source(tmp_path / "run", device="cpu", mode="fast").prune_level == DEFAULT_FAST_LEVEL
    write_pruning_table(table(0.70, 0.75, 0.80, accurate=0.80), best)
    assert json.loads((tmp_path / "run" / TABLE_NAME).read_text())["chosen_level"] == 3
    assert (tmp_path / "run" / "pruning.png").read_bytes()[:4] == b"\x89PNG"
    write_pruning_table(table(0.795, 0.70, 0.80, accurate=0.79), best)
    with caplog.at_level(logging.INFO, logger="unetpp3d"):
        predictor = Predictor.from_source(tmp_path / "run", device="cpu", mode="fast")
    assert predictor.prune_level == 1 and "L^1" in predictor.describe()
    assert "L^1 is the smallest level within 0.01 Dice" in caplog.text
    # An explicit level wins; accurate mode is untouched.
    assert Predictor.from_source(best, device="cpu", mode="fast", prune_level=2).prune_level == 2
    assert Predictor.from_source(best, device="cpu").prune_level is None


def test_a_table_for_other_weights_is_ignored(tmp_path, caplog):
    best = _checkpoint(tmp_path / "run" / "best.pt")
    write_pruning_table(table(0.795, 0.70, 0.80, accurate=0.79), best)
    payload = torch.load(best, weights_only=True)
    payload["epoch"] = 2  # training went on: other weights in the same file name
    torch.save(payload, best)
    with caplog.at_level(logging.WARNING, logger="unetpp3d"):
        assert Predictor.from_source(best, device="cpu", mode="fast").prune_level == DEFAULT_FAST_LEVEL
    assert "measured for other weights" in caplog.text


@pytest.mark.slow
def test_a_tiny_trained_run_writes_its_pruning_table(tmp_path):
    phantoms = write_dataset("liver", 4, tmp_path / "phantoms", seed=0, size=32)
    run = run_training(phantoms, REPO / "configs" / "smoke.yaml", tmp_path / "run", device="cpu", overrides=[
        "model.features=[4,8,16]", "data.patch_size=[32,32,32]", "data.batch_size=2", "train.epochs=1",
        "train.iterations_per_epoch=2", "train.val_every=1", "train.amp=off"])
    saved = json.loads((run / TABLE_NAME).read_text())
    assert [e["name"] for e in saved["levels"]] == ["L1", "L2", "accurate"]
    assert saved["chosen_level"] in (1, 2) and saved["checkpoint"] == "best.pt"
    assert (run / "pruning.png").is_file()
    log = (run / "train.log").read_text()
    assert "pruning table" in log and f"will run L^{saved['chosen_level']}" in log
    assert load_pruning_choice(run / "best.pt")[0] == saved["chosen_level"]
    # Without deep supervision there is nothing to prune, and nothing is written.
    plain = run_training(phantoms, REPO / "configs" / "smoke.yaml", tmp_path / "plain", device="cpu", overrides=[
        "model.features=[4,8,16]", "model.deep_supervision=false", "data.patch_size=[32,32,32]",
        "data.batch_size=2", "train.epochs=1", "train.iterations_per_epoch=1", "train.amp=off"])
    assert not (plain / TABLE_NAME).exists()
