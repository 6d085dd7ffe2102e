"""The run's human-readable record: metrics.csv, train.log, TensorBoard scalars and curves.png."""

from __future__ import annotations

import csv
import math
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from unetpp3d.atomic import atomic_write_csv, write_failed
from unetpp3d.preview import save_curves_png


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
        try:
            self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=first_epoch + 1 if first_epoch else None)
        except OSError as exc:
            raise write_failed(folder / "tensorboard", exc.strerror or str(exc)) from None

    def _truncate_csv(self, first_epoch: int) -> None:
        rows = []
        if first_epoch and self.csv_path.is_file():
            with open(self.csv_path, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh)
                        if r.get("epoch", "").isdigit() and int(r["epoch"]) <= first_epoch]
        atomic_write_csv(self.csv_path, self.columns, rows, ignore_extra=True)

    def message(self, text: str) -> None:
        """A line on the console and in train.log."""
        if not self.active:
            return
        tqdm.write(text)
        try:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(f"{datetime.now().isoformat(timespec='seconds')} {text}\n")
        except OSError as exc:
            raise write_failed(self.log_path, exc.strerror or str(exc)) from None

    def epoch(self, row: dict[str, Any], validated: bool) -> None:
        """Append one epoch's row to metrics.csv, TensorBoard and train.log; redraw curves.png."""
        if not self.active:
            return
        try:
            with open(self.csv_path, "a", newline="", encoding="utf-8") as fh:
                csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore",
                               lineterminator="\n").writerow({k: _fmt(v) for k, v in row.items()})
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:  # a full disk: one line naming the file, not a traceback
            raise write_failed(self.csv_path, exc.strerror or str(exc)) from None
        try:
            self._tensorboard(row, validated)
        except OSError as exc:
            raise write_failed(self.folder / "tensorboard", exc.strerror or str(exc)) from None
        step = row["epoch"]
        text = f"epoch {step}  loss {row['train_loss']:.4f}"
        if validated:
            text += f"  val_dice {row['val_dice']:.4f}"
            if len(self.class_columns) > 1:
                text += " (" + ", ".join(f"{c[5:]} {row[c]:.4f}" for c in self.class_columns) + ")"
        self.message(f"{text}  lr {row['lr']:.3g}  {row['seconds']:.1f} s")
        if validated:
            save_curves_png(self.csv_path, self.folder / "curves.png")

    def _tensorboard(self, row: dict[str, Any], validated: bool) -> None:
        step = row["epoch"]
        self.tb.add_scalar("train/loss", row["train_loss"], step)
        self.tb.add_scalar("train/lr", row["lr"], step)
        if validated:
            self.tb.add_scalar("val/dice", row["val_dice"], step)
            for col in self.class_columns:
                self.tb.add_scalar(f"val/{col}", row[col], step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            tb, self.tb = self.tb, None
            try:
                tb.close()
            except OSError as exc:
                raise write_failed(self.folder / "tensorboard", exc.strerror or str(exc)) from None


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value
