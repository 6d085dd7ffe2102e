"""Loaders: patches for training, whole volumes for validation.

Training draws a fixed number of batches per epoch (nnU-Net's "iterations per epoch") from an
endless stream of shuffled cases, rather than passing once over the dataset, so that an epoch
means the same amount of work whatever the dataset's size.

Everything random in an epoch is reseeded from ``(seed, epoch, rank)`` when the epoch starts:
the order of the cases, the crops and augmentations in the main process, and the seeds of the
DataLoader's worker processes. An epoch therefore draws the same patches whether the run went
straight through or was killed and resumed at the epoch boundary, and different ranks of a
distributed run draw different cases and patches.
"""

from __future__ import annotations

import math
import multiprocessing
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.data.utils import set_rnd
from torch.utils.data import Sampler

from unetpp3d.config import DataConfig, Preprocessing
from unetpp3d.data.transforms import eval_transforms, make_dataset, train_transforms


def derive_seed(*parts: int) -> int:
    """A seed in [0, 2**31) that depends on every part, e.g. ``(seed, epoch, rank)``.

    ``SeedSequence`` mixes the parts thoroughly, so neighbouring epochs or ranks get unrelated
    streams (``seed + epoch`` would make epoch 1 of seed 0 equal epoch 0 of seed 1).
    """
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] >> 1)


def worker_context(num_workers: int) -> Any:
    """How DataLoader workers start: forked where the platform can fork, whatever the parent's default.

    A process started with ``spawn`` (the LIDC experiment's jobs, a notebook's pool) makes
    ``spawn`` the default for its own children too. Spawned workers import torch and MONAI afresh
    and receive the whole cached dataset by pickle, at every epoch (workers are not persistent,
    so that each epoch reseeds them): on an H200 machine five such trainings took about 50 s per
    epoch of 50 steps and 1 s per validation crop (docs/lidc.md); here a spawned job waited
    7-9 s for each epoch's first batch against 0.15 s forked. Forked workers share the cache
    copy-on-write. They must not touch CUDA, and they do not: the transforms run on the CPU.
    Linux only: on macOS fork is offered but unsafe with the system's frameworks (Python's default
    there is spawn), and Windows cannot fork.
    """
    if num_workers > 0 and sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return None


def case_dicts(cases: Sequence[Any]) -> list[dict[str, str]]:
    """The ``{"image", "label"}`` dicts that MONAI dictionary transforms take, one per case."""
    out = []
    for case in cases:
        item = {"image": str(case.image)}
        if getattr(case, "label", None) is not None:
            item["label"] = str(case.label)
        out.append(item)
    return out


class EpochSampler(Sampler[int]):
    """Case indices for one epoch, drawn from successive shuffles of all cases.

    The stream of shuffles depends on ``(seed, epoch)`` only, and rank ``r`` of ``world_size``
    takes every ``world_size``-th index of it from position ``r``, so ranks see disjoint draws
    (as with ``DistributedSampler``) and every case comes up about equally often.

    Args:
        n_cases: size of the dataset.
        num_samples: indices per epoch for this rank.
        seed: the run's seed.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, n_cases: int, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if n_cases < 1:
            raise ValueError("the sampler needs at least one case")
        self.n_cases, self.num_samples = int(n_cases), int(num_samples)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5A))
        needed = self.num_samples * self.world_size
        stream: list[int] = []
        while len(stream) < needed:
            stream.extend(torch.randperm(self.n_cases, generator=g).tolist())
        return iter(stream[self.rank:needed:self.world_size])

    def __len__(self) -> int:
        return self.num_samples


class TrainLoader:
    """``iterations`` batches of ``batch_size`` patches per epoch; call :meth:`set_epoch` first.

    Each dataset item yields ``samples_per_volume`` patches of one case, so a batch is drawn
    from ``ceil(batch_size / samples_per_volume)`` cases and cut to ``batch_size`` patches.

    Args:
        dataset: a MONAI dataset whose transform ends in a random patch crop.
        batch_size: patches per batch (per process).
        samples_per_volume: patches each dataset item yields.
        iterations: batches per epoch.
        seed, rank, world_size: see :class:`EpochSampler`.
        num_workers: DataLoader worker processes (0: load in the main process).
        pin_memory: pin batches for faster copies to a GPU.
    """

    def __init__(self, dataset: Any, batch_size: int, samples_per_volume: int, iterations: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool = False):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.iterations = int(iterations)
        self.seed, self.rank = int(seed), int(rank)
        self.volumes_per_batch = max(1, math.ceil(self.batch_size / max(1, int(samples_per_volume))))
        self.sampler = EpochSampler(len(dataset), self.iterations * self.volumes_per_batch, seed, rank, world_size)
        # The generator sets the worker processes' seeds (torch draws a base seed from it each
        # time an epoch's iterator starts); reseeding it per epoch makes the workers reproducible.
        self.generator = torch.Generator()
        self.loader = DataLoader(dataset, batch_size=self.volumes_per_batch, sampler=self.sampler,
                                 num_workers=int(num_workers), pin_memory=pin_memory, generator=self.generator,
                                 persistent_workers=False, drop_last=False,
                                 multiprocessing_context=worker_context(int(num_workers)))
        self.num_workers = int(num_workers)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed everything random in ``epoch`` from ``(seed, epoch, rank)``."""
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(derive_seed(self.seed, epoch, self.rank, 0x3C))
        if self.num_workers == 0:
            # Without workers the transforms run here with their own random states; with workers
            # MONAI's worker_init_fn reseeds each worker's copy from the generator above.
            set_rnd(self.dataset, derive_seed(self.seed, epoch, self.rank, 0x7E))

    def __len__(self) -> int:
        return self.iterations

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield {key: value[: self.batch_size] for key, value in batch.items() if key in ("image", "label")}


def make_train_loader(cases: Sequence[Any], prep: Preprocessing, data_cfg: DataConfig, batch_size: int,
                      iterations: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                      pin_memory: bool = False) -> TrainLoader:
    """Build the training loader: cached dataset, training transforms, epoch-seeded sampling.

    Args:
        cases: the training cases (``Case`` objects with ``image`` and ``label``).
        prep: resolved preprocessing (spacing, intensities, patch size).
        data_cfg: the ``data`` section of the resolved config (augmentation, caching, workers).
        batch_size: patches per batch for this process.
        iterations: batches per epoch.
        seed: the run's seed.
        rank, world_size: this process's place in a distributed run.
        pin_memory: pin batches (when training on a GPU).
    """
    dataset = make_dataset(case_dicts(cases), train_transforms(prep, data_cfg), data_cfg.cache,
                           data_cfg.cache_dir, data_cfg.num_workers)
    return TrainLoader(dataset, batch_size=batch_size, samples_per_volume=data_cfg.samples_per_volume,
                       iterations=iterations, seed=seed, rank=rank, world_size=world_size,
                       num_workers=data_cfg.num_workers, pin_memory=pin_memory)


def make_val_loader(cases: Sequence[Any], prep: Preprocessing, data_cfg: DataConfig, rank: int = 0,
                    world_size: int = 1, pin_memory: bool = False) -> DataLoader | list:
    """Whole validation volumes, one per batch, this rank's share (every ``world_size``-th case).

    A rank without a share gets an empty list, which iterates like an empty loader.

    Args:
        cases: the validation cases.
        prep: resolved preprocessing.
        data_cfg: the ``data`` section (caching, workers).
        rank, world_size: this process's place in a distributed run.
        pin_memory: pin batches (when validating on a GPU).
    """
    mine = list(cases)[rank::world_size]
    if not mine:  # more ranks than validation cases: this rank only joins the all-reduce
        return []
    dataset = make_dataset(case_dicts(mine), eval_transforms(prep, ("image", "label")), data_cfg.cache,
                           data_cfg.cache_dir, data_cfg.num_workers)
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=data_cfg.num_workers, pin_memory=pin_memory,
                      multiprocessing_context=worker_context(int(data_cfg.num_workers)))
