"""Optimiser, learning-rate schedule and mixed-precision policy for training."""

from __future__ import annotations

import math
from typing import Any

import torch

from unetpp3d.config import TrainConfig
from unetpp3d.errors import UserError


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
