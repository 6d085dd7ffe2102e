"""The human-readable files of a bundle: docs/README.md, the licence notice and logging.conf."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import unetpp3d
from unetpp3d.bundle.check_unetpp3d import install_command
from unetpp3d.bundle.configs import INTENDED_USE, LIMITATIONS
from unetpp3d.inference.predictor import Predictor
from unetpp3d.model.portable import fast_method_name, prune_levels
from unetpp3d.tasks import task_rules


def _validation_rows(source: Path) -> list[dict[str, str]]:
    """Rows of the run's metrics.csv (beside the checkpoint) that have a validation score."""
    path = source.parent / "metrics.csv"
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [r for r in csv.DictReader(fh) if r.get("val_dice")]
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _postprocessing_text(predictor: Predictor) -> str:
    prep = predictor.prep
    if task_rules(prep.task).postprocessing == "min_volume":
        return f"components smaller than {predictor.min_component_ml:g} mL removed."
    if prep.num_classes > 2:
        return ("largest connected component of the foreground (all labels together, each voxel keeping its label), "
                "enclosed background filled as the first label.")
    return "largest connected component, enclosed holes filled."


def _readme(payload: dict[str, Any], predictor: Predictor, meta: dict[str, Any], source: Path) -> str:
    prep = predictor.prep
    cfg = payload.get("config") or {}
    train, data = cfg.get("train") or {}, cfg.get("data") or {}
    args = predictor.network.model_args
    targets = meta["task"].replace(" segmentation in CT", "")
    best = payload.get("best_metric")
    has_best = isinstance(best, (int, float)) and best >= 0
    split = payload.get("split") or {}
    lines = [
        f"# {meta['name']}",
        "",
        f"A 3D UNet++ that segments **{targets}** in CT scans, exported from `{source.parent.name}/{source.name}` "
        "by unetpp3d "
        f"{unetpp3d.__version__}.",
        "",
        "> **Research use only.** " + INTENDED_USE[len("Research only. "):],
        "",
        "## What it segments",
        "",
        "| label | class |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in prep.labels.items()],
        "",
        "Post-processing: " + _postprocessing_text(predictor),
        "",
        "## How it was trained",
        "",
        f"- network: UNet++ with features {args['features']}, strides {args['strides']}, {args['norm']} norm, "
        f"{args['act']}, deep supervision {'on' if args['deep_supervision'] else 'off'}",
        f"- input: reoriented to {prep.orientation}, resampled to {prep.target_spacing} mm, "
        + ("cropped to the body, " if prep.crop_foreground else "")
        + f"clipped to {prep.intensity_range} HU, z-scored with mean/std {prep.intensity_stats}",
        f"- patches of {prep.patch_size} voxels"
        + (f", batch size {data['batch_size']}" if data.get("batch_size", "auto") != "auto" else ""),
    ]
    if train:
        lines.append(f"- {train.get('epochs')} epochs of {train.get('iterations_per_epoch')} iterations, "
                     f"{train.get('optimizer')} lr {train.get('lr')} ({train.get('schedule')} schedule), "
                     f"loss {train.get('loss')}, seed {train.get('seed')}")
    lines.append(f"- this checkpoint: epoch {payload.get('epoch', 'unknown')}")
    if split:
        lines.append(f"- cases: {len(split.get('training') or [])} training, "
                     f"{len(split.get('validation') or [])} validation")
    lines += ["", "## Validation", ""]
    if has_best:
        lines.append(f"Best mean validation Dice: **{best:.4f}** (the run's validation cases, whole volumes, "
                     "before post-processing).")
    else:
        lines.append("No validation score was recorded for this checkpoint.")
    rows = _validation_rows(source)
    if rows:
        best_row = max(rows, key=lambda r: float(r["val_dice"]) if r["val_dice"] else -1.0)
        cols = [c for c in best_row if c.startswith("dice_") or c in ("epoch", "val_dice")]
        lines += ["", "Best validated epoch in `metrics.csv`:", "",
                  "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols),
                  "| " + " | ".join(best_row[c] for c in cols) + " |"]
    lines += [
        "",
        "Figures from one run's own validation split; they say nothing about other scanners, protocols or "
        "populations.",
        "",
        "## Limitations",
        "",
        LIMITATIONS,
        "",
        "## What it needs",
        "",
        f"The configs name unetpp3d's network and components, so unetpp3d {unetpp3d.__version__} or newer must be "
        "installed beside MONAI, with MONAI's bundle tools (`fire`, `jsonschema`):",
        "",
        "```bash",
        install_command(unetpp3d.__version__),
        "```",
        "",
        "(from a clone of unetpp3d at that version: `pip install '.[bundle]'`). Every config's `initialize` first runs "
        "`scripts/check_unetpp3d.py`, which stops the run with one line naming that command when unetpp3d is missing "
        "or older; `python BUNDLE/scripts/check_unetpp3d.py` checks an environment alone.",
        "",
        "## How to run it",
        "",
        "```bash",
        "python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE \\",
        "    --dataset_dir SCANS --output_dir MASKS",
        "```",
        "",
        "`SCANS` holds NIfTI/NRRD/MHA files or DICOM series folders, or is a dataset root holding `imagesTs/` (as the "
        "zoo's bundles take `dataset_dir`), whose scans are then segmented. Each mask is written as "
        "`MASKS/<case>.nii.gz` on its scan's own grid, by MONAI's `SaveImaged` (so MONAI Label's post-filters apply), "
        "named and written atomically as `unetpp3d infer` does"
        + (", with each scan's nodule report beside it (`<case>.nodules.json` and `.csv`, as `unetpp3d infer` "
           "writes them)" if predictor.rules.nodule_report else "")
        + ". A folder without scans stops the run with one line saying so. As exported, it runs the model's own "
        "inference settings: "
        f"test-time augmentation {'on' if predictor.tta else 'off'} (`--window_network#tta "
        f"{'False' if predictor.tta else 'True'}` to turn it {'off' if predictor.tta else 'on'}), "
        + (f"the pruned network UNet++ L^{predictor.prune_level} (`--window_network#prune_level None` for all heads)"
           if predictor.prune_level is not None else
           "all heads (the faster pruned network: `--window_network#prune_level 2`)")
        + ". Like `unetpp3d infer`, windows run in bf16 on GPUs "
        "and on CPUs that compute bf16 natively; `--window_network#amp False` keeps fp32. A DICOM folder holding several "
        "series: `--preprocessing#transforms#0#reader#series_uid UID`.",
        "",
        "This is bundle format 2 (`unetpp3d.format` in `configs/metadata.json`). `unetpp3d infer` also reads "
        "format-1 bundles (exported before unetpp3d grouped its modules by stage), but their `inference.json` names "
        "components that moved: export a format-1 bundle again to run it with `python -m monai.bundle run`.",
        "",
        "With unetpp3d (also writes previews):",
        "",
        "```bash",
        "unetpp3d infer SCANS --out MASKS --model BUNDLE",
        "```",
        "",
        *_torchscript_section(predictor.network),
        "",
        "## How to train it",
        "",
        "```bash",
        "python -m monai.bundle run --config_file BUNDLE/configs/train.json --bundle_root BUNDLE --dataset_dir DATA",
        "```",
        "",
        "`DATA` is a dataset root holding `imagesTr/` and `labelsTr/` (images paired with labels by case name; "
        "nnU-Net's `<case>_0000` image names too) or a datalist JSON (MSD/nnU-Net `dataset.json`, Auto3DSeg datalist, "
        "unetpp3d manifest). Training is unetpp3d's own loop (not ignite) with this bundle's network, preprocessing "
        "and training config; it starts from the weights in `models/model.pt` (`--pretrained False`: from the "
        "network as built), validates every `val_interval` epochs and after the last, and writes the best validated "
        "weights (the last ones without validation) back to `models/model.pt`, in the form `unetpp3d infer --model "
        "BUNDLE` and `inference.json` read, and traces `models/model.ts` again. The run's log, `metrics.csv`, "
        "checkpoints and TensorBoard go to `BUNDLE/train/` (`--output_dir`); an earlier run's are replaced. Without "
        "`validate#dataset#data`, a share of the cases (the config's `data.validation_fraction`, or `--fold K`) "
        "validates. Other settings: `--epochs N`, `--val_interval N`, `--config_overrides \"['train.lr=0.001', "
        "'data.num_workers=2']\"` (as `unetpp3d train --set`). The preprocessing is the bundle's and cannot change "
        "here: `inference.json` applies it to the weights trained. An interrupted run is not resumed: the next run "
        "starts again from `models/model.pt`, which only a finished run replaces. `metadata.json` (its "
        "`eval_metrics`) and this README still describe the exported weights after training.",
        "",
        "On several GPUs, one process each (the trainer joins torchrun's process group itself):",
        "",
        "```bash",
        "torchrun --nproc_per_node=2 -m monai.bundle run \\",
        "    --config_file \"['BUNDLE/configs/train.json','BUNDLE/configs/multi_gpu_train.json']\" "
        "--bundle_root BUNDLE --dataset_dir DATA",
        "```",
        "",
        "To score `models/model.pt` on labelled cases (every labelled case of `DATA`, segmented as `unetpp3d infer` "
        "does; Dice, IoU, HD95 and surface Dice per class into `BUNDLE/eval/evaluation.json`):",
        "",
        "```bash",
        "python -m monai.bundle run --config_file \"['BUNDLE/configs/train.json','BUNDLE/configs/evaluate.json']\" "
        "\\",
        "    --bundle_root BUNDLE --dataset_dir DATA",
        "```",
        "",
        "MONAI Label trains a bundle through `train.json` (it sets `train#dataset#data`, `validate#dataset#data`, "
        "`train#trainer#max_epochs` and `device`, which this trainer reads) and `multi_gpu_train.json`.",
        "",
        "## What has been checked",
        "",
        "`configs/metadata.json` fills every field MONAI's official metadata schema (`meta_schema_20240725.json`, named "
        "in its `schema` field) requires. It can be validated offline with MONAI's `verify_metadata`:",
        "",
        "```bash",
        "python -c \"from unetpp3d.bundle import verify_metadata; verify_metadata('BUNDLE')\"",
        "```",
        "",
        "which checks it against unetpp3d's own schema (`unetpp3d/resources/meta_schema.json`), **not** MONAI's "
        "official file: unetpp3d does not ship that file. To check against the official schema, pass a local copy "
        "(`verify_metadata('BUNDLE', schema='meta_schema_20240725.json')`). This bundle was not validated at export. "
        "unetpp3d's tests export bundles like this one and validate them against its own schema in every run, and "
        "against a local copy of the official schema only where one is supplied "
        "(`UNETPP3D_MONAI_META_SCHEMA`); they run `inference.json` and `train.json` under `python -m monai.bundle "
        "run` on the CPU. Not checked: the model zoo's own CI, and any run on a GPU or under MONAI Label itself.",
        "",
        "## Licence",
        "",
        "See `docs/license.txt` (also at `LICENSE`).",
        "",
    ]
    return "\n".join(lines)


def _torchscript_section(network: Any) -> list[str]:
    """How to run ``models/model.ts`` (see :func:`unetpp3d.model.portable.trace_modes`)."""
    args = network.model_args
    levels = prune_levels(network)
    shape = f"`(B, {args['out_channels']}, x, y, z)`"
    if levels:
        rows = [f"| accurate | `model(x)` | log-probabilities {shape}: the log of the mean of the {len(levels)} "
                "heads' softmax probabilities |",
                *[f"| fast, UNet++ L^{lv} | `model.{fast_method_name(lv)}(x)` | head X^{{0,{lv}}}'s logits |"
                  for lv in levels]]
        example = f"# accurate; model.{fast_method_name(min(2, levels[-1]))}(x) for fast mode"
    else:
        rows = [f"| accurate | `model(x)` | logits {shape} (trained without deep supervision: one head, no fast "
                "mode) |"]
        example = ""
    return [
        "### TorchScript",
        "",
        "`models/model.ts` is the network alone, without pre- or post-processing, traced with TorchScript from "
        "the plain reference path: it holds no CPU-only operator, so it runs on the CPU and on CUDA alike, at any "
        f"batch size and any input size `(B, {args['in_channels']}, x, y, z)` whose sides are multiples of "
        f"{list(network.size_divisor)}, preprocessed as above. Each inference mode is a method of the same module "
        "(the weights are stored once):",
        "",
        "| mode | call | output |",
        "| --- | --- | --- |",
        *rows,
        "",
        "In every mode the output's softmax over channels is the probabilities (in accurate mode, exactly the "
        "mean of the heads' probabilities) and its argmax the label.",
        "",
        "```python",
        "import torch",
        'model = torch.jit.load("BUNDLE/models/model.ts", map_location="cuda")  # or "cpu"',
        "with torch.no_grad():",
        f"    probs = model(x.cuda()).softmax(1)  {example}".rstrip(),
        "```",
        "",
    ]


# configs/logging.conf, which MONAI's runner applies: the cases written are logged to the console.
LOGGING_CONF = """\
[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


LICENSE_TEXT = """\
Licence notice

The weights in models/ and the configuration in configs/ are made available under the Apache
License, Version 2.0, unless the model's author states otherwise. You may obtain a copy of the
licence at https://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, this bundle is distributed on an
"AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.

The code it runs (unetpp3d, MONAI, PyTorch) is under those projects' own licences. The data the
model was trained on may carry its own terms, which can restrict how the model may be used.

This model is for research only. It is not a medical device.
"""
