#!/usr/bin/env python
"""The paper-style table (issue 8): UNet++ against a U-Net of similar size, on synthetic CT.

    .venv/bin/python bench/paper_table.py --out bench/paper_table.md --quick     # minutes on a CPU
    .venv/bin/python bench/paper_table.py --out bench/paper_table.md --seeds 3 --iterations 2000

Zhou et al. (UNet++, DLMIA 2018, arXiv:1807.10165) compare U-Net, UNet++ without and with deep
supervision (DS) and the pruned UNet++ L^1..L^4 by IoU. This script rebuilds the comparison's
shape on the project's synthetic phantoms (``unetpp3d.synth``), per task (liver, lung nodule):

* data: one training set and one *separately seeded* held-out test set per task, written once
  with :func:`unetpp3d.synth.phantom.write_dataset`; the same for every model and seed;
* preprocessing: planned once per task from the training set (:func:`unetpp3d.model.planning.plan`);
* models, all trained by the project's own training loop (:func:`unetpp3d.training.trainer.build_trainer`:
  the loop, precision policy, optimiser and poly schedule of ``unetpp3d train``) with the same
  budget (iterations, patch, batch), the same patch stream and the same seeds:
    - ``U-Net``: MONAI ``BasicUNet`` with features chosen so its parameter count is within
      ``--param-tolerance`` of our UNet++ (both counts printed and tabulated);
    - ``UNet++``: :class:`unetpp3d.model.network.UNetPlusPlus3D` without deep supervision;
    - ``UNet++ DS``: with deep supervision, evaluated in accurate mode (mean of the heads);
    - ``UNet++ L^l``: the *same* deep-supervised weights pruned at inference (``prune_level=l``);
* evaluation: :class:`unetpp3d.inference.predictor.Predictor` (sliding window, inverse transforms to the
  scan's own grid, the task's post-processing) for every model alike, then
  :func:`unetpp3d.evaluation.metrics.score_arrays` for foreground IoU and Dice per test volume; a seed's
  score is the mean over the test volumes; the table gives mean and sample std over seeds;
* timing: wall seconds per test volume of ``Predictor.predict`` (read, preprocess, windows,
  inverse, post-process) on this machine, with ``--threads`` torch threads.

Writes the Markdown table to ``--out`` and every per-seed, per-volume number to the JSON next to
it (``--json``). Per-run training times are printed so that a longer run can be sized.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from monai.networks.nets import BasicUNet  # noqa: E402

from unetpp3d.config import config_from_dict  # noqa: E402
from unetpp3d.data.fingerprint import fingerprint  # noqa: E402
from unetpp3d.data.manifest import Case, load_manifest  # noqa: E402
from unetpp3d.evaluation.metrics import score_arrays  # noqa: E402
from unetpp3d.imageio.readers import read_image  # noqa: E402
from unetpp3d.inference.predictor import Predictor  # noqa: E402
from unetpp3d.model.network import UNetPlusPlus3D  # noqa: E402
from unetpp3d.model.planning import plan  # noqa: E402
from unetpp3d.synth.phantom import write_dataset  # noqa: E402
from unetpp3d.training.loss import DeepSupervisionLoss  # noqa: E402
from unetpp3d.training.rng import seed_everything  # noqa: E402
from unetpp3d.training.trainer import build_trainer  # noqa: E402

PAPER_IOU = {  # Zhou et al. 2018, Table 3 (IoU %): U-Net, UNet++ with deep supervision
    "liver": (76.62, 82.90),
    "lung_nodule": (71.47, 77.21),
}
# (train cases, test cases, phantom edge in voxels) per task. Liver phantoms span 384 mm and
# chest phantoms 360 mm, so 96 voxels are 3.75 mm: a 3 mm nodule is under one voxel across and a
# 30 mm one eight (about 270 voxels) -- small and hard, not saturated.
FULL_DATA = {"liver": (16, 6, 64), "lung_nodule": (16, 6, 96)}
QUICK_DATA = {"liver": (8, 3, 48), "lung_nodule": (8, 3, 96)}
DATA_SEED = {"liver": 1001, "lung_nodule": 2001}
TEST_SEED_OFFSET = 500_000  # the held-out set has its own seed: no phantom is in both sets


# ----------------------------------------------------------------------------------------------
# Data and preprocessing
# ----------------------------------------------------------------------------------------------


def _labelled(manifest: Path) -> list[Case]:
    """Every case of a synthetic dataset with its label: the manifest's training list and the
    scans write_dataset held out (their labels are in labelsTs/)."""
    man = load_manifest(manifest)
    cases = [*man.training, *(man.validation or [])]
    for entry in man.test or []:
        img = Path(getattr(entry, "image", entry))
        cases.append(Case(img.name.split(".")[0], img, img.parent.parent / "labelsTs" / img.name))
    return sorted(cases, key=lambda c: c.name)


def make_data(task: str, work: Path, n_train: int, n_test: int, size: int) -> tuple[list[Case], list[Case]]:
    """Write ``n_train`` training phantoms and ``n_test`` test phantoms from two different seeds."""
    train_cases = _labelled(write_dataset(task, n_train, work / task / "train", seed=DATA_SEED[task], size=size))
    test_cases = _labelled(write_dataset(task, n_test, work / task / "test", seed=DATA_SEED[task] + TEST_SEED_OFFSET,
                                         size=size))
    return train_cases, test_cases


def make_plan(task: str, train_cases: list, labels: dict[int, str], args: argparse.Namespace):
    cfg = config_from_dict({"task": task}, "paper_table", [
        f"model.features={list(args.features)}",
        f"model.strides={[2] * (len(args.features) - 1)}",
        f"data.patch_size={[args.patch] * 3}",
        f"data.batch_size={args.batch}",
        "data.samples_per_volume=2",
        "data.cache=memory",
        "data.num_workers=0",
        f"train.optimizer={args.optimizer}",
        f"train.lr={args.lr}",
    ])
    fp = fingerprint(train_cases, labels)
    return plan(cfg, fp, labels, echo=None)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def pruned_params(net: UNetPlusPlus3D, level: int) -> int:
    """Parameters that UNet++ L^level uses: nodes with i + j <= level and head X^{0,level}."""
    mods = [net.encoder[i] for i in range(level + 1)]
    for lvl in range(level):
        for j in range(1, level - lvl + 1):
            mods += [net.up[lvl][j - 1], net.nodes[lvl][j - 1]]
    mods.append(net.heads[level - 1])
    return sum(n_params(m) for m in mods)


def unetpp(features, ds: bool, n_classes: int) -> UNetPlusPlus3D:
    return UNetPlusPlus3D(1, n_classes, features=features, deep_supervision=ds, strides=[2] * (len(features) - 1))


def matched_unet_features(target: int, tolerance: float) -> tuple[int, ...]:
    """BasicUNet features (6 widths, depth 4) whose parameter count is closest to ``target``."""
    best = None
    for pattern in ((1, 1, 2, 4, 8, 1), (1, 2, 4, 8, 16, 1), (2, 2, 4, 8, 16, 2), (1, 1, 2, 4, 4, 1)):
        for w in range(2, 65):
            feats = tuple(w * k for k in pattern)
            count = n_params(BasicUNet(3, 1, 2, features=feats))
            err = abs(count - target) / target
            if best is None or err < best[0]:
                best = (err, feats)
            if count > target * (1 + tolerance):
                break
    err, feats = best
    if err > tolerance:
        raise SystemExit(f"no BasicUNet within {tolerance:.0%} of {target} parameters (closest {feats}, {err:.1%})")
    return feats


# ----------------------------------------------------------------------------------------------
# Training and evaluation, the same for every model
# ----------------------------------------------------------------------------------------------


def train(net: torch.nn.Module, cfg, prep, train_cases, iterations: int, seed: int, folder: Path) -> dict:
    """``iterations`` optimiser steps of ``unetpp3d train``'s own Trainer (loop, precision, optimiser,
    poly schedule, patch stream), without validation; the run's files go to ``folder``."""
    tc = cfg.train
    tc.epochs = min(10, iterations)  # the poly schedule steps per epoch
    tc.iterations_per_epoch = max(1, iterations // tc.epochs)
    tc.seed = seed  # the epochs' patches and augmentation are seeded from (seed, epoch)
    # "auto": equal head weights, taken from each call (3 heads with DS, 1 without, 1 for the U-Net)
    loss_fn = DeepSupervisionLoss(prep.num_classes, "auto", kind=tc.loss)
    trainer = build_trainer(cfg, prep, net, loss_fn, train_cases, [], folder, torch.device("cpu"))
    start = time.perf_counter()
    stopped = trainer.fit()
    if stopped is not None:  # Ctrl-C: the trainer stopped after a step; so does the table
        raise SystemExit(128 + stopped)
    net.eval()
    losses = [row["train_loss"] for row in trainer.history]
    return {"train_s": time.perf_counter() - start, "steps": tc.epochs * tc.iterations_per_epoch,
            "first_loss": losses[0], "last_loss": losses[-1]}


def evaluate(net: torch.nn.Module, prep, test: list[Case], prune_level: int | None,
             overlap: float) -> dict:
    """Foreground IoU/Dice and seconds per test volume through the Predictor."""
    predictor = Predictor(net, prep, mode="accurate" if prune_level is None else "fast", prune_level=prune_level,
                          overlap=overlap, sw_batch_size=2, device="cpu", amp=False, progress=False,
                          keep_probabilities=False, source="paper_table")
    rows = []
    for case in test:
        image, label = Path(case.image), Path(case.label)
        pred = predictor.predict(image)
        ref, geom = read_image(label, is_label=True)
        m = score_arrays(pred.mask_xyz, ref, geom.spacing, labels=[1], case=image.name)[0]
        rows.append({"case": image.name, "iou": m.iou, "dice": m.dice, "seconds": pred.seconds,
                     "windows_s": pred.info["windows_s"], "ref_ml": m.ref_ml, "pred_ml": m.pred_ml})
    return {"iou": float(np.mean([r["iou"] for r in rows])), "dice": float(np.mean([r["dice"] for r in rows])),
            "seconds": float(np.mean([r["seconds"] for r in rows])), "cases": rows}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
            "python": platform.python_version()}


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return head + (" (working tree has uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def markdown(results: dict) -> str:
    h = results["header"]
    m = h["machine"]
    lines = [
        "# UNet++ vs U-Net on synthetic CT (paper-style table)",
        "",
        f"- command: `{h['command']}`",
        f"- date: {h['date']}; commit: {h['commit']}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), load average "
        f"{' / '.join(str(x) for x in m['load_average_start'])} (start) {' / '.join(str(x) for x in m['load_average'])} "
        f"(end); torch {m['torch']}",
        f"- budget (every model): {h['iterations']} iterations, batch {h['batch']}, patch {h['patch']}^3, "
        f"{h['optimizer']} lr {h['lr']} with poly decay, seeds {h['seeds']}; UNet++ features {h['features']}, "
        f"U-Net (MONAI BasicUNet) features {h['unet_features']}",
        "- IoU and Dice: foreground, mean over the held-out test volumes per seed, then mean ± sample std over "
        "seeds; on the scan's own grid after the task's post-processing. s/volume: `Predictor.predict` wall "
        "time (read, preprocess, sliding window, inverse, post-process) on this machine.",
        "",
    ]
    for task, t in results["tasks"].items():
        lines += [f"## {task}: {t['n_train']} training, {t['n_test']} held-out phantoms, {t['size']}^3 voxels, "
                  f"{t['spacing_mm']:.2f} mm", ""]
        lines += ["| model | params | IoU % | Dice % | inference s/volume |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, row in t["models"].items():
            iou = mean_std([100 * r["iou"] for r in row["seeds"]])
            dice = mean_std([100 * r["dice"] for r in row["seeds"]])
            sec = mean_std([r["seconds"] for r in row["seeds"]])
            lines.append(f"| {name} | {row['params']:,} | {iou[0]:.2f} ± {iou[1]:.2f} | {dice[0]:.2f} ± {dice[1]:.2f} "
                         f"| {sec[0]:.2f} ± {sec[1]:.2f} |")
        paper = PAPER_IOU[task]
        lines += ["", f"Paper (Zhou et al. 2018, arXiv:1807.10165; real CT, its own data and training): U-Net {paper[0]:.2f}, "
                      f"UNet++ with deep supervision {paper[1]:.2f} IoU.", ""]
        lines += ["Training seconds per run: " + ", ".join(
            f"{name} {np.mean([r['train_s'] for r in row['train']]):.0f}"
            for name, row in t["models"].items() if row.get("train")), ""]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/paper_table.md"), help="Markdown table")
    ap.add_argument("--json", type=Path, default=None, help="raw numbers (default: --out with .json)")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds 0..N-1 (default 3; --quick 2)")
    ap.add_argument("--iterations", type=int, default=None, help="optimiser steps per model (default 2000; "
                                                                   "--quick 120)")
    ap.add_argument("--quick", action="store_true", help="small data, 2 seeds, few iterations: a CPU budget")
    ap.add_argument("--tasks", nargs="+", default=["liver", "lung_nodule"], choices=["liver", "lung_nodule"])
    ap.add_argument("--train-cases", type=int, default=None)
    ap.add_argument("--test-cases", type=int, default=None)
    ap.add_argument("--size", type=int, default=None, help="phantom edge in voxels for every task")
    ap.add_argument("--patch", type=int, default=None, help="cubic patch side (default 64; --quick 32)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--features", type=int, nargs="+", default=None,
                    help="UNet++ widths (default 16 32 64 128; --quick 8 16 32 64)")
    ap.add_argument("--optimizer", default="adamw", choices=["sgd", "adamw"])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap")
    ap.add_argument("--param-tolerance", type=float, default=0.10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where the phantoms and the training runs go (default: a temp dir)")
    args = ap.parse_args(argv)
    args.seeds = args.seeds or (2 if args.quick else 3)
    args.iterations = args.iterations or (120 if args.quick else 2000)
    args.patch = args.patch or (32 if args.quick else 64)
    args.features = tuple(args.features or ((8, 16, 32, 64) if args.quick else (16, 32, 64, 128)))
    args.json = args.json or args.out.with_suffix(".json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/paper_table.py",
                                                 *(sys.argv[1:] if argv is None else argv)])
    mach = machine()
    mach["load_average_start"] = mach["load_average"]
    depth = len(args.features) - 1

    ref = unetpp(args.features, True, 2)
    target = n_params(ref)
    unet_feats = matched_unet_features(target, args.param_tolerance)
    unet_count = n_params(BasicUNet(3, 1, 2, features=unet_feats))
    print(f"parameters: UNet++ {args.features} = {target:,} (without DS {n_params(unetpp(args.features, False, 2)):,});"
          f" BasicUNet {unet_feats} = {unet_count:,} ({100 * (unet_count - target) / target:+.1f}%)", flush=True)

    header = {"command": command, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": commit(), "machine": mach, "iterations": args.iterations, "batch": args.batch,
              "patch": args.patch, "optimizer": args.optimizer, "lr": args.lr, "seeds": list(range(args.seeds)),
              "features": list(args.features), "unet_features": list(unet_feats), "overlap": args.overlap}
    results: dict = {"header": header, "tasks": {}}
    tmp = None
    work = args.work_dir
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="paper_table_")
        work = Path(tmp.name)
    t_all = time.perf_counter()
    try:
        for task in args.tasks:
            n_train, n_test, size = (QUICK_DATA if args.quick else FULL_DATA)[task]
            n_train, n_test = args.train_cases or n_train, args.test_cases or n_test
            size = args.size or size
            t0 = time.perf_counter()
            train_cases, test = make_data(task, work, n_train, n_test, size)
            labels = {0: "background", 1: "liver" if task == "liver" else "nodule"}
            cfg0, prep = make_plan(task, train_cases, labels, args)
            print(f"[{task}] data: {len(train_cases)} train + {len(test)} test phantoms of {size}^3 "
                  f"({time.perf_counter() - t0:.0f} s); spacing {prep.target_spacing}, patch {prep.patch_size}",
                  flush=True)
            models: dict[str, dict] = {}
            names = ["U-Net (BasicUNet)", "UNet++ (no DS)", "UNet++ (DS)"] + [f"UNet++ L{l} (pruned DS)"
                                                                             for l in range(1, depth + 1)]
            for name in names:
                models[name] = {"seeds": [], "train": []}
            for seed in range(args.seeds):
                builders = {
                    "U-Net (BasicUNet)": lambda: BasicUNet(3, 1, prep.num_classes, features=unet_feats),
                    "UNet++ (no DS)": lambda: unetpp(args.features, False, prep.num_classes),
                    "UNet++ (DS)": lambda: unetpp(args.features, True, prep.num_classes),
                }
                for name, build in builders.items():
                    cfg = config_from_dict(cfg0.to_dict(), "paper_table")
                    seed_everything(seed)  # the same initialisation stream for every model
                    net = build()
                    models[name]["params"] = n_params(net)
                    slug = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
                    info = train(net, cfg, prep, train_cases, args.iterations, seed,
                                 work / task / "runs" / f"{slug}_seed{seed}")
                    models[name]["train"].append({"seed": seed, **info})
                    evals = [(name, None)]
                    if name == "UNet++ (DS)":
                        evals += [(f"UNet++ L{l} (pruned DS)", l) for l in range(1, depth + 1)]
                    with torch.no_grad():
                        for row_name, level in evals:
                            r = evaluate(net, prep, test, level, args.overlap)
                            models[row_name]["seeds"].append({"seed": seed, **r})
                            if level is not None:
                                models[row_name]["params"] = pruned_params(net, level)
                            print(f"[{task}] seed {seed} {row_name:24s} IoU {100 * r['iou']:6.2f} Dice "
                                  f"{100 * r['dice']:6.2f}  {r['seconds']:.2f} s/volume"
                                  + (f"  (trained {info['steps']} steps in {info['train_s']:.0f} s, epoch loss "
                                     f"{info['first_loss']:.3f} -> {info['last_loss']:.3f})" if level is None else ""),
                                  flush=True)
            spacing = float(np.mean(read_image(test[0].image)[1].spacing))
            results["tasks"][task] = {"n_train": len(train_cases), "n_test": len(test), "size": size,
                                      "spacing_mm": spacing, "preprocessing": prep.to_dict(), "models": models}
    finally:
        if tmp is not None:
            tmp.cleanup()
    mach["load_average"] = [round(x, 2) for x in os.getloadavg()]
    header["total_s"] = time.perf_counter() - t_all
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(results), encoding="utf-8")
    args.json.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"wrote {args.out} and {args.json} in {header['total_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
