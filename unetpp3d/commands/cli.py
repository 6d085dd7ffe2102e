"""Command line: `unetpp3d check | synth | train | infer | evaluate | export-bundle | export-onnx | demo`.

Each command is a thin shell over one module's public function. A :class:`UserError` is printed
as one line, without a traceback, and the process exits with status 2. Options with a fixed set
of values are choices that click checks, and lists in ``--help``, before any command code runs.

Exit status, the same for every command (:func:`unetpp3d.errors.exit_status`): 0 all done; 2 a
problem the user can fix (a bad flag, manifest, config value or input file), also when it hits
only some cases of a batch; 1 some case failed for another reason (1 wins over 2); 130 Ctrl-C.
The console log (the ``unetpp3d`` logger at INFO, written above progress bars) is set up here,
once, in :func:`main`; library code only logs.

Options before the command apply to every command: ``--no-malloc-tuning`` leaves glibc's
allocator as it is (see :func:`unetpp3d.hardware.keep_freed_memory`).

The command modules are imported up front: importing them inside each command would save
`unetpp3d --help` only 0.10-0.16 s of CPU next to the 3.4-4.1 s that torch, MONAI and typer take
anyway (five runs on the 2-core development machine).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from tqdm.contrib.logging import logging_redirect_tqdm

from unetpp3d import __version__
from unetpp3d.bundle.export import export_bundle as write_bundle
from unetpp3d.commands.check import run_check
from unetpp3d.commands.demo import run_demo
from unetpp3d.commands.evaluate import run_evaluation
from unetpp3d.commands.infer import run_inference
from unetpp3d.commands.train import run_training
from unetpp3d.config import INFER_MODES
from unetpp3d.data.manifest import TASKS
from unetpp3d.errors import EXIT_USER, UserError
from unetpp3d.hardware import device_name, keep_freed_memory
from unetpp3d.imageio.writer import OUTPUT_TYPES
from unetpp3d.synth.phantom import write_dataset

EXIT_STATUS_HELP = ("Exit status: 0 all done; 2 a problem you can fix (a bad flag, manifest, config value or input "
                    "file), also when it hits only some cases of a batch; 1 some case failed for another reason.")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="3D UNet++ segmentation of CT scans (liver, lung nodules). Research software, not a medical device.",
    epilog=EXIT_STATUS_HELP,
)

# Options with a fixed set of values as choices: click refuses another value, and --help lists them.
Task = Enum("Task", {t: t for t in TASKS}, type=str)
Mode = Enum("Mode", {m: m for m in INFER_MODES}, type=str)
OutputType = Enum("OutputType", {t: t for t in OUTPUT_TYPES}, type=str)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"unetpp3d {__version__}")
        raise typer.Exit()


def device_option(value: Optional[str]) -> Optional[str]:
    """Check a ``--device`` value before anything loads; ``gpu`` and ``gpu:N`` mean ``cuda``.

    The name is read by :func:`unetpp3d.hardware.device_name`, as training and inference read it;
    whether the device is present is checked when the command picks it.

    Args:
        value: ``cpu``, ``cuda``, ``cuda:N``, ``gpu``, ``gpu:N`` (any case), or None for the default.

    Returns:
        The value as PyTorch names it (``cpu``, ``cuda`` or ``cuda:N``), or None.

    Raises:
        typer.BadParameter: anything else (click reports it as a usage error, exit status 2).
    """
    if value is None:
        return None
    try:
        return device_name(value)
    except UserError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
    malloc_tuning: bool = typer.Option(True, "--malloc-tuning/--no-malloc-tuning",
                                       help="Keep freed memory in the process for reuse (glibc): large CPU activations "
                                            "then reuse pages instead of faulting in fresh ones (faster on the CPU; "
                                            "the process keeps its peak memory until it ends)."),
) -> None:
    """The app's own options; each command does the work."""
    keep_freed_memory(malloc_tuning)  # see unetpp3d/hardware.py
    _quiet_monai_gpu_dicom_reader()


def _quiet_monai_gpu_dicom_reader() -> None:
    """Silence MONAI's notice that its GPU DICOM decoder is unavailable.

    MONAI's ``LoadImage`` builds every reader it knows even when given ours, and where pydicom is
    installed (the ``dicom`` extra brings it) its nvImageCodec reader logs a warning and warns
    on every load. unetpp3d reads DICOM with SimpleITK, so the notice says nothing to our users.
    """
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


@app.command()
def check(
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Dataset manifest (JSON)."),
    series_uid: Optional[str] = typer.Option(None, help="Pick this SeriesInstanceUID in DICOM folders holding several."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for <manifest>.fingerprint.json "
                                       "(default: the current folder, never beside the data)."),
    fingerprint: Optional[Path] = typer.Option(None, help="Write the dataset fingerprint to this file instead."),
) -> None:
    """Validate every case of a manifest, print a summary and write the dataset fingerprint.

    Exit status 2 when some case has a problem (each is printed), 0 when none has.
    """
    raise typer.Exit(run_check(manifest, series_uid=series_uid, fingerprint_path=fingerprint, out_dir=out))


@app.command()
def synth(
    task: Task = typer.Option("liver", help="Which phantoms: abdominal (liver) or chest (lung nodules)."),
    cases: int = typer.Option(8, help="Number of phantoms."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (NIfTI files plus manifest.json)."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same phantoms."),
    size: int = typer.Option(96, help="Edge length of each phantom in voxels (before random geometry)."),
    random_geometry: bool = typer.Option(False, help="Random spacing and orientation, to exercise geometry code."),
) -> None:
    """Write synthetic CT phantoms with labels and a manifest."""
    path = write_dataset(task=task.value, n_cases=cases, out_dir=out, seed=seed, size=size,
                         random_geometry=random_geometry)
    typer.echo(f"wrote {cases} {task.value} phantoms and {path}")


@app.command()
def train(
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Dataset manifest (JSON)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (default: the task's config)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<manifest>-<time>)."),
    resume: bool = typer.Option(False, help="Continue from OUT/last.pt with the run's config (a --config given "
                                "again must ask for the same values)."),
    force: bool = typer.Option(False, help="Overwrite an existing run folder."),
    epochs: Optional[int] = typer.Option(None, help="Override train.epochs."),
    device: Optional[str] = typer.Option(None, callback=device_option,
                                         help="cpu, cuda, cuda:N or gpu (= cuda) (default: cuda when available)."),
    fold: Optional[int] = typer.Option(None, help="Cross-validation fold (0-based) when the manifest has no validation "
                                                  "list: the dataset's own folds (nnU-Net splits_final.json beside a "
                                                  "dataset.json, Auto3DSeg 'fold' keys), else seeded data.folds."),
    set_: list[str] = typer.Option([], "--set", help="Config override KEY=VALUE, e.g. --set train.lr=0.001 (repeatable)."),
    fingerprint: Optional[Path] = typer.Option(None, help="Fingerprint written by `unetpp3d check`, reused while the "
                                               "cases' files are unchanged (default: ./<manifest>.fingerprint.json)."),
) -> None:
    """Train a 3D UNet++ on the cases of a manifest."""
    overrides = list(set_) + ([f"train.epochs={epochs}"] if epochs is not None else [])
    run_training(manifest=manifest, config_path=config, out_dir=out, resume=resume, force=force,
                 device=device, fold=fold, overrides=overrides, fingerprint_path=fingerprint)


@app.command()
def infer(
    inputs: list[Path] = typer.Argument(..., help="Scans: NIfTI/NRRD/MHA files, DICOM series folders, folders of scans, or a manifest."),
    out: Path = typer.Option(..., "--out", "-o", help="Mask file for one input (.nii.gz; .dcm with --output-type dicom-seg), or a folder for several."),
    model: Optional[list[Path]] = typer.Option(None, help="Checkpoint, run folder or exported bundle (default: the newest run in ./runs, printed). Repeat to ensemble models that share their preprocessing, such as the folds of a cross-validation: their probabilities are averaged."),
    mode: Optional[Mode] = typer.Option(None, help="accurate (mean of all heads' probabilities) or fast (pruned network) (default: the model's infer.mode, else accurate)."),
    prune_level: Optional[int] = typer.Option(None, help="Pruned UNet++ L^l for fast mode (default: the model's infer.prune_level; else the smallest level within 0.01 validation Dice of the best, from the run's pruning.json; else 2)."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Flip test-time augmentation, 8 flips (default: the model's infer.tta)."),
    overlap: Optional[float] = typer.Option(None, help="Sliding-window overlap (default: the model's infer.overlap)."),
    batch_size: Optional[int] = typer.Option(None, help="Windows per forward pass (default: the model's infer.sw_batch_size)."),
    device: Optional[str] = typer.Option(None, callback=device_option,
                                         help="cpu, cuda, cuda:N or gpu (= cuda) (default: cuda when available)."),
    amp: bool = typer.Option(True, help="Reduced precision where it pays: bf16 on the GPU and on CPUs that "
                                          "compute it natively (AMX, AVX512-BF16); --no-amp for fp32."),
    preview: Optional[Path] = typer.Option(None, help="PNG of the mask over the scan (one input) or a folder of PNGs."),
    skip_existing: bool = typer.Option(False, help="Skip inputs whose mask already exists."),
    series_uid: Optional[str] = typer.Option(None, help="Pick this SeriesInstanceUID in DICOM folders holding several."),
    trust_bundle: bool = typer.Option(False, help="Allow a bundle not written by unetpp3d (its JSON may run code)."),
    output_type: OutputType = typer.Option("nifti", help="nifti: compressed NIfTI masks (<case>.nii.gz); dicom-seg: "
                                                         "a DICOM SEG referencing the source series (<case>.dcm; "
                                                         "DICOM inputs only; needs highdicom: the dicom extra)."),
    save_probabilities: Optional[Path] = typer.Option(None, help="Also write the class probabilities: float32 NIfTI "
                                                                 "on the scan's grid, one volume per class (x, y, z, "
                                                                 "class); a .nii.gz for one input, else a folder of "
                                                                 "<case>.nii.gz (not the masks' folder)."),
    statistics: bool = typer.Option(False, "--statistics", "-s", help="Per class: volume in mL and mean/std HU "
                                                                      "inside the mask, in <case>.statistics.json "
                                                                      "beside each mask, and in statistics.csv for "
                                                                      "a folder of outputs."),
    points: Optional[Path] = typer.Option(None, help="CSV of nodule locations in the one input scan: coordX,coordY,coordZ in world LPS mm (as LUNA16), optional id. Segments the nodule at each point; OUT is a folder."),
    crop_mm: Optional[float] = typer.Option(None, help="With --points: edge of the cube cropped around each point, in mm (default 64)."),
) -> None:
    """Segment scans and write masks on each scan's own grid (or, with --points, the nodule at each point).

    Exit status 2 when some input has a problem you can fix (missing, unreadable), 1 when some
    case failed otherwise; each failed case is listed in the summary.
    """
    raise typer.Exit(run_inference(
        inputs=inputs, out=out, model=model or None, mode=mode.value if mode else None, prune_level=prune_level,
        tta=tta, overlap=overlap, batch_size=batch_size, device=device, amp=amp, preview=preview,
        skip_existing=skip_existing, series_uid=series_uid, trust_bundle=trust_bundle, output_type=output_type.value,
        save_probabilities=save_probabilities, statistics=statistics, points=points, crop_mm=crop_mm,
    ))


@app.command()
def evaluate(
    pred: Path = typer.Option(..., help="Predicted masks: a file, a folder or a manifest."),
    ref: Path = typer.Option(..., help="Reference masks: a file, a folder or a manifest."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder receiving evaluation.csv (per case and "
                                                                  "label) and summary.json (default: the current "
                                                                  "folder)."),
    tolerance_mm: float = typer.Option(2.0, help="Tolerance of the surface Dice, in mm."),
) -> None:
    """Score predicted masks against references: Dice, IoU, HD95, surface Dice, volumes, detections.

    A label absent from both prediction and reference has no Dice (null) and is left out of the
    means, as in nnU-Net and in training validation.
    """
    raise typer.Exit(run_evaluation(pred=pred, ref=ref, out=out, tolerance_mm=tolerance_mm))


@app.command("export-bundle")
def export_bundle(
    model: Path = typer.Option(..., help="Checkpoint or run folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write."),
    force: bool = typer.Option(False, help="Write into a non-empty folder."),
) -> None:
    """Export a trained model as a MONAI Bundle that `python -m monai.bundle run` executes."""
    path = write_bundle(model=model, out=out, force=force)
    typer.echo(f"bundle written to {path}")


@app.command("export-onnx")
def export_onnx(
    model: Path = typer.Argument(..., help="Checkpoint, run folder or bundle exported by unetpp3d."),
    out: Path = typer.Option(..., "--out", "-o", help="ONNX file to write."),
    mode: Optional[str] = typer.Option(None, help="accurate (every head, probabilities averaged) or fast (pruned "
                                       "network); default: the model's own infer.mode, as infer."),
    prune_level: Optional[int] = typer.Option(None, help="Pruned UNet++ L^l for fast mode (default: as infer: the "
                                              "model's, else its run's pruning table, else 2)."),
) -> None:
    """Export the network in one inference mode as ONNX (needs the onnx extra), checked in onnxruntime."""
    from unetpp3d.commands.export_onnx import describe, run_export_onnx

    typer.echo(describe(run_export_onnx(model, out, mode=mode, prune_level=prune_level)))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Where the demo writes everything."),
    device: Optional[str] = typer.Option(None, callback=device_option,
                                         help="cpu, cuda or gpu (= cuda) (default: cuda when available)."),
) -> None:
    """Train a small UNet++ on synthetic abdominal phantoms, segment held-out ones, print the Dice."""
    raise typer.Exit(run_demo(out_dir=out, device=device))


@contextlib.contextmanager
def _console_logging() -> Iterator[None]:
    """The ``unetpp3d`` log on the console at INFO, above the progress bars, unless the host set up logging."""
    logger = logging.getLogger("unetpp3d")
    if logger.hasHandlers():
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        # Swaps our console handler for one that writes through tqdm, so bars are not torn.
        with logging_redirect_tqdm(loggers=[logger]):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: set up console logging, run the app, turn user errors into one line and exit status 2."""
    try:
        with _console_logging():
            # Standalone mode lets click report usage errors itself (exit status 2) and exit.
            app(args=argv, prog_name="unetpp3d")
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USER)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
