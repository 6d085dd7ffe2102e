"""Training: assemble a run from a manifest and a config, then run a short loop of hooks.

:func:`run_training` does everything that can fail because of the user first — manifest,
config, case checks, planning, patch size against the network — and only then creates the run
folder and hands a :class:`Trainer` its parts. The trainer is the loop of nnU-Net v2's trainer
(Isensee et al., Nature Methods 2021) cut to its hooks::

    on_train_start -> for each epoch: train_step x iterations, validate (every val_every),
    on_epoch_end -> on_train_end

Reproducible resume: every random draw of an epoch is reseeded from ``(seed, epoch, rank)``
when the epoch starts (see :mod:`unetpp3d.data.loader`), and ``last.pt`` is written at the start and
after every epoch. A run killed at any moment and resumed with ``--resume`` repeats the
interrupted epoch from the same state and draws the same patches, so it ends with the weights
an uninterrupted run would have.

Distributed: under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) each process trains
a :class:`~torch.nn.parallel.DistributedDataParallel` replica on its own patches (its sampling
is seeded by rank), metrics are all-reduced, and only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.networks.utils import one_hot
from tqdm import tqdm

from unetpp3d.config import Config, Preprocessing
from unetpp3d.data.loader import derive_seed
from unetpp3d.data.transforms import pad_value
from unetpp3d.evaluation.metrics import dice_per_class
from unetpp3d.model.checkpoint import save_checkpoint
from unetpp3d.model.network import UNetPlusPlus3D
from unetpp3d.training.distributed import Dist
from unetpp3d.training.loss import DeepSupervisionLoss
from unetpp3d.training.rng import rng_state, seed_everything
from unetpp3d.training.runlog import RunLog


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
