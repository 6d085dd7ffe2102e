#!/usr/bin/env python
"""The UNet++ paper's 3D lung-nodule experiment on LIDC-IDRI crops, fairly: one command, one recipe.

    python pipelines/lidc_experiment.py --protocol reduced --out /tmp/lidc_reduced      # 2 CPU cores, < 1 h
    python pipelines/lidc_experiment.py --protocol full --device cuda --out OUT          # one GPU (aimed at ~8 min; docs/lidc.md)

Zhou et al. (UNet++, DLMIA 2018, arXiv:1807.10165) report IoU 71.47 for U-Net and 77.21 for
UNet++ with deep supervision on LIDC-IDRI nodule crops. This recipe repeats the comparison on
``../shared/data/lidc_nodule_crops`` (801 crops, 441 patients) with every source of unfairness
removed:

* **Same building blocks.** U-Net: :class:`unetpp3d.model.unet.UNet3D`, the UNet++'s encoder,
  ``ConvBlock``, strides, norm and upsampling with a plain decoder; wide U-Net: the same with
  widths scaled to the UNet++ DS's parameter count (:func:`~unetpp3d.model.unet.matched_features`);
  UNet++ without and with deep supervision: :class:`unetpp3d.model.network.UNetPlusPlus3D`.
* **Same training.** One :class:`unetpp3d.training.trainer.Trainer` per model and fold, built by
  :func:`~unetpp3d.training.trainer.build_trainer` (the loop and loaders of ``unetpp3d train``)
  from the protocol's config (``pipelines/lidc_experiment.yaml``): same loss (Dice + CE, equal
  head weights under deep supervision), optimiser, schedule, iterations, patch stream and seed.
  The checkpoint kept is the one with the best validation Dice (sliding window on whole
  validation crops, patients apart from training and test).
* **Split by patient.** k-fold cross-validation over patients: each nodule is tested exactly
  once, by the models of the fold that did not see its patient.
* **Scored per nodule on the crop's own grid**: probabilities resampled back with MONAI's
  ``Invertd``, then argmax; no post-processing. Mean IoU and Dice with 95% cluster-bootstrap
  intervals (patients resampled), paired differences against U-Net bootstrapped the same way,
  and the per-fold means.
* **Cost**: parameters, FLOPs per patch (``torch.utils.flop_counter``) and milliseconds per crop
  (sliding window on the preprocessed crop, batch 1, this machine, ``threads`` torch threads).

For the deep-supervised UNet++ the same weights are scored in accurate mode with the heads'
probabilities averaged (the paper) and with their logits averaged, and pruned to each level
L^1 ... L^L. Its head disagreement (:mod:`unetpp3d.inference.quality`) is correlated with the
per-nodule Dice (Spearman). Breakdowns: equivalent diameter (from the mask's volume) in bands
< 6, 6-10, 10-20, > 20 mm, and texture from ``nodules.csv``: ground-glass = Texture_value 1-2
("Non-Solid/GGO", "Non-Solid/Mixed"), part-solid = 3, solid = 4-5 ("Solid/Mixed", "Solid").

Writes ``results.json`` (every per-nodule number) and ``results.md`` (the tables) to ``--out``,
and each training's run folder (``runs/fold<k>_<model>/``: best.pt, metrics.csv, train.log).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from monai.data import MetaTensor  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402
from monai.transforms import Invertd  # noqa: E402

from unetpp3d.atomic import atomic_write_text  # noqa: E402
from unetpp3d.config import AUTO, Config, Preprocessing, config_from_dict  # noqa: E402
from unetpp3d.data.manifest import Case  # noqa: E402
from unetpp3d.data.plausibility import field_of_view_mm  # noqa: E402
from unetpp3d.data.transforms import eval_transforms, pad_value  # noqa: E402
from unetpp3d.evaluation.stats import bootstrap_mean, paired_difference, spearman, t_interval  # noqa: E402
from unetpp3d.imageio.readers import read_image  # noqa: E402
from unetpp3d.inference.pruning import measure_pruning, write_pruning_table  # noqa: E402
from unetpp3d.inference.quality import dice_gap, head_logits, head_spread  # noqa: E402
from unetpp3d.model.checkpoint import load_checkpoint  # noqa: E402
from unetpp3d.model.fused import flop_counter_mode  # noqa: E402
from unetpp3d.model.network import UNetPlusPlus3D, on_device  # noqa: E402
from unetpp3d.model.unet import UNet3D, count_parameters, matched_features  # noqa: E402
from unetpp3d.training.loss import DeepSupervisionLoss  # noqa: E402
from unetpp3d.training.rng import seed_everything  # noqa: E402
from unetpp3d.training.trainer import build_trainer  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "lidc_nodule_crops"
DEFAULT_CONFIG = Path(__file__).with_name("lidc_experiment.yaml")
PAPER_IOU = {"unet": 71.47, "unetpp_ds": 77.21}  # Zhou et al. 2018, Table 3, LIDC-IDRI (IoU %)
MODELS = ("unet", "wide_unet", "unetpp", "unetpp_ds")
MODEL_NAMES = {"unet": "U-Net", "wide_unet": "wide U-Net", "unetpp": "UNet++", "unetpp_ds": "UNet++ DS"}
SIZE_BANDS = ((0.0, 6.0, "< 6 mm"), (6.0, 10.0, "6-10 mm"), (10.0, 20.0, "10-20 mm"), (20.0, math.inf, "> 20 mm"))
TEXTURE_GROUPS = {1: "ground-glass", 2: "ground-glass", 3: "part-solid", 4: "solid", 5: "solid"}
EXPERIMENT_KEYS = ("folds", "validation_fraction", "timing_crops", "jobs", "threads")


# ----------------------------------------------------------------------------------------------
# Data: crops, folds by patient, preprocessing once
# ----------------------------------------------------------------------------------------------


@dataclass
class Crop:
    """One nodule-centred crop and what the breakdowns need about it."""

    name: str
    patient: str
    image: str
    mask: str
    texture: int
    csv_diameter_mm: float
    volume_mm3: float
    size: tuple[int, int, int] = (0, 0, 0)  # voxels per axis, the file's order
    spacing: tuple[float, float, float] = (0.0, 0.0, 0.0)  # mm, the same order

    @property
    def equivalent_diameter_mm(self) -> float:
        return (6.0 * self.volume_mm3 / math.pi) ** (1.0 / 3.0)


def size_band(diameter_mm: float) -> str:
    """The paper-style size band of an equivalent diameter (bands are [low, high) in mm)."""
    return next(name for low, high, name in SIZE_BANDS if low <= diameter_mm < high)


def load_crops(data_dir: Path, limit_patients: int | None = None, seed: int = 0) -> list[Crop]:
    """Every crop of ``data_dir`` with its row of ``nodules.csv`` and its mask volume.

    Args:
        data_dir: the ``lidc_nodule_crops`` folder (``images/``, ``masks/``, ``nodules.csv``).
        limit_patients: keep the crops of this many patients only (drawn with ``seed``), for a
            quick try or a test.
        seed: seed of that draw.
    """
    rows = {}
    with open(data_dir / "nodules.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            rows[f"{row['patient_id']}_R_{row['nodule_id']}"] = row
    crops = []
    for image in sorted((data_dir / "images").glob("*.nii.gz")):
        name = image.name[: -len(".nii.gz")]
        row = rows.get(name)
        if row is None:
            raise SystemExit(f"{image}: no row for {name} in {data_dir / 'nodules.csv'}")
        mask = data_dir / "masks" / image.name
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(mask))
        m = reader.Execute()
        volume = float(sitk.GetArrayViewFromImage(m).astype(bool).sum()) * float(np.prod(m.GetSpacing()))
        crops.append(Crop(name, row["patient_id"], str(image), str(mask), int(row["Texture_value"]),
                          float(row["diameter_mm"]), volume, tuple(m.GetSize()), tuple(m.GetSpacing())))
    if limit_patients:
        patients = sorted({c.patient for c in crops})
        keep = set(random.Random(seed).sample(patients, min(limit_patients, len(patients))))
        crops = [c for c in crops if c.patient in keep]
    return crops


def patient_folds(crops: Sequence[Crop], folds: int, val_fraction: float, seed: int
                  ) -> list[dict[str, list[str]]]:
    """k folds by patient: for each, the crop names of training, validation and test.

    Patients are shuffled with ``seed`` and dealt round-robin into ``folds`` test groups; of the
    remaining patients a share ``val_fraction`` (at least one) validates. No patient's crops
    are ever on two sides.
    """
    patients = sorted({c.patient for c in crops})
    if len(patients) < folds + 1:
        raise SystemExit(f"{len(patients)} patients cannot make {folds} folds with a validation set")
    random.Random(seed).shuffle(patients)
    groups = [patients[k::folds] for k in range(folds)]
    out = []
    for k in range(folds):
        rest = [p for j, g in enumerate(groups) if j != k for p in g]
        random.Random(seed + 1 + k).shuffle(rest)
        n_val = max(1, int(round(val_fraction * len(rest))))
        side = {**{p: "test" for p in groups[k]}, **{p: "validation" for p in rest[:n_val]},
                **{p: "training" for p in rest[n_val:]}}
        out.append({s: [c.name for c in crops if side[c.patient] == s] for s in ("training", "validation", "test")})
    return out


def make_prep(cfg: Config) -> Preprocessing:
    """The preprocessing every model shares, from the protocol's (fully specified) config."""
    for key in ("target_spacing", "intensity_range", "intensity_stats", "patch_size"):
        if getattr(cfg.data, key) == AUTO:
            raise SystemExit(f"the protocol's config must set data.{key}: the experiment plans nothing from the data")
    return Preprocessing(task="lung_nodule", labels={"0": "background", "1": "nodule"},
                         target_spacing=[float(v) for v in cfg.data.target_spacing],
                         intensity_range=[float(v) for v in cfg.data.intensity_range],
                         intensity_stats=[float(v) for v in cfg.data.intensity_stats],
                         patch_size=[int(v) for v in cfg.data.patch_size], crop_foreground=cfg.data.crop_foreground)


_CACHE: dict[str, Any] = {}


def _preprocess(crops: Sequence[Crop], cfg: Config) -> None:
    """Fill this process's scoring cache: every crop preprocessed once, its native mask, and the Case
    each training reads (training and validation load their crops as ``unetpp3d train`` does)."""
    prep = make_prep(cfg)
    eval_pipe = eval_transforms(prep, ("image", "label"))
    items, native = {}, {}
    for crop in crops:
        items[crop.name] = eval_pipe({"image": crop.image, "label": crop.mask})
        native[crop.name] = read_image(crop.mask, is_label=True)[0] > 0
    cases = {c.name: Case(c.name, Path(c.image), Path(c.mask)) for c in crops}
    _CACHE.update(prep=prep, eval_pipe=eval_pipe, items=items, native=native, cases=cases,
                  crops={c.name: c for c in crops})


def _init_worker(crops: Sequence[Crop], cfg_dict: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    _preprocess(crops, config_from_dict(cfg_dict, "protocol"))


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def model_args(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    return dict(in_channels=1, out_channels=2, strides=m.strides, norm=m.norm, act=m.act, upsample=m.upsample,
                dropout=m.dropout)


def build_model(name: str, cfg: Config) -> torch.nn.Module:
    """The network ``name`` (one of :data:`MODELS`) for the protocol's config."""
    args, features = model_args(cfg), list(cfg.model.features)
    if name == "unet":
        return UNet3D(features=features, deep_supervision=False, **args)
    if name == "wide_unet":
        target = count_parameters(lambda: UNetPlusPlus3D(features=features, deep_supervision=True, **args))
        return UNet3D(features=matched_features(target, features, **args)[0], deep_supervision=False, **args)
    if name in ("unetpp", "unetpp_ds"):
        return UNetPlusPlus3D(features=features, deep_supervision=name == "unetpp_ds", **args)
    raise ValueError(f"unknown model {name!r}; use one of {', '.join(MODELS)}")


def variants(name: str, net: torch.nn.Module) -> list[str]:
    """The ways one trained model is scored: its output, or for UNet++ DS both averages and each level."""
    if name != "unetpp_ds":
        return ["output"]
    return ["accurate", "logit_mean", *[f"L{level}" for level in range(1, net.depth + 1)]]


class _AllVariants(torch.nn.Module):
    """Window network for UNet++ DS: every head's probabilities, then the softmax of the heads' mean logit."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = head_logits(self.net, x)
        probs = [torch.softmax(h.float(), dim=1) for h in heads]
        return torch.cat([*probs, torch.softmax(torch.stack(heads).float().mean(0), dim=1)], dim=1)


class _Softmax(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x).float(), dim=1)


class _Level(torch.nn.Module):
    """``net`` at one prune level (None: accurate mode, or a network that cannot be pruned)."""

    def __init__(self, net: torch.nn.Module, level: int | None):
        super().__init__()
        self.net, self.level = net, level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) if self.level is None else self.net(x, prune_level=self.level)


def _scores(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    inter = int(np.logical_and(pred, ref).sum())
    total = int(pred.sum()) + int(ref.sum())
    union = total - inter
    dice = 1.0 if total == 0 else 2.0 * inter / total
    iou = 1.0 if union == 0 else inter / union
    return dice, iou


@torch.no_grad()
def evaluate(name: str, net: torch.nn.Module, names: Sequence[str], cfg: Config, device: torch.device
             ) -> list[dict[str, Any]]:
    """Per-crop Dice and IoU of every variant on the crop's own grid; head disagreement for UNet++ DS."""
    prep, eval_pipe = _CACHE["prep"], _CACHE["eval_pipe"]
    invert = Invertd(keys="pred", transform=eval_pipe, orig_keys="image", nearest_interp=False, to_tensor=True)
    kinds = variants(name, net)
    window = _AllVariants(net) if name == "unetpp_ds" else _Softmax(net)
    net.eval()
    rows = []
    for crop in names:
        item = _CACHE["items"][crop]
        image = item["image"].as_tensor()[None].to(device)
        probs = sliding_window_inference(image, prep.patch_size, cfg.infer.sw_batch_size, window,
                                         overlap=cfg.infer.overlap, mode="gaussian", cval=pad_value(prep))[0]
        # Invertd takes the trace from "image" and needs a MetaTensor to apply it to.
        native = invert({**item, "pred": MetaTensor(probs.cpu())})["pred"]
        native = (native.as_tensor() if hasattr(native, "as_tensor") else native).float().numpy()
        ref = _CACHE["native"][crop]
        row: dict[str, Any] = {"case": crop}
        if name != "unetpp_ds":
            row["output"] = _scores(native[1] > native[0], ref)
        else:
            heads = native[:-2].reshape(-1, 2, *native.shape[1:])  # (H, C, x, y, z)
            mean = heads.mean(0)
            accurate = mean[1] > mean[0]
            row["accurate"] = _scores(accurate, ref)
            row["logit_mean"] = _scores(native[-1] > native[-2], ref)
            for level, head in enumerate(heads, start=1):
                row[f"L{level}"] = _scores(head[1] > head[0], ref)
            spread = head_spread(torch.as_tensor(heads)[:, None])[0].numpy()
            row["disagreement"] = float(spread[accurate].mean()) if accurate.any() else math.nan
            row["l1_dice_gap"] = dice_gap(heads[0][1] > heads[0][0], accurate)
        rows.append(row)
    assert all(k in rows[0] for k in kinds) if rows else True
    return rows


@torch.no_grad()
def cost(name: str, net: torch.nn.Module, names: Sequence[str], cfg: Config, device: torch.device
         ) -> dict[str, dict[str, float]]:
    """FLOPs per patch and ms per crop (sliding window on the preprocessed crop) of every variant."""
    prep = _CACHE["prep"]
    levels: dict[str, int | None] = {"output": None, "accurate": None}
    if name == "unetpp_ds":
        levels.update({f"L{level}": level for level in range(1, net.depth + 1)})
        levels.pop("output")
    else:
        levels.pop("accurate")
    out = {}
    images = [_CACHE["items"][c]["image"].as_tensor()[None].to(device) for c in names]
    net.eval()
    for kind, level in levels.items():
        model = _Level(net, level)
        with flop_counter_mode(display=False) as counter:  # counts the fused path's direct oneDNN calls too
            model(torch.zeros(1, 1, *prep.patch_size, device=device))
        window = _Softmax(model)

        def run(image: torch.Tensor, window: torch.nn.Module = window) -> None:
            sliding_window_inference(image, prep.patch_size, cfg.infer.sw_batch_size, window,
                                     overlap=cfg.infer.overlap, mode="gaussian", cval=pad_value(prep))

        for image in images[:2]:  # warm-up: allocator, oneDNN/cuDNN kernel choice
            run(image)
        _sync(device)
        start = time.perf_counter()
        for image in images:
            run(image)
        _sync(device)
        ms = 1000.0 * (time.perf_counter() - start) / max(len(images), 1)
        out[kind] = {"gflops_per_patch": counter.get_total_flops() / 1e9, "ms_per_crop": ms}
    if "accurate" in out:
        out["logit_mean"] = dict(out["accurate"])  # the same network pass; only the averaging differs
    return out


def _device_name(device: str) -> str:
    """The device as a reader of the results needs it: the card's name on a GPU."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(dev)})"
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# One training: fold k, one model
# ----------------------------------------------------------------------------------------------


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one model on one fold with the shared recipe, keep its best validation checkpoint, score it."""
    cfg = config_from_dict(job["config"], "protocol")
    device = torch.device(job["device"])
    name, fold = job["model"], job["fold"]
    folder = Path(job["out"]) / "runs" / f"fold{fold}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    split = job["split"]
    # The checkpoint records what the model saw, as `unetpp3d train` does: infer then warns when it
    # is run on a whole chest CT rather than at points.
    seen = [_CACHE["crops"][n] for n in split["training"]]
    prep = dataclasses.replace(_CACHE["prep"], field_of_view_mm=field_of_view_mm([c.size for c in seen],
                                                                                  [c.spacing for c in seen]))
    start = time.perf_counter()
    seed_everything(cfg.train.seed)  # the same initial draw for every model of a fold
    net = build_model(name, cfg)
    loss_fn = DeepSupervisionLoss(prep.num_classes, cfg.train.head_weights, kind=cfg.train.loss)
    # The loop, optimiser, schedule, precision and loaders of `unetpp3d train`, for every model alike; the
    # patch stream depends on the seed only, so each model of a fold sees the same patches.
    trainer = build_trainer(cfg, prep, net, loss_fn, [_CACHE["cases"][n] for n in split["training"]],
                            [_CACHE["cases"][n] for n in split["validation"]], folder, device,
                            split={"fold": fold, **split})
    signum = trainer.fit()
    if signum is not None:  # Ctrl-C or SIGTERM: the trainer stopped in order; the experiment stops too
        raise SystemExit(128 + signum)
    train_s = time.perf_counter() - start
    best = folder / "best.pt"
    payload = load_checkpoint(best if best.is_file() else folder / "last.pt", map_location=device)
    net.load_state_dict(payload["state_dict"])
    on_device(net, device)  # scored and timed on the path `unetpp3d infer` takes, not training's
    rows = evaluate(name, net, split["test"], cfg, device)
    costs = cost(name, net, split["test"][: job["timing_crops"]], cfg, device)
    pruning = None
    if name == "unetpp_ds" and best.is_file():
        # The run's own pruning table, as `unetpp3d train` writes it: infer --mode fast reads it.
        pruning = measure_pruning(net, trainer.val_loader, prep.patch_size, num_classes=prep.num_classes,
                                  sw_batch_size=cfg.infer.sw_batch_size, overlap=cfg.infer.overlap, cval=pad_value(prep),
                                  device=device, timing_cases=job["timing_crops"])
        write_pruning_table(pruning, best)
    (folder / "last.pt").unlink(missing_ok=True)  # best.pt is what was scored; keep the folder small
    return {"fold": fold, "model": name, "params": sum(p.numel() for p in net.parameters()),
            "features": net.model_args["features"], "best_val_dice": float(trainer.best_metric),
            "best_epoch": int(payload.get("epoch", -1)), "train_seconds": train_s,
            "eval_seconds": time.perf_counter() - start - train_s, "cost": costs, "rows": rows, "pruning": pruning,
            "load": os.getloadavg()}


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def collect(results: list[dict[str, Any]], crops: Sequence[Crop]) -> dict[str, Any]:
    """Per-variant per-nodule scores in one crop order, with intervals, paired differences and breakdowns."""
    by_name = {c.name: c for c in crops}
    scores: dict[str, dict[str, dict[str, float]]] = {}  # "model/variant" -> case -> {dice, iou}
    quality: dict[str, dict[str, float]] = {}
    for res in results:
        for row in res["rows"]:
            for key, value in row.items():
                if isinstance(value, (list, tuple)):
                    label = res["model"] if key == "output" else f"{res['model']}/{key}"
                    scores.setdefault(label, {})[row["case"]] = {"dice": value[0], "iou": value[1]}
            if "disagreement" in row:
                quality[row["case"]] = {"disagreement": row["disagreement"], "l1_dice_gap": row["l1_dice_gap"]}
    cases = sorted(set.intersection(*(set(v) for v in scores.values()))) if scores else []
    patients = [by_name[c].patient for c in cases]
    table = {}
    base = scores.get("unet")
    for label, per_case in scores.items():
        dice = np.array([per_case[c]["dice"] for c in cases])
        iou = np.array([per_case[c]["iou"] for c in cases])
        entry = {"iou": bootstrap_mean(iou, patients).to_dict(), "dice": bootstrap_mean(dice, patients).to_dict()}
        if base is not None and label != "unet":
            entry["iou_minus_unet"] = paired_difference(iou, [base[c]["iou"] for c in cases], patients).to_dict()
            entry["dice_minus_unet"] = paired_difference(dice, [base[c]["dice"] for c in cases], patients).to_dict()
        bands = {}
        for group_name, key in (("size", lambda c: size_band(by_name[c].equivalent_diameter_mm)),
                                ("texture", lambda c: TEXTURE_GROUPS[by_name[c].texture])):
            groups: dict[str, list[int]] = {}
            for i, c in enumerate(cases):
                groups.setdefault(key(c), []).append(i)
            bands[group_name] = {g: {"n": len(ix), "iou": bootstrap_mean(iou[ix], [patients[i] for i in ix]).to_dict(),
                                     "dice": float(dice[ix].mean())} for g, ix in groups.items()}
        entry["breakdown"] = bands
        folds = {}
        for res in results:
            if label.split("/")[0] == res["model"]:
                fold_cases = [r["case"] for r in res["rows"]]
                folds[res["fold"]] = float(np.mean([per_case[c]["iou"] for c in fold_cases]))
        entry["fold_iou"] = folds
        entry["fold_iou_t"] = t_interval(list(folds.values())).to_dict()
        table[label] = entry
    correlation = {}
    if quality and "unetpp_ds/accurate" in scores:
        q_cases = [c for c in cases if c in quality]
        dice = [scores["unetpp_ds/accurate"][c]["dice"] for c in q_cases]
        for key in ("disagreement", "l1_dice_gap"):
            correlation[key] = spearman([quality[c][key] for c in q_cases], dice)
    return {"cases": cases, "scores": scores, "quality": quality, "table": table, "quality_vs_dice": correlation}


def _row_label(label: str) -> str:
    model, _, kind = label.partition("/")
    name = MODEL_NAMES[model]
    named = {"": name, "accurate": f"{name}, accurate (mean probability)", "logit_mean": f"{name}, mean logit"}
    return named[kind] if kind in named else f"{name}, pruned {kind[0]}^{kind[1:]}"


def _cost_of(results: list[dict[str, Any]], label: str) -> dict[str, float]:
    model, _, kind = label.partition("/")
    runs = [r for r in results if r["model"] == model]
    key = kind or "output"
    return {"params": runs[0]["params"], "features": runs[0]["features"],
            "gflops": runs[0]["cost"][key]["gflops_per_patch"],
            "ms": float(np.median([r["cost"][key]["ms_per_crop"] for r in runs])),
            "val_dice": float(np.mean([r["best_val_dice"] for r in runs]))}


def markdown(summary: dict[str, Any], results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The tables of ``results.md``."""
    table = summary["table"]
    order = [lab for lab in ("unet", "wide_unet", "unetpp", "unetpp_ds/accurate", "unetpp_ds/logit_mean")
             if lab in table] + sorted(lab for lab in table if "/L" in lab)
    pct = lambda d: f"{d['mean'] * 100:.1f} [{d['low'] * 100:.1f}, {d['high'] * 100:.1f}]"  # noqa: E731
    lines = [f"# LIDC-IDRI nodule crops: U-Net vs UNet++ ({meta['protocol']} protocol)", "",
             f"{meta['date']}, commit `{meta['commit']}`, {meta['machine']}; wall time {meta['wall_minutes']:.1f} min; "
             f"load average (1 min) at start {meta['load_start'][0]:.2f}, at the end of each training "
             f"{', '.join(f'{x:.1f}' for x in meta['load_jobs'])}.", "",
             f"`{meta['command']}`", "",
             *([] if meta.get("complete", True) else
               [f"**Partial:** {meta['finished']} of {meta['planned']} trainings had finished when this was "
                f"written; the tables cover the complete fold(s) {', '.join(map(str, meta['folds_run']))} only.", ""]),
             f"{len(summary['cases'])} held-out nodules; {meta['patients']} patients in {meta['folds']} folds by patient"
             + (" (each nodule tested once)" if len(meta["folds_run"]) == meta["folds"] else
                f" (fold(s) {', '.join(map(str, meta['folds_run']))} run: their test patients only)")
             + f". Recipe: {meta['recipe']}.", "",
             "IoU and Dice: mean per nodule (%) on the crop's own grid, 95% cluster-bootstrap interval over patients. "
             "Δ: paired difference against U-Net (same nodules), same interval. ms: median over folds of the mean "
             "sliding-window time per crop (preprocessed, batch 1).", "",
             "| model | params | GFLOPs/patch | ms/crop | val Dice | IoU % | Dice % | ΔIoU vs U-Net | ΔDice vs U-Net |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for label in order:
        e, c = table[label], _cost_of(results, label)
        d_iou = pct(e["iou_minus_unet"]) if "iou_minus_unet" in e else "—"
        d_dice = pct(e["dice_minus_unet"]) if "dice_minus_unet" in e else "—"
        lines.append(f"| {_row_label(label)} | {c['params'] / 1e6:.3f} M | {c['gflops']:.2f} | {c['ms']:.1f} | "
                     f"{c['val_dice']:.3f} | {pct(e['iou'])} | {pct(e['dice'])} | {d_iou} | {d_dice} |")
    lines += ["", f"Paper (its own crops, its own budget): U-Net IoU {PAPER_IOU['unet']}, UNet++ DS IoU "
                  f"{PAPER_IOU['unetpp_ds']}.", "",
              "Per-fold mean IoU (%):", "",
              "| model | " + " | ".join(f"fold {k}" for k in meta["folds_run"]) + " | mean [95% t] |",
              "| --- | " + " | ".join("---:" for _ in meta["folds_run"]) + " | --- |"]
    for label in order:
        e = table[label]
        folds = " | ".join(f"{e['fold_iou'].get(k, math.nan) * 100:.1f}" for k in meta["folds_run"])
        t = e["fold_iou_t"]
        interval = "" if math.isnan(t["low"]) else f" [{t['low'] * 100:.1f}, {t['high'] * 100:.1f}]"  # one fold: none
        lines.append(f"| {_row_label(label)} | {folds} | {t['mean'] * 100:.1f}{interval} |")
    for group, title, names in (("size", "equivalent diameter (from the mask volume)", [b[2] for b in SIZE_BANDS]),
                                ("texture", "texture (nodules.csv Texture_value: ground-glass 1-2, part-solid 3, "
                                            "solid 4-5)", ["ground-glass", "part-solid", "solid"])):
        present = [n for n in names if n in table[order[0]]["breakdown"][group]]
        lines += ["", f"Mean IoU (%) by {title}, 95% interval for the first and the accurate UNet++ DS:", "",
                  "| model | " + " | ".join(f"{n} (n={table[order[0]]['breakdown'][group][n]['n']})"
                                             for n in present) + " |",
                  "| --- | " + " | ".join("---" for _ in present) + " |"]
        for label in order:
            cells = []
            for n in present:
                iou = table[label]["breakdown"][group][n]["iou"]
                cells.append(pct(iou) if label in ("unet", "unetpp_ds/accurate") else f"{iou['mean'] * 100:.1f}")
            lines.append(f"| {_row_label(label)} | " + " | ".join(cells) + " |")
    corr = summary["quality_vs_dice"]
    if corr:
        lines += ["", "Head disagreement of UNet++ DS against its per-nodule Dice (accurate mode), Spearman:", ""]
        for key, text in (("disagreement", "mean per-voxel spread of the heads' probabilities inside the mask"),
                          ("l1_dice_gap", "1 − Dice between head L^1's mask and the averaged mask")):
            c = corr[key]
            lines.append(f"- {text}: ρ = {c['rho']:.3f} (p = {c['p']:.2g}, n = {c['n']})")
        lines.append("")
        lines.append("A negative ρ means more disagreement goes with a lower Dice: the score ranks the cases to review.")
    return "\n".join(lines) + "\n"


def retime(args: argparse.Namespace, work: list[dict[str, Any]], crops: Sequence[Crop], cfg: Config,
           settings: dict[str, Any], commit: str) -> int:
    """Time every finished run's best.pt again, sequentially in this process; write timing.md and timing.json."""
    device = torch.device(args.device)
    _preprocess(crops, cfg)
    rows = []
    for job in work:
        best = args.out / "runs" / f"fold{job['fold']}_{job['model']}" / "best.pt"
        if not best.is_file():
            raise SystemExit(f"{best}: missing; --retime times the runs of an earlier run of this command")
        net = on_device(build_model(job["model"], cfg), device)
        net.load_state_dict(load_checkpoint(best, map_location=device)["state_dict"])
        rows.append({"fold": job["fold"], "model": job["model"], "load": os.getloadavg(),
                     "cost": cost(job["model"], net, job["split"]["test"][: job["timing_crops"]], cfg, device)})
        print(f"fold {job['fold']} {job['model']}: " + ", ".join(f"{k} {v['ms_per_crop']:.0f} ms" for k, v in
                                                                rows[-1]["cost"].items()), flush=True)
    loads = ", ".join(f"{r['load'][0]:.1f}" for r in rows)
    lines = [f"# Time per crop, measured again ({args.protocol} protocol)", "",
             f"{_dt.datetime.now().isoformat(timespec='minutes')}, commit `{commit}`, {platform.machine()} "
             f"{os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), one process, device {args.device}; "
             f"load average (1 min) {loads}; the first {settings['timing_crops']} test crops of each fold, sliding "
             "window on the preprocessed crop, batch 1.", "",
             "| model | GFLOPs/patch | ms/crop, median over folds | per fold |", "| --- | ---: | ---: | --- |"]
    for model in MODELS:
        mine = [r for r in rows if r["model"] == model]
        for kind in (mine[0]["cost"] if mine else {}):
            label = model if kind == "output" else f"{model}/{kind}"
            ms = [r["cost"][kind]["ms_per_crop"] for r in mine]
            lines.append(f"| {_row_label(label)} | {mine[0]['cost'][kind]['gflops_per_patch']:.2f} | "
                         f"{float(np.median(ms)):.1f} | {', '.join(f'{v:.0f}' for v in ms)} |")
    text = "\n".join(lines) + "\n"
    (args.out / "timing.md").write_text(text, encoding="utf-8")
    (args.out / "timing.json").write_text(json.dumps({"commit": commit, "rows": rows}, indent=1) + "\n",
                                          encoding="utf-8")
    print(text)
    return 0


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def load_protocol(path: Path, protocol: str, overrides: Sequence[str]) -> tuple[dict[str, Any], Config]:
    """The protocol's experiment settings and its validated unetpp3d config, ``KEY=VALUE`` overrides applied."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if protocol not in data:
        raise SystemExit(f"{path}: no protocol {protocol!r}; it has {', '.join(data)}")
    settings = copy.deepcopy(data[protocol])
    cfg_dict = settings.pop("config")
    cfg_overrides = []
    for text in overrides:
        key, _, raw = text.partition("=")
        if key in EXPERIMENT_KEYS:
            settings[key] = yaml.safe_load(raw)
        else:
            cfg_overrides.append(text)
    cfg = config_from_dict(cfg_dict, f"{path}:{protocol}", cfg_overrides)
    return settings, cfg


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", default="reduced", help="a protocol of --config: reduced, full or nodule_model")
    parser.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, runs/)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the lidc_nodule_crops folder")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the protocols' YAML")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--limit-patients", type=int, default=None, help="use the crops of this many patients only")
    parser.add_argument("--fold", type=int, action="append", default=None,
                        help="run only this fold (repeatable); the tables then cover its test patients only")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override: a config key (train.epochs=4) or an experiment key (folds=3, jobs=1)")
    parser.add_argument("--retime", action="store_true",
                        help="train nothing: time the best.pt of each run already in --out again, one after another in "
                             "this process (for a quieter machine than the one that trained), into timing.md/.json")
    args = parser.parse_args(argv)

    settings, cfg = load_protocol(args.config, args.protocol, args.overrides)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; use {', '.join(MODELS)}")
    if not (args.data / "nodules.csv").is_file():
        raise SystemExit(f"{args.data}: no nodules.csv; pass --data .../lidc_nodule_crops")
    start, load_start, commit = time.perf_counter(), os.getloadavg(), _commit()  # the code that runs, not that ends
    threads, jobs = int(settings["threads"]), int(settings["jobs"])
    torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)

    crops = load_crops(args.data, args.limit_patients, cfg.train.seed)
    folds = patient_folds(crops, int(settings["folds"]), float(settings["validation_fraction"]), cfg.train.seed)
    (args.out / "folds.json").write_text(json.dumps(folds, indent=1) + "\n", encoding="utf-8")
    print(f"{len(crops)} crops of {len({c.patient for c in crops})} patients, {len(folds)} folds, models "
          f"{', '.join(models)}, {jobs} job(s) x {threads} thread(s) on {args.device}", flush=True)
    work = [{"fold": k, "model": m, "split": folds[k], "config": cfg.to_dict(), "device": args.device,
             "out": str(args.out), "timing_crops": int(settings["timing_crops"])}
            for k in range(len(folds)) for m in models if args.fold is None or k in args.fold]
    if not work:
        raise SystemExit(f"--fold {args.fold}: the protocol has folds 0..{len(folds) - 1}")
    if args.retime:
        return retime(args, work, crops, cfg, settings, commit)
    results: list[dict[str, Any]] = []

    def write(final: bool) -> dict[str, Any]:
        """results.json and results.md from the trainings finished so far, so that a run stopped early keeps them.

        The tables cover complete folds only (every model of the fold finished), so that every row is
        scored on the same nodules and every average runs over the same folds."""
        done_models: dict[int, set[str]] = {}
        for r in results:
            done_models.setdefault(r["fold"], set()).add(r["model"])
        complete = {k for k, names in done_models.items() if names == set(models)}
        ordered = sorted((r for r in results if r["fold"] in complete), key=lambda r: (r["fold"], MODELS.index(r["model"])))
        summary = collect(ordered, crops)
        c = cfg
        meta = {"protocol": args.protocol, "date": _dt.datetime.now().isoformat(timespec="minutes"),
                "commit": commit,
                "machine": f"{platform.machine()} {os.cpu_count()} cores ({torch.get_num_threads()} torch threads x "
                           f"{jobs} job(s)), torch {torch.__version__}, device {_device_name(args.device)}",
                "wall_minutes": (time.perf_counter() - start) / 60.0, "load_start": list(load_start),
                "load_jobs": [r["load"][0] for r in ordered], "finished": len(results), "planned": len(work),
                "complete": final,
                "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
                "patients": len({x.patient for x in crops}), "folds": len(folds),
                "folds_run": sorted({r["fold"] for r in ordered}),
                "recipe": (f"features {c.model.features}, strides {c.model.strides}, patch {c.data.patch_size} at "
                           f"{c.data.target_spacing} mm, batch {c.data.batch_size}, {c.train.epochs} x "
                           f"{c.train.iterations_per_epoch} iterations, {c.train.optimizer} lr {c.train.lr} "
                           f"{c.train.schedule}, loss {c.train.loss}, validation every {c.train.val_every} epochs"),
                "settings": settings, "config": cfg.to_dict()}
        payload = {"meta": meta, "summary": {k: v for k, v in summary.items() if k != "scores"},
                   "per_nodule": {label: per_case for label, per_case in summary["scores"].items()},
                   "nodules": {x.name: {**asdict(x), "equivalent_diameter_mm": x.equivalent_diameter_mm}
                               for x in crops},
                   "runs": [{k: v for k, v in r.items() if k != "rows"}
                            for r in sorted(results, key=lambda r: (r["fold"], MODELS.index(r["model"])))]}
        atomic_write_text(args.out / "results.json", json.dumps(payload, indent=1) + "\n")
        atomic_write_text(args.out / "results.md", markdown(summary, ordered, meta) if ordered else
                          f"# LIDC-IDRI nodule crops ({args.protocol} protocol)\n\n**Partial:** {len(results)} of "
                          f"{len(work)} trainings had finished and no fold was complete when this was written.\n")
        return {"summary": summary, "results": ordered, "meta": meta}

    def done(res: dict[str, Any]) -> None:
        results.append(res)
        print(f"fold {res['fold']} {res['model']}: val Dice {res['best_val_dice']:.3f}, trained "
              f"{res['train_seconds']:.0f} s, scored {res['eval_seconds']:.0f} s, load {res['load'][0]:.2f} "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)
        if len(results) < len(work):
            write(final=False)

    if jobs <= 1:
        _preprocess(crops, cfg)
        for job in work:
            done(run_job(job))
    else:
        # Spawned workers (no fork: CUDA and OpenMP state do not survive it), each with its own cache.
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(crops, cfg.to_dict(), threads)) as pool:
            # In the order they finish, so that a time limit keeps every finished training's result.
            for future in as_completed([pool.submit(run_job, job) for job in work]):
                done(future.result())
    final = write(final=True)
    summary, results, meta = final["summary"], final["results"], final["meta"]
    print(markdown(summary, results, meta))
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
