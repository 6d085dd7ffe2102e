"""Optimiser and learning-rate schedule for training (the precision policy is unetpp3d.hardware.autocast_dtype)."""

from __future__ import annotations

import math
from typing import Any

import torch

from unetpp3d.config import TrainConfig


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
