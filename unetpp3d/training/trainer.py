"""The training loop as a short sequence of hooks, for any segmentation network and loss.

The loop is nnU-Net v2's trainer (Isensee et al., Nature Methods 2021) cut to its hooks::

    on_train_start -> for each epoch: train_step x iterations, validate (every val_every),
    on_epoch_end -> on_train_end

:func:`build_trainer` gives a :class:`Trainer` its optimiser, schedule, precision, loaders and
run log from a config, for any ``nn.Module`` that returns logits (or a list of deep-supervision
logits) in training and one logits tensor in eval mode, and any loss callable. ``unetpp3d
train`` (:mod:`unetpp3d.commands.train`) builds one for a UNet++ after checking everything a
user can get wrong; ``bench/paper_table.py`` builds one for each of its baselines, so that
every model is trained by the same loop, precision and schedule.

Reproducible resume: every random draw of an epoch is reseeded from ``(seed, epoch, rank)``
when the epoch starts (see :mod:`unetpp3d.data.loader`), and ``last.pt`` is written at the start and
after every epoch. A run killed at any moment and resumed with ``--resume`` repeats the
interrupted epoch from the same state and draws the same patches, so it ends with the weights
an uninterrupted run would have.

Distributed: under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) each process trains
a :class:`~torch.nn.parallel.DistributedDataParallel` replica on its own patches (its sampling
is seeded by rank), metrics are all-reduced, and only rank 0 writes files.

Non-finite training: a step whose loss is NaN or infinite is skipped (no optimiser step).
``train.max_nonfinite_steps`` skipped steps in a row, an epoch with no finite step, or weights
that are no longer finite at an epoch's end stop the run with a one-line :class:`UserError`;
``last.pt`` keeps the last epoch whose weights were finite, and ``best.pt`` is never replaced
by a model with non-finite weights.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.networks.utils import one_hot
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from unetpp3d.config import Config, Preprocessing
from unetpp3d.data.loader import derive_seed, make_train_loader, make_val_loader
from unetpp3d.data.manifest import Case
from unetpp3d.data.transforms import pad_value
from unetpp3d.errors import UserError
from unetpp3d.evaluation.metrics import dice_per_class
from unetpp3d.hardware import autocast_dtype
from unetpp3d.model.checkpoint import non_finite_tensors, save_checkpoint
from unetpp3d.model.network import on_device
from unetpp3d.training.distributed import Dist
from unetpp3d.training.optim import lr_factor, make_optimizer, make_scheduler
from unetpp3d.training.rng import (
    configure_determinism,
    rng_state,
    seed_everything,
    set_rng_state,
)
from unetpp3d.training.runlog import RunLog

Outputs = Union[torch.Tensor, Sequence[torch.Tensor]]
LossFn = Callable[[Outputs, torch.Tensor], torch.Tensor]  # (logits or list of head logits, label map) -> loss


@dataclass
class Trainer:
    """The training loop as hooks; :func:`build_trainer` assembles one from a config.

    Subclass and override a hook to change one step (e.g. ``train_step`` for another loss
    signature) without touching the rest.
    """

    cfg: Config
    prep: Preprocessing
    net: nn.Module  # the bare network: saved, validated
    model: nn.Module  # what training calls: the network, maybe wrapped in DDP and compiled
    loss_fn: LossFn
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
    history: list[dict[str, Any]] = field(default_factory=list)  # each finished epoch's row, on every rank
    _saved_epoch: int = 0  # the epoch last.pt holds
    stop_reason: str | None = None  # why training diverged (non-finite loss or weights), if it did
    _nonfinite_run: int = 0  # skipped (non-finite loss) steps in a row
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
            f"patch {self.prep.patch_size}, batch {self.cfg.data.batch_size} x {self.dist.world_size} process(es)"
            f"{f' ({self.dist.backend})' if self.dist.backend else ''}, "
            f"{tc.iterations_per_epoch} iterations/epoch, {self.device}"
            f"{', ' + str(self.amp).replace('torch.', '') if self.amp else ''} -> {self.folder}")

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimiser step on one batch of patches; returns the loss."""
        image, label = (_plain(batch[k]).to(self.device, non_blocking=True) for k in ("image", "label"))
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            outputs = self.model(image)
        loss = self.loss_fn(outputs, label)
        if not self._everywhere(bool(torch.isfinite(loss.detach()).all())):
            # A NaN/inf loss would poison every weight through the optimiser step: skip the step
            # (on every rank alike, or DDP would wait for a gradient all-reduce forever).
            self.optimizer.zero_grad(set_to_none=True)
            return math.nan
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Sliding-window Dice per foreground class on whole validation volumes, over all ranks.

        Empty masks follow ``unetpp3d evaluate``'s convention (:func:`dice_per_class`): a class
        absent from both prediction and label is left out of its mean; predicted where the label
        has none, it scores 0.
        """
        self.net.eval()
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
            dice = dice_per_class(pred, one_hot(label.long(), self.prep.num_classes))[0].double()
            ok = ~torch.isnan(dice)  # undefined: absent from both prediction and label
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
        row = {"epoch": done, "train_loss": train_loss, "lr": lr, "seconds": seconds, "val_dice": math.nan,
               **{c: math.nan for c in self.log.class_columns}, **(val or {})}
        self.history.append(row)
        if not self.dist.is_main:
            return
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
            if self.stop_reason is not None:
                self.log.message(self.stop_reason)
                why = "non-finite numbers"
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
                if not losses or not self._everywhere(not non_finite_tensors(self.net.state_dict())):
                    self._diverged(epoch, "no step of the epoch had a finite loss" if not losses
                                   else "the weights are no longer finite")
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
        if self.stop_reason is not None:
            raise UserError(self.stop_reason)
        return self.stop_signal

    def _everywhere(self, ok: bool) -> bool:
        """``ok`` on every rank (one rank's NaN stops all of them at the same step)."""
        if not self.dist.enabled:
            return ok
        flag = torch.tensor([0 if ok else 1], device=self.device)
        return not int(self.dist.all_reduce(flag, op="max"))

    def _diverged(self, epoch: int, why: str) -> None:
        """Record why training stops on non-finite numbers; :meth:`fit` raises it after cleaning up."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.stop_reason = (
            f"{self.folder}: training stopped in epoch {epoch + 1}: {why} (learning rate {lr:g}); the learning "
            f"rate is too high (or not a number) or the data holds non-finite values; last.pt keeps epoch "
            f"{self._saved_epoch}, whose weights are finite; lower train.lr and resume with --resume, or start again")

    def _train_epoch(self, epoch: int) -> list[float] | None:
        """The epoch's finite step losses, or None when a signal or non-finite losses stopped it part-way."""
        seed_everything(derive_seed(self.cfg.train.seed, epoch, self.dist.rank))
        self.train_loader.set_epoch(epoch)
        self.model.train()
        bar = tqdm(total=len(self.train_loader), desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", unit="batch",
                   leave=False, dynamic_ncols=True, disable=True if not self.dist.is_main else None)
        losses: list[float] = []  # the finite ones; skipped steps have none
        steps = 0
        limit = self.cfg.train.max_nonfinite_steps
        start = time.perf_counter()
        batches = iter(self.train_loader)
        try:
            while steps < len(self.train_loader):
                if self._should_stop():
                    return None
                try:
                    batch = next(batches)
                except (RuntimeError, StopIteration):
                    if self._should_stop():  # a worker process that the signal ended
                        return None
                    raise
                loss = self.train_step(batch)
                steps += 1
                if not math.isfinite(loss):
                    self._nonfinite_run += 1
                    if self._nonfinite_run >= limit:
                        self._diverged(epoch, f"the loss was not finite for {self._nonfinite_run} steps in a row "
                                              f"(train.max_nonfinite_steps={limit})")
                        return None
                    continue
                self._nonfinite_run = 0
                losses.append(loss)
                rate = steps * self.cfg.data.batch_size / max(time.perf_counter() - start, 1e-9)
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
            # Networks other than UNetPlusPlus3D (a benchmark's baselines) have no model_args and
            # are not rebuilt from the checkpoint.
            "model_args": getattr(self.net, "model_args", None),
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


def build_trainer(cfg: Config, prep: Preprocessing, net: nn.Module, loss_fn: LossFn, train_cases: Sequence[Case],
                  val_cases: Sequence[Case], folder: str | Path, device: torch.device, *, dist: Dist | None = None,
                  split: dict[str, Any] | None = None, resume: dict[str, Any] | None = None) -> Trainer:
    """A :class:`Trainer` for ``net`` with the optimiser, schedule, precision and loaders of ``cfg``.

    Args:
        cfg: the resolved config (no ``auto`` left in ``data.batch_size``).
        prep: the preprocessing the loaders apply (:func:`unetpp3d.model.planning.plan`).
        net: any segmentation network: logits ``(B, C, *spatial)`` or a list of them (deep
            supervision) in training mode, one logits tensor in eval mode. Moved to ``device``.
            Seed before building it (:func:`~unetpp3d.training.rng.seed_everything`) for
            reproducible initial weights.
        loss_fn: ``loss_fn(outputs, label_map) -> scalar``, e.g.
            :class:`~unetpp3d.training.loss.DeepSupervisionLoss`.
        train_cases: labelled cases to draw patches from.
        val_cases: labelled cases validated whole every ``train.val_every`` epochs; may be empty.
        folder: the run folder (checkpoints, metrics.csv, train.log, TensorBoard).
        device: where to train.
        dist: this process's place in a ``torchrun`` run; default one process.
        split: recorded in checkpoints; default the case names, no fold.
        resume: a ``last.pt`` payload to continue from (weights, optimiser, schedule, RNG, epoch).

    Returns:
        The trainer; :meth:`Trainer.fit` runs it.

    Raises:
        UserError: ``train.amp`` asks for a precision the device lacks.
    """
    dist = dist or Dist()
    folder = Path(folder)
    amp = autocast_dtype(cfg.train.amp, device, name="train.amp")
    configure_determinism(cfg.train, device)
    net = on_device(net, device, training=True, dtype=amp)
    if resume is not None:
        net.load_state_dict(resume["state_dict"])
    model = net
    if dist.enabled:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        model = torch.compile(model)
    optimizer = make_optimizer(net.parameters(), cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    start_epoch, best = 0, -1.0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        # The same value LambdaLR would set; differs from the saved one only when --epochs changed
        # on resume, and then the remaining epochs follow the new schedule.
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * lr_factor(scheduler.last_epoch, cfg.train)
        if resume["scaler"]:
            scaler.load_state_dict(resume["scaler"])
        set_rng_state(resume["rng"])
        start_epoch, best = int(resume["epoch"]), float(resume["best_metric"])
    pin = device.type == "cuda"
    train_loader = make_train_loader(list(train_cases), prep, cfg.data, int(cfg.data.batch_size),
                                     cfg.train.iterations_per_epoch, seed=cfg.train.seed, rank=dist.rank,
                                     world_size=dist.world_size, pin_memory=pin)
    val_loader = (make_val_loader(list(val_cases), prep, cfg.data, dist.rank, dist.world_size, pin)
                  if val_cases else [])
    names = [prep.labels[k] for k in sorted(prep.labels, key=int) if int(k) != 0]
    log = RunLog(folder, names, first_epoch=start_epoch, active=dist.is_main)
    if split is None:
        split = {"fold": None, "training": [c.name for c in train_cases], "validation": [c.name for c in val_cases]}
    return Trainer(cfg=cfg, prep=prep, net=net, model=model, loss_fn=loss_fn, optimizer=optimizer,
                   scheduler=scheduler, scaler=scaler, train_loader=train_loader, val_loader=val_loader,
                   device=device, folder=folder, split=split, log=log, dist=dist, amp=amp,
                   start_epoch=start_epoch, best_metric=best)
