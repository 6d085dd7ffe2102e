"""This process's place in a ``torchrun`` run (or a one-process run) and the collectives the loop needs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from unetpp3d.errors import UserError


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
