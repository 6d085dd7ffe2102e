#!/usr/bin/env python
"""Where a training step of the LIDC full protocol spends its time, alone and with others on one GPU.

    python bench/lidc_probe.py --data DIR/lidc_nodule_crops --device cuda --jobs 1 5 --steps 30

The full protocol (pipelines/lidc_experiment.yaml) trains five models at once on one GPU. On an
H200 (2026-11-27, docs/lidc.md) each of the five took about 1 s per iteration and about 1 s per
validation crop, whatever the model, twenty times the protocol's estimate. This probe times the
pieces of fold 0's UNet++ DS training in 1..J concurrent processes started as the experiment
starts them (spawned), each measuring at the same moment (a barrier):

* ``loader``:  the training loader alone (workers, augmentation, collation), ms per batch;
* ``compute``: ``Trainer.train_step`` on one batch already on the device, ms per step;
* ``loop``:    both, as training runs them, ms per step;
* ``val``:     ``Trainer.validate`` on the first validation crops, ms per crop;
* ``fused``:   the compute step again on the fused path, where :func:`~unetpp3d.model.network.on_device`
  picked the plain one (or the reverse), ms per step.

It prints one row per process count and writes ``--json``. Times only; nothing is trained to the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "pipelines")]

import lidc_experiment as lidc  # noqa: E402

from unetpp3d.data.manifest import Case  # noqa: E402
from unetpp3d.training.loss import DeepSupervisionLoss  # noqa: E402
from unetpp3d.training.trainer import build_trainer  # noqa: E402


def _timed(fn, n: int, device: torch.device) -> float:
    lidc._sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    lidc._sync(device)
    return 1000.0 * (time.perf_counter() - start) / n


def probe(job: dict[str, Any]) -> dict[str, float]:
    """One process's timings (see the module docstring)."""
    settings, cfg = lidc.load_protocol(Path(job["config"]), job["protocol"], job["overrides"])
    torch.set_num_threads(int(settings["threads"]))
    device = torch.device(job["device"])
    crops = {c.name: c for c in job["crops"]}
    split = job["split"]
    prep = lidc.make_prep(cfg)
    net = lidc.build_model("unetpp_ds", cfg)
    loss_fn = DeepSupervisionLoss(prep.num_classes, cfg.train.head_weights, kind=cfg.train.loss)
    case = lambda n: Case(n, Path(crops[n].image), Path(crops[n].mask))  # noqa: E731
    folder = Path(job["out"]) / f"probe{job['rank']}"
    trainer = build_trainer(cfg, prep, net, loss_fn, [case(n) for n in split["training"]],
                            [case(n) for n in split["validation"][: job["val_crops"]]], folder, device,
                            split={"fold": 0, **split})
    steps = min(int(job["steps"]), len(trainer.train_loader))  # one epoch's iterator each for loader and loop
    trainer.train_loader.set_epoch(0)
    batches = iter(trainer.train_loader)
    batch = next(batches)
    for _ in range(3):  # warm-up: cuDNN's algorithm choice, the allocator
        trainer.train_step(batch)
    job["barrier"].wait()
    out: dict[str, float] = {}
    trainer.train_loader.set_epoch(1)
    it = iter(trainer.train_loader)
    out["loader"] = _timed(lambda: next(it), steps, device)
    on_device = {k: v.to(device) for k, v in batch.items()}
    out["compute"] = _timed(lambda: trainer.train_step(on_device), steps, device)
    trainer.train_loader.set_epoch(2)
    it = iter(trainer.train_loader)
    out["loop"] = _timed(lambda: trainer.train_step(next(it)), steps, device)
    start = time.perf_counter()
    trainer.validate()
    lidc._sync(device)
    out["val"] = 1000.0 * (time.perf_counter() - start) / max(1, len(split["validation"][: job["val_crops"]]))
    net.fused = not net.fused
    net.to(memory_format=torch.channels_last_3d if net.fused else torch.contiguous_format)
    for _ in range(3):
        trainer.train_step(on_device)
    out["fused" if net.fused else "plain"] = _timed(lambda: trainer.train_step(on_device), steps, device)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the lidc_nodule_crops folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--protocol", default="full")
    parser.add_argument("--config", type=Path, default=lidc.DEFAULT_CONFIG)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 5], help="process counts to try, in order")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--val-crops", type=int, default=10)
    parser.add_argument("--limit-patients", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("/tmp/lidc_probe"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    settings, cfg = lidc.load_protocol(args.config, args.protocol, args.overrides)
    crops = lidc.load_crops(args.data, args.limit_patients, cfg.train.seed)
    split = lidc.patient_folds(crops, int(settings["folds"]), float(settings["validation_fraction"]), cfg.train.seed)[0]
    rows = []
    print(f"{'jobs':>4}  {'loader':>10}  {'compute':>10}  {'loop':>10}  {'val/crop':>10}  {'other path':>14}   (ms)",
          flush=True)
    for jobs in args.jobs:
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager, ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            barrier = manager.Barrier(jobs)
            work = [{"rank": r, "config": str(args.config), "protocol": args.protocol, "overrides": args.overrides,
                     "device": args.device, "crops": crops, "split": split, "steps": args.steps,
                     "val_crops": args.val_crops, "out": str(args.out / f"j{jobs}"), "barrier": barrier}
                    for r in range(jobs)]
            results = list(pool.map(probe, work))
        mean = {k: sum(r[k] for r in results) / len(results) for k in results[0]}
        other = next(k for k in mean if k in ("fused", "plain"))
        rows.append({"jobs": jobs, **mean, "per_process": results})
        print(f"{jobs:>4}  {mean['loader']:>10.1f}  {mean['compute']:>10.1f}  {mean['loop']:>10.1f}  "
              f"{mean['val']:>10.1f}  {other + ' ' + format(mean[other], '.1f'):>14}", flush=True)
    if args.json:
        meta = {"device": args.device, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                "torch": torch.__version__, "protocol": args.protocol, "overrides": args.overrides,
                "steps": args.steps, "settings": settings}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
