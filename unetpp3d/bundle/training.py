"""The components a bundle's ``train.json``, ``multi_gpu_train.json`` and ``evaluate.json`` name.

MONAI's runner (``python -m monai.bundle run``) trains and evaluates a bundle with these, and
they are unetpp3d's own loop and predictor with plain arguments, not ignite engines:

* :func:`labelled_datalist`: a dataset root holding ``imagesTr/`` and ``labelsTr/`` (MSD and
  nnU-Net layouts), or a datalist JSON, as ``[{"image", "label", "name"}, ...]``;
* :class:`BundleTrainer`: :class:`~unetpp3d.training.trainer.Trainer` on the bundle's network,
  preprocessing and config, starting from ``models/model.pt``, validating every
  ``val_interval`` epochs, and writing the best validated weights back to ``models/model.pt``
  (the format ``unetpp3d infer --model BUNDLE`` reads) and ``models/model.ts``;
* :class:`BundleValidator`: segments labelled cases as ``unetpp3d infer --model BUNDLE`` does and
  scores the masks on each scan's own grid.

The preprocessing is the bundle's (``metadata.json``'s ``unetpp3d.preprocessing``), never the
training config's: ``inference.json`` and ``unetpp3d infer`` apply it to the weights trained here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unetpp3d.atomic import atomic_path, atomic_write_text
from unetpp3d.bundle.torchscript import save_torchscript
from unetpp3d.config import AUTO, Config, Preprocessing, config_from_dict
from unetpp3d.data.manifest import Case, Manifest, case_name, load_manifest, split_cases
from unetpp3d.data.transforms import IMAGE_KEY
from unetpp3d.data.validation import validate_case
from unetpp3d.errors import UserError
from unetpp3d.evaluation.metrics import score_arrays
from unetpp3d.geometry import align_label_to_image, axis_mapping
from unetpp3d.imageio.formats import IMAGE_SUFFIXES
from unetpp3d.imageio.readers import read_image
from unetpp3d.inference.predictor import Predictor
from unetpp3d.model.checkpoint import load_state_dict
from unetpp3d.training.distributed import Dist
from unetpp3d.training.loss import DeepSupervisionLoss
from unetpp3d.training.trainer import build_trainer

log = logging.getLogger("unetpp3d")

LABEL_KEY = "label"
TRAIN_IMAGES, TRAIN_LABELS = "imagesTr", "labelsTr"

# What a bundle's training run writes in its run folder; an earlier run's are replaced.
_RUN_FILES = ("last.pt", "best.pt", "train.log", "metrics.csv", "curves.png", "config.yaml", "split.json")


def labelled_datalist(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The labelled cases of a dataset as ``[{"image": path, "label": path, "name": case}, ...]``.

    Args:
        dataset_dir: a dataset root holding ``imagesTr/`` and ``labelsTr/`` (images paired with
            labels by case name: ``imagesTr/<case>.nii.gz`` or nnU-Net's ``<case>_0000.nii.gz``
            with ``labelsTr/<case>.nii.gz``), or a datalist JSON (an MSD or nnU-Net
            ``dataset.json``, an Auto3DSeg datalist or a unetpp3d manifest: its training and
            validation cases).

    Raises:
        UserError: no such dataset, no ``imagesTr/``, an image without its label, or no cases.
    """
    path = Path(dataset_dir)
    if path.is_file() and path.name.lower().endswith(".json"):
        manifest = load_manifest(path)
        cases = [*manifest.training, *(manifest.validation or [])]
    elif (path / TRAIN_IMAGES).is_dir():
        cases = _paired_cases(path)
    else:
        why = "no such file or folder" if not path.exists() else f"no {TRAIN_IMAGES}/ folder in it"
        raise UserError(f"dataset_dir {path}: {why}; pass --dataset_dir with a dataset root holding {TRAIN_IMAGES}/ "
                        f"and {TRAIN_LABELS}/, or a datalist JSON")
    if not cases:
        raise UserError(f"dataset_dir {path}: no labelled cases; put scans in {TRAIN_IMAGES}/ and their labels, "
                        f"named alike, in {TRAIN_LABELS}/")
    return [{IMAGE_KEY: str(c.image), LABEL_KEY: str(c.label), "name": c.name} for c in cases]


def _scans(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES)]


def _paired_cases(root: Path) -> list[Case]:
    labels = {case_name(p): p for p in _scans(root / TRAIN_LABELS)}
    cases, unpaired = [], []
    for image in _scans(root / TRAIN_IMAGES):
        name = case_name(image)
        # nnU-Net names the first (only) channel <case>_0000 and the label <case>.
        for candidate in ([name[:-5]] if name.endswith("_0000") else []) + [name]:
            if candidate in labels:
                cases.append(Case(candidate, image, labels[candidate]))
                break
        else:
            unpaired.append(image.name)
    if unpaired:
        listed = ", ".join(unpaired[:5]) + (" ..." if len(unpaired) > 5 else "")
        raise UserError(f"dataset_dir {root}: no label in {TRAIN_LABELS}/ for {len(unpaired)} image(s) of "
                        f"{TRAIN_IMAGES}/ ({listed}); give each its label under the same case name")
    return cases


def _cases(data: Any, role: str) -> list[Case]:
    """``[{"image", "label"(, "name")}, ...]`` (MONAI's datalist form) as cases."""
    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
        raise UserError(f"{role}: expected a list of {{'image': ..., 'label': ...}}, got {type(data).__name__}")
    cases = []
    for i, item in enumerate(data):
        if not isinstance(item, Mapping) or IMAGE_KEY not in item or LABEL_KEY not in item:
            raise UserError(f"{role}[{i}]: expected {{'image': ..., 'label': ...}}, got {item!r:.200}")
        image = Path(str(item[IMAGE_KEY]))
        cases.append(Case(str(item.get("name") or case_name(image)), image, Path(str(item[LABEL_KEY]))))
    return cases


def _refuse_bad_cases(cases: Sequence[Case], labels: dict[int, str], role: str) -> None:
    """Refuse cases that ``unetpp3d check`` would fail (warnings pass), listing the problems."""
    problems = [f"{case.name}: {p.message}" for case in cases for p in validate_case(case, labels)
                if p.severity == "error"]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise UserError(f"{role}: {len(problems)} problem(s) in the training data: {shown}")


def _device_name(device: Any) -> str | None:
    return None if device is None else str(device)


class BundleTrainer:
    """What a bundle's ``train#trainer`` runs: unetpp3d's Trainer, from ``models/model.pt`` back to it.

    Takes the arguments MONAI's tools set on a training bundle (``max_epochs``, the data of
    ``train#dataset`` and ``validate#dataset``, ``device``); ``run()`` trains.

    Args:
        network: the bundle's ``network_def``.
        preprocessing: the bundle's preprocessing (``metadata.json``'s ``unetpp3d.preprocessing``).
        config: the bundle's training config (``metadata.json``'s ``unetpp3d.config``): optimiser,
            schedule, augmentation, batch size, loader.
        train_data: labelled cases ``[{"image", "label"}, ...]``.
        model_file: the bundle's ``models/model.pt``: training starts from its weights (when
            ``pretrained`` and the file exists) and the result replaces it.
        run_dir: the run's files (``train.log``, ``metrics.csv``, ``last.pt``, ``best.pt``,
            TensorBoard); an earlier run's there are replaced.
        device: where to train (under ``torchrun``, each process takes ``cuda:LOCAL_RANK``).
        val_data: validation cases; None splits ``train_data`` as ``unetpp3d train`` does
            (``data.validation_fraction``, or fold ``fold`` of ``data.folds``); ``[]``: none.
        max_epochs: epochs (``train.epochs`` when None).
        val_interval: validate every this many epochs, and after the last (``train.val_every``).
        iterations_per_epoch: batches per epoch (``train.iterations_per_epoch``).
        num_workers: loader processes (``data.num_workers``).
        config_overrides: ``KEY=VALUE`` changes to the config, as ``unetpp3d train --set``.
        fold: the fold that validates when ``val_data`` is None.
        pretrained: start from ``model_file``'s weights; False starts from ``network`` as built.
        distributed: refuse to run outside ``torchrun`` (``multi_gpu_train.json`` sets it).
    """

    def __init__(self, network: nn.Module, preprocessing: Mapping[str, Any], config: Mapping[str, Any] | None,
                 train_data: Sequence[Mapping[str, Any]], model_file: str | os.PathLike, run_dir: str | os.PathLike,
                 device: str | torch.device | None = None, val_data: Sequence[Mapping[str, Any]] | None = None,
                 max_epochs: int | None = None, val_interval: int | None = None,
                 iterations_per_epoch: int | None = None, num_workers: int | None = None,
                 config_overrides: Sequence[str] = (), fold: int | None = None, pretrained: bool = True,
                 distributed: bool = False) -> None:
        self.network, self.preprocessing, self.config = network, dict(preprocessing), config
        self.train_data, self.val_data = train_data, val_data
        self.model_file, self.run_dir = Path(model_file), Path(run_dir)
        self.device = device
        self.max_epochs, self.val_interval = max_epochs, val_interval
        self.iterations_per_epoch, self.num_workers = iterations_per_epoch, num_workers
        self.config_overrides, self.fold = list(config_overrides or []), fold
        self.pretrained, self.distributed = bool(pretrained), bool(distributed)

    def run(self) -> Path:
        """Train, then write the best validated weights (the last, without validation) to ``model_file``.

        Returns:
            ``model_file``.

        Raises:
            UserError: bad data, config or weights, as ``unetpp3d train`` reports them.
            SystemExit: 128 + the signal number after SIGINT or SIGTERM; ``model_file`` is
                then left as it was.
        """
        if self.distributed and int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise UserError("multi_gpu_train.json runs one process per GPU under torchrun: torchrun "
                            "--nproc_per_node=N -m monai.bundle run --config_file \"['BUNDLE/configs/train.json',"
                            "'BUNDLE/configs/multi_gpu_train.json']\" --bundle_root BUNDLE --dataset_dir DATA")
        cfg, prep = self._config()
        train_cases, val_cases, split = self._split(cfg, prep)
        dist, device = Dist.from_env(_device_name(self.device))
        try:
            dist.on_main(_refuse_bad_cases, [*train_cases, *val_cases],
                     {int(k): v for k, v in prep.labels.items()}, "train.json's data")
            net = self._initial_network(cfg)
            if dist.is_main:
                self._clear_previous_run(cfg, split)
            loss_fn = DeepSupervisionLoss(prep.num_classes, cfg.train.head_weights, kind=cfg.train.loss)
            trainer = build_trainer(cfg, prep, net, loss_fn, train_cases, val_cases, self.run_dir, device, dist=dist,
                                    split=split)
            signum = trainer.fit()
            if signum is not None:
                raise SystemExit(128 + signum)
            if dist.is_main:
                self._publish(trainer.net)
        finally:
            dist.close()
        return self.model_file

    def _config(self) -> tuple[Config, Preprocessing]:
        if not self.config:
            raise UserError("train.json: the bundle's metadata.json holds no training config (unetpp3d.config); "
                            "export the bundle from a checkpoint written by `unetpp3d train`")
        overrides = list(self.config_overrides)
        for key, value in (("train.epochs", self.max_epochs), ("train.val_every", self.val_interval),
                           ("train.iterations_per_epoch", self.iterations_per_epoch),
                           ("data.num_workers", self.num_workers)):
            if value is not None:
                overrides.append(f"{key}={int(value)}")
        cfg = config_from_dict(dict(self.config), "train.json (the bundle's config)", overrides)
        if cfg.data.batch_size == AUTO:
            raise UserError("train.json: the bundle's config leaves data.batch_size 'auto'; set it, e.g. "
                            "--train#trainer#config_overrides \"['data.batch_size=2']\"")
        return cfg, Preprocessing.from_dict(self.preprocessing)

    def _split(self, cfg: Config, prep: Preprocessing) -> tuple[list[Case], list[Case], dict[str, Any]]:
        cases = _cases(self.train_data, "train#dataset#data")
        if self.val_data is None:
            labels = {int(k): v for k, v in prep.labels.items()}
            data = Manifest(path=Path("train#dataset#data"), root=Path.cwd(), task=prep.task, labels=labels,
                            training=cases)
            train, val = split_cases(data, fold=self.fold, folds=cfg.data.folds,
                                     val_fraction=cfg.data.validation_fraction, seed=cfg.train.seed)
        else:
            train, val = cases, _cases(self.val_data, "validate#dataset#data")
        if not train:
            raise UserError("train.json: no training cases (all of them went to validation, or none were given)")
        split = {"fold": self.fold, "training": [c.name for c in train], "validation": [c.name for c in val]}
        return train, val, split

    def _initial_network(self, cfg: Config) -> nn.Module:
        net = self.network
        if self.pretrained and self.model_file.is_file():
            try:
                net.load_state_dict(load_state_dict(self.model_file))
            except RuntimeError as exc:
                raise UserError(f"{self.model_file}: does not fit network_def ({str(exc).splitlines()[0]}); "
                                "pass --pretrained False to train from the network as built") from None
            log.info("training from the weights in %s", self.model_file)
        else:
            log.info("training from the network as built (%s)",
                     "--pretrained False" if not self.pretrained else f"no {self.model_file}")
        net.checkpointing = cfg.train.checkpointing
        return net

    def _clear_previous_run(self, cfg: Config, split: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in _RUN_FILES:
            (self.run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)
        atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
        atomic_write_text(self.run_dir / "split.json", json.dumps(split, indent=2) + "\n")

    def _publish(self, net: nn.Module) -> None:
        """Write the run's best weights (else its last) to ``model_file`` and trace ``model.ts`` again beside it."""
        source = self.run_dir / "best.pt" if (self.run_dir / "best.pt").is_file() else self.run_dir / "last.pt"
        state = load_state_dict(source)
        self.model_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.model_file) as tmp:
            torch.save(state, tmp)
        log.info("wrote %s (the weights of %s)", self.model_file, source)
        traced = self.model_file.with_name("model.ts")
        configs = self.model_file.parent.parent / "configs"
        if traced.is_file() and (configs / "metadata.json").is_file() and (configs / "inference.json").is_file():
            meta = json.loads((configs / "metadata.json").read_text(encoding="utf-8"))
            inference = json.loads((configs / "inference.json").read_text(encoding="utf-8"))
            net = net.cpu()
            net.load_state_dict(state)
            save_torchscript(net, inference["inferer"]["roi_size"], meta, inference, traced)
            log.info("wrote %s (TorchScript of the same weights)", traced)


class BundleValidator:
    """What a bundle's ``evaluate.json`` runs: segment labelled cases as ``unetpp3d infer --model BUNDLE`` does, then score them.

    Each mask is scored against its label on the scan's own grid (the label re-indexed when it
    is stored in another axis order, never resampled) with
    :func:`~unetpp3d.evaluation.metrics.score_arrays`: Dice, IoU, HD95 and surface Dice per
    foreground class, with ``unetpp3d evaluate``'s convention for empty masks.

    Args:
        bundle_root: the bundle folder (its ``configs/metadata.json`` and ``models/model.pt``).
        data: labelled cases ``[{"image", "label"}, ...]``.
        output_dir: receives ``evaluation.json`` (every case's scores and the mean per class).
        device: where to segment; default CUDA when available.
    """

    def __init__(self, bundle_root: str | os.PathLike, data: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike,
                 device: str | torch.device | None = None) -> None:
        self.bundle_root, self.data, self.output_dir, self.device = Path(bundle_root), data, Path(output_dir), device

    def run(self) -> dict[str, float]:
        """Segment and score every case; return the mean Dice per class name (NaN where no case defines it)."""
        cases = _cases(self.data, "validate#dataset#data")
        predictor = Predictor.from_source(self.bundle_root, device=_device_name(self.device), progress=False)
        names = {int(k): v for k, v in predictor.prep.labels.items() if int(k) != 0}
        rows = []
        for case in cases:
            prediction = predictor.predict(case.image)
            ref, ref_geom = read_image(case.label, is_label=True)
            if axis_mapping(ref_geom, prediction.geometry) is None:
                raise UserError(f"{case.label}: not on the grid of its scan {case.image} "
                                f"({prediction.geometry.differences(ref_geom)}); give each scan its own label")
            ref = np.rint(align_label_to_image(np.asarray(ref), ref_geom, prediction.geometry)).astype(np.int64)
            rows += score_arrays(prediction.mask_xyz.astype(np.int64), ref, list(prediction.geometry.spacing),
                                 case=case.name, labels=sorted(names))
        means = {}
        for label, name in names.items():
            defined = [r.dice for r in rows if r.label == label and not math.isnan(r.dice)]
            means[name] = float(np.mean(defined)) if defined else math.nan
        summary = {"model": str(self.bundle_root), "cases": len(cases),
                   "mean_dice": {k: _finite(v) for k, v in means.items()},
                   "per_case": [{k: _finite(v) for k, v in asdict(r).items()} for r in rows]}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.output_dir / "evaluation.json", json.dumps(summary, indent=2) + "\n")
        log.info("mean Dice over %d case(s): %s; wrote %s", len(cases),
                 ", ".join(f"{k} {v:.4f}" for k, v in means.items()), self.output_dir / "evaluation.json")
        return means


def _finite(value: Any) -> Any:
    """NaN and infinities as None (``null``): JSON has no NaN."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
