"""Dataset manifests: which scans and labels make up a dataset, and how it splits for training.

Two JSON forms are read (see ``data_manifests/README.md``):

* the Medical Segmentation Decathlon / nnU-Net ``dataset.json``: ``labels``, ``modality`` (MSD)
  or ``channel_names`` (nnU-Net v2), ``training`` as ``[{"image": ..., "label": ...}]`` and
  ``test`` as a list of paths. nnU-Net v2 files without a ``training`` list are read from the
  ``imagesTr``/``labelsTr`` folders beside them, using ``file_ending``;
* our own form, the same plus an optional ``task`` (``"liver"`` or ``"lung_nodule"``) and an
  optional ``validation`` list of ``{"image", "label"}`` entries that fixes the split.

Cross-validation folds fixed elsewhere are read too, so that ``--fold K`` trains on the same
cases as the other tool did: nnU-Net v2's ``splits_final.json`` beside a ``dataset.json`` (a
list of ``{"train": [...], "val": [...]}``, one per fold, naming cases), and the ``fold`` key of
each training entry of an Auto3DSeg datalist (whose ``testing`` list is read as ``test``).

Paths are relative to the folder holding the manifest. Images may be NIfTI, NRRD, MHA/MHD files
or DICOM series folders. A case is named after its image file (``liver_3`` for
``imagesTr/liver_3.nii.gz``) unless its entry gives a ``"name"``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unetpp3d.atomic import atomic_write_text
from unetpp3d.errors import UserError
from unetpp3d.imageio.formats import IMAGE_SUFFIXES
from unetpp3d.strictjson import strict_loads
from unetpp3d.readable import require_file
from unetpp3d.tasks import TASKS

SPLITS_FILE = "splits_final.json"  # nnU-Net v2's name, read beside a manifest named dataset.json


@dataclass(frozen=True)
class Case:
    """One scan, with its label map when it has one.

    Attributes:
        name: identifier used for outputs and splits (the image's file name without suffix).
        image: absolute path of the scan (a file or a DICOM series folder).
        label: absolute path of the label map, or None for unlabelled (test) cases.
    """

    name: str
    image: Path
    label: Path | None = None


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold fixed by the dataset: case names to train on and to validate on."""

    train: tuple[str, ...]
    val: tuple[str, ...]


@dataclass
class Manifest:
    """A loaded manifest.

    Attributes:
        path: the manifest file.
        root: the folder its relative paths start from.
        task: ``"liver"``, ``"lung_nodule"`` or None when the manifest does not say.
        labels: class number -> name, always ``0 .. n-1`` with 0 the background.
        training: labelled cases to train on (and to split, when there is no validation list).
        validation: labelled cases fixed for validation, or None to split ``training``.
        test: cases without labels, for inference.
        folds: cross-validation folds fixed by the dataset (fold number -> training and
            validation case names), or None when ``split_cases`` draws them.
        folds_source: where ``folds`` came from, for messages and logs.
    """

    path: Path
    root: Path
    task: str | None
    labels: dict[int, str]
    training: list[Case]
    validation: list[Case] | None = None
    test: list[Case] = field(default_factory=list)
    folds: dict[int, Fold] | None = None
    folds_source: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def all_cases(self) -> list[Case]:
        """Training, validation and test cases, in that order."""
        return [*self.training, *(self.validation or []), *self.test]


# Folder names that say what a folder holds rather than which case it is: a DICOM series in
# ``.../patient7/dicom`` is the case ``patient7``. check, train, infer and evaluate all name it so.
GENERIC_FOLDER_NAMES = frozenset({"dicom", "dcm", "series", "images", "image", "ct", "scan"})


def case_name(path: str | Path) -> str:
    """``imagesTr/liver_3.nii.gz`` -> ``liver_3``; a DICOM folder keeps its folder name, or takes its
    parent's where the folder's own name is generic (:data:`GENERIC_FOLDER_NAMES`)."""
    path = Path(path)
    name = path.name
    if name.lower() in GENERIC_FOLDER_NAMES and path.is_dir() and path.resolve().parent.name:
        return path.resolve().parent.name
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _parse_labels(raw: Any, where: str) -> dict[int, str]:
    """Accept ``{"0": "background", "1": "liver"}`` (MSD) or ``{"background": 0, "liver": 1}`` (nnU-Net v2)."""
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: 'labels' must be a non-empty mapping such as {{\"0\": \"background\", \"1\": \"liver\"}}")
    labels: dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, (list, tuple)):
            raise UserError(f"{where}: label {key!r} maps to {value}; region-based labels (nnU-Net v2 regions) are "
                            "not supported — give one class number per name")
        number, name = (key, value) if _is_int(key) else (value, key)
        if not _is_int(number) or not isinstance(name, str):
            raise UserError(f"{where}: label entry {key!r}: {value!r} is neither \"<number>\": \"<name>\" nor "
                            "\"<name>\": <number>")
        number = int(number)
        if number in labels:
            raise UserError(f"{where}: label number {number} appears twice ({labels[number]!r} and {name!r})")
        labels[number] = name
    expected = list(range(len(labels)))
    if sorted(labels) != expected:
        raise UserError(f"{where}: label numbers must be 0..{len(labels) - 1} with 0 the background, got "
                        f"{sorted(labels)}")
    return dict(sorted(labels.items()))


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def _resolve(root: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: expected a file path, got {value!r}")
    # normpath folds "./" and "../" so that the same file always gets the same Path.
    return Path(os.path.normpath(root / Path(value)))


def _cases(entries: Any, root: Path, where: str, need_label: bool) -> list[Case]:
    if not isinstance(entries, list):
        raise UserError(f"{where}: expected a list, got {type(entries).__name__}")
    cases = []
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict):
            raise UserError(f"{at}: expected {{\"image\": ..., \"label\": ...}} or a path, got {entry!r}")
        if "image" not in entry:
            raise UserError(f"{at}: missing key 'image'")
        image = _resolve(root, entry["image"], f"{at}.image")
        label = entry.get("label")
        if label is None and need_label:
            raise UserError(f"{at}: missing key 'label' (every training and validation case needs one)")
        name = entry.get("name", case_name(image))
        if not isinstance(name, str) or not name.strip() or "/" in name or "\\" in name:
            raise UserError(f"{at}.name: expected a plain case name, got {name!r}")
        cases.append(Case(name, image, _resolve(root, label, f"{at}.label") if label is not None else None))
    return cases


def _discover_nnunet_v2(data: dict, root: Path, where: str) -> list[Case]:
    """nnU-Net v2: ``imagesTr/<case>_0000<ending>`` with ``labelsTr/<case><ending>``."""
    ending = data["file_ending"]
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise UserError(f"{where}: no 'training' list and no imagesTr folder beside it; list the cases under "
                        "'training' or use the nnU-Net folder layout")
    cases = []
    for image in sorted(images_dir.iterdir()):
        if not image.name.endswith(f"_0000{ending}") or image.name.startswith("."):
            continue
        name = image.name[: -len(f"_0000{ending}")]
        cases.append(Case(name, image, labels_dir / f"{name}{ending}"))
    if not cases:
        raise UserError(f"{where}: no images named <case>_0000{ending} in {images_dir}")
    return cases


def _names(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise UserError(f"{where}: expected a list of case names, got {value!r}")
    if len(set(value)) != len(value):
        twice = sorted({v for v in value if value.count(v) > 1})
        raise UserError(f"{where}: case(s) listed twice: {', '.join(twice)}")
    return tuple(value)


def _read_splits_final(path: Path) -> dict[int, Fold]:
    """nnU-Net v2's ``splits_final.json``: ``[{"train": [names], "val": [names]}, ...]``, fold k at index k."""
    try:
        data = strict_loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{path}: cannot read the cross-validation splits ({exc}); fix or remove the file") from None
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected a non-empty list of {{\"train\": [...], \"val\": [...]}}, one per fold")
    folds = {}
    for k, entry in enumerate(data):
        if not isinstance(entry, dict) or set(entry) != {"train", "val"}:
            raise UserError(f"{path}: fold {k}: expected {{\"train\": [...], \"val\": [...]}}, got {entry!r:.200}")
        folds[k] = Fold(_names(entry["train"], f"{path}: fold {k}: train"),
                        _names(entry["val"], f"{path}: fold {k}: val"))
    return folds


def _datalist_folds(entries: list, cases: list[Case], where: str) -> dict[int, Fold] | None:
    """An Auto3DSeg datalist's ``"fold": k`` keys: fold k validates on the entries marked k, trains on the rest."""
    marks = [e.get("fold") if isinstance(e, dict) else None for e in entries]
    if all(m is None for m in marks):
        return None
    unmarked = [i for i, m in enumerate(marks) if m is None]
    if unmarked:
        listed = ", ".join(f"training[{i}]" for i in unmarked[:5]) + (" …" if len(unmarked) > 5 else "")
        raise UserError(f"{where}: {len(unmarked)} training entr{'y has' if len(unmarked) == 1 else 'ies have'} no "
                        f"'fold' key ({listed}) while others have one; give every entry a fold or none")
    for i, m in enumerate(marks):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise UserError(f"{where}: training[{i}].fold: expected a fold number 0, 1, …, got {m!r}")
    return {k: Fold(tuple(c.name for c, m in zip(cases, marks) if m != k),
                    tuple(c.name for c, m in zip(cases, marks) if m == k))
            for k in sorted(set(marks))}


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest (MSD/nnU-Net ``dataset.json`` or our form) and check its structure.

    File existence and contents are left to :func:`unetpp3d.commands.check.run_check`, which reports every
    problem at once; this function checks only what makes the manifest unusable.

    Args:
        path: the JSON file.

    Returns:
        The :class:`Manifest`, with absolute case paths.

    Raises:
        UserError: missing or invalid JSON, missing keys, bad labels, an unknown task, more than
            one channel, duplicate case names or files, or malformed folds (``splits_final.json``
            or datalist ``fold`` keys; whether a fold names known cases is checked by
            :func:`split_cases`, for the fold asked for).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: manifest not found")
    require_file(path, "manifest")  # a folder, FIFO or device is refused, not read
    try:
        data = strict_loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting: RecursionError
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object with 'labels' and 'training', got {type(data).__name__}")
    where = str(path)
    root = path.parent.resolve()

    task = data.get("task")
    if task is not None and task not in TASKS:
        raise UserError(f"{where}: task {task!r} is not one of {', '.join(TASKS)}")
    channels = data.get("channel_names", data.get("modality"))
    if isinstance(channels, dict) and len(channels) > 1:
        raise UserError(f"{where}: {len(channels)} input channels ({', '.join(map(str, channels.values()))}); "
                        "unetpp3d segments single-channel CT")
    if "labels" not in data:
        raise UserError(f"{where}: missing key 'labels' (e.g. {{\"0\": \"background\", \"1\": \"liver\"}})")
    labels = _parse_labels(data["labels"], where)

    if "training" in data:
        training = _cases(data["training"], root, f"{where}: training", need_label=True)
    elif "file_ending" in data:
        training = _discover_nnunet_v2(data, root, where)
    else:
        raise UserError(f"{where}: missing key 'training' (a list of {{\"image\": ..., \"label\": ...}})")
    validation = (_cases(data["validation"], root, f"{where}: validation", need_label=True)
                  if data.get("validation") is not None else None)
    # Auto3DSeg datalists call the unlabelled cases "testing".
    test_key = "test" if "test" in data else "testing"
    test = _cases(data.get(test_key) or [], root, f"{where}: {test_key}", need_label=False)
    if not training and not validation and not test:
        raise UserError(f"{where}: lists no cases")

    seen_names: dict[str, Path] = {}
    seen_files: dict[Path, str] = {}
    for case in [*training, *(validation or []), *test]:
        if case.name in seen_names:
            raise UserError(f"{where}: duplicate case name {case.name!r} ({seen_names[case.name]} and {case.image}); "
                            "case names come from the image file or folder names and must be unique — "
                            "give the entries a \"name\"")
        seen_names[case.name] = case.image
        for f in (case.image, case.label):
            if f is None:
                continue
            if f in seen_files:
                raise UserError(f"{where}: file {f} is listed twice (cases {seen_files[f]!r} and {case.name!r})")
            seen_files[f] = case.name

    folds, folds_source = None, None
    if "training" in data:
        folds = _datalist_folds(data["training"], training, where)
        folds_source = f"{where}: the training entries' 'fold' keys" if folds else None
    splits = path.parent / SPLITS_FILE
    if path.name == "dataset.json" and splits.is_file():
        if folds:
            raise UserError(f"{where}: folds are given twice, by its entries' 'fold' keys and by {splits}; "
                            "keep one of them")
        folds, folds_source = _read_splits_final(splits), str(splits)
    return Manifest(path=path, root=root, task=task, labels=labels, training=training, validation=validation,
                    test=test, folds=folds, folds_source=folds_source)


def split_cases(manifest: Manifest, fold: int | None = None, folds: int = 5, val_fraction: float = 0.2,
                seed: int = 0) -> tuple[list[Case], list[Case]]:
    """Split labelled cases into training and validation.

    The manifest's own ``validation`` list wins when present. With ``fold`` given and folds
    fixed by the dataset (``manifest.folds``: nnU-Net's ``splits_final.json`` or an Auto3DSeg
    datalist's ``fold`` keys) those folds are used, whatever ``folds`` says; training cases a
    fold does not name are left out of it, as in nnU-Net. Otherwise the training cases are
    shuffled with ``seed`` (from their sorted names, so the split does not depend on the order
    of the manifest) and either split into ``folds`` parts with part ``fold`` held out, or, with
    ``fold=None``, a ``val_fraction`` share is held out (at least one case when there are two or
    more and ``val_fraction > 0``).

    Returns:
        ``(train_cases, val_cases)``; ``val_cases`` may be empty.

    Raises:
        UserError: ``fold`` given with a manifest that fixes its validation cases, ``fold``
            outside the dataset's folds or ``0..folds-1``, a fixed fold naming cases the
            manifest's training list lacks or naming a case on both sides, or fewer cases than
            folds.
    """
    if manifest.validation is not None:
        if fold is not None:
            raise UserError(f"{manifest.path}: the manifest fixes its validation cases, so --fold does not apply; "
                            "remove the 'validation' list to cross-validate")
        return list(manifest.training), list(manifest.validation)
    if fold is not None and manifest.folds is not None:
        return _fixed_fold(manifest, fold)
    cases = sorted(manifest.training, key=lambda c: c.name)
    random.Random(seed).shuffle(cases)
    if fold is not None:
        if folds < 2:
            raise UserError(f"folds must be at least 2, got {folds}")
        if not 0 <= fold < folds:
            raise UserError(f"fold {fold} is outside 0..{folds - 1}")
        if len(cases) < folds:
            raise UserError(f"{manifest.path}: {len(cases)} training cases cannot make {folds} folds")
        parts = np.array_split(np.arange(len(cases)), folds)
        held = set(parts[fold].tolist())
        return [c for i, c in enumerate(cases) if i not in held], [cases[i] for i in sorted(held)]
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"validation fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * len(cases)))
    if val_fraction > 0 and len(cases) >= 2:
        n_val = min(max(n_val, 1), len(cases) - 1)
    return cases[n_val:], cases[:n_val]


def _fixed_fold(manifest: Manifest, fold: int) -> tuple[list[Case], list[Case]]:
    assert manifest.folds is not None
    source = manifest.folds_source
    numbers = sorted(manifest.folds)
    if fold not in manifest.folds:
        have = (f"0..{numbers[-1]}" if numbers == list(range(len(numbers)))
                else ", ".join(map(str, numbers)))
        raise UserError(f"--fold {fold}: {source} defines {len(numbers)} fold(s), numbered {have}; "
                        "pick one of those")
    chosen = manifest.folds[fold]
    by_name = {c.name: c for c in manifest.training}
    unknown = [n for n in (*chosen.train, *chosen.val) if n not in by_name]
    if unknown:
        known = sorted(by_name)
        raise UserError(f"{source}: fold {fold} names {len(unknown)} case(s) that {manifest.path} does not list "
                        f"for training: {', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''} (its cases: "
                        f"{', '.join(known[:5])}{' …' if len(known) > 5 else ''}); regenerate the splits for this "
                        "dataset or fix the case names")
    both = sorted(set(chosen.train) & set(chosen.val))
    if both:
        raise UserError(f"{source}: fold {fold} both trains and validates on {', '.join(both[:5])}"
                        f"{' …' if len(both) > 5 else ''}; a case belongs on one side")
    return [by_name[n] for n in chosen.train], [by_name[n] for n in chosen.val]


def _entry(root: Path, case: Case | Sequence | str) -> dict[str, str]:
    def rel(p: str | Path) -> str:
        p = Path(p)
        try:
            return Path(os.path.relpath(p.resolve(), root)).as_posix()
        except ValueError:  # another drive on Windows
            return str(p.resolve())

    name = None
    if isinstance(case, Case):
        image, label, name = case.image, case.label, case.name
    elif isinstance(case, (str, Path)):
        image, label = case, None
    else:
        image, label = case[0], (case[1] if len(case) > 1 else None)
    entry = {"image": rel(image)}
    if label is not None:
        entry["label"] = rel(label)
    if name is not None and name != case_name(image):
        entry["name"] = name  # only when it cannot be derived from the file name
    return entry


def write_manifest(path: str | Path, training: Iterable[Case | Sequence], labels: dict[int, str] | dict[str, str],
                   task: str | None = None, validation: Iterable[Case | Sequence] | None = None,
                   test: Iterable[Case | Sequence | str] | None = None, name: str | None = None,
                   description: str | None = None) -> Path:
    """Write a manifest in our form, with paths relative to its folder, atomically.

    Args:
        path: the JSON file to write.
        training: labelled cases, as :class:`Case` or ``(image, label)`` pairs.
        labels: class number -> name (int or string keys).
        task: ``"liver"`` or ``"lung_nodule"`` (optional).
        validation: labelled cases to fix as the validation set (optional).
        test: unlabelled cases, as :class:`Case`, paths or ``(image,)`` tuples (optional).
        name: dataset name (optional).
        description: free text (optional).

    Returns:
        ``path`` as a :class:`~pathlib.Path`; :func:`load_manifest` reads it back.
    """
    path = Path(path)
    if task is not None and task not in TASKS:
        raise UserError(f"task {task!r} is not one of {', '.join(TASKS)}")
    root = path.parent.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if name:
        data["name"] = name
    if description:
        data["description"] = description
    if task:
        data["task"] = task
    data["modality"] = {"0": "CT"}
    data["labels"] = {str(int(k)): str(v) for k, v in sorted(labels.items(), key=lambda kv: int(kv[0]))}
    data["training"] = [_entry(root, c) for c in training]
    if validation is not None:
        data["validation"] = [_entry(root, c) for c in validation]
    test_entries = [_entry(root, c) for c in (test or [])]
    data["test"] = [e if "name" in e else e["image"] for e in test_entries]
    data["numTraining"] = len(data["training"])
    data["numTest"] = len(data["test"])
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path
