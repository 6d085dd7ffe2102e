"""Non-finite training: NaN/inf losses are skipped then stop the run; non-finite weights are never saved or loaded."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet

from unetpp3d import UserError
from unetpp3d.config import load_config
from unetpp3d.data.fingerprint import fingerprint
from unetpp3d.data.manifest import load_manifest
from unetpp3d.model.checkpoint import load_checkpoint, load_state_dict, save_checkpoint
from unetpp3d.model.network import UNetPlusPlus3D
from unetpp3d.model.planning import plan
from unetpp3d.synth.phantom import write_dataset
from unetpp3d.training.trainer import build_trainer

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
TINY = ["model.features=[4,8,16]", "data.patch_size=[32,32,32]", "data.batch_size=1", "data.num_workers=0",
        "train.val_every=1", "train.amp=off"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_dataset("liver", 3, tmp_path_factory.mktemp("phantoms"), seed=0, size=32)


def _trainer(phantoms: Path, folder: Path, loss_fn, overrides: list[str]):
    man = load_manifest(phantoms)
    cfg = load_config(SMOKE, TINY + overrides)
    cfg, prep = plan(cfg, fingerprint(man.training, man.labels), man.labels, echo=None)
    torch.manual_seed(0)
    net = BasicUNet(3, 1, prep.num_classes, features=(4, 4, 8, 8, 8, 4))
    return build_trainer(cfg, prep, net, loss_fn, man.training[:-1], man.training[-1:], folder, torch.device("cpu"))


def _loss_cells(folder: Path) -> list[str]:
    if not (folder / "metrics.csv").is_file():
        return []
    with open(folder / "metrics.csv", newline="", encoding="utf-8") as fh:
        return [row["train_loss"] for row in csv.DictReader(fh)]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_a_non_finite_learning_rate_is_refused(value):
    with pytest.raises(UserError, match="train.lr"):
        load_config(None, [f"train.lr={value}"])


@pytest.mark.parametrize("key", ["data.pos_fraction", "train.grad_clip", "infer.overlap", "train.weight_decay"])
def test_no_config_number_may_be_nan(key):
    with pytest.raises(UserError, match="finite"):
        load_config(None, [f"{key}=.nan"])


def test_nan_losses_stop_training_and_keep_the_last_finite_checkpoint(phantoms, tmp_path):
    calls = []

    def nan_loss(logits, label):
        calls.append(1)
        return logits.sum() * math.nan

    run = tmp_path / "run"
    trainer = _trainer(phantoms, run, nan_loss, ["train.epochs=4", "train.iterations_per_epoch=5",
                                                 "train.max_nonfinite_steps=3"])
    with pytest.raises(UserError, match=r"not finite for 3 steps in a row.*last\.pt keeps epoch 0") as info:
        trainer.fit()
    assert "\n" not in str(info.value)
    assert len(calls) == 3  # bounded: stopped at the third skipped step, not at the epoch's fifth
    assert not (run / "best.pt").exists()
    assert all(cell != "" for cell in _loss_cells(run))
    last = load_checkpoint(run / "last.pt")  # loads: its weights are finite
    assert last["epoch"] == 0
    assert "training stopped" in (run / "train.log").read_text(encoding="utf-8")


def test_an_epoch_without_a_finite_step_stops_before_saving(phantoms, tmp_path):
    run = tmp_path / "run"
    trainer = _trainer(phantoms, run, lambda logits, label: logits.sum() * math.inf,
                       ["train.epochs=3", "train.iterations_per_epoch=1", "train.max_nonfinite_steps=5"])
    with pytest.raises(UserError, match="no step of the epoch had a finite loss"):
        trainer.fit()
    assert _loss_cells(run) == [] and not (run / "best.pt").exists()
    assert load_checkpoint(run / "last.pt")["epoch"] == 0


def test_weights_that_diverge_are_never_saved_as_best(phantoms, tmp_path):
    """Finite losses but weights gone NaN (an optimiser step with a NaN learning rate): no best.pt, no last.pt of them."""
    run = tmp_path / "run"
    trainer = _trainer(phantoms, run, DiceCELoss(to_onehot_y=True, softmax=True),
                       ["train.epochs=3", "train.iterations_per_epoch=1"])
    for group in trainer.optimizer.param_groups:  # what --set train.lr=.nan did before the config refused it
        group["lr"] = math.nan
    with pytest.raises(UserError, match="weights are no longer finite"):
        trainer.fit()
    assert not (run / "best.pt").exists()
    assert load_checkpoint(run / "last.pt")["epoch"] == 0
    assert trainer.history == [] and _loss_cells(run) == []


def test_a_few_nan_steps_are_skipped_and_training_goes_on(phantoms, tmp_path):
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    calls = []

    def sometimes_nan(logits, label):
        calls.append(1)
        loss = dice_ce(logits, label)
        return loss * math.nan if len(calls) in (1, 3) else loss

    run = tmp_path / "run"
    trainer = _trainer(phantoms, run, sometimes_nan, ["train.epochs=2", "train.iterations_per_epoch=2",
                                                      "train.max_nonfinite_steps=2"])
    assert trainer.fit() is None
    cells = _loss_cells(run)
    assert len(cells) == 2 and all(math.isfinite(float(c)) for c in cells)
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


def _tiny_net() -> UNetPlusPlus3D:
    torch.manual_seed(0)
    return UNetPlusPlus3D(1, 2, features=(4, 8))


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_checkpoints_with_non_finite_weights_are_refused_on_load(tmp_path, value):
    net = _tiny_net()
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"model_args": net.model_args, "state_dict": net.state_dict()})
    state = net.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone().fill_(value)
    torch.save({"model_args": net.model_args, "state_dict": state}, path)  # as a diverged run wrote it
    with pytest.raises(UserError, match=rf"{path.name}: refused, its weights are not finite.*{name}"):
        load_checkpoint(path)
    bundle_weights = tmp_path / "model.pt"
    torch.save(state, bundle_weights)  # a bundle's models/model.pt is a bare state dict
    with pytest.raises(UserError, match=r"model\.pt: refused, its weights are not finite"):
        load_state_dict(bundle_weights)


def test_non_finite_weights_are_never_saved(tmp_path):
    net = _tiny_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].view(-1)[0] = math.nan
    with pytest.raises(UserError, match="not saved, the weights are not finite"):
        save_checkpoint(tmp_path / "best.pt", {"model_args": net.model_args, "state_dict": state})
    assert not (tmp_path / "best.pt").exists()
