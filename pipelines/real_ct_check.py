#!/usr/bin/env python
"""Real-CT check: can the pipeline fit three real, labelled CT scans from three scanners and formats?

Trains a small UNet++ for a short budget on the labelled cases in ``../shared/data`` and
segments the same scans again; each must reach a liver Dice above 0.8 against its reference
label. A model that fits these scans shows that reading, orientation, resampling, intensity
normalisation and writing agree on real data:

- ``abdomen_ct_ts``: NIfTI, direction diag(-1, -1, 1), 122x101x30 at 3 mm; label ``liver.nii.gz``;
- ``abdomen_ct_dicom_ts``: DICOM, JPEG2000 lossless (Siemens), 512x512x20 at 0.98x0.98x2 mm;
  label ``liver.nii.gz``, its array stored y-flipped on the same physical grid;
- ``abdomen_ct_3slice_dcmqi``: DICOM, implicit VR little endian (GE), 512x512x3 at 0.81x0.81x1 mm;
  label ``liver.nrrd``.

Steps, each the project's own command line (``unetpp3d ...``) in a subprocess, all under ``--out``:

1. write ``cases.json`` (the three cases, paths relative to it) and ``train.json`` (the same
   cases for training, and again for validation through symbolic links, because a manifest
   refuses to list one file twice);
2. ``unetpp3d check --manifest cases.json --out .`` (writes ``cases.fingerprint.json``);
3. ``unetpp3d train --manifest train.json --config configs/real_ct_check.yaml --out run``;
4. ``unetpp3d infer cases.json --model run --out masks``;
5. compare every mask's grid with its scan's, read independently with plain SimpleITK: size,
   spacing, origin and direction must be equal;
6. ``unetpp3d evaluate --pred masks --ref cases.json --out evaluation``;
7. print one row per case (format, scanner, grid, Dice, PASS/FAIL) and write ``summary.json``.

Exit status: 0 when every case passes; 1 when a case fails (Dice, grid, no mask) or a step
fails; 2 when the arguments, the data folder or the output folder are unusable.

Training runs one thread per process unless ``--threads`` or ``OMP_NUM_THREADS`` says otherwise:
on a shared 2-core machine two threads per process made training 2-4 times slower.

Usage::

    .venv/bin/python pipelines/real_ct_check.py --data ../shared/data --out /tmp/real_ct_check
    .venv/bin/python pipelines/real_ct_check.py --data ../shared/data --out /tmp/rc --epochs 20 --device cpu
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "real_ct_check.yaml"
DICE_THRESHOLD = 0.8
LABELS = {0: "background", 1: "liver"}
# What the script writes under --out; --force removes exactly these.
OUTPUTS = ("cases.json", "cases.fingerprint.json", "train.json", "validation_links", "run", "masks",
           "evaluation", "summary.json", "logs")
# Tolerances of the grid comparison: what a float32 NIfTI header keeps of a DICOM geometry.
SPACING_RTOL = 1e-5
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-5


@dataclass(frozen=True)
class RealCase:
    """One labelled case of ../shared/data, as its README describes it."""

    name: str
    image: str  # relative to the data folder
    label: str
    format: str


CASES = (
    RealCase("abdomen_ct_ts", "abdomen_ct_ts/ct.nii.gz", "abdomen_ct_ts/liver.nii.gz", "NIfTI"),
    RealCase("abdomen_ct_dicom_ts", "abdomen_ct_dicom_ts/dicom", "abdomen_ct_dicom_ts/liver.nii.gz",
             "DICOM JPEG2000"),
    RealCase("abdomen_ct_3slice_dcmqi", "abdomen_ct_3slice_dcmqi/dicom", "abdomen_ct_3slice_dcmqi/liver.nrrd",
             "DICOM 3-slice"),
)


class CheckError(Exception):
    """The check cannot start: unusable arguments, missing data, or an --out it must not write into."""


# --------------------------------------------------------------------------------------------
# Geometry, read independently of unetpp3d
# --------------------------------------------------------------------------------------------


def read_sitk(path: Path):
    """The image at ``path`` (a file or a DICOM series folder) with plain SimpleITK."""
    import SimpleITK as sitk

    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def grid_of(image) -> dict:
    return {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()), "origin": list(image.GetOrigin()),
            "direction": list(image.GetDirection())}


def grid_differences(mask: dict, scan: dict) -> list[str]:
    """What differs between the mask's and the scan's grids (empty when they are the same)."""
    problems = []
    if mask["size"] != scan["size"]:
        problems.append(f"size {mask['size']} != {scan['size']}")
    if any(not math.isclose(a, b, rel_tol=SPACING_RTOL) for a, b in zip(mask["spacing"], scan["spacing"])):
        problems.append(f"spacing {mask['spacing']} != {scan['spacing']}")
    if any(abs(a - b) > ORIGIN_ATOL_MM for a, b in zip(mask["origin"], scan["origin"])):
        problems.append(f"origin {mask['origin']} != {scan['origin']}")
    if any(abs(a - b) > DIRECTION_ATOL for a, b in zip(mask["direction"], scan["direction"])):
        problems.append(f"direction {mask['direction']} != {scan['direction']}")
    return problems


def scanner_of(path: Path) -> str:
    """Manufacturer and model from the first DICOM file's header, or what the format records."""
    import SimpleITK as sitk

    if not path.is_dir():
        return "not recorded (NIfTI)"
    files = sorted(p for p in path.iterdir() if p.is_file())
    reader = sitk.ImageFileReader()
    try:
        reader.SetFileName(str(files[0]))
        reader.ReadImageInformation()
    except (IndexError, RuntimeError):
        return "unreadable"
    parts = [reader.GetMetaData(k).strip() for k in ("0008|0070", "0008|1090") if reader.HasMetaDataKey(k)]
    return " ".join(p for p in parts if p) or "not recorded"


def describe_grid(grid: dict) -> str:
    size = "x".join(map(str, grid["size"]))
    spacing = "x".join(f"{s:.3g}" for s in grid["spacing"])
    return f"{size} @ {spacing} mm"


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CheckError(f"--out {out}: exists and is not a folder")
    if out.is_dir():
        ours = [out / name for name in OUTPUTS if (out / name).exists() or (out / name).is_symlink()]
        others = [p for p in out.iterdir() if p not in ours]
        if ours and not force:
            raise CheckError(f"--out {out}: already holds a check's outputs; pass --force to replace them "
                             "or choose another folder")
        if others and not force:
            raise CheckError(f"--out {out}: not empty; choose an empty or new folder")
        for path in ours:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def find_cases(data: Path) -> list[RealCase]:
    missing = [str(data / p) for c in CASES for p in (c.image, c.label) if not (data / p).exists()]
    if missing:
        raise CheckError(f"--data {data}: missing {', '.join(missing)}; point --data at the shared real-CT folder "
                         "(../shared/data from the repository root)")
    return list(CASES)


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def write_manifests(data: Path, out: Path, cases: list[RealCase]) -> tuple[Path, Path]:
    """``cases.json`` (the three cases) and ``train.json`` (training plus the same cases for validation)."""
    out_abs = out.resolve()
    data_abs = data.resolve()
    entries = [{"name": c.name, "image": _rel(data_abs / c.image, out_abs), "label": _rel(data_abs / c.label, out_abs)}
               for c in cases]
    base = {"name": "real_ct_check", "description": "Real labelled CT cases of ../shared/data (not part of the "
            "repository); written by pipelines/real_ct_check.py", "task": "liver",
            "labels": {str(k): v for k, v in LABELS.items()}}
    cases_json = out / "cases.json"
    cases_json.write_text(json.dumps({**base, "training": entries}, indent=2) + "\n", encoding="utf-8")

    # A manifest refuses to list one file twice (it would leak training cases into validation);
    # here that is the point, so validation reaches the same files through links of its own.
    links = out / "validation_links"
    validation = []
    for c in cases:
        folder = links / c.name
        folder.mkdir(parents=True)
        entry = {"name": f"{c.name}.val"}
        for key, rel in (("image", c.image), ("label", c.label)):
            target = data_abs / rel
            link = folder / f"{key}{''.join(target.suffixes) if target.is_file() else ''}"
            try:
                link.symlink_to(target, target_is_directory=target.is_dir())
            except OSError:
                validation = None  # no symbolic links here: train without validation
                break
            entry[key] = _rel(link.absolute(), out_abs)
        if validation is None:
            break
        validation.append(entry)
    train_json = out / "train.json"
    manifest = {**base, "training": entries}
    if validation:
        manifest["validation"] = validation
    train_json.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return cases_json, train_json


def unetpp3d_command() -> list[str]:
    script = Path(sys.executable).with_name("unetpp3d")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "unetpp3d"]


def _children_cpu() -> float:
    """CPU seconds (user + system) used so far by finished child processes; 0 where the OS does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_step(name: str, args: list[str], out: Path, env: dict[str, str]) -> tuple[int, float, float]:
    """Run ``unetpp3d <args>``, echo its output, keep it in ``logs/<name>.log``.

    Returns:
        ``(exit status, wall seconds, CPU seconds)``. On a loaded machine the CPU time of a
        one-thread step is close to the wall time the step would take on an idle core.
    """
    command = unetpp3d_command() + args
    print(f"\n== {name}: {' '.join(command)}", flush=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    cpu_before = _children_cpu()
    start = time.perf_counter()
    with open(logs / f"{name}.log", "wb") as log:
        # Bytes, not text: text mode would turn the progress bars' carriage returns into new lines.
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        assert proc.stdout is not None
        for raw in proc.stdout:
            log.write(raw)
            line = raw.decode("utf-8", errors="replace")
            if not _noise(line):
                sys.stdout.write(line)
                sys.stdout.flush()
        rc = proc.wait()
    seconds = time.perf_counter() - start
    cpu = _children_cpu() - cpu_before
    print(f"== {name}: exit {rc} after {seconds:.1f} s, {cpu:.1f} CPU s (log: {logs / f'{name}.log'})", flush=True)
    return rc, seconds, cpu


def _noise(line: str) -> bool:
    # Progress bars and library warnings stay in the log file.
    return "\r" in line or "Warning" in line or line.startswith(("  warnings.warn", "  warn("))


def _load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # Windows
        return []


def read_metrics(run: Path) -> dict[str, float]:
    """The trainer's last validation Dice (on the resampled grid), from ``run/metrics.csv``."""
    path = run / "metrics.csv"
    if not path.is_file():
        return {}
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    for row in reversed(rows):
        value = row.get("val_dice", "")
        if value and value != "nan":
            return {"val_dice": float(value), "epoch": int(row["epoch"])}
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the shared real-CT folder (../shared/data)")
    parser.add_argument("--out", type=Path, required=True, help="folder for manifests, run, masks and reports")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs of the config")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--config", type=Path, default=CONFIG, help=f"training config (default {CONFIG.relative_to(REPO)})")
    parser.add_argument("--threads", type=int, default=None,
                        help="OpenMP/PyTorch threads per process (default: $OMP_NUM_THREADS, else 1; more threads "
                             "help only on idle cores: on a shared 2-core machine two threads made training 2-4x "
                             "slower)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed to `unetpp3d train`, e.g. --set train.seed=1 (repeatable)")
    parser.add_argument("--force", action="store_true", help="replace the outputs of an earlier check in --out")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    env = dict(os.environ)
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads {args.threads}: must be at least 1", file=sys.stderr)
            return 2
        env["OMP_NUM_THREADS"] = str(args.threads)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    try:
        if args.epochs is not None and args.epochs < 1:
            raise CheckError(f"--epochs {args.epochs}: must be at least 1")
        if not args.config.is_file():
            raise CheckError(f"--config {args.config}: no such file")
        cases = find_cases(args.data)
        out = args.out
        prepare_out(out, args.force)
        cases_json, train_json = write_manifests(args.data, out, cases)
    except CheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    out_abs = out.resolve()
    steps = {
        "check": ["check", "--manifest", str(cases_json.resolve()), "--out", str(out_abs)],
        "train": ["train", "--manifest", str(train_json.resolve()), "--config", str(args.config.resolve()),
                  "--out", str(out_abs / "run"), "--device", args.device,
                  *(["--epochs", str(args.epochs)] if args.epochs is not None else []),
                  *[a for override in args.overrides for a in ("--set", override)]],
        # infer and evaluate carry on past a case that fails and exit 1: the table shows which.
        "infer": ["infer", str(cases_json.resolve()), "--model", str(out_abs / "run"), "--out",
                  str(out_abs / "masks"), "--device", args.device],
        "evaluate": ["evaluate", "--pred", str(out_abs / "masks"), "--ref", str(cases_json.resolve()), "--out",
                     str(out_abs / "evaluation")],
    }
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    failed_step = None
    for name, step_args in steps.items():
        rc, timings[name], cpu[name] = run_step(name, step_args, out, env)
        if rc != 0 and (name in ("check", "train") or not (out / "masks").is_dir()):
            failed_step = f"`unetpp3d {name}` exited with status {rc}; see {out / 'logs' / f'{name}.log'}"
            break

    dice: dict[str, float] = {}
    if (out / "evaluation" / "evaluation.csv").is_file():
        with open(out / "evaluation" / "evaluation.csv", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if int(row["label"]) == 1:
                    dice[row["case"]] = float(row["dice"])
    rows, results = [], []
    for c in cases:
        mask_path = out / "masks" / f"{c.name}.nii.gz"
        try:
            scan = grid_of(read_sitk(args.data / c.image))
        except RuntimeError:
            scan, problems = None, ["scan unreadable by SimpleITK"]
        else:
            problems = grid_differences(grid_of(read_sitk(mask_path)), scan) if mask_path.is_file() else ["no mask"]
        d = dice.get(c.name, math.nan)
        passed = d > DICE_THRESHOLD and not problems
        results.append({"case": c.name, "format": c.format, "scanner": scanner_of(args.data / c.image),
                        "grid": describe_grid(scan) if scan else "?", "dice": d, "grid_problems": problems,
                        "passed": passed})
        rows.append([c.name, c.format, results[-1]["scanner"], results[-1]["grid"], f"{d:.4f}",
                     "same" if not problems else "; ".join(problems), "PASS" if passed else "FAIL"])
    total = time.perf_counter() - started
    metrics = read_metrics(out / "run")
    summary = {"threshold": DICE_THRESHOLD, "passed": failed_step is None and all(r["passed"] for r in results),
               "failed_step": failed_step, "cases": results, "seconds": {**timings, "total": total},
               "cpu_seconds": {**cpu, "total": sum(cpu.values())}, "load_average": _load_average(),
               "validation": metrics, "epochs": args.epochs, "overrides": args.overrides, "device": args.device,
               "threads": env["OMP_NUM_THREADS"], "config": str(args.config)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    header = ["case", "format", "scanner", "grid (x, y, z)", "Dice", "mask grid", "result"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    if metrics:
        print(f"trainer's validation Dice (epoch {metrics['epoch']}; mean of the cases on the 3 mm grid, before "
              f"post-processing): {metrics['val_dice']:.4f}")
    print("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()))
    print("CPU seconds:  " + ", ".join(f"{k} {v:.0f}" for k, v in summary["cpu_seconds"].items())
          + f" ({env['OMP_NUM_THREADS']} thread(s) per process; load average now "
          + ", ".join(f"{v:.2f}" for v in summary["load_average"]) + ")")
    if failed_step:
        print(f"FAIL: {failed_step}")
        return 1
    n_fail = sum(not r["passed"] for r in results)
    print(f"{'PASS' if not n_fail else 'FAIL'}: {len(results) - n_fail} of {len(results)} case(s) reach liver Dice > "
          f"{DICE_THRESHOLD} with a mask on the scan's own grid")
    return 0 if not n_fail else 1


if __name__ == "__main__":
    sys.exit(main())
