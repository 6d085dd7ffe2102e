"""Training: assemble a run from a manifest and a config, then run a short loop of hooks.

:func:`run_training` does everything that can fail because of the user first — manifest,
config, case checks, planning, patch size against the network — and only then creates the run
folder and hands a :class:`Trainer` its parts. The trainer is the loop of nnU-Net v2's trainer
(Isensee et al., Nature Methods 2021) cut to its hooks::

    on_train_start -> for each epoch: train_step x iterations, validate (every val_every),
    on_epoch_end -> on_train_end

Reproducible resume: every random draw of an epoch is reseeded from ``(seed, epoch, rank)``
when the epoch starts (see :mod:`unetpp3d.loader`), and ``last.pt`` is written at the start and
after every epoch. A run killed at any moment and resumed with ``--resume`` repeats the
interrupted epoch from the same state and draws the same patches, so it ends with the weights
an uninterrupted run would have.

Distributed: under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) each process trains
a :class:`~torch.nn.parallel.DistributedDataParallel` replica on its own patches (its sampling
is seeded by rank), metrics are all-reduced, and only rank 0 writes files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import yaml
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.utils import set_determinism
from tqdm import tqdm

from unetpp3d.atomic import atomic_write_text
from unetpp3d.check import validate_case
from unetpp3d.checkpoint import load_checkpoint, save_checkpoint
from unetpp3d.config import Config, Preprocessing, TrainConfig, config_from_dict, load_config
from unetpp3d.errors import UserError
from unetpp3d.loader import derive_seed, make_train_loader, make_val_loader
from unetpp3d.loss import DeepSupervisionLoss, normalise_head_weights
from unetpp3d.manifest import Case, Manifest, load_manifest, split_cases
from unetpp3d.network import UNetPlusPlus3D
from unetpp3d.planning import fingerprint, plan
from unetpp3d.preview import save_curves_png
from unetpp3d.transforms import pad_value

__all__ = ["Trainer", "run_training", "make_optimizer", "make_scheduler", "amp_dtype", "Dist"]

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_FILES = ("last.pt", "best.pt", "config.yaml", "split.json", "metrics.csv", "train.log", "curves.png",
             "tensorboard")


# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------


def make_optimizer(params: Any, tc: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (nnU-Net's default) or AdamW."""
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)


def lr_factor(epoch: int, tc: TrainConfig) -> float:
    """Learning-rate multiplier for 0-based ``epoch``: linear warm-up, then poly or cosine decay.

    Poly is nnU-Net's ``(1 - epoch / epochs) ** 0.9``; cosine goes from 1 to 0 over the epochs
    after the warm-up (Loshchilov & Hutter, SGDR, 2017).
    """
    warm = min(max(int(tc.warmup_epochs), 0), tc.epochs - 1)
    if epoch < warm:
        return (epoch + 1) / (warm + 1)
    t = (epoch - warm) / max(tc.epochs - warm, 1)
    if tc.schedule == "poly":
        return max(1.0 - t, 0.0) ** 0.9
    return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def make_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch schedule; a plain function, so its state dict holds numbers only."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, tc))


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp``: auto is bf16 where CUDA supports it, else fp16; off on CPU."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        if setting == "fp16":
            raise UserError("train.amp: fp16 needs a CUDA device; use train.amp=bf16 or off on the CPU")
        return torch.bfloat16
    bf16_ok = torch.cuda.is_bf16_supported()
    if setting == "bf16" and not bf16_ok:
        raise UserError(f"train.amp: {torch.cuda.get_device_name(device)} does not support bf16; use fp16 or auto")
    return torch.bfloat16 if setting == "bf16" or (setting == "auto" and bf16_ok) else torch.float16


# --------------------------------------------------------------------------------------------
# Distributed context
# --------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in a (possibly one-process) run, and the collectives the loop needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_request: str | None) -> tuple[Dist, torch.device]:
        """Read torchrun's variables, join the process group, and pick this process's device."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        device = _pick_device(device_request, local if world > 1 else None)
        if world > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(rank, world, local), device

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.enabled:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a run folder name, an error message)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _pick_device(request: str | None, local_rank: int | None) -> torch.device:
    if request is None:
        request = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", request):
        raise UserError(f"--device {request!r}: use cpu, cuda or cuda:N")
    if request.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {request}: no CUDA device is available; use --device cpu")
        device = torch.device(f"cuda:{local_rank}" if local_rank is not None else request)
        if device.index is None:  # "cuda": the current device, by number, for DDP and messages
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Run folder: metrics.csv, train.log, TensorBoard, curves.png (rank 0 only)
# --------------------------------------------------------------------------------------------


class RunLog:
    """The run's human-readable record; every method is a no-op on ranks other than 0.

    Args:
        folder: the run folder.
        class_names: foreground class names, for the per-class Dice columns.
        first_epoch: 0 for a new run; for a resumed run the epoch of ``last.pt``, so that rows
            and TensorBoard events of epochs after it (which will be redone) are dropped.
        active: False on ranks other than 0.
    """

    def __init__(self, folder: Path, class_names: list[str], first_epoch: int = 0, active: bool = True):
        self.folder, self.active = folder, active
        self.class_columns = [f"dice_{re.sub(r'[^A-Za-z0-9_]+', '_', n)}" for n in class_names]
        self.columns = ["epoch", "train_loss", "val_dice", "lr", "seconds", *self.class_columns]
        self.csv_path, self.log_path = folder / "metrics.csv", folder / "train.log"
        self.tb = None
        if not active:
            return
        self._truncate_csv(first_epoch)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=first_epoch + 1 if first_epoch else None)

    def _truncate_csv(self, first_epoch: int) -> None:
        rows = []
        if first_epoch and self.csv_path.is_file():
            with open(self.csv_path, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh)
                        if r.get("epoch", "").isdigit() and int(r["epoch"]) <= first_epoch]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.csv_path, buf.getvalue())

    def message(self, text: str) -> None:
        """A line on the console and in train.log."""
        if not self.active:
            return
        tqdm.write(text)
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(f"{datetime.now().isoformat(timespec='seconds')} {text}\n")

    def epoch(self, row: dict[str, Any], validated: bool) -> None:
        """Append one epoch's row to metrics.csv, TensorBoard and train.log; redraw curves.png."""
        if not self.active:
            return
        with open(self.csv_path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore",
                           lineterminator="\n").writerow({k: _fmt(v) for k, v in row.items()})
            fh.flush()
            os.fsync(fh.fileno())
        step = row["epoch"]
        self.tb.add_scalar("train/loss", row["train_loss"], step)
        self.tb.add_scalar("train/lr", row["lr"], step)
        text = f"epoch {step}  loss {row['train_loss']:.4f}"
        if validated:
            self.tb.add_scalar("val/dice", row["val_dice"], step)
            for col in self.class_columns:
                self.tb.add_scalar(f"val/{col}", row[col], step)
            text += f"  val_dice {row['val_dice']:.4f}"
            if len(self.class_columns) > 1:
                text += " (" + ", ".join(f"{c[5:]} {row[c]:.4f}" for c in self.class_columns) + ")"
        self.tb.flush()
        self.message(f"{text}  lr {row['lr']:.3g}  {row['seconds']:.1f} s")
        if validated:
            save_curves_png(self.csv_path, self.folder / "curves.png")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


# --------------------------------------------------------------------------------------------
# RNG states for the checkpoint (plain types and tensors, for weights-only loading)
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and python generator states, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(state), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (CUDA states only on a machine with as many GPUs)."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """The training loop as hooks; :func:`run_training` builds one from a manifest and a config.

    Subclass and override a hook to change one step (e.g. ``train_step`` for another loss
    signature) without touching the rest.
    """

    cfg: Config
    prep: Preprocessing
    net: UNetPlusPlus3D  # the bare network: saved, validated
    model: torch.nn.Module  # what training calls: the network, maybe wrapped in DDP and compiled
    loss_fn: DeepSupervisionLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    train_loader: Any
    val_loader: Any
    device: torch.device
    folder: Path
    split: dict[str, Any]
    log: RunLog
    dist: Dist = field(default_factory=Dist)
    amp: torch.dtype | None = None
    start_epoch: int = 0
    best_metric: float = -1.0
    stop_signal: int | None = None
    _saved_epoch: int = 0  # the epoch last.pt holds
    _owner_pid: int = 0
    _completed: bool = False
    _previous_handlers: dict = field(default_factory=dict)

    # ---- hooks ---------------------------------------------------------------------------

    def on_train_start(self) -> None:
        """Install SIGINT/SIGTERM handlers and make sure a last.pt exists from the first step on."""
        self._owner_pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        tc = self.cfg.train
        if self.start_epoch == 0 and self.dist.is_main:
            # So that a run killed in its first epoch can be resumed, like one killed later.
            save_checkpoint(self.folder / "last.pt", self.payload(0))
        self.log.message(
            f"{'resuming at' if self.start_epoch else 'training from'} epoch {self.start_epoch + 1}/{tc.epochs}: "
            f"{len(self.split['training'])} training and {len(self.split['validation'])} validation cases, "
            f"patch {self.prep.patch_size}, batch {self.cfg.data.batch_size} x {self.dist.world_size} process(es), "
            f"{tc.iterations_per_epoch} iterations/epoch, {self.device}"
            f"{', ' + str(self.amp).replace('torch.', '') if self.amp else ''} -> {self.folder}")

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimiser step on one batch of patches; returns the loss."""
        image, label = (_plain(batch[k]).to(self.device, non_blocking=True) for k in ("image", "label"))
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            outputs = self.model(image)
        loss = self.loss_fn(outputs, label)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Sliding-window Dice per foreground class on whole validation volumes, over all ranks."""
        self.net.eval()
        metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        n_fg = self.prep.num_classes - 1
        sums = torch.zeros(n_fg, dtype=torch.float64, device=self.device)
        counts = torch.zeros(n_fg, dtype=torch.float64, device=self.device)
        for batch in self.val_loader:
            image, label = (_plain(batch[k]).to(self.device) for k in ("image", "label"))
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                logits = sliding_window_inference(image, self.prep.patch_size, self.cfg.infer.sw_batch_size,
                                                  self.net, overlap=self.cfg.infer.overlap, mode="gaussian",
                                                  cval=pad_value(self.prep))  # pad as training did
            pred = one_hot(logits.argmax(1, keepdim=True), self.prep.num_classes)
            dice = metric(pred, one_hot(label.long(), self.prep.num_classes))[0].double()
            ok = ~torch.isnan(dice)  # a class absent from a case's label says nothing about it
            sums += torch.where(ok, dice, 0.0)
            counts += ok
        self.net.train()
        self.dist.all_reduce(sums)
        self.dist.all_reduce(counts)
        per_class = torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan).tolist()
        known = [d for d in per_class if not math.isnan(d)]
        return {"val_dice": sum(known) / len(known) if known else math.nan,
                **{col: d for col, d in zip(self.log.class_columns, per_class)}}

    def on_epoch_end(self, epoch: int, train_loss: float, seconds: float, val: dict[str, float] | None) -> None:
        """Step the schedule, record the epoch, keep best.pt, then save last.pt."""
        done = epoch + 1
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        improved = val is not None and not math.isnan(val["val_dice"]) and val["val_dice"] > self.best_metric
        if improved:
            self.best_metric = val["val_dice"]
        if not self.dist.is_main:
            return
        row = {"epoch": done, "train_loss": train_loss, "lr": lr, "seconds": seconds, "val_dice": math.nan,
               **{c: math.nan for c in self.log.class_columns}, **(val or {})}
        # The row goes down before last.pt: a kill in between makes resume redo this epoch and
        # replace the row, never leave an epoch without one.
        self.log.epoch(row, validated=val is not None)
        payload = self.payload(done)
        if improved:
            save_checkpoint(self.folder / "best.pt", payload)
            self.log.message(f"new best val_dice {self.best_metric:.4f} at epoch {done}: saved best.pt")
        save_checkpoint(self.folder / "last.pt", payload)

    def on_train_end(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()
        if self._completed:
            best = f"best val_dice {self.best_metric:.4f}" if self.best_metric >= 0 else "no validation score"
            self.log.message(f"finished {self.cfg.train.epochs} epochs, {best}; run folder {self.folder}")
        else:
            why = signal.Signals(self.stop_signal).name if self.stop_signal is not None else "an error"
            self.log.message(f"stopped by {why}; last.pt holds epoch {self._saved_epoch}; continue with "
                             f"`unetpp3d train --manifest ... --out {self.folder} --resume`")
        self.log.close()

    # ---- the loop ------------------------------------------------------------------------

    def fit(self) -> int | None:
        """Train from ``start_epoch`` to ``cfg.train.epochs``; returns the stopping signal, if any."""
        tc = self.cfg.train
        self._saved_epoch = self.start_epoch
        self.on_train_start()
        try:
            for epoch in range(self.start_epoch, tc.epochs):
                t0 = time.perf_counter()
                losses = self._train_epoch(epoch)
                if losses is None:
                    break
                train_loss = torch.tensor([sum(losses) / len(losses)], dtype=torch.float64, device=self.device)
                train_loss = float(self.dist.all_reduce(train_loss)) / self.dist.world_size
                due = (epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.epochs
                val = self.validate() if due and self.split["validation"] else None
                self.on_epoch_end(epoch, train_loss, time.perf_counter() - t0, val)
                self._saved_epoch = epoch + 1
            else:
                self._completed = True
        finally:
            self.on_train_end()
        return self.stop_signal

    def _train_epoch(self, epoch: int) -> list[float] | None:
        """The epoch's training steps, or None when a signal stopped it part-way."""
        seed_everything(derive_seed(self.cfg.train.seed, epoch, self.dist.rank))
        self.train_loader.set_epoch(epoch)
        self.model.train()
        bar = tqdm(total=len(self.train_loader), desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", unit="batch",
                   leave=False, dynamic_ncols=True, disable=True if not self.dist.is_main else None)
        losses: list[float] = []
        start = time.perf_counter()
        batches = iter(self.train_loader)
        try:
            while len(losses) < len(self.train_loader):
                if self._should_stop():
                    return None
                try:
                    batch = next(batches)
                except (RuntimeError, StopIteration):
                    if self._should_stop():  # a worker process that the signal ended
                        return None
                    raise
                losses.append(self.train_step(batch))
                rate = len(losses) * self.cfg.data.batch_size / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", patches_s=f"{rate:.1f}", refresh=False)
                bar.update()
        finally:
            bar.close()
            del batches  # shuts the workers down before the next epoch starts new ones
        return losses

    def _should_stop(self) -> bool:
        if not self.dist.enabled:
            return self.stop_signal is not None
        flag = torch.tensor([0 if self.stop_signal is None else self.stop_signal], device=self.device)
        # Ranks must stop at the same step, or one would wait forever in DDP's gradient all-reduce.
        signum = int(self.dist.all_reduce(flag, op="max"))
        if signum and self.stop_signal is None:
            self.stop_signal = signum
        return bool(signum)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._owner_pid:
            # A DataLoader worker forked from this process inherits the handler; the process
            # group's Ctrl-C reaches it too. Let the trainer stop it in order.
            return
        if self.stop_signal is not None:  # asked twice: stop waiting for the step to finish
            raise KeyboardInterrupt
        self.stop_signal = signum
        if self.dist.is_main:
            tqdm.write(f"{signal.Signals(signum).name}: stopping after this step (again to abort now)")

    def payload(self, epoch: int) -> dict[str, Any]:
        """The checkpoint (docs/architecture.md): enough to rebuild the model and to resume."""
        return {
            "model_args": self.net.model_args,
            "state_dict": self.net.state_dict(),
            "preprocessing": self.prep.to_dict(),
            "config": self.cfg.to_dict(),
            "epoch": epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "best_metric": self.best_metric,
            "split": self.split,
        }


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A MetaTensor's data as a plain tensor: the network needs no metadata, and is faster without."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


# --------------------------------------------------------------------------------------------
# Assembly: everything the user can get wrong is checked before the run folder is touched
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    cfg: Config
    prep: Preprocessing | None  # None until planned (new runs)
    train_cases: list[Case]
    val_cases: list[Case]
    split: dict[str, Any]
    source: str  # where the config came from, for messages
    resume_payload: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _load_run_config(man: Manifest, config_path: Path | None, overrides: list[str]) -> tuple[Config, str]:
    """The config file (default: ``configs/<task>.yaml``) with overrides, and its name for messages.

    A config that names a task must name the manifest's; one that does not takes the manifest's.
    """
    if config_path is None and man.task and (REPO_CONFIGS / f"{man.task}.yaml").is_file():
        config_path = REPO_CONFIGS / f"{man.task}.yaml"
    cfg = load_config(config_path, overrides)
    if man.task and cfg.task != man.task:
        raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) if config_path else {}
        explicit = (isinstance(raw, dict) and "task" in raw) or any(o.split("=", 1)[0].strip() == "task"
                                                                     for o in overrides)
        if explicit:
            raise UserError(f"{config_path or '--set task'}: task {cfg.task!r} differs from the manifest's "
                            f"{man.task!r} ({man.path}); use a config for {man.task} or drop its task key")
        cfg.task = man.task  # a generic config (e.g. smoke.yaml) takes the manifest's task
    return cfg, str(config_path) if config_path else "default config"


def _cases_from_split(man: Manifest, split: dict[str, Any], source: Path) -> tuple[list[Case], list[Case]]:
    by_name = {c.name: c for c in [*man.training, *(man.validation or [])]}
    missing = [n for n in [*split["training"], *split["validation"]] if n not in by_name]
    if missing:
        raise UserError(f"{source}: the run used case(s) {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''} that {man.path} no longer lists; resume with the "
                        f"manifest the run started from")
    return [by_name[n] for n in split["training"]], [by_name[n] for n in split["validation"]]


def _check_cases(man: Manifest, cases: list[Case]) -> None:
    """Refuse cases that fail ``unetpp3d check``, listing the problems, before any training."""
    problems = []
    for case in cases:
        # Warnings (an all-background label, say) are reported by `unetpp3d check` but do not stop training.
        problems += [f"{case.name}: {p.message}" for p in validate_case(case, man.labels) if p.severity == "error"]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise UserError(f"{man.path}: {len(problems)} problem(s) in the training data: {shown}; "
                        f"run `unetpp3d check --manifest {man.path}` for the full report")


def _check_network(cfg: Config, prep: Preprocessing, model_args: dict[str, Any], source: str) -> None:
    net = UNetPlusPlus3D(**model_args)
    try:
        net.check_input_size(prep.patch_size)
    except ValueError:
        nearest = [max(d, round(p / d) * d) for p, d in zip(prep.patch_size, net.size_divisor)]
        raise UserError(f"{source}: data.patch_size {list(prep.patch_size)} must be a multiple of "
                        f"{list(net.size_divisor)} on each axis (the product of model.strides {cfg.model.strides}); "
                        f"e.g. {nearest}") from None
    heads = net.depth if net.deep_supervision else 1
    try:
        normalise_head_weights(heads, cfg.train.head_weights)
    except ValueError as exc:
        raise UserError(f"{source}: train.{exc}") from None


def _model_args(cfg: Config, prep: Preprocessing) -> dict[str, Any]:
    return dict(in_channels=1, out_channels=prep.num_classes, features=cfg.model.features,
                deep_supervision=cfg.model.deep_supervision, strides=cfg.model.strides, norm=cfg.model.norm,
                act=cfg.model.act, upsample=cfg.model.upsample, dropout=cfg.model.dropout)


def _plan_run(man: Manifest, config_path: Path | None, out_dir: Path | None, resume: bool, fold: int | None,
              overrides: list[str]) -> _Plan:
    """Config, split and (when resuming) checkpoint: the checks that need no image read."""
    if resume:
        if out_dir is None:
            raise UserError("--resume needs --out RUN_DIR, the folder of the run to continue")
        if config_path is not None:
            raise UserError("--resume continues with the run's own config; drop --config (use --set to change a "
                            "value such as train.epochs)")
        last = Path(out_dir) / "last.pt"
        if not last.is_file():
            raise UserError(f"{last}: nothing to resume (no last.pt); start a new run without --resume")
        payload = load_checkpoint(last)
        cfg = config_from_dict(payload["config"], str(last), overrides)
        prep = Preprocessing.from_dict(payload["preprocessing"])
        if {int(k): v for k, v in prep.labels.items()} != man.labels:
            raise UserError(f"{man.path}: labels {man.labels} differ from the run's {prep.labels}; resume with the "
                            f"manifest the run started from")
        split = payload["split"]
        if fold is not None and fold != split.get("fold"):
            raise UserError(f"--fold {fold}: the run in {out_dir} trains fold {split.get('fold')}")
        train_cases, val_cases = _cases_from_split(man, split, last)
        return _Plan(cfg, prep, train_cases, val_cases, split, str(last), payload)

    cfg, source = _load_run_config(man, config_path, overrides)
    train_cases, val_cases = split_cases(man, fold=fold, folds=cfg.data.folds,
                                         val_fraction=cfg.data.validation_fraction, seed=cfg.train.seed)
    if not train_cases:
        raise UserError(f"{man.path}: no training cases (the 'training' list is empty or all of it went to "
                        f"validation); list labelled cases under 'training'")
    split = {"fold": fold, "training": [c.name for c in train_cases], "validation": [c.name for c in val_cases]}
    return _Plan(cfg, None, train_cases, val_cases, split, source)


def _resolve(plan_: _Plan, man: Manifest) -> None:
    """Check every case, fingerprint them and resolve the config's ``auto`` values (new runs)."""
    cases = [*plan_.train_cases, *plan_.val_cases]
    _check_cases(man, cases)
    if plan_.resume_payload is None:
        # All labelled cases, as nnU-Net does, so that every fold gets the same preprocessing.
        fp = fingerprint(cases, man.labels)
        try:
            plan_.cfg, plan_.prep = plan(plan_.cfg, fp, man.labels, echo=plan_.notes.append)
        except UserError as exc:  # name the config the bad values came from
            raise UserError(f"{plan_.source}: {exc}") from None
    _check_network(plan_.cfg, plan_.prep, _model_args(plan_.cfg, plan_.prep), plan_.source)


def _default_run_dir(manifest: Path) -> Path:
    stem = manifest.name.split(".")[0]
    if stem in ("manifest", "dataset"):
        stem = manifest.resolve().parent.name or stem
    return Path("runs") / f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _check_folder(folder: Path, resume: bool, force: bool) -> None:
    """Refuse to write into another run's folder (or any non-empty one) unless forced."""
    if resume or not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"--out {folder}: exists and is not a folder")
    if any(folder.iterdir()) and not force:
        what = "a training run" if (folder / "last.pt").exists() or (folder / "metrics.csv").exists() else "files"
        raise UserError(f"--out {folder}: already holds {what}; choose another --out, continue it with --resume, "
                        f"or overwrite it with --force")


def _claim_folder(folder: Path, resume: bool, force: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if force and not resume:
        # Only what a run writes: --force pointed at the wrong folder must not wipe other files.
        for name in RUN_FILES:
            target = folder / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def _on_rank0(dist: Dist, fn: Any, *args: Any) -> None:
    """Run ``fn`` on rank 0 only; a UserError there is raised on every rank, so all stop together."""
    error = None
    if dist.is_main:
        try:
            fn(*args)
        except UserError as exc:
            error = str(exc)
    error = dist.broadcast(error)
    if error:
        raise UserError(error)


def _configure_determinism(cfg: Config, device: torch.device) -> None:
    set_determinism(seed=cfg.train.seed)
    if device.type == "cuda":
        # MONAI's set_determinism also turns cuDNN autotuning off; keep it unless asked not to.
        torch.backends.cudnn.deterministic = cfg.train.deterministic
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _build_trainer(p: _Plan, folder: Path, dist: Dist, device: torch.device, amp: torch.dtype | None) -> Trainer:
    cfg, prep, payload = p.cfg, p.prep, p.resume_payload
    _configure_determinism(cfg, device)
    seed_everything(cfg.train.seed)  # the same initial weights on every rank (DDP broadcasts them anyway)
    net = UNetPlusPlus3D(**_model_args(cfg, prep)).to(device)
    net.checkpointing = cfg.train.checkpointing
    if payload is not None:
        net.load_state_dict(payload["state_dict"])
    model: torch.nn.Module = net
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        model = torch.compile(model)
    optimizer = make_optimizer(net.parameters(), cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    start_epoch, best = 0, -1.0
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        # The same value LambdaLR would set; differs from the saved one only when --epochs changed
        # on resume, and then the remaining epochs follow the new schedule.
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * lr_factor(scheduler.last_epoch, cfg.train)
        if payload["scaler"]:
            scaler.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"])
        start_epoch, best = int(payload["epoch"]), float(payload["best_metric"])
    pin = device.type == "cuda"
    train_loader = make_train_loader(p.train_cases, prep, cfg.data, int(cfg.data.batch_size),
                                     cfg.train.iterations_per_epoch, seed=cfg.train.seed, rank=dist.rank,
                                     world_size=dist.world_size, pin_memory=pin)
    val_loader = (make_val_loader(p.val_cases, prep, cfg.data, dist.rank, dist.world_size, pin)
                  if p.val_cases else [])
    names = [prep.labels[k] for k in sorted(prep.labels, key=int) if int(k) != 0]
    log = RunLog(folder, names, first_epoch=start_epoch, active=dist.is_main)
    loss_fn = DeepSupervisionLoss(prep.num_classes, cfg.train.head_weights, kind=cfg.train.loss)
    return Trainer(cfg=cfg, prep=prep, net=net, model=model, loss_fn=loss_fn, optimizer=optimizer,
                   scheduler=scheduler, scaler=scaler, train_loader=train_loader, val_loader=val_loader,
                   device=device, folder=folder, split=p.split, log=log, dist=dist, amp=amp,
                   start_epoch=start_epoch, best_metric=best)


def run_training(manifest: str | Path, config_path: str | Path | None = None, out_dir: str | Path | None = None,
                 resume: bool = False, force: bool = False, device: str | None = None, fold: int | None = None,
                 overrides: list[str] | None = None) -> Path:
    """Train a 3D UNet++ on a manifest's cases; the command ``unetpp3d train``.

    Everything a user can get wrong raises a :class:`UserError` before the run folder is
    written: the manifest, unknown or invalid config keys, cases that fail ``unetpp3d check``
    (including label values the manifest does not declare), an empty training set, and a patch
    size the network cannot take.

    Args:
        manifest: the dataset manifest (JSON).
        config_path: YAML config; default ``configs/<task>.yaml`` for the manifest's task when it
            exists, else the built-in defaults. Not allowed with ``resume`` (the run's own config
            is used).
        out_dir: run folder; default ``runs/<manifest>-<date>-<time>``.
        resume: continue the run in ``out_dir`` from its ``last.pt``.
        force: overwrite the run files in an existing ``out_dir``.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default CUDA when available. Under
            torchrun each process takes ``cuda:LOCAL_RANK``.
        fold: cross-validation fold (0-based) when the manifest has no validation list.
        overrides: ``KEY=VALUE`` config overrides, e.g. ``["train.epochs=10"]``.

    Returns:
        The run folder, holding ``last.pt``, ``best.pt``, ``config.yaml``, ``split.json``,
        ``metrics.csv``, ``train.log``, ``curves.png`` and ``tensorboard/``.

    Raises:
        UserError: bad input, as above.
        SystemExit: 128 + the signal number after SIGINT or SIGTERM, once ``last.pt`` is safe.

    Example::

        >>> run_training("data/manifest.json", "configs/smoke.yaml", "runs/smoke", device="cpu")
    """
    overrides = list(overrides or [])
    dist, dev = Dist.from_env(device)
    try:
        man = load_manifest(manifest)
        p = _plan_run(man, Path(config_path) if config_path else None, Path(out_dir) if out_dir else None,
                      resume, fold, overrides)
        folder = Path(out_dir) if out_dir else Path(dist.broadcast(str(_default_run_dir(Path(manifest)))))
        _on_rank0(dist, _check_folder, folder, resume, force)
        _resolve(p, man)
        amp = amp_dtype(p.cfg.train.amp, dev)

        _on_rank0(dist, _claim_folder, folder, resume, force)
        trainer = _build_trainer(p, folder, dist, dev, amp)
        if dist.is_main:
            atomic_write_text(folder / "config.yaml", p.cfg.to_yaml())
            atomic_write_text(folder / "split.json", _json(p.split))
            for line in p.notes:
                trainer.log.message(line)
        signum = trainer.fit()
    finally:
        dist.close()
    if signum is not None:
        raise SystemExit(128 + signum)
    return folder


def _json(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"
