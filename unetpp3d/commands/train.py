"""``unetpp3d train``: check everything a user can get wrong, plan the run, then hand a Trainer its parts.

Manifest, config, case checks, planning and the patch size against the network are all checked
before the run folder is created, so a mistake costs seconds and leaves nothing behind. Each
case is read once before the loaders read it: the fingerprint ``unetpp3d check`` wrote is reused
while the cases' files are unchanged (and then the cases need no new check either), else every
case is checked and fingerprinted in one read.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from unetpp3d.atomic import atomic_write_text
from unetpp3d.config import (
    AUTO,
    Config,
    Preprocessing,
    config_from_dict,
    load_config,
    load_yaml,
    task_config_path,
)
from unetpp3d.data.fingerprint import dataset_differences, fingerprint_mismatch, read_fingerprint
from unetpp3d.data.leaks import leak_messages
from unetpp3d.data.manifest import Case, Manifest, load_manifest, split_cases
from unetpp3d.data.plausibility import field_of_view_mm, volume_range
from unetpp3d.data.transforms import pad_value
from unetpp3d.data.validation import default_fingerprint_path, fingerprint_of, inspect_case
from unetpp3d.errors import UserError
from unetpp3d.hardware import autocast_dtype
from unetpp3d.inference.pruning import PLOT_NAME as PRUNING_PLOT
from unetpp3d.inference.pruning import TABLE_NAME as PRUNING_TABLE
from unetpp3d.inference.pruning import choose_level, format_table, measure_pruning, write_pruning_table
from unetpp3d.inference.quality import has_heads
from unetpp3d.model.checkpoint import load_checkpoint
from unetpp3d.model.network import UNetPlusPlus3D
from unetpp3d.model.planning import plan
from unetpp3d.outputs import PNG, OutputKind, check_outputs, csv_kind, json_kind
from unetpp3d.strictjson import strict_loads
from unetpp3d.training.distributed import Dist
from unetpp3d.training.loss import DeepSupervisionLoss, normalise_head_weights
from unetpp3d.training.rng import seed_everything
from unetpp3d.training.runlock import LOCK_NAME, RunLock
from unetpp3d.training.trainer import Trainer, build_trainer

RUN_FILES = ("last.pt", "best.pt", "config.yaml", "split.json", "metrics.csv", "train.log", "curves.png",
             "tensorboard", "dataset.fingerprint.json", PRUNING_TABLE, PRUNING_PLOT)
RUN_FINGERPRINT = "dataset.fingerprint.json"  # the fingerprint of the run's cases when it started


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
    fingerprint: dict[str, Any] | None = None  # of train_cases + val_cases, from this run's read


def _load_run_config(man: Manifest, config_path: Path | None, overrides: list[str]) -> tuple[Config, str]:
    """The config file (default: the task's shipped config) with overrides, and its name for messages.

    A config that names a task must name the manifest's; one that does not takes the manifest's.
    """
    if config_path is None and man.task:
        config_path = task_config_path(man.task)
    cfg = load_config(config_path, overrides)
    if man.task and cfg.task != man.task:
        raw = load_yaml(Path(config_path).read_text(encoding="utf-8"), str(config_path)) if config_path else {}
        explicit = (isinstance(raw, dict) and "task" in raw) or any(o.split("=", 1)[0].strip() == "task"
                                                                     for o in overrides)
        if explicit:
            raise UserError(f"{config_path or '--set task'}: task {cfg.task!r} differs from the manifest's "
                            f"{man.task!r} ({man.path}); use a config for {man.task} or drop its task key")
        cfg.task = man.task  # a generic config (e.g. smoke.yaml) takes the manifest's task
    return cfg, str(config_path) if config_path else "default config"


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _config_differences(requested: Config, run: Config, overridden: list[str]) -> list[str]:
    """``"key: A here, B in the run"`` for every value of ``requested`` the run does not have.

    ``auto`` matches whatever the run planned from it; keys set by ``--set`` are left out
    (they change the resumed run's config, as without ``--config``).
    """
    mine, theirs = _flatten(requested.to_dict()), _flatten(run.to_dict())
    differences = []
    for key, value in mine.items():
        if value == AUTO or any(key == o or key.startswith(o + ".") for o in overridden):
            continue
        if value != theirs.get(key):
            differences.append(f"{key}: {value!r} here, {theirs.get(key)!r} in the run")
    return differences


def _refuse_another_config(man: Manifest, config_path: Path, overrides: list[str], run_cfg: Config,
                           out_dir: Path) -> None:
    """Refuse a ``--config`` given on resume that asks for other values than the run's, naming them."""
    requested, source = _load_run_config(man, config_path, [])
    differences = _config_differences(requested, run_cfg, [o.split("=", 1)[0].strip() for o in overrides])
    if differences:
        shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
        raise UserError(f"{source}: differs from the config of the run in {out_dir}: {shown}; resume with the "
                        f"run's config (or without --config), change a value with --set KEY=VALUE, or start a new "
                        f"run in another --out")


# What --set may change when a run resumes: how long and how often it runs, and how data are
# loaded. Everything else is restored from last.pt (weights, optimiser state, schedule, planned
# preprocessing) and would either not fit the weights or silently not take effect.
RESUMABLE_KEYS = ("train.epochs", "train.val_every", "train.compile", "train.checkpointing", "train.deterministic",
                  "train.max_nonfinite_steps", "data.num_workers", "data.cache", "data.cache_dir", "infer.")


def _refuse_unresumable_changes(requested: Config, run: Config, out_dir: Path) -> None:
    """Refuse ``--set`` values on resume that the restored run cannot honour, naming them."""
    mine, theirs = _flatten(requested.to_dict()), _flatten(run.to_dict())
    changed = [f"{key}: {value!r} here, {theirs.get(key)!r} in the run" for key, value in mine.items()
               if value != theirs.get(key) and not key.startswith(RESUMABLE_KEYS)]
    if changed:
        raise UserError(f"--resume {out_dir}: {'; '.join(changed[:8])}: a resumed run keeps its network, optimiser, "
                        f"schedule and preprocessing (from last.pt), so these cannot change; only "
                        f"{', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in RESUMABLE_KEYS)} "
                        "can. Start a new run in another --out to change them")


def _cases_from_split(man: Manifest, split: dict[str, Any], source: Path) -> tuple[list[Case], list[Case]]:
    by_name = {c.name: c for c in [*man.training, *(man.validation or [])]}
    missing = [n for n in [*split["training"], *split["validation"]] if n not in by_name]
    if missing:
        raise UserError(f"{source}: the run used case(s) {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''} that {man.path} no longer lists; resume with the "
                        f"manifest the run started from")
    return [by_name[n] for n in split["training"]], [by_name[n] for n in split["validation"]]


def _refuse_problems(man: Manifest, problems: list[str]) -> None:
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise UserError(f"{man.path}: {len(problems)} problem(s) in the training data: {shown}; "
                        f"run `unetpp3d check --manifest {man.path}` for the full report")


def _check_cases(man: Manifest, cases: list[Case]) -> dict[str, Any]:
    """Refuse cases that fail ``unetpp3d check``, listing the problems, before any training.

    Returns:
        The fingerprint of the cases, from the same read.
    """
    results = [inspect_case(case, man.labels) for case in cases]
    # Warnings (an all-background label, say) are reported by `unetpp3d check` but do not stop training.
    _refuse_problems(man, [f"{case.name}: {p.message}" for case, r in zip(cases, results)
                           for p in r.problems if p.severity == "error"])
    return fingerprint_of(results, man.labels)


def _checked_fingerprint(man: Manifest, cases: list[Case], path: Path | None, notes: list[str]) -> dict[str, Any]:
    """The fingerprint of ``cases``: ``unetpp3d check``'s when it matches their files, else computed now.

    ``check`` writes a fingerprint only when every case passed, so one that matches the files
    also vouches for the cases, and nothing is read here.
    """
    found = path if path is not None else default_fingerprint_path(man.path)
    if path is not None and not path.is_file():
        raise UserError(f"--fingerprint {path}: no such file; write it with `unetpp3d check --manifest {man.path} "
                        f"--fingerprint {path}`, or leave --fingerprint out")
    why = None
    if found.is_file():
        try:
            fp = read_fingerprint(found)
            why = fingerprint_mismatch(fp, cases, man.labels)
        except UserError as exc:
            why = str(exc)
        if why is None:
            notes.append(f"fingerprint: reusing {found} (its {len(cases)} cases are unchanged since "
                         f"`unetpp3d check`)")
            return fp
        notes.append(f"fingerprint: not reusing {found} ({why}); checked and fingerprinted every case")
    else:
        notes.append(f"fingerprint: none at {found}; checked and fingerprinted every case (`unetpp3d check` "
                     f"writes one that training reuses)")
    return _check_cases(man, cases)


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
        last = Path(out_dir) / "last.pt"
        if not last.is_file():
            raise UserError(f"{last}: nothing to resume (no last.pt); start a new run without --resume")
        payload = load_checkpoint(last)
        if config_path is not None:  # the first run's command line again: fine if it asks for the same config
            _refuse_another_config(man, config_path, overrides, config_from_dict(payload["config"], str(last)),
                                   out_dir)
        cfg = config_from_dict(payload["config"], str(last), overrides)
        _refuse_unresumable_changes(cfg, config_from_dict(payload["config"], str(last)), out_dir)
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


def _resolve(plan_: _Plan, man: Manifest, fingerprint_path: Path | None) -> None:
    """Check every case, fingerprint them and resolve the config's ``auto`` values (new runs)."""
    cases = [*plan_.train_cases, *plan_.val_cases]
    leaks = leak_messages({"training": plan_.train_cases, "validation": plan_.val_cases})
    if leaks and plan_.cfg.data.allow_leaks:
        plan_.notes.append(f"data.allow_leaks: {len(leaks)} validation case(s) are training cases; validation "
                           "measures the fit to the training data, not generalisation")
    elif leaks:
        _refuse_problems(man, [f"{name}: {message}" for name, message in leaks])
    if plan_.resume_payload is not None:
        plan_.fingerprint = _check_cases(man, cases)
    else:
        # All labelled cases, as nnU-Net does, so that every fold gets the same preprocessing.
        fp = plan_.fingerprint = _checked_fingerprint(man, cases, fingerprint_path, plan_.notes)
        try:
            plan_.cfg, plan_.prep = plan(plan_.cfg, fp, man.labels, echo=plan_.notes.append)
        except UserError as exc:  # name the config the bad values came from
            raise UserError(f"{plan_.source}: {exc}") from None
        # The training cases' label volumes and fields of view alone (validation is not what the
        # model learnt from): infer warns when a predicted volume or a scan is far outside them.
        names = {c.name for c in plan_.train_cases}
        seen = [c for c in fp.get("cases", []) if c.get("name") in names]
        plan_.prep.volume_range_ml = volume_range([c.get("label_volumes_ml") or {} for c in seen])
        sized = [c for c in seen if c.get("size") and c.get("spacing")]
        plan_.prep.field_of_view_mm = field_of_view_mm([c["size"] for c in sized], [c["spacing"] for c in sized])
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
    if any(p.name != LOCK_NAME for p in folder.iterdir()) and not force:
        what = "a training run" if (folder / "last.pt").exists() or (folder / "metrics.csv").exists() else "files"
        raise UserError(f"--out {folder}: already holds {what}; choose another --out, continue it with --resume, "
                        f"or overwrite it with --force")


def _yaml_config(path: Path) -> bool:
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, UserError):
        return False
    return isinstance(data, dict) and "model" in data and "train" in data


def _zip_file(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _log_file(path: Path) -> bool:
    with open(path, "rb") as fh:
        return re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d ", fh.read(20)) is not None


# What a run writes under each name, so that --force replaces only a run's own files.
_RUN_FILE_KINDS = {
    "last.pt": OutputKind("checkpoint", (".pt",), _zip_file),
    "best.pt": OutputKind("checkpoint", (".pt",), _zip_file),
    "config.yaml": OutputKind("run config", (".yaml",), _yaml_config),
    "split.json": json_kind("run split", ("training", "validation")),
    "metrics.csv": csv_kind("run metrics table", "epoch,train_loss,"),
    "train.log": OutputKind("run log", (".log",), _log_file),
    "curves.png": PNG,
    RUN_FINGERPRINT: json_kind("run's dataset fingerprint", ("labels",)),
}


def _check_forced_files(folder: Path, man: Manifest) -> None:
    """With --force, refuse to delete a file of a run's name that a run did not write."""
    inputs = [man.path, *(p for c in man.all_cases() for p in (c.image, c.label) if p)]
    for name, kind in _RUN_FILE_KINDS.items():
        check_outputs([folder / name], kind, inputs, "--out")
    board = folder / "tensorboard"
    if board.exists() and (not board.is_dir() or any(not (p.is_file() and p.name.startswith("events.out.tfevents."))
                                                      for p in board.iterdir())):
        raise UserError(f"--out {board}: holds files TensorBoard did not write; --force replaces only a run's own "
                        "files — move them away or choose another --out")


def _refuse_other_data(folder: Path, p: _Plan) -> None:
    """On resume, refuse cases whose data differ from those the run started with (same names, other scans)."""
    recorded_path = folder / RUN_FINGERPRINT
    if not recorded_path.is_file():  # a run started before runs recorded their fingerprint
        p.notes.append(f"resume: {recorded_path} missing; the cases could not be compared with the run's")
        return
    try:
        recorded = strict_loads(recorded_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{recorded_path}: unreadable ({exc}); it records the data the run started with") from None
    diff = dataset_differences(recorded, p.fingerprint or {})
    if diff:
        raise UserError(f"--resume {folder}: the manifest's cases are not the data this run started with: "
                        f"{'; '.join(diff)}; resume with the original data, or start a new run")


def _claim_folder(folder: Path, resume: bool, force: bool, lock: RunLock) -> None:
    # Locked before anything is written; checked again under the lock, since a run that held the
    # folder until now may have filled it after the first check.
    lock.acquire()
    _check_folder(folder, resume, force)
    if force and not resume:
        # Only what a run writes: --force pointed at the wrong folder must not wipe other files.
        for name in RUN_FILES:
            target = folder / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def _build_trainer(p: _Plan, folder: Path, dist: Dist, device: torch.device) -> Trainer:
    cfg, prep = p.cfg, p.prep
    seed_everything(cfg.train.seed)  # the same initial weights on every rank (DDP broadcasts them anyway)
    net = UNetPlusPlus3D(**_model_args(cfg, prep))
    net.checkpointing = cfg.train.checkpointing
    loss_fn = DeepSupervisionLoss(prep.num_classes, cfg.train.head_weights, kind=cfg.train.loss)
    return build_trainer(cfg, prep, net, loss_fn, p.train_cases, p.val_cases, folder, device, dist=dist,
                         split=p.split, resume=p.resume_payload)


def _measure_pruning(trainer: Trainer) -> None:
    """After training: score and time every UNet++ level of ``best.pt`` on the validation cases.

    Writes ``pruning.json`` and ``pruning.png`` beside it (see :mod:`unetpp3d.inference.pruning`)
    and logs the table. Nothing to do for a network without deep supervision or a run without
    validation cases. Under torchrun, rank 0 measures its own share of the validation cases.
    """
    best = trainer.folder / "best.pt"
    if not has_heads(trainer.net) or not trainer.split["validation"] or not best.is_file():
        return
    # A copy with the best weights: the trained network (maybe wrapped, compiled) stays as it was.
    net = copy.deepcopy(trainer.net)
    net.load_state_dict(load_checkpoint(best)["state_dict"])
    cfg, prep = trainer.cfg, trainer.prep
    table = measure_pruning(net, trainer.val_loader, prep.patch_size, num_classes=prep.num_classes,
                            sw_batch_size=cfg.infer.sw_batch_size, overlap=cfg.infer.overlap, cval=pad_value(prep),
                            device=trainer.device)
    path = write_pruning_table(table, best)
    level, reason = choose_level(table)
    trainer.log.message(format_table(table))
    trainer.log.message(f"fast mode (infer --mode fast without --prune-level) will run L^{level}: {reason}; "
                        f"wrote {path} and {path.with_name(PRUNING_PLOT)}")


def run_training(manifest: str | Path, config_path: str | Path | None = None, out_dir: str | Path | None = None,
                 resume: bool = False, force: bool = False, device: str | None = None, fold: int | None = None,
                 overrides: list[str] | None = None, fingerprint_path: str | Path | None = None) -> Path:
    """Train a 3D UNet++ on a manifest's cases; the command ``unetpp3d train``.

    Everything a user can get wrong raises a :class:`UserError` before the run folder is
    written: the manifest, unknown or invalid config keys, cases that fail ``unetpp3d check``
    (including label values the manifest does not declare), an empty training set, a patch
    size the network cannot take, and on resume a config that differs from the run's.

    Args:
        manifest: the dataset manifest (JSON).
        config_path: YAML config; default the config shipped for the manifest's task
            (``unetpp3d/resources/configs/<task>.yaml``) when there is one, else the built-in
            defaults. With ``resume`` it may be given again, as on the first run's command
            line: it must then ask for the run's values (``auto`` matches what was planned;
            ``overrides`` may change values as always).
        out_dir: run folder; default ``runs/<manifest>-<date>-<time>``.
        resume: continue the run in ``out_dir`` from its ``last.pt``.
        force: overwrite the run files in an existing ``out_dir``.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default CUDA when available. Under
            torchrun each process takes ``cuda:LOCAL_RANK``.
        fold: cross-validation fold (0-based) when the manifest has no validation list.
        overrides: ``KEY=VALUE`` config overrides, e.g. ``["train.epochs=10"]``.
        fingerprint_path: the fingerprint ``unetpp3d check`` wrote; default
            ``./<manifest stem>.fingerprint.json`` when it exists. Reused when it matches the
            cases' files (names, sizes, modification times), else every case is read again;
            train.log says which and why.

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
    lock: RunLock | None = None
    try:
        man = load_manifest(manifest)
        p = _plan_run(man, Path(config_path) if config_path else None, Path(out_dir) if out_dir else None,
                      resume, fold, overrides)
        folder = Path(out_dir) if out_dir else Path(dist.broadcast(str(_default_run_dir(Path(manifest)))))
        lock = RunLock(folder)
        if folder.is_dir():  # another train in it is refused before anything else is read
            dist.on_main(lock.acquire)
        dist.on_main(_check_folder, folder, resume, force)
        if force and not resume:
            dist.on_main(_check_forced_files, folder, man)
        _resolve(p, man, Path(fingerprint_path) if fingerprint_path is not None else None)
        # Refuse a precision the device lacks before the run folder exists.
        autocast_dtype(p.cfg.train.amp, dev, name="train.amp")

        if resume:
            dist.on_main(_refuse_other_data, folder, p)
        dist.on_main(_claim_folder, folder, resume, force, lock)
        trainer = _build_trainer(p, folder, dist, dev)
        if dist.is_main:
            if not resume:
                atomic_write_text(folder / RUN_FINGERPRINT, _json(p.fingerprint))
            atomic_write_text(folder / "config.yaml", p.cfg.to_yaml())
            atomic_write_text(folder / "split.json", _json(p.split))
            for line in p.notes:
                trainer.log.message(line)
        signum = trainer.fit()
        if signum is None and dist.is_main and p.cfg.train.measure_pruning:
            _measure_pruning(trainer)
    finally:
        if lock is not None:
            lock.release()
        dist.close()
    if signum is not None:
        raise SystemExit(128 + signum)
    return folder


def _json(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"
