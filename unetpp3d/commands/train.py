"""``unetpp3d train``: check everything a user can get wrong, plan the run, then hand a Trainer its parts.

Manifest, config, case checks, planning and the patch size against the network are all checked
before the run folder is created, so a mistake costs seconds and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.utils import set_determinism

from unetpp3d.atomic import atomic_write_text
from unetpp3d.config import Config, Preprocessing, config_from_dict, load_config
from unetpp3d.data.fingerprint import fingerprint
from unetpp3d.data.loader import make_train_loader, make_val_loader
from unetpp3d.data.manifest import Case, Manifest, load_manifest, split_cases
from unetpp3d.data.validation import validate_case
from unetpp3d.errors import UserError
from unetpp3d.hardware import autocast_dtype
from unetpp3d.model.checkpoint import load_checkpoint
from unetpp3d.model.network import UNetPlusPlus3D
from unetpp3d.model.planning import plan
from unetpp3d.training.distributed import Dist
from unetpp3d.training.loss import DeepSupervisionLoss, normalise_head_weights
from unetpp3d.training.optim import lr_factor, make_optimizer, make_scheduler
from unetpp3d.training.rng import seed_everything, set_rng_state
from unetpp3d.training.runlog import RunLog
from unetpp3d.training.trainer import Trainer

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


RUN_FILES = ("last.pt", "best.pt", "config.yaml", "split.json", "metrics.csv", "train.log", "curves.png",
             "tensorboard")


@dataclass
class _Plan:
    cfg: Config
    prep: Preprocessing | None  # None until planned (new runs)
    train_cases: list[Case]
    val_cases: list[Case]
    split: dict[str, Any]
    source: str  # where the config came from, for messages
    resume_payload: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _load_run_config(man: Manifest, config_path: Path | None, overrides: list[str]) -> tuple[Config, str]:
    """The config file (default: ``configs/<task>.yaml``) with overrides, and its name for messages.

    A config that names a task must name the manifest's; one that does not takes the manifest's.
    """
    if config_path is None and man.task and (REPO_CONFIGS / f"{man.task}.yaml").is_file():
        config_path = REPO_CONFIGS / f"{man.task}.yaml"
    cfg = load_config(config_path, overrides)
    if man.task and cfg.task != man.task:
        raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) if config_path else {}
        explicit = (isinstance(raw, dict) and "task" in raw) or any(o.split("=", 1)[0].strip() == "task"
                                                                     for o in overrides)
        if explicit:
            raise UserError(f"{config_path or '--set task'}: task {cfg.task!r} differs from the manifest's "
                            f"{man.task!r} ({man.path}); use a config for {man.task} or drop its task key")
        cfg.task = man.task  # a generic config (e.g. smoke.yaml) takes the manifest's task
    return cfg, str(config_path) if config_path else "default config"


def _cases_from_split(man: Manifest, split: dict[str, Any], source: Path) -> tuple[list[Case], list[Case]]:
    by_name = {c.name: c for c in [*man.training, *(man.validation or [])]}
    missing = [n for n in [*split["training"], *split["validation"]] if n not in by_name]
    if missing:
        raise UserError(f"{source}: the run used case(s) {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''} that {man.path} no longer lists; resume with the "
                        f"manifest the run started from")
    return [by_name[n] for n in split["training"]], [by_name[n] for n in split["validation"]]


def _check_cases(man: Manifest, cases: list[Case]) -> None:
    """Refuse cases that fail ``unetpp3d check``, listing the problems, before any training."""
    problems = []
    for case in cases:
        # Warnings (an all-background label, say) are reported by `unetpp3d check` but do not stop training.
        problems += [f"{case.name}: {p.message}" for p in validate_case(case, man.labels) if p.severity == "error"]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise UserError(f"{man.path}: {len(problems)} problem(s) in the training data: {shown}; "
                        f"run `unetpp3d check --manifest {man.path}` for the full report")


def _check_network(cfg: Config, prep: Preprocessing, model_args: dict[str, Any], source: str) -> None:
    net = UNetPlusPlus3D(**model_args)
    try:
        net.check_input_size(prep.patch_size)
    except ValueError:
        nearest = [max(d, round(p / d) * d) for p, d in zip(prep.patch_size, net.size_divisor)]
        raise UserError(f"{source}: data.patch_size {list(prep.patch_size)} must be a multiple of "
                        f"{list(net.size_divisor)} on each axis (the product of model.strides {cfg.model.strides}); "
                        f"e.g. {nearest}") from None
    heads = net.depth if net.deep_supervision else 1
    try:
        normalise_head_weights(heads, cfg.train.head_weights)
    except ValueError as exc:
        raise UserError(f"{source}: train.{exc}") from None


def _model_args(cfg: Config, prep: Preprocessing) -> dict[str, Any]:
    return dict(in_channels=1, out_channels=prep.num_classes, features=cfg.model.features,
                deep_supervision=cfg.model.deep_supervision, strides=cfg.model.strides, norm=cfg.model.norm,
                act=cfg.model.act, upsample=cfg.model.upsample, dropout=cfg.model.dropout)


def _plan_run(man: Manifest, config_path: Path | None, out_dir: Path | None, resume: bool, fold: int | None,
              overrides: list[str]) -> _Plan:
    """Config, split and (when resuming) checkpoint: the checks that need no image read."""
    if resume:
        if out_dir is None:
            raise UserError("--resume needs --out RUN_DIR, the folder of the run to continue")
        if config_path is not None:
            raise UserError("--resume continues with the run's own config; drop --config (use --set to change a "
                            "value such as train.epochs)")
        last = Path(out_dir) / "last.pt"
        if not last.is_file():
            raise UserError(f"{last}: nothing to resume (no last.pt); start a new run without --resume")
        payload = load_checkpoint(last)
        cfg = config_from_dict(payload["config"], str(last), overrides)
        prep = Preprocessing.from_dict(payload["preprocessing"])
        if {int(k): v for k, v in prep.labels.items()} != man.labels:
            raise UserError(f"{man.path}: labels {man.labels} differ from the run's {prep.labels}; resume with the "
                            f"manifest the run started from")
        split = payload["split"]
        if fold is not None and fold != split.get("fold"):
            raise UserError(f"--fold {fold}: the run in {out_dir} trains fold {split.get('fold')}")
        train_cases, val_cases = _cases_from_split(man, split, last)
        return _Plan(cfg, prep, train_cases, val_cases, split, str(last), payload)

    cfg, source = _load_run_config(man, config_path, overrides)
    train_cases, val_cases = split_cases(man, fold=fold, folds=cfg.data.folds,
                                         val_fraction=cfg.data.validation_fraction, seed=cfg.train.seed)
    if not train_cases:
        raise UserError(f"{man.path}: no training cases (the 'training' list is empty or all of it went to "
                        f"validation); list labelled cases under 'training'")
    split = {"fold": fold, "training": [c.name for c in train_cases], "validation": [c.name for c in val_cases]}
    return _Plan(cfg, None, train_cases, val_cases, split, source)


def _resolve(plan_: _Plan, man: Manifest) -> None:
    """Check every case, fingerprint them and resolve the config's ``auto`` values (new runs)."""
    cases = [*plan_.train_cases, *plan_.val_cases]
    _check_cases(man, cases)
    if plan_.resume_payload is None:
        # All labelled cases, as nnU-Net does, so that every fold gets the same preprocessing.
        fp = fingerprint(cases, man.labels)
        try:
            plan_.cfg, plan_.prep = plan(plan_.cfg, fp, man.labels, echo=plan_.notes.append)
        except UserError as exc:  # name the config the bad values came from
            raise UserError(f"{plan_.source}: {exc}") from None
    _check_network(plan_.cfg, plan_.prep, _model_args(plan_.cfg, plan_.prep), plan_.source)


def _default_run_dir(manifest: Path) -> Path:
    stem = manifest.name.split(".")[0]
    if stem in ("manifest", "dataset"):
        stem = manifest.resolve().parent.name or stem
    return Path("runs") / f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _check_folder(folder: Path, resume: bool, force: bool) -> None:
    """Refuse to write into another run's folder (or any non-empty one) unless forced."""
    if resume or not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"--out {folder}: exists and is not a folder")
    if any(folder.iterdir()) and not force:
        what = "a training run" if (folder / "last.pt").exists() or (folder / "metrics.csv").exists() else "files"
        raise UserError(f"--out {folder}: already holds {what}; choose another --out, continue it with --resume, "
                        f"or overwrite it with --force")


def _claim_folder(folder: Path, resume: bool, force: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if force and not resume:
        # Only what a run writes: --force pointed at the wrong folder must not wipe other files.
        for name in RUN_FILES:
            target = folder / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def _on_rank0(dist: Dist, fn: Any, *args: Any) -> None:
    """Run ``fn`` on rank 0 only; a UserError there is raised on every rank, so all stop together."""
    error = None
    if dist.is_main:
        try:
            fn(*args)
        except UserError as exc:
            error = str(exc)
    error = dist.broadcast(error)
    if error:
        raise UserError(error)


def _configure_determinism(cfg: Config, device: torch.device) -> None:
    set_determinism(seed=cfg.train.seed)
    if device.type == "cuda":
        # MONAI's set_determinism also turns cuDNN autotuning off; keep it unless asked not to.
        torch.backends.cudnn.deterministic = cfg.train.deterministic
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _build_trainer(p: _Plan, folder: Path, dist: Dist, device: torch.device, amp: torch.dtype | None) -> Trainer:
    cfg, prep, payload = p.cfg, p.prep, p.resume_payload
    _configure_determinism(cfg, device)
    seed_everything(cfg.train.seed)  # the same initial weights on every rank (DDP broadcasts them anyway)
    net = UNetPlusPlus3D(**_model_args(cfg, prep)).to(device)
    net.checkpointing = cfg.train.checkpointing
    if payload is not None:
        net.load_state_dict(payload["state_dict"])
    model: torch.nn.Module = net
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        model = torch.compile(model)
    optimizer = make_optimizer(net.parameters(), cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    start_epoch, best = 0, -1.0
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        # The same value LambdaLR would set; differs from the saved one only when --epochs changed
        # on resume, and then the remaining epochs follow the new schedule.
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * lr_factor(scheduler.last_epoch, cfg.train)
        if payload["scaler"]:
            scaler.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"])
        start_epoch, best = int(payload["epoch"]), float(payload["best_metric"])
    pin = device.type == "cuda"
    train_loader = make_train_loader(p.train_cases, prep, cfg.data, int(cfg.data.batch_size),
                                     cfg.train.iterations_per_epoch, seed=cfg.train.seed, rank=dist.rank,
                                     world_size=dist.world_size, pin_memory=pin)
    val_loader = (make_val_loader(p.val_cases, prep, cfg.data, dist.rank, dist.world_size, pin)
                  if p.val_cases else [])
    names = [prep.labels[k] for k in sorted(prep.labels, key=int) if int(k) != 0]
    log = RunLog(folder, names, first_epoch=start_epoch, active=dist.is_main)
    loss_fn = DeepSupervisionLoss(prep.num_classes, cfg.train.head_weights, kind=cfg.train.loss)
    return Trainer(cfg=cfg, prep=prep, net=net, model=model, loss_fn=loss_fn, optimizer=optimizer,
                   scheduler=scheduler, scaler=scaler, train_loader=train_loader, val_loader=val_loader,
                   device=device, folder=folder, split=p.split, log=log, dist=dist, amp=amp,
                   start_epoch=start_epoch, best_metric=best)


def run_training(manifest: str | Path, config_path: str | Path | None = None, out_dir: str | Path | None = None,
                 resume: bool = False, force: bool = False, device: str | None = None, fold: int | None = None,
                 overrides: list[str] | None = None) -> Path:
    """Train a 3D UNet++ on a manifest's cases; the command ``unetpp3d train``.

    Everything a user can get wrong raises a :class:`UserError` before the run folder is
    written: the manifest, unknown or invalid config keys, cases that fail ``unetpp3d check``
    (including label values the manifest does not declare), an empty training set, and a patch
    size the network cannot take.

    Args:
        manifest: the dataset manifest (JSON).
        config_path: YAML config; default ``configs/<task>.yaml`` for the manifest's task when it
            exists, else the built-in defaults. Not allowed with ``resume`` (the run's own config
            is used).
        out_dir: run folder; default ``runs/<manifest>-<date>-<time>``.
        resume: continue the run in ``out_dir`` from its ``last.pt``.
        force: overwrite the run files in an existing ``out_dir``.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default CUDA when available. Under
            torchrun each process takes ``cuda:LOCAL_RANK``.
        fold: cross-validation fold (0-based) when the manifest has no validation list.
        overrides: ``KEY=VALUE`` config overrides, e.g. ``["train.epochs=10"]``.

    Returns:
        The run folder, holding ``last.pt``, ``best.pt``, ``config.yaml``, ``split.json``,
        ``metrics.csv``, ``train.log``, ``curves.png`` and ``tensorboard/``.

    Raises:
        UserError: bad input, as above.
        SystemExit: 128 + the signal number after SIGINT or SIGTERM, once ``last.pt`` is safe.

    Example::

        >>> run_training("data/manifest.json", "configs/smoke.yaml", "runs/smoke", device="cpu")
    """
    overrides = list(overrides or [])
    dist, dev = Dist.from_env(device)
    try:
        man = load_manifest(manifest)
        p = _plan_run(man, Path(config_path) if config_path else None, Path(out_dir) if out_dir else None,
                      resume, fold, overrides)
        folder = Path(out_dir) if out_dir else Path(dist.broadcast(str(_default_run_dir(Path(manifest)))))
        _on_rank0(dist, _check_folder, folder, resume, force)
        _resolve(p, man)
        amp = autocast_dtype(p.cfg.train.amp, dev, name="train.amp")

        _on_rank0(dist, _claim_folder, folder, resume, force)
        trainer = _build_trainer(p, folder, dist, dev, amp)
        if dist.is_main:
            atomic_write_text(folder / "config.yaml", p.cfg.to_yaml())
            atomic_write_text(folder / "split.json", _json(p.split))
            for line in p.notes:
                trainer.log.message(line)
        signum = trainer.fit()
    finally:
        dist.close()
    if signum is not None:
        raise SystemExit(128 + signum)
    return folder


def _json(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"
