"""`unetpp3d demo`: the whole pipeline on synthetic abdominal phantoms, in minutes on a CPU.

synth -> check -> train (small UNet++, ``resources/demo.yaml``) -> infer on held-out phantoms
-> evaluate -> preview PNG. Every stage is the same public function the command line uses; the
demo only chooses small sizes. Nothing it trains is a clinical model.
"""

from __future__ import annotations

import shutil
import statistics
import time
from importlib import resources
from pathlib import Path

from unetpp3d.atomic import atomic_write_text
from unetpp3d.commands.check import run_check
from unetpp3d.commands.evaluate import run_evaluation
from unetpp3d.commands.infer import run_inference
from unetpp3d.commands.train import run_training
from unetpp3d.data.manifest import load_manifest
from unetpp3d.errors import UserError
from unetpp3d.evaluation.metrics import evaluate_case
from unetpp3d.synth.phantom import SYNTH_MANIFEST, write_dataset

DEMO_CASES = 14  # about 20% are held out for testing by the phantom writer


DEMO_SIZE = 64  # voxels per axis: 6 mm voxels over the phantoms' 384 mm field of view


DEMO_SEED = 0


TARGET_DICE = 0.90


DEMO_MARKER = ".unetpp3d-demo"  # marks a folder the demo made, whose contents it may replace


DEMO_ENTRIES = {DEMO_MARKER, "data", "run", "masks", "previews", "evaluation.csv", "summary.json", "manifest.fingerprint.json"}


def _previous_demo(out: Path) -> bool:
    """A demo folder from before the marker: only the demo's entries, and phantoms in data/."""
    entries = {p.name for p in out.iterdir()}
    return entries <= DEMO_ENTRIES and (out / "data" / "manifest.json").is_file() \
        and SYNTH_MANIFEST.is_ours(out / "data" / "manifest.json")


def demo_config_path() -> Path:
    """The demo's training config, shipped inside the package."""
    return Path(str(resources.files("unetpp3d") / "resources" / "demo.yaml"))


def run_demo(out_dir: str | Path = "demo_out", device: str | None = None) -> int:
    """Run the demo and print where everything went.

    Args:
        out_dir: folder for the phantoms, the run, the masks, the previews and the table. A
            previous demo's files there are replaced.
        device: ``"cpu"`` or ``"cuda"``; default CUDA when available.

    Returns:
        0 when the mean liver Dice on the held-out phantoms reaches 0.90, else 1.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; pick another --out")
    marker = out / DEMO_MARKER
    if out.is_dir() and any(out.iterdir()) and not marker.is_file() and not _previous_demo(out):
        # The demo replaces its data/, run/ and masks/ folders: never those of a folder it did not make.
        raise UserError(f"--out {out}: the folder holds files and is not a previous demo's (no {DEMO_MARKER}); "
                        "the demo replaces what it finds there, so pick a new or empty folder")
    atomic_write_text(marker, "written by `unetpp3d demo`; the demo may replace everything in this folder\n")
    started = time.monotonic()
    say = print

    say(f"unetpp3d demo -> {out}  (synthetic data; not a clinical model)")
    say(f"[1/5] writing {DEMO_CASES} synthetic abdominal phantoms ({DEMO_SIZE}^3 voxels)")
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)  # phantoms are cheap and deterministic: always start from the same set
    manifest = write_dataset(task="liver", n_cases=DEMO_CASES, out_dir=data, seed=DEMO_SEED, size=DEMO_SIZE)

    say("[2/5] checking the dataset")
    fingerprint = out / f"{manifest.stem}.fingerprint.json"  # in the demo's folder; training reuses it
    if run_check(manifest, fingerprint_path=fingerprint) != 0:
        raise UserError(f"{manifest}: the generated phantoms failed `unetpp3d check`; this is a bug, please report it")

    say("[3/5] training a small UNet++ (progress per epoch below)")
    run = run_training(manifest=manifest, config_path=demo_config_path(), out_dir=out / "run", force=True,
                       device=device, fingerprint_path=fingerprint)

    say("[4/5] segmenting the held-out phantoms")
    test_cases = load_manifest(manifest).test
    masks = out / "masks"
    if masks.exists():
        shutil.rmtree(masks)
    previews = out / "previews"
    status = run_inference(inputs=[c.image for c in test_cases], out=masks, model=run, device=device,
                           preview=previews)
    if status != 0:
        raise UserError(f"inference failed on some held-out phantom; see the messages above and {run}/train.log")

    say("[5/5] scoring against the phantoms' labels")
    references = data / "labelsTs"  # the phantom writer keeps the held-out labels out of the manifest
    run_evaluation(pred=masks, ref=references, out=out)  # evaluation.csv and summary.json
    dice = [row.dice for c in test_cases
            for row in evaluate_case(masks / f"{c.name}.nii.gz", references / f"{c.name}.nii.gz")]
    mean_dice = statistics.fmean(dice)

    minutes = (time.monotonic() - started) / 60
    say("")
    say(f"held-out liver Dice: mean {mean_dice:.3f} over {len(dice)} phantoms "
        f"(min {min(dice):.3f}, max {max(dice):.3f}); target {TARGET_DICE:.2f}; {minutes:.1f} min in all")
    say("written:")
    for label, path in [
        ("phantoms + manifest", manifest),
        ("dataset fingerprint", fingerprint),
        ("run folder (checkpoints, config.yaml, train.log, TensorBoard)", run),
        ("training curves", run / "curves.png"),
        ("metrics per epoch", run / "metrics.csv"),
        ("masks", masks),
        ("previews (mask over scan)", previews),
        ("evaluation table", out / "evaluation.csv"),
        ("evaluation summary (means per label)", out / "summary.json"),
    ]:
        say(f"  {label:<62} {path}")
    if mean_dice < TARGET_DICE:
        say(f"mean Dice {mean_dice:.3f} is below the demo's target of {TARGET_DICE:.2f}")
        return 1
    return 0
