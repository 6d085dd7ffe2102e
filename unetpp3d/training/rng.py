"""Seeds, determinism flags, and random-generator states as plain types and tensors (checkpoints load
with ``weights_only``)."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from monai.utils import set_determinism

from unetpp3d.config import TrainConfig


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


def configure_determinism(tc: TrainConfig, device: torch.device) -> None:
    """Seed every generator from ``tc.seed`` and set cuDNN's flags for ``tc.deterministic``."""
    set_determinism(seed=tc.seed)
    if device.type == "cuda":
        # MONAI's set_determinism also turns cuDNN autotuning off; keep it unless asked not to.
        torch.backends.cudnn.deterministic = tc.deterministic
        torch.backends.cudnn.benchmark = not tc.deterministic
        if tc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
