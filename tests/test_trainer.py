"""Training: a short run learns and writes its run folder; resume after SIGKILL; SIGTERM; bad input.

Tiny widths (4, 8, 16), 32^3 patches and 32^3 synthetic phantoms keep every run to seconds.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from factories import ONE_THREAD
from monai.data import Dataset
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
from monai.transforms import Compose, RandSpatialCropSamplesd

import unetpp3d.commands.train as train_command
from unetpp3d import UserError, load_model
from unetpp3d.commands.check import run_check
from unetpp3d.commands.train import _load_run_config, run_training
from unetpp3d.config import TrainConfig, load_config
from unetpp3d.data.fingerprint import fingerprint
from unetpp3d.data.loader import EpochSampler, TrainLoader, worker_context
from unetpp3d.data.manifest import Case, load_manifest, write_manifest
from unetpp3d.data.plausibility import field_of_view_mm, volume_range
from unetpp3d.data.validation import inspect_case
from unetpp3d.model.checkpoint import PAYLOAD_KEYS, load_checkpoint
from unetpp3d.model.planning import plan
from unetpp3d.synth.phantom import write_dataset
from unetpp3d.training.optim import lr_factor
from unetpp3d.training.trainer import build_trainer

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
TINY = ["model.features=[4,8,16]", "data.patch_size=[32,32,32]", "data.batch_size=2", "data.num_workers=0",
        "train.iterations_per_epoch=4", "train.val_every=1", "train.amp=off"]
EPOCHS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Five 32^3 liver phantoms: three to train on, one to validate, one held out."""
    return write_dataset("liver", 5, tmp_path_factory.mktemp("phantoms"), seed=0, size=32)


@pytest.fixture(scope="module")
def reference_run(phantoms, tmp_path_factory) -> Path:
    """One uninterrupted run that several tests inspect."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    return run_training(phantoms, SMOKE, out, device="cpu", overrides=TINY + [f"train.epochs={EPOCHS}"])


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def last_epoch(run: Path) -> int:
    try:
        return int(load_checkpoint(run / "last.pt")["epoch"])
    except UserError:  # not written yet
        return -1


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "unetpp3d", "train", *args]


# ---- a run learns and leaves a complete run folder -------------------------------------------


@pytest.mark.slow
def test_a_short_run_lowers_the_loss(reference_run):
    rows = read_metrics(reference_run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(0.0 <= float(r["val_dice"]) <= 1.0 for r in rows)
    assert set(rows[0]) == {"epoch", "train_loss", "val_dice", "lr", "seconds", "dice_liver"}
    # Poly decay, nnU-Net's formula, stepped per epoch.
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.01 * (1 - e / EPOCHS) ** 0.9 for e in range(EPOCHS)],
                                                           rel=1e-4)


@pytest.mark.slow
def test_run_folder_holds_everything(reference_run):
    for name in ("last.pt", "best.pt", "config.yaml", "split.json", "metrics.csv", "train.log", "curves.png"):
        assert (reference_run / name).is_file(), name
    assert list((reference_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (reference_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = load_checkpoint(reference_run / "last.pt")
    assert set(PAYLOAD_KEYS) <= set(last)
    assert last["epoch"] == EPOCHS and last["preprocessing"]["patch_size"] == [32, 32, 32]
    assert set(last["rng"]) == {"torch", "numpy", "python", "cuda"}
    best = load_checkpoint(reference_run / "best.pt")
    best_in_csv = max(float(r["val_dice"]) for r in read_metrics(reference_run))
    assert best["best_metric"] == pytest.approx(best_in_csv, rel=1e-5)
    # The resolved config reloads as a config, with no "auto" left in what planning resolves.
    cfg = load_config(reference_run / "config.yaml")
    assert cfg.data.patch_size == [32, 32, 32] and cfg.model.strides != "auto" and cfg.data.target_spacing != "auto"
    # A model rebuilds from the checkpoint alone.
    net = load_model(reference_run / "best.pt")
    assert net.model_args["features"] == [4, 8, 16]
    log = (reference_run / "train.log").read_text()
    assert sum(line.split(" ", 1)[1].startswith("epoch ") for line in log.splitlines() if " " in line) == EPOCHS


# ---- resume ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_weights(phantoms, reference_run, tmp_path):
    """Kill -9 in epoch 2, resume: same final weights, bit for bit, and metrics.csv continues."""
    run = tmp_path / "killed"
    args = cli("--manifest", str(phantoms), "--config", str(SMOKE), "--out", str(run), "--device", "cpu",
               *[a for o in TINY + [f"train.epochs={EPOCHS}"] for a in ("--set", o)])
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    try:
        deadline = time.monotonic() + 120
        while last_epoch(run) < 1:  # epoch 1 is saved: the process is now in epoch 2
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert last_epoch(run) == 1

    run_training(phantoms, out_dir=run, resume=True, device="cpu")

    final, reference = load_checkpoint(run / "last.pt"), load_checkpoint(reference_run / "last.pt")
    assert final["epoch"] == EPOCHS
    for key, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key
    rows, ref_rows = read_metrics(run), read_metrics(reference_run)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref_rows]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in ref_rows]
    assert [r["val_dice"] for r in rows] == [r["val_dice"] for r in ref_rows]
    assert "resuming at epoch 2/3" in (run / "train.log").read_text()


@pytest.mark.slow
def test_sigterm_keeps_last_checkpoint_and_says_how_to_resume(phantoms, tmp_path):
    run = tmp_path / "stopped"
    args = cli("--manifest", str(phantoms), "--config", str(SMOKE), "--out", str(run), "--device", "cpu",
               *[a for o in TINY + ["train.epochs=50", "train.val_every=50"] for a in ("--set", o)])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", env=ONE_THREAD)
    deadline = time.monotonic() + 120
    while last_epoch(run) < 1:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output and "--resume" in output
    saved = last_epoch(run)
    assert 1 <= saved < 50
    assert [int(r["epoch"]) for r in read_metrics(run)] == list(range(1, saved + 1))


def test_resume_with_the_first_runs_command_line(phantoms, tmp_path):
    """`--resume` with the same --config works; a config asking for other values is refused, naming them."""
    run = tmp_path / "run"
    first = TINY + ["train.epochs=1", "train.iterations_per_epoch=1"]
    run_training(phantoms, SMOKE, run, device="cpu", overrides=first)
    # The training cases' label volumes (not validation's) go with the model, for infer's warning.
    fp, split = (json.loads((run / name).read_text()) for name in ("dataset.fingerprint.json", "split.json"))
    trained = volume_range([c["label_volumes_ml"] for c in fp["cases"] if c["name"] in split["training"]])
    prep = load_checkpoint(run / "last.pt")["preprocessing"]
    assert trained["1"][0] > 0 and prep["volume_range_ml"] == trained
    seen = [c for c in fp["cases"] if c["name"] in split["training"]]
    assert prep["field_of_view_mm"] == field_of_view_mm([c["size"] for c in seen], [c["spacing"] for c in seen])
    run_training(phantoms, SMOKE, run, resume=True, device="cpu",
                 overrides=TINY + ["train.epochs=2", "train.iterations_per_epoch=1"])  # --set still changes values
    assert last_epoch(run) == 2 and "resuming at epoch 2/2" in (run / "train.log").read_text()
    # What the restored weights, optimiser and schedule cannot honour is refused, not silently ignored.
    for change, named in [("train.lr=0.5", r"train\.lr: 0\.5 here, 0\.01 in the run"),
                          ("model.features=[4,8,32]", r"model\.features: \[4, 8, 32\] here, \[4, 8, 16\]"),
                          ("train.optimizer=adamw", r"train\.optimizer: 'adamw' here, 'sgd' in the run")]:
        with pytest.raises(UserError, match=named + r".*Start a new run"):
            run_training(phantoms, SMOKE, run, resume=True, device="cpu",
                         overrides=TINY + ["train.epochs=3", "train.iterations_per_epoch=1", change])
    assert last_epoch(run) == 2

    other = tmp_path / "other.yaml"
    other.write_text(SMOKE.read_text().replace("lr: 0.01", "lr: 0.02").replace("overlap: 0.25", "overlap: 0.5"))
    with pytest.raises(UserError, match=r"other\.yaml: differs from the config of the run in .*"
                                        r"train\.lr: 0\.02 here, 0\.01 in the run; "
                                        r"infer\.overlap: 0\.5 here, 0\.25 in the run"):
        run_training(phantoms, other, run, resume=True, device="cpu", overrides=first)
    assert last_epoch(run) == 2


def test_resume_needs_a_run(phantoms, tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        run_training(phantoms, out_dir=tmp_path / "none", resume=True, device="cpu")
    with pytest.raises(UserError, match="--resume needs --out"):
        run_training(phantoms, resume=True, device="cpu")


# ---- bad input: a UserError before anything is written ---------------------------------------


@pytest.mark.parametrize("override, message", [
    ("train.bogus=1", "unknown key"),
    ("data.patch_size=[30,32,32]", r"multiple of \[4, 4, 4\]"),
    ("train.lr=-0.01", r"train.lr must be in \(0, 10\], got -0.01"),
    ("train.head_weights=[1,2,3]", "head_weights"),
    ("data.samples_per_volume=0", r"data\.samples_per_volume must be in \[1, 1,024\], got 0"),
    ("model.dropout=5", r"model\.dropout must be in \[0, 1\)"),
    ("model.norm=bogus", r"model\.norm 'bogus' is not one of"),
    ("data.num_workers=-1", r"data\.num_workers must be in \[0, 256\]"),
    ("train.lr=.nan", r"train\.lr: expected a finite number"),
])
def test_bad_config_is_refused(phantoms, tmp_path, override, message):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=message):
        run_training(phantoms, SMOKE, out, device="cpu", overrides=TINY + [override])
    assert not out.exists()


def test_fp16_on_cpu_is_refused(phantoms, tmp_path):
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        run_training(phantoms, SMOKE, tmp_path / "run", device="cpu", overrides=TINY + ["train.amp=fp16"])
    assert not (tmp_path / "run").exists()


def _manifest_with(tmp_path: Path, phantoms: Path, **changes) -> Path:
    man = load_manifest(phantoms)
    return write_manifest(tmp_path / "manifest.json", training=changes.get("training", man.training),
                          labels=changes.get("labels", man.labels), task="liver", test=changes.get("test", []))


def test_manifest_that_fails_check_is_refused(phantoms, tmp_path):
    man = load_manifest(phantoms)
    broken = tmp_path / "broken_label.nii.gz"
    broken.write_bytes(b"not a nifti file")
    cases = [Case(man.training[0].name, man.training[0].image, broken), *man.training[1:]]
    path = _manifest_with(tmp_path, phantoms, training=cases)
    with pytest.raises(UserError, match=r"problem\(s\) in the training data.*broken_label.*unetpp3d check"):
        run_training(path, SMOKE, tmp_path / "run", device="cpu", overrides=TINY)
    assert not (tmp_path / "run").exists()


def test_undeclared_label_class_is_refused(phantoms, tmp_path):
    man = load_manifest(phantoms)
    img = sitk.ReadImage(str(man.training[0].label))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = 2  # class 2 is not in the manifest's labels
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(tmp_path / "label2.nii.gz"))
    case = Case(man.training[0].name, man.training[0].image, tmp_path / "label2.nii.gz")
    path = _manifest_with(tmp_path, phantoms, training=[case, *man.training[1:]])
    with pytest.raises(UserError, match=r"label values \[2\] are not among"):
        run_training(path, SMOKE, tmp_path / "run", device="cpu", overrides=TINY)


def test_empty_training_set_is_refused(phantoms, tmp_path):
    man = load_manifest(phantoms)
    path = _manifest_with(tmp_path, phantoms, training=[], test=[c.image for c in man.training])
    with pytest.raises(UserError, match="no training cases"):
        run_training(path, SMOKE, tmp_path / "run", device="cpu", overrides=TINY)


def test_another_runs_folder_is_not_overwritten(phantoms, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"another run")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds a training run.*--force"):
        run_training(phantoms, SMOKE, out, device="cpu", overrides=TINY)
    assert (out / "last.pt").read_bytes() == b"another run"


@pytest.mark.slow
def test_force_overwrites_only_run_files_and_fold_picks_the_split(phantoms, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("epoch,train_loss,val_dice,lr,seconds\n7,0.5,,0.01,1.0\n")  # an old run's
    (out / "notes.txt").write_text("mine")
    run_training(phantoms, SMOKE, out, force=True, device="cpu", fold=1,
                 overrides=TINY + ["train.epochs=1", "train.iterations_per_epoch=1", "data.folds=2"])
    assert (out / "notes.txt").read_text() == "mine"
    assert [r["epoch"] for r in read_metrics(out)] == ["1"]
    split = json.loads((out / "split.json").read_text())
    assert split["fold"] == 1 and len(split["training"]) == len(split["validation"]) == 2


def test_default_config_is_the_tasks(phantoms, tmp_path, monkeypatch):
    (tmp_path / "liver.yaml").write_text("train:\n  lr: -1.0\n")
    monkeypatch.setattr(train_command, "task_config_path", lambda task: tmp_path / f"{task}.yaml")
    with pytest.raises(UserError, match=r"liver\.yaml: train\.lr must be in \(0, 10\]"):
        run_training(phantoms, out_dir=tmp_path / "run", device="cpu")


def test_a_lung_nodule_manifest_gets_the_shipped_lung_config(phantoms, tmp_path):
    man = load_manifest(phantoms)
    lung = write_manifest(tmp_path / "lung.json", man.training, {0: "background", 1: "nodule"}, task="lung_nodule")
    cfg, source = _load_run_config(load_manifest(lung), None, [])
    assert Path(source).name == "lung_nodule.yaml" and Path(source).parent.name == "configs"
    assert cfg.task == "lung_nodule" and cfg.data.intensity_range == [-1000.0, 400.0] and cfg.infer.tta is True
    cfg, _ = _load_run_config(man, None, [])
    assert cfg.task == "liver" and cfg.data.intensity_range == "auto" and cfg.infer.tta is False


def test_training_reuses_checks_fingerprint_until_a_file_changes(phantoms, tmp_path, monkeypatch):
    """Each case is read once: `check`'s fingerprint is reused while the files are unchanged."""
    man = load_manifest(phantoms)
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    # Copies: the test changes a file's modification time.
    cases = [Case(c.name, Path(shutil.copy(c.image, tmp_path / "images")),
                  Path(shutil.copy(c.label, tmp_path / "labels"))) for c in [*man.training, *(man.validation or [])]]
    manifest = write_manifest(tmp_path / "ds.json", cases, man.labels, task="liver")
    monkeypatch.chdir(tmp_path)
    assert run_check(manifest) == 0  # writes ./ds.fingerprint.json
    reads: list[str] = []

    def counting(case, *args, **kwargs):
        reads.append(case.name)
        return inspect_case(case, *args, **kwargs)

    monkeypatch.setattr(train_command, "inspect_case", counting)
    overrides = TINY + ["train.epochs=1", "train.iterations_per_epoch=1"]
    reused = run_training(manifest, SMOKE, tmp_path / "reused", device="cpu", overrides=overrides)
    assert f"fingerprint: reusing {tmp_path / 'ds.fingerprint.json'}" in (reused / "train.log").read_text()
    assert reads == []

    later = cases[1].label.stat().st_mtime_ns + 10**9
    os.utime(cases[1].label, ns=(later, later))
    stale = run_training(manifest, SMOKE, tmp_path / "stale", device="cpu", overrides=overrides)
    log = (stale / "train.log").read_text()
    assert "fingerprint: not reusing" in log and f"{cases[1].name}'s label {cases[1].label.resolve()}" in log
    assert sorted(reads) == sorted(c.name for c in cases)  # checked and fingerprinted in one read each
    assert load_config(stale / "config.yaml") == load_config(reused / "config.yaml")  # the same plan

    with pytest.raises(UserError, match="--fingerprint .*missing.json: no such file"):
        run_training(manifest, SMOKE, tmp_path / "none", device="cpu", overrides=overrides,
                     fingerprint_path=tmp_path / "missing.json")


def test_a_config_for_another_task_is_refused(phantoms, tmp_path):
    config = tmp_path / "nodules.yaml"
    config.write_text("task: lung_nodule\n")
    with pytest.raises(UserError, match="task 'lung_nodule' differs from the manifest's 'liver'"):
        run_training(phantoms, config, tmp_path / "run", device="cpu")


def test_cli_prints_user_errors_on_one_line(phantoms, tmp_path, capsys):
    from unetpp3d.commands.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--manifest", str(phantoms), "--config", str(SMOKE), "--out", str(tmp_path / "r"),
              "--device", "cpu", "--set", "train.lr=-1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train.lr must be in (0, 10]" in err and "\n" not in err


# ---- pieces ------------------------------------------------------------------------------------


def test_the_trainer_trains_any_network_with_any_loss(phantoms, tmp_path):
    """A MONAI BasicUNet and a plain loss function through the same loop, schedule and run files."""
    man = load_manifest(phantoms)
    cfg = load_config(SMOKE, TINY + ["train.epochs=2", "train.iterations_per_epoch=1", "train.val_every=2"])
    cfg, prep = plan(cfg, fingerprint(man.training, man.labels), man.labels, echo=None)
    torch.manual_seed(0)
    net = BasicUNet(3, 1, prep.num_classes, features=(4, 4, 8, 8, 8, 4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    calls: list[tuple[int, ...]] = []

    def loss_fn(logits, label):
        calls.append(tuple(logits.shape))
        return dice_ce(logits, label)

    trainer = build_trainer(cfg, prep, net, loss_fn, man.training[:-1], man.training[-1:], tmp_path / "run",
                            torch.device("cpu"))
    assert trainer.fit() is None
    assert calls == [(2, prep.num_classes, 32, 32, 32)] * 2
    assert [row["epoch"] for row in trainer.history] == [1, 2]
    assert [row["lr"] for row in trainer.history] == pytest.approx([0.01, 0.01 * 0.5**0.9])  # poly, per epoch
    assert 0.0 <= trainer.history[-1]["val_dice"] <= 1.0  # validated after the last epoch
    assert any(not torch.equal(v, before[k]) for k, v in net.state_dict().items())
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 2 and last["model_args"] is None  # not a UNet++: not rebuilt from the file
    assert [int(r["epoch"]) for r in read_metrics(tmp_path / "run")] == [1, 2]


def test_schedules():
    poly = TrainConfig(epochs=10, schedule="poly")
    assert [lr_factor(e, poly) for e in (0, 5, 9)] == pytest.approx([1.0, 0.5**0.9, 0.1**0.9])
    cosine = TrainConfig(epochs=10, schedule="cosine", warmup_epochs=2, optimizer="adamw")
    factors = [lr_factor(e, cosine) for e in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a > b for a, b in zip(factors[2:], factors[3:])) and factors[-1] > 0


def test_sampler_ranks_draw_disjoint_cases_and_epochs_differ():
    a = [list(EpochSampler(10, 7, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(a[0]) == len(a[1]) == 7 and not set(a[0][:5]) & set(a[1][:5])  # one shuffle covers both
    s = EpochSampler(10, 7, seed=3)
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(2)
    assert list(s) != first
    s.set_epoch(1)
    assert list(s) == first


@pytest.mark.parametrize("workers", [0, 1])
def test_an_epoch_draws_the_same_patches_however_the_run_got_there(workers):
    """The core of reproducible resume: batches depend on (seed, epoch, rank), not on history."""
    data = [{"image": np.random.default_rng(i).normal(size=(1, 12, 12, 12)).astype(np.float32),
             "label": np.zeros((1, 12, 12, 12), np.float32)} for i in range(4)]
    transform = Compose([RandSpatialCropSamplesd(["image", "label"], roi_size=(4, 4, 4), num_samples=2,
                                                 random_size=False)])

    def batches(loader, epoch):
        loader.set_epoch(epoch)
        return [b["image"].clone() for b in loader]

    def make(rank=0):
        return TrainLoader(Dataset(data, transform), batch_size=3, samples_per_volume=2, iterations=3, seed=7,
                           rank=rank, world_size=2, num_workers=workers)

    straight = make()
    batches(straight, 0)
    epoch1 = batches(straight, 1)
    resumed = make()  # a fresh process that starts at epoch 1
    again = batches(resumed, 1)
    assert len(epoch1) == 3 and all(b.shape == (3, 1, 4, 4, 4) for b in epoch1)
    assert all(torch.equal(x, y) for x, y in zip(epoch1, again))
    other_rank = batches(make(rank=1), 1)
    assert not any(torch.equal(x, y) for x, y in zip(epoch1, other_rank))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers fork on Linux only")
def test_loader_workers_fork_even_where_the_default_is_spawn():
    """A process started by spawn (the LIDC experiment's jobs) makes spawn its children's default;
    spawned workers would import torch again and receive the whole cached dataset by pickle at
    every epoch. The loaders fork their workers whatever the default."""
    data = [{"image": np.zeros((1, 8, 8, 8), np.float32), "label": np.zeros((1, 8, 8, 8), np.float32)}] * 2
    transform = Compose([RandSpatialCropSamplesd(["image", "label"], roi_size=(4, 4, 4), num_samples=2,
                                                 random_size=False)])
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        loader = TrainLoader(Dataset(data, transform), batch_size=2, samples_per_volume=2, iterations=2,
                             num_workers=1)
        assert loader.loader.multiprocessing_context.get_start_method() == "fork"
        loader.set_epoch(0)
        assert [b["image"].shape for b in loader] == [(2, 1, 4, 4, 4)] * 2
        assert worker_context(0) is None
    finally:
        multiprocessing.set_start_method(before, force=True)


def test_train_checkpointing_setting_reaches_the_network(phantoms, tmp_path, monkeypatch):
    """`train.checkpointing=true` trains with activation checkpointing (recomputed in backward)."""
    import unetpp3d.commands.train as trainer_module
    from unetpp3d.model.network import UNetPlusPlus3D

    seen: list[bool] = []

    class Recording(UNetPlusPlus3D):
        def forward(self, x):
            if self.training:
                seen.append(self.checkpointing)
            return super().forward(x)

    monkeypatch.setattr(trainer_module, "UNetPlusPlus3D", Recording)
    run_training(phantoms, SMOKE, tmp_path / "run", device="cpu",
                 overrides=TINY + ["train.epochs=1", "train.iterations_per_epoch=2", "train.checkpointing=true"])
    assert seen and all(seen)


class _FixedLogits(torch.nn.Module):
    """Returns the logits of a given label map, whatever the input: validation sees known predictions."""

    def __init__(self, labels: np.ndarray, num_classes: int):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.as_tensor(labels).long(), num_classes).permute(3, 0, 1, 2)
        self.logits = self.logits[None].float() * 10.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, -1, -1, -1)


def test_validation_treats_empty_masks_as_evaluate_does():
    """A class absent from prediction and label is left out of the mean; predicted where the label has
    none, it scores 0 (nnU-Net's convention, and `unetpp3d evaluate`'s)."""
    from types import SimpleNamespace

    from unetpp3d.commands.evaluate import class_means
    from unetpp3d.config import Config, Preprocessing
    from unetpp3d.evaluation.metrics import score_arrays
    from unetpp3d.training.trainer import Trainer

    liver = np.zeros((16, 16, 16), np.int64)
    liver[2:10, 2:10, 2:10] = 1
    tumour = liver.copy()
    tumour[4:6, 4:6, 4:6] = 2
    # (prediction, label): tumour right; no tumour on either side; tumour predicted where there is none
    cases = [(tumour, tumour), (liver, liver), (tumour, liver)]
    prep = Preprocessing(task="liver", labels={"0": "background", "1": "liver", "2": "tumour"},
                         target_spacing=[1.0, 1.0, 1.0], intensity_range=[-100.0, 200.0],
                         intensity_stats=[50.0, 50.0], patch_size=[16, 16, 16])
    per_case = []
    for pred, label in cases:
        trainer = Trainer(cfg=Config(task="liver"), prep=prep, net=_FixedLogits(pred, 3), model=None, loss_fn=None,
                          optimizer=None, scheduler=None, scaler=None, train_loader=None,
                          val_loader=[{"image": torch.zeros(1, 1, 16, 16, 16),
                                       "label": torch.as_tensor(label)[None, None]}],
                          device=torch.device("cpu"), folder=Path("."), split={},
                          log=SimpleNamespace(class_columns=["dice_liver", "dice_tumour"]))
        per_case.append(trainer.validate())
    assert per_case[0]["dice_tumour"] == 1.0
    assert np.isnan(per_case[1]["dice_tumour"]) and per_case[1]["val_dice"] == 1.0  # left out, not 1
    assert per_case[2]["dice_tumour"] == 0.0  # a false positive counts
    # the same cases through evaluate's scoring: the same per-case values and the same means
    rows = [r for i, (pred, label) in enumerate(cases) for r in score_arrays(pred, label, (1, 1, 1), case=str(i),
                                                                              labels=[1, 2])]
    for i, val in enumerate(per_case):
        tumour_row = next(r for r in rows if r.case == str(i) and r.label == 2)
        assert np.isnan(tumour_row.dice) if np.isnan(val["dice_tumour"]) else tumour_row.dice == val["dice_tumour"]
    assert class_means(rows)[2]["Dice"] == pytest.approx(np.nanmean([v["dice_tumour"] for v in per_case])) == 0.5
