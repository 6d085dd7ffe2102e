"""This process's place in a ``torchrun`` run (or a one-process run) and the collectives the loop needs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from unetpp3d.errors import UserError
from unetpp3d.hardware import resolve_device


@dataclass
class Dist:
    """This process's place in a (possibly one-process) run, and the collectives the loop needs.

    ``backend`` is the process group's ("nccl" on GPUs, "gloo" on CPUs), or None for a plain
    one-process run. Every process that ``torchrun`` starts joins a group, one process alone
    too, so that ``torchrun --nproc_per_node=1`` runs the distributed code (DDP, NCCL
    collectives) as a multi-GPU run does: a single GPU can check that path.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_request: str | None) -> tuple[Dist, torch.device]:
        """Read torchrun's variables, join the process group, and pick this process's device."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        launched = world > 1 or torch_dist.is_torchelastic_launched()
        device = resolve_device(device_request, local if launched else None)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not launched:
            return cls(rank, world, local), device
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(rank, world, local, torch_dist.get_backend()), device

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

    def on_main(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on rank 0 only; a UserError there is raised on every rank, so all stop together."""
        error = None
        if self.is_main:
            try:
                fn(*args)
            except UserError as exc:
                error = str(exc)
        error = self.broadcast(error)
        if error:
            raise UserError(error)

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
