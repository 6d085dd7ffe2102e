"""Export a trained model as a MONAI Bundle (``unetpp3d export-bundle``).

The bundle follows the layout the MONAI Bundle specification documents
(https://docs.monai.io/en/latest/mb_specification.html)::

    BUNDLE/
      configs/metadata.json    versions, task, intended use, network_data_format, and the
                               ``unetpp3d`` section (model_args, preprocessing, config) that
                               ``unetpp3d infer --model BUNDLE`` reads as plain data
      configs/inference.json   the same pipeline as ``unetpp3d infer``, for ``python -m monai.bundle run``
      configs/train.json       training with unetpp3d's Trainer from and back to models/model.pt
      configs/multi_gpu_train.json   merged over train.json under torchrun
      configs/evaluate.json    merged over train.json: segment and score labelled cases
      configs/logging.conf     console logging for MONAI's runner
      models/model.pt          the state dict
      models/model.ts          TorchScript of every inference mode, device-neutral, with metadata.json and
                               inference.json inside: ``forward`` accurate, ``fast_l<l>`` UNet++ L^l
      scripts/check_unetpp3d.py  refuses, in one line, to run without unetpp3d or with an older one
      docs/README.md           what it segments, how it was trained, its validation figures, how to run it
      docs/license.txt         the licence notice, where the zoo keeps it
      LICENSE                  the same notice

``inference.json`` is generated here, at export time, from the
:class:`~unetpp3d.inference.predictor.Predictor` that ``unetpp3d infer --model CHECKPOINT`` would
build: each step is a ``{"_target_": ..., **arguments}`` spec naming a MONAI class or a unetpp3d
one (the reader, the body mask, the post-processing, the writer), so the file reads as a list of
components rather than a program. The preprocessing and post-processing specs are the ones the
predictor instantiated itself (:mod:`unetpp3d.inference.pipeline`), so the bundle cannot drift
from ``unetpp3d infer``. Test-time augmentation and fast mode are the model's own ``infer``
settings.

Bundle format: ``metadata.json``'s ``unetpp3d.format`` is 2 since the modules were grouped by
stage, which changed the ``_target_`` paths in ``inference.json``. ``unetpp3d infer --model
BUNDLE`` reads every format as data (model_args, preprocessing, weights); a format-1 bundle must
be exported again (``unetpp3d export-bundle``) to run under ``python -m monai.bundle run``.

Run it with MONAI alone::

    python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE \\
        --dataset_dir SCANS --output_dir MASKS

which writes ``MASKS/<case>.nii.gz`` on each scan's own grid, as ``unetpp3d infer SCANS --out MASKS``
does (TTA on or off: ``--window_network#tta True|False``; fast mode: ``--window_network#prune_level 2``;
fp32 where ``infer`` would use bf16: ``--window_network#amp False``, as ``--no-amp``).
The ``$`` expressions are kept to what MONAI's runner needs: the device, the default folders,
the weights path, ``"initialize"`` (the unetpp3d check, seeding) and ``"run": ["$@evaluator.run()"]``.
The workflow is
:class:`BundleEvaluator`, a small loop with ``SupervisedEvaluator``'s argument names, because
MONAI's own evaluator needs pytorch-ignite, which unetpp3d does not depend on.

Metadata schema: ``metadata.json`` names MONAI's official schema (``meta_schema_20240725.json``)
in its ``schema`` field and fills every field that schema requires. :func:`verify_metadata` checks
it offline with MONAI's ``verify_metadata``: by default against
``unetpp3d/resources/meta_schema.json``, **unetpp3d's own schema, not MONAI's official file**
(which unetpp3d does not ship); given a local copy of the official file, against that
(tests/test_bundle.py does so when ``UNETPP3D_MONAI_META_SCHEMA`` names one).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any


from unetpp3d.atomic import atomic_write_bytes, atomic_write_text, write_failed
from unetpp3d.bundle import check_unetpp3d
from unetpp3d.bundle.configs import CHECK_SCRIPT, inference_config, metadata_config
from unetpp3d.bundle.readme import LICENSE_TEXT, LOGGING_CONF, _readme
from unetpp3d.bundle.torchscript import save_torchscript
from unetpp3d.bundle.train_configs import (
    evaluate_config,
    multi_gpu_train_config,
    train_config,
)
from unetpp3d.errors import UserError
from unetpp3d.inference.predictor import Predictor
from unetpp3d.model.checkpoint import load_checkpoint, resolve_model_path, save_state_dict

log = logging.getLogger("unetpp3d")


def _check_plain_strings(obj: Any, where: str) -> None:
    """MONAI's ConfigParser reads strings starting with $, @ or % as code, references or macros."""
    if isinstance(obj, str):
        if obj[:1] in ("$", "@", "%"):
            raise UserError(f"{where}: {obj!r} starts with {obj[0]!r}, which MONAI bundle configs read as code or a "
                            "reference; rename it in the model's config before exporting")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_plain_strings(str(k), where)
            _check_plain_strings(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain_strings(v, f"{where}[{i}]")


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder for the bundle")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: folder is not empty; pass --force to write the bundle into it, "
                        "or pick a new folder")


def _load_payload(model: Path) -> tuple[dict[str, Any], Path]:
    ckpt = resolve_model_path(model)
    payload = load_checkpoint(ckpt)
    if "preprocessing" not in payload:
        raise UserError(f"{ckpt}: has no preprocessing, so the bundle's input pipeline is unknown; export a "
                        "checkpoint written by `unetpp3d train` (best.pt or last.pt)")
    return payload, ckpt


def _predictor(ckpt: Path) -> Predictor:
    """What ``unetpp3d infer --model CHECKPOINT`` would run: the model's own settings, on the CPU."""
    return Predictor.from_source(ckpt, device="cpu", amp=False, progress=False)


def export_bundle(model: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Write a trained model as a MONAI Bundle folder (``unetpp3d export-bundle``).

    The bundle is built in a temporary folder beside ``out`` and moved into place once
    complete. With ``force``, its files replace those of the same name in ``out``; other files
    there are left alone.

    Args:
        model: a checkpoint written by ``unetpp3d train`` or a run folder (its ``best.pt``, else ``last.pt``).
        out: the bundle folder; must be absent or empty unless ``force``.
        force: write into a non-empty folder.

    Returns:
        The bundle folder.

    Raises:
        UserError: the model cannot be loaded or lacks its preprocessing, or ``out`` is a file
            or a non-empty folder without ``force``.
    """
    out = Path(out)
    _check_target(out, force)
    payload, ckpt = _load_payload(Path(model))
    predictor = _predictor(ckpt)
    inference = inference_config(predictor)
    configs = {"inference.json": inference, "train.json": train_config(payload, predictor),
               "multi_gpu_train.json": multi_gpu_train_config(), "evaluate.json": evaluate_config()}
    meta = metadata_config(payload, predictor, ckpt)
    # Everything the configs take from the checkpoint is in the metadata too (train.json refers to it).
    _check_plain_strings({k: v for k, v in meta.items() if k != "schema"}, "metadata.json")

    stage = out.parent / f".{out.name.replace('.', '_')}.{uuid.uuid4().hex[:8]}.part"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()  # mkdir, unlike mkdtemp, honours the umask
        # Each file is written atomically and checked (a full disk is reported, never left
        # truncated), then the whole folder is moved into place.
        atomic_write_text(stage / "configs" / "metadata.json", json.dumps(meta, indent=2) + "\n")
        for name, config in configs.items():
            atomic_write_text(stage / "configs" / name, json.dumps(config, indent=2) + "\n")
        atomic_write_text(stage / "configs" / "logging.conf", LOGGING_CONF)
        save_state_dict(predictor.network.state_dict(), stage / "models" / "model.pt")
        save_torchscript(predictor.network, predictor.roi_size, meta, inference, stage / "models" / "model.ts")
        # The check runs before unetpp3d is known to be importable, so the bundle carries its own copy.
        atomic_write_bytes(stage / CHECK_SCRIPT, Path(check_unetpp3d.__file__).read_bytes())
        atomic_write_text(stage / "docs" / "README.md", _readme(payload, predictor, meta, ckpt))
        atomic_write_text(stage / "docs" / "license.txt", LICENSE_TEXT)
        atomic_write_text(stage / "LICENSE", LICENSE_TEXT)
        if not out.exists():
            os.replace(stage, out)
        else:
            for path in sorted(p for p in stage.rglob("*") if p.is_file()):
                target = out / path.relative_to(stage)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    except OSError as exc:
        raise write_failed(out, exc.strerror or str(exc)) from None
    except UserError as exc:  # name the bundle's file, not its place in the staging folder
        raise UserError(str(exc).replace(str(stage), str(out))) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("bundle written to %s", out)
    return out
