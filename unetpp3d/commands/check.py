"""Validate a whole dataset before training: every problem of every case, at once.

``unetpp3d check --manifest dataset.json`` reads each case the way training will
(:func:`unetpp3d.imageio.readers.read_image`), collects what is wrong instead of stopping at the first
error, prints one line per problem, a short summary of the data, and writes the dataset
fingerprint that :func:`unetpp3d.model.planning.plan` turns into a configuration into an output
folder (the current one by default; never beside the user's data, which may be read-only or
shared). ``unetpp3d train`` reuses it while the cases' files are unchanged.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from unetpp3d.atomic import atomic_write_text
from unetpp3d.data.leaks import leak_messages
from unetpp3d.data.manifest import Case, load_manifest
from unetpp3d.data.validation import (
    CaseResult,
    Problem,
    default_fingerprint_path,
    fingerprint_of,
    inspect_case,
)
from unetpp3d.errors import exit_status
from unetpp3d.outputs import check_outputs, json_kind

# What check writes: a JSON object naming the manifest it describes.
FINGERPRINT = json_kind("dataset fingerprint", ("manifest", "labels"))


def _range(values: list[float], fmt: str = "{:.4g}") -> str:
    lo, hi, med = min(values), max(values), float(np.median(values))
    if lo == hi:
        return fmt.format(lo)
    return f"{fmt.format(lo)} to {fmt.format(hi)} (median {fmt.format(med)})"


def _summary(n_cases: dict[str, int], entries: list[dict[str, Any]], labels: dict[int, str], n_errors: int,
             n_warnings: int, n_bad_cases: int) -> str:
    total = sum(n_cases.values())
    rows = [("cases", f"{total} ({n_cases['training']} training, {n_cases['validation']} validation, "
                      f"{n_cases['test']} test); {total - n_bad_cases} without errors")]
    if entries:
        for title, key, fmt in (("spacing (mm)", "spacing", "{:.4g}"), ("size (voxels)", "size", "{:.0f}")):
            rows.append((title, "   ".join(f"{axis} {_range([e[key][a] for e in entries], fmt)}"
                                            for a, axis in enumerate("xyz"))))
        orient = Counter(e["axcodes"] for e in entries)
        rows.append(("orientation", ", ".join(f"{code} x{n}" for code, n in orient.most_common())))
        lo = min(e["intensity_min"] for e in entries)
        hi = max(e["intensity_max"] for e in entries)
        rows.append(("intensities", f"{lo:.6g} to {hi:.6g}"))
        for k, name in labels.items():
            if k == 0:
                continue
            vols = [e["label_volumes_ml"][str(k)] for e in entries if "label_volumes_ml" in e]
            if vols:
                empty = sum(v == 0 for v in vols)
                rows.append((f"{name} (mL)", _range(vols, "{:.1f}") + (f"; absent in {empty} case(s)" if empty else "")))
    rows.append(("problems", f"{n_errors} error(s), {n_warnings} warning(s)"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {title:<{width}}  {text}" for title, text in rows)


def run_check(manifest_path: str | Path, series_uid: str | None = None, fingerprint_path: str | Path | None = None,
              seed: int = 0, out_dir: str | Path | None = None) -> int:
    """Check every case of a manifest, print the problems and a summary, write the fingerprint.

    Spacing and size in the summary and the fingerprint are in the RAS (x, y, z) order that
    training uses. The fingerprint (see :func:`unetpp3d.data.fingerprint.combine_fingerprints`) comes
    from the training and validation cases (all cases when none is labelled), records each
    case's file sizes and modification times, and is written only when no case has an error, so
    a stale dataset never plans a model.

    Args:
        manifest_path: the dataset manifest.
        series_uid: SeriesInstanceUID for DICOM folders holding several series.
        fingerprint_path: where to write the fingerprint JSON; default
            ``OUT_DIR/<manifest stem>.fingerprint.json``.
        seed: intensity-sampling seed.
        out_dir: folder for the fingerprint; default the current folder.

    Returns:
        The exit status of :func:`unetpp3d.errors.exit_status`: 0 when no case has an error, 2
        when some case has one (every problem check finds is one the user can fix in the data).

    Raises:
        UserError: the manifest itself is unusable, or the fingerprint cannot be written.
    """
    manifest = load_manifest(manifest_path)
    out = (Path(fingerprint_path) if fingerprint_path is not None
           else default_fingerprint_path(manifest.path, out_dir))
    # Before any case is read: the fingerprint must not land on a scan, a label or the manifest.
    inputs = [manifest.path, *(p for c in manifest.all_cases() for p in (c.image, c.label) if p)]
    check_outputs([out], FINGERPRINT, inputs, "--fingerprint")
    labelled_names = {c.name for c in [*manifest.training, *(manifest.validation or [])]}
    cases = manifest.all_cases()
    results: list[tuple[Case, CaseResult]] = []
    for case in tqdm(cases, desc="checking", unit="case", file=sys.stderr, disable=None, leave=False):
        results.append((case, inspect_case(case, manifest.labels, series_uid, seed)))

    problems = [p for _, r in results for p in r.problems]
    by_name = {c.name: c for c in cases}
    problems += [Problem(name, by_name[name].image, message) for name, message in leak_messages(
        {"training": manifest.training, "validation": manifest.validation or [], "test": manifest.test})]
    errors = [p for p in problems if p.severity == "error"]
    bad_cases = {p.case for p in errors}
    entries = [r.entry for _, r in results if r.entry is not None]
    n_cases = {"training": len(manifest.training), "validation": len(manifest.validation or []),
               "test": len(manifest.test)}
    print(f"{manifest.path}: {len(cases)} case(s)")
    for p in problems:
        print(p)
    print(_summary(n_cases, entries, manifest.labels, len(errors), len(problems) - len(errors), len(bad_cases)))
    if errors:
        print(f"{len(errors)} error(s) in {len(bad_cases)} case(s); fix them and run the check again "
              "(fingerprint not written)")
        return exit_status(user_problems=len(bad_cases))

    chosen = [(c, r) for c, r in results if r.entry is not None and c.name in labelled_names]
    if not chosen:
        chosen = [(c, r) for c, r in results if r.entry is not None]
    fp = fingerprint_of([r for _, r in chosen], manifest.labels)
    fp["manifest"] = str(manifest.path.resolve())
    fp["seed"] = seed
    fp["series_uid"] = series_uid
    atomic_write_text(out, json.dumps(fp, indent=1) + "\n")
    print(f"all {len(cases)} case(s) passed; fingerprint written to {out}")
    return 0
