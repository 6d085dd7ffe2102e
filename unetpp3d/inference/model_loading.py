"""Find and load the model to run: a checkpoint, a run folder or an exported MONAI Bundle."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from torch import nn

from unetpp3d.config import FAST_PRUNE_LEVEL, InferConfig, Preprocessing, config_from_dict
from unetpp3d.errors import UserError
from unetpp3d.inference.pruning import load_pruning_choice
from unetpp3d.model.checkpoint import (
    load_checkpoint,
    load_state_dict,
    resolve_model_path,
)
from unetpp3d.model.network import network_from_checkpoint
from unetpp3d.strictjson import strict_loads

log = logging.getLogger("unetpp3d")


# The section of a bundle's configs/metadata.json that unetpp3d writes and reads: plain JSON
# holding model_args, preprocessing and (optionally) the training config.
BUNDLE_METADATA_KEY = "unetpp3d"


# The version of that section and of the component names inference.json uses. 2: the layout by
# stage (unetpp3d.inference.postprocess, unetpp3d.model.network, ...). `infer` reads every format
# as data; a format-1 bundle must be exported again to run under `python -m monai.bundle run`.
BUNDLE_FORMAT = 2


def find_default_model(runs_dir: str | Path = "runs") -> Path:
    """The model to use when none is given: the newest run in ``./runs``.

    The newest run is the one whose ``best.pt`` or ``last.pt`` was written last. The predictor
    logs the model it loads, so a run that took this default says which one it was.

    Raises:
        UserError: there is none, saying how to get a model.
    """
    runs = Path(runs_dir)
    candidates = []
    if runs.is_dir():
        for run in runs.iterdir():
            stamps = [(run / n).stat().st_mtime for n in ("best.pt", "last.pt") if (run / n).is_file()]
            if stamps:
                candidates.append((max(stamps), run))
    if not candidates:
        raise UserError(
            f"no model given and none found (no run with best.pt or last.pt in {runs.resolve()}); "
            "train one with `unetpp3d train --manifest dataset.json` (or try `unetpp3d demo`), "
            "or pass --model CHECKPOINT|RUN_FOLDER|BUNDLE_FOLDER"
        )
    return max(candidates, key=lambda c: c[0])[1].resolve()


def _is_bundle(folder: Path) -> bool:
    return (folder / "configs" / "metadata.json").is_file()


def bundle_metadata(payload: dict[str, Any]) -> dict[str, Any]:
    """The ``unetpp3d`` section a bundle's ``configs/metadata.json`` needs so that ``infer`` trusts it.

    Plain JSON: the network's constructor arguments, the :class:`Preprocessing` and the training
    config. With it, :meth:`Predictor.from_source` rebuilds the network itself and reads the
    weights from ``models/model.pt`` with ``weights_only=True``; nothing in the bundle is executed.

    Args:
        payload: a loaded checkpoint (``model_args``, ``preprocessing``, optionally ``config``).
    """
    return {
        "format": BUNDLE_FORMAT,
        "model_args": payload["model_args"],
        "preprocessing": payload["preprocessing"],
        "config": payload.get("config"),
    }


def _bundle_weights(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: missing; a bundle keeps its weights in models/model.pt")
    return load_state_dict(path)


def _load_bundle(folder: Path, trust_bundle: bool) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Network, preprocessing dict and config dict of an exported MONAI Bundle.

    A bundle carrying our metadata section is read as data only. Any other bundle can only be
    run by building its ``network_def`` with MONAI's ConfigParser, whose ``$`` expressions are
    Python code: that happens only with ``trust_bundle``.
    """
    meta_path = folder / "configs" / "metadata.json"
    try:
        metadata = strict_loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{meta_path}: not readable JSON ({exc})") from None
    ours = metadata.get(BUNDLE_METADATA_KEY) if isinstance(metadata, dict) else None
    weights = folder / "models" / "model.pt"
    if isinstance(ours, dict) and "model_args" in ours and "preprocessing" in ours:
        version = ours.get("format", 1)
        if not isinstance(version, int) or version > BUNDLE_FORMAT:
            raise UserError(f"{meta_path}: bundle format {version!r} is newer than this unetpp3d reads "
                            f"({BUNDLE_FORMAT}); upgrade unetpp3d")
        # Every format so far keeps model_args, preprocessing and config here, so all are read alike.
        state = _bundle_weights(weights)
        net = network_from_checkpoint({"model_args": ours["model_args"], "state_dict": state}, folder)
        return net, ours["preprocessing"], ours.get("config") or {}
    if not trust_bundle:
        raise UserError(
            f"{folder}: this bundle was not exported by unetpp3d (no '{BUNDLE_METADATA_KEY}' section with model_args "
            f"and preprocessing in configs/metadata.json); running it means executing the Python expressions in its "
            f"configs. If you trust its author, pass --trust-bundle; or run it with `python -m monai.bundle run`"
        )
    configs = [folder / "configs" / n for n in ("inference.json", "inference.yaml", "inference.yml")]
    config_path = next((p for p in configs if p.is_file()), None)
    if config_path is None:
        raise UserError(f"{folder}: no configs/inference.json (or .yaml) to build the network from")
    parser = ConfigParser()
    parser.read_meta(str(meta_path))
    parser.read_config(str(config_path))
    prep = (ours or {}).get("preprocessing") if isinstance(ours, dict) else None
    if prep is None and "preprocessing" in parser.config:
        prep = parser.get_parsed_content("preprocessing")
    if prep is None:
        raise UserError(f"{folder}: the bundle does not give unetpp3d preprocessing (a '{BUNDLE_METADATA_KEY}."
                        f"preprocessing' entry in metadata.json or 'preprocessing' in {config_path.name}), so its "
                        "input pipeline cannot be reproduced; run it with `python -m monai.bundle run` instead")
    try:
        net = parser.get_parsed_content("network_def")
    except Exception as exc:  # anything the bundle's own code raises
        raise UserError(f"{config_path}: cannot build 'network_def' ({type(exc).__name__}: {exc})") from None
    try:
        net.load_state_dict(_bundle_weights(weights))
    except RuntimeError as exc:
        raise UserError(f"{weights}: does not fit the bundle's network_def ({str(exc).splitlines()[0]})") from None
    config = ours.get("config") if isinstance(ours, dict) else None
    return net, dict(prep), config or {}


def _load_model(model: str | Path | None, trust_bundle: bool) -> tuple[nn.Module, dict, dict, Path]:
    """Network, preprocessing dict, config dict and resolved path of one model source (see ``from_source``)."""
    path = Path(model) if model is not None else find_default_model()
    if path.is_dir() and _is_bundle(path):
        net, prep, config = _load_bundle(path, trust_bundle)
    else:
        ckpt = resolve_model_path(path)
        payload = load_checkpoint(ckpt)
        if "preprocessing" not in payload:
            raise UserError(f"{ckpt}: has no preprocessing, so its input pipeline is unknown; use a checkpoint "
                            "written by `unetpp3d train` (best.pt or last.pt)")
        net = network_from_checkpoint(payload, ckpt)
        prep, config = payload["preprocessing"], payload.get("config") or {}
        path = ckpt
    log.info("model: %s%s", path, "" if model is not None else " (the newest run in ./runs: no model given)")
    return net, prep, config or {}, path


# Preprocessing fields that describe a model's training data rather than its input pipeline:
# the folds of one cross-validation differ in them and still ensemble.
_NOT_PIPELINE = ("volume_range_ml", "field_of_view_mm")


def ensemble_training_data(preps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The training-data fields of an ensemble's members merged, so that a warning holds for all of
    them whatever their order: the widest volume range per class and the largest field of view per
    axis; None (nothing judged) where a member does not record the field."""
    ranges = [p.get("volume_range_ml") for p in preps]
    views = [p.get("field_of_view_mm") for p in preps]
    merged: dict[str, Any] = {"volume_range_ml": None, "field_of_view_mm": None}
    if all(r is not None for r in ranges):
        classes = {c for r in ranges for c in r}
        merged["volume_range_ml"] = {c: [min(r[c][0] for r in ranges if c in r), max(r[c][1] for r in ranges if c in r)]
                                     for c in sorted(classes)}
    if all(v is not None for v in views):
        merged["field_of_view_mm"] = [max(v[i] for v in views) for i in range(3)]
    return merged


def _preprocessing_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``"name: value_a vs value_b"`` for each pipeline field of two models' preprocessing that differs."""
    a, b = Preprocessing.from_dict(dict(a)).to_dict(), Preprocessing.from_dict(dict(b)).to_dict()
    return [f"{key}: {a[key]} vs {b[key]}" for key in a if a[key] != b[key] and key not in _NOT_PIPELINE]


def model_infer_config(config: dict[str, Any] | None, source: str | Path) -> InferConfig:
    """A model's own inference settings: its config's ``infer`` section over :class:`InferConfig`'s defaults.

    Args:
        config: the training config saved with the model (a dict, possibly empty).
        source: the model, for messages.

    Raises:
        UserError: the section holds a value that is not valid.
    """
    section = (config or {}).get("infer") or {}
    try:
        return config_from_dict({"infer": dict(section)}, f"{source} (its config)").infer
    except UserError as exc:
        raise UserError(f"{exc}; fix the model's config or pass the setting on the command line") from None


def model_mode(own: InferConfig, path: str | Path, mode: str | None, prune_level: int | None,
               pruning_table: bool = True) -> tuple[str, int | None]:
    """The mode and prune level to run: the caller's, else the model's own ``infer`` settings,
    else for fast mode the level its run measured (``pruning.json``), else the default level.

    Args:
        own: the model's ``infer`` section (:func:`model_infer_config`).
        path: the model's checkpoint, beside which a run's pruning table lies.
        mode, prune_level: what the caller asked for (None: not asked).
        pruning_table: consult the run's table (not for an ensemble: each member has its own).
    """
    mode = mode if mode is not None else own.mode
    if prune_level is None and mode == "fast":
        prune_level = own.prune_level
    if prune_level is None and mode == "fast" and pruning_table:
        # The run measured its levels after training: take the smallest one close to the best.
        choice = load_pruning_choice(path)
        if choice is not None:
            prune_level = choice[0]
            log.info("fast mode: UNet++ L^%d from the run's pruning table: %s", *choice)
        else:
            log.info("fast mode: no pruning table beside %s; using the default level L^%d (capped at the depth)",
                     path, FAST_PRUNE_LEVEL)
    return mode, prune_level
