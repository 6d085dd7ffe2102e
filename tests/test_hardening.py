"""Hardening: huge headers, interruptions, concurrent writers, untrusted checkpoints and bundles, odd paths.

What already has tests elsewhere is not repeated here: a SIGKILL while a checkpoint is written
(test_checkpoint), resume after SIGKILL and SIGTERM's last.pt (test_trainer), a pickle that would
run code through ``load_checkpoint`` (test_checkpoint), a foreign bundle refused by
``Predictor.from_source`` (test_predictor). Corrupted files and manifests are fuzzed in test_fuzz.

Models are tiny (features 4, 8, 16; 32^3 windows; 8 mm voxels) with random weights: these tests
check what is written and when, not accuracy. Subprocesses run with one OpenMP thread.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from factories import ONE_THREAD, tiny_payload, write_image
from factories import noisy_sphere as sphere

from unetpp3d.commands.infer import run_inference
from unetpp3d.errors import UserError
from unetpp3d.imageio.readers import read_image
from unetpp3d.inference.predictor import Predictor
from unetpp3d.model.checkpoint import load_checkpoint
from unetpp3d.model.network import UNetPlusPlus3D

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
ONE_THREAD_UTF8 = {**ONE_THREAD, "PYTHONIOENCODING": "utf-8"}
TINY = ["model.features=[4,8,16]", "data.patch_size=[32,32,32]", "data.batch_size=2", "data.num_workers=0",
        "train.iterations_per_epoch=4", "train.val_every=1", "train.amp=off"]
N_SCANS = 12
GiB = 1024**3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def unetpp3d(*args: str | Path, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run the command line in a subprocess (the console script when installed), text decoded as UTF-8."""
    script = Path(sys.executable).with_name("unetpp3d")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "unetpp3d"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, encoding="utf-8", errors="replace",
                          env=ONE_THREAD_UTF8, timeout=timeout, **kwargs)


class Background:
    """The command line running in the background, its output going to a file (a pipe could fill and block it)."""

    def __init__(self, *args: str | Path):
        script = Path(sys.executable).with_name("unetpp3d")
        cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "unetpp3d"]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([*cmd, *map(str, args)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=ONE_THREAD_UTF8)

    def output(self, timeout: float = 600) -> str:
        """Wait for the end and return what it printed."""
        self.proc.wait(timeout=timeout)
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "best.pt"
    torch.save(tiny_payload(), path)
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """N_SCANS small scans in one folder, each a little different."""
    folder = tmp_path_factory.mktemp("scans")
    for i in range(N_SCANS):
        write_image(folder / f"case{i:02d}.nii.gz", sphere(radius=5.0 + i % 4, seed=i), spacing=(1.5, 1.5, 2.0))
    return folder


@pytest.fixture(scope="module")
def reference_masks(model, scans, tmp_path_factory) -> dict[str, np.ndarray]:
    """What one uninterrupted process writes for every scan."""
    out = tmp_path_factory.mktemp("reference")
    assert run_inference([scans], out, model=model, device="cpu") == 0
    masks = {p.name: read_image(p, is_label=True)[0] for p in sorted(out.iterdir())}
    assert len(masks) == N_SCANS
    return masks


def assert_masks_match(out: Path, reference: dict[str, np.ndarray], names=None) -> None:
    for name in names if names is not None else reference:
        np.testing.assert_array_equal(read_image(out / name, is_label=True)[0], reference[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# Inputs too large for memory: refused from the header, with an estimate
# ---------------------------------------------------------------------------------------------


def huge_header(path: Path, sizes=(2048, 2048, 2048), dtype="int16") -> Path:
    """A file whose header declares ``sizes`` voxels, followed by a few bytes of data."""
    name = path.name
    data = b"\0" * 64
    if name.endswith((".nii", ".nii.gz")):
        header = nib.Nifti1Header()
        header.set_data_shape(sizes)
        header.set_data_dtype(np.dtype(dtype))
        header.set_zooms((1.0, 1.0, 1.0))
        header["vox_offset"] = 352
        raw = header.binaryblock + b"\0" * 4 + data
        path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    elif name.endswith(".nrrd"):
        kind = {"int16": "short", "float64": "double"}[dtype]
        encoding = "gzip" if "gzip" in name else "raw"
        head = (f"NRRD0004\ntype: {kind}\ndimension: 3\nsizes: {' '.join(map(str, sizes))}\n"
                f"spacings: 1 1 1\nendian: little\nencoding: {encoding}\n\n").encode()
        path.write_bytes(head + (gzip.compress(data) if encoding == "gzip" else data))
    else:
        kind = {"int16": "MET_SHORT", "float64": "MET_DOUBLE"}[dtype]
        compressed = "zlib" in name
        head = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
                f"CompressedData = {compressed}\nElementSpacing = 1 1 1\nDimSize = {' '.join(map(str, sizes))}\n"
                f"ElementType = {kind}\nElementDataFile = LOCAL\n").encode()
        path.write_bytes(head + (zlib.compress(data) if compressed else data))
    return path


HUGE_FILES = ["huge.nii.gz", "huge.nii", "huge.nrrd", "huge-gzip.nrrd", "huge.mha", "huge-zlib.mha"]


@pytest.mark.parametrize("name", HUGE_FILES)
def test_a_2048_cubed_header_on_tiny_data_is_refused_with_an_estimate(tmp_path, monkeypatch, name):
    import unetpp3d.imageio.formats as readers

    monkeypatch.setattr(readers, "_available_memory", lambda: 8 * GiB)  # the same answer on every machine
    path = huge_header(tmp_path / name)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with pytest.raises(UserError) as exc:
        read_image(path)
    message = str(exc.value)
    # 2048^3 voxels x 2 bytes, held twice while converting = 32 GiB
    expected = f"{path}: reading it needs about 32.0 GiB of memory (8,589,934,592 voxels of 2 bytes"
    assert message.startswith(expected), message
    assert "only 8.0 GiB is available" in message and "crop or downsample" in message
    assert time.perf_counter() - start < 5.0
    # refused from the header: nothing near the declared size was allocated
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak < GiB


def test_huge_headers_through_unetpp3d_check_use_the_real_free_memory(tmp_path):
    """No monkeypatching: 2048^3 doubles need 128 GiB (twice 64 GiB); either refused for memory or as truncated."""
    import unetpp3d.imageio.formats as readers

    paths = [huge_header(tmp_path / n.replace("huge", f"huge64_{i}"), dtype="float64")
             for i, n in enumerate(HUGE_FILES)]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"labels": {"0": "background", "1": "liver"}, "training": [],
                                    "test": [str(p) for p in paths]}))
    from unetpp3d.commands.check import run_check

    assert run_check(manifest) == 2
    enough = (readers._available_memory() or 0) >= 128 * GiB
    for path in paths:
        with pytest.raises(UserError, match="truncated" if enough else r"needs about 128\.0 GiB of memory"):
            read_image(path)


# ---------------------------------------------------------------------------------------------
# infer: SIGKILL mid-run, and two processes writing into one folder
# ---------------------------------------------------------------------------------------------


def final_masks(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []


@pytest.mark.slow
def test_sigkill_during_infer_leaves_only_complete_masks_and_a_rerun_finishes(model, scans, reference_masks,
                                                                              tmp_path):
    out = tmp_path / "masks"
    run = Background("infer", scans, "--out", out, "--model", model, "--device", "cpu")
    deadline = time.monotonic() + 300
    try:
        while len(final_masks(out)) < 2:  # some cases done, more to come
            assert run.proc.poll() is None, f"infer ended before it could be killed:\n{run.output()}"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        run.proc.send_signal(signal.SIGKILL)
        run.output()
    assert run.proc.returncode == -signal.SIGKILL
    done = final_masks(out)
    assert 2 <= len(done) < N_SCANS, done
    # Every file named like a mask is a whole one, with the voxels an uninterrupted run writes;
    # anything else is one of atomic_path's dot-prefixed temporaries.
    assert_masks_match(out, reference_masks, done)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert all(".part" in name for name in leftovers), leftovers
    stamps = {name: (out / name).stat().st_mtime_ns for name in done}

    result = unetpp3d("infer", scans, "--out", out, "--model", model, "--device", "cpu", "--skip-existing")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{N_SCANS - len(done)} segmented, {len(done)} skipped, 0 failed" in result.stdout
    assert final_masks(out) == sorted(reference_masks)
    assert_masks_match(out, reference_masks)
    assert {name: (out / name).stat().st_mtime_ns for name in done} == stamps  # finished cases left alone
    # A leftover temporary is never taken for a mask by the commands that read mask folders.
    (out / ".case00.nii.gz.abc123.part.nii.gz").write_bytes(b"half a file")
    from unetpp3d.commands.evaluate import collect_masks
    from unetpp3d.commands.infer import expand_inputs

    assert sorted(collect_masks(out, "prediction")) == sorted(n[:-7] for n in reference_masks)
    assert [c.name for c in expand_inputs([out])] == [n[:-7] for n in sorted(reference_masks)]


@pytest.mark.slow
def test_two_infer_processes_writing_into_one_folder_do_not_corrupt_each_other(model, scans, reference_masks,
                                                                                tmp_path):
    out = tmp_path / "shared"
    files = sorted(scans.iterdir())
    # The middle third is written by both, the second process going backwards so that they meet there.
    first, second = files[: N_SCANS * 2 // 3], files[N_SCANS // 3:][::-1]
    runs = [Background("infer", *part, "--out", out, "--model", model, "--device", "cpu") for part in (first, second)]
    outputs = [r.output() for r in runs]
    assert [r.proc.returncode for r in runs] == [0, 0], outputs
    assert final_masks(out) == sorted(reference_masks)
    assert_masks_match(out, reference_masks)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


# ---------------------------------------------------------------------------------------------
# train: SIGINT saves last.pt and the run resumes (SIGTERM and SIGKILL: see test_trainer)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigint_during_train_saves_last_pt_and_the_run_resumes(tmp_path):
    from unetpp3d.commands.train import run_training
    from unetpp3d.synth.phantom import write_dataset

    phantoms = write_dataset("liver", 3, tmp_path / "phantoms", seed=0, size=32)
    run = tmp_path / "run"
    training = Background("train", "--manifest", phantoms, "--config", SMOKE, "--out", run, "--device", "cpu",
                          *[a for o in TINY + ["train.epochs=50", "train.val_every=50"] for a in ("--set", o)])

    def saved_epoch() -> int:
        try:
            return int(load_checkpoint(run / "last.pt")["epoch"])
        except UserError:
            return -1

    deadline = time.monotonic() + 300
    while saved_epoch() < 1:
        assert training.proc.poll() is None and time.monotonic() < deadline, training.output()
        time.sleep(0.05)
    training.proc.send_signal(signal.SIGINT)
    output = training.output(timeout=300)
    assert training.proc.returncode == 128 + signal.SIGINT, output
    assert "stopped by SIGINT" in output and "--resume" in output and "Traceback" not in output
    saved = saved_epoch()
    assert 1 <= saved < 50
    with open(run / "metrics.csv", newline="") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == list(range(1, saved + 1))

    run_training(phantoms, out_dir=run, resume=True, device="cpu", overrides=[f"train.epochs={saved + 1}"])
    assert load_checkpoint(run / "last.pt")["epoch"] == saved + 1
    with open(run / "metrics.csv", newline="") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == list(range(1, saved + 2))
    assert f"resuming at epoch {saved + 1}/{saved + 1}" in (run / "train.log").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Untrusted checkpoints and bundles
# ---------------------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this would call os.mkdir(marker): a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def scan(tmp_path) -> Path:
    return write_image(tmp_path / "scan.nii.gz", sphere(), spacing=(1.5, 1.5, 2.0))


def cli_error(args: list[str], capsys) -> str:
    """Run ``unetpp3d.commands.cli.main`` in-process; it must exit with status 2 and one line on stderr."""
    from unetpp3d.commands.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_infer_refuses_a_checkpoint_that_would_run_code(tmp_path, scan, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({**tiny_payload(), "extra": RunsCode(marker)}, evil)  # plain torch.save pickles anything
    err = cli_error(["infer", str(scan), "--out", str(tmp_path / "out"), "--model", str(evil), "--device", "cpu"],
                    capsys)
    assert f"{evil}: refused" in err and "could run code" in err and "mkdir" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def marker_expression(marker: Path) -> str:
    return f"$__import__('pathlib').Path({str(marker)!r}).mkdir()"


def foreign_bundle(folder: Path, marker: Path) -> Path:
    """A MONAI Bundle not exported by unetpp3d whose inference.json runs code when its network is built."""
    payload = tiny_payload()
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0", "name": "someone else's"}))
    args = {k: v for k, v in payload["model_args"].items() if k != "features"}
    inference = {
        "side_effect": marker_expression(marker),
        "network_def": {"_target_": "unetpp3d.model.network.UNetPlusPlus3D", **args,
                        "features": "$@side_effect or [4, 8, 16]"},
        "preprocessing": payload["preprocessing"],
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    torch.save(payload["state_dict"], folder / "models" / "model.pt")
    return folder


def test_a_foreign_bundle_is_refused_without_trust_bundle_and_its_code_does_not_run(tmp_path, scan, capsys):
    marker = tmp_path / "code-ran"
    bundle = foreign_bundle(tmp_path / "foreign bundle", marker)
    err = cli_error(["infer", str(scan), "--out", str(tmp_path / "out"), "--model", str(bundle), "--device", "cpu"],
                    capsys)
    assert "was not exported by unetpp3d" in err and "--trust-bundle" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    # --trust-bundle is what allows its code to run: the expression is evaluated when the network is built.
    predictor = Predictor.from_source(bundle, device="cpu", trust_bundle=True, progress=False)
    assert marker.is_dir() and isinstance(predictor.network, UNetPlusPlus3D)


@pytest.fixture(scope="module")
def exported_bundle(tmp_path_factory) -> Path:
    """A bundle written by `unetpp3d export-bundle` from a tiny checkpoint."""
    from unetpp3d.bundle.export import export_bundle

    folder = tmp_path_factory.mktemp("export")
    torch.save(tiny_payload(), folder / "best.pt")
    return export_bundle(folder / "best.pt", folder / "bundle")


def test_infer_reads_its_own_bundle_as_data_and_never_evaluates_its_expressions(exported_bundle, model, scan,
                                                                                 tmp_path):
    """Expressions planted in the bundle's JSON (inference.json and metadata.json) are not run by `infer`."""
    bundle = tmp_path / "bundle"
    shutil.copytree(exported_bundle, bundle)
    markers = [tmp_path / f"code-ran-{i}" for i in range(3)]
    inference_path = bundle / "configs" / "inference.json"
    inference = json.loads(inference_path.read_text(encoding="utf-8"))
    assert any(isinstance(v, str) and v.startswith("$") for v in inference.values())  # it has expressions
    inference["network_def"] = marker_expression(markers[0])
    inference["device"] = marker_expression(markers[1])
    inference_path.write_text(json.dumps(inference), encoding="utf-8")
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["description"] = marker_expression(markers[2])
    meta_path.write_text(json.dumps(meta), encoding="utf-8")

    out = tmp_path / "mask.nii.gz"
    assert run_inference([scan], out, model=bundle, device="cpu") == 0
    assert not any(m.exists() for m in markers)
    # the same network and preprocessing as the checkpoint it came from
    expected = Predictor.from_source(model, device="cpu", progress=False).predict(scan).mask_xyz
    np.testing.assert_array_equal(read_image(out, is_label=True)[0], expected)


def test_a_bundle_with_unparseable_metadata_is_a_user_error(tmp_path, scan):
    bundle = foreign_bundle(tmp_path / "bundle", tmp_path / "marker")
    (bundle / "configs" / "metadata.json").write_text("[" * 100_000 + "]" * 100_000)  # nested past the parser
    with pytest.raises(UserError, match="metadata.json: not readable JSON"):
        Predictor.from_source(bundle, device="cpu", trust_bundle=True)
    (bundle / "configs" / "metadata.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(UserError, match="metadata.json: not readable JSON"):
        Predictor.from_source(bundle, device="cpu")


@pytest.mark.slow
def test_untrusted_models_through_the_installed_command(tmp_path, scan):
    """The console script itself: exit status 2, one line on stderr, and the code did not run."""
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({**tiny_payload(), "extra": RunsCode(marker)}, evil)
    bundle = foreign_bundle(tmp_path / "foreign", marker)
    for source, expected in ((evil, "could run code"), (bundle, "--trust-bundle")):
        result = unetpp3d("infer", scan, "--out", tmp_path / "out", "--model", source, "--device", "cpu")
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
        assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Paths with spaces and non-ASCII characters, through every command
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unicode_and_spaces_in_paths_through_every_command(tmp_path):
    from unetpp3d.data.manifest import load_manifest, write_manifest

    root = tmp_path / "tmp" / "Ünïcode dir"
    synth = root / "synth ø"
    result = unetpp3d("synth", "--task", "liver", "--cases", "3", "--size", "32", "--out", synth)
    assert result.returncode == 0, result.stderr
    # Rename every file to "scan N.nii.gz" in folders with spaces and accents.
    images, labels = root / "images ä", root / "labels ö"
    images.mkdir()
    labels.mkdir()
    cases = []
    for i, case in enumerate(load_manifest(synth / "manifest.json").training, start=1):
        image, label = images / f"scan {i}.nii.gz", labels / f"scan {i}.nii.gz"
        shutil.copy(case.image, image)
        shutil.copy(case.label, label)
        cases.append((image, label))
    manifest = write_manifest(root / "dataset ü.json", training=cases, labels={0: "background", 1: "liver"},
                              task="liver")
    names = [f"scan {i}.nii.gz" for i in range(1, len(cases) + 1)]
    assert len(names) >= 2

    result = unetpp3d("check", "--manifest", manifest, "--out", root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (root / "dataset ü.fingerprint.json").is_file()

    run = root / "run ß"
    result = unetpp3d("train", "--manifest", manifest, "--config", SMOKE, "--out", run, "--device", "cpu",
                      *[a for o in TINY + ["train.epochs=1", "train.iterations_per_epoch=2"] for a in ("--set", o)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert (run / "last.pt").is_file() and str(run) in (run / "train.log").read_text(encoding="utf-8")

    masks = root / "masks é"
    result = unetpp3d("infer", images, "--out", masks, "--model", run, "--device", "cpu",
                      "--preview", root / "previews ç")
    assert result.returncode == 0, result.stdout + result.stderr
    assert final_masks(masks) == names
    assert (root / "previews ç" / "scan 1.png").is_file()
    single = root / "one mask ñ.nii.gz"
    result = unetpp3d("infer", images / "scan 1.nii.gz", "--out", single, "--model", run, "--device", "cpu")
    assert result.returncode == 0 and single.is_file(), result.stdout + result.stderr

    scores = root / "scores ü"
    result = unetpp3d("evaluate", "--pred", masks, "--ref", labels, "--out", scores)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(scores / "evaluation.csv", newline="", encoding="utf-8") as fh:
        assert sorted(r["case"] for r in csv.DictReader(fh)) == [n[:-7] for n in names]

    bundle = root / "bündle ü"
    result = unetpp3d("export-bundle", "--model", run, "--out", bundle)
    assert result.returncode == 0, result.stdout + result.stderr
    from_bundle = root / "from bündle"
    result = unetpp3d("infer", images, "--out", from_bundle, "--model", bundle, "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert final_masks(from_bundle) == names
    for name in names:
        np.testing.assert_array_equal(read_image(from_bundle / name)[0], read_image(masks / name)[0])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", "dicom"])
def test_every_format_reads_and_writes_under_unicode_paths_with_spaces(tmp_path, suffix):
    from factories import write_dicom_series

    from unetpp3d.imageio.writer import write_mask

    folder = tmp_path / "tmp" / "Ünïcode dir" / "Ωmega ç"
    volume = sphere(shape=(8, 8, 4))
    if suffix == "dicom":
        path = write_dicom_series(folder / "séries 1", n=4)
        volume = None  # write_dicom_series has its own pixels
    else:
        path = write_image(folder / f"scan 1{suffix}", volume, spacing=(0.5, 0.5, 2.0))
    array, geometry = read_image(path)
    assert geometry.size == (8, 8, 4)
    if volume is not None:
        np.testing.assert_array_equal(array, volume)
    mask = write_mask(array > 0, geometry, folder / "masks ü" / "scan 1.nii.gz")
    np.testing.assert_array_equal(read_image(mask, is_label=True)[0], (array > 0).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# A full disk: every command ends in one line and a non-zero status, and leaves no partial file
# ---------------------------------------------------------------------------------------------


def _no_partial_files(folder: Path) -> None:
    """Every file under its final name is whole; no temporary is left behind."""
    for path in folder.rglob("*"):
        assert ".part" not in path.name, path
        if path.is_file() and path.name.endswith(".nii.gz"):
            read_image(path)


def _full_disk(monkeypatch) -> None:
    """Make every fsync report a full disk, as a filesystem with delayed allocation does."""
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)


def test_a_full_disk_during_infer_fails_the_case_and_writes_no_mask(model, scans, tmp_path, monkeypatch, capsys):
    out = tmp_path / "masks"
    _full_disk(monkeypatch)
    assert run_inference([scans / "case00.nii.gz"], out, model=model, device="cpu") == 2  # a user-fixable failure (errors.exit_status)
    printed = capsys.readouterr().out
    assert "failed" in printed and "could not write the file" in printed and "No space left" in printed
    assert not list(out.glob("*.nii.gz")) and not any(p.name.startswith(".") for p in out.iterdir())


def test_a_full_disk_during_export_bundle_is_one_line(model, tmp_path, monkeypatch, capsys):
    _full_disk(monkeypatch)
    err = cli_error(["export-bundle", "--model", str(model), "--out", str(tmp_path / "bundle")], capsys)
    assert "could not write the file" in err and "No space left" in err and ".part" not in err
    assert not any(tmp_path.iterdir())  # neither the bundle nor its staging folder


def test_a_full_disk_during_train_is_one_line(tmp_path, monkeypatch, capsys):
    from unetpp3d.synth.phantom import write_dataset

    manifest = write_dataset("liver", 3, tmp_path / "data", size=32)
    _full_disk(monkeypatch)
    run = tmp_path / "run"
    err = cli_error(["train", "--manifest", str(manifest), "--config", str(SMOKE), "--out", str(run), "--device",
                     "cpu", *[a for o in TINY + ["train.epochs=1"] for a in ("--set", o)]], capsys)
    assert f"{run}" in err and "could not write the file" in err
    assert not (run / "last.pt").exists()
    _no_partial_files(run)


def test_a_full_disk_during_synth_check_and_evaluate_is_one_line(tmp_path, monkeypatch, capsys):
    from unetpp3d.synth.phantom import write_dataset

    manifest = write_dataset("liver", 3, tmp_path / "data", size=16)
    with monkeypatch.context() as patch:
        _full_disk(patch)
        assert "could not write" in cli_error(["synth", "--out", str(tmp_path / "more"), "--cases", "2", "--size",
                                               "16"], capsys)
        assert "fingerprint.json: could not write" in cli_error(["check", "--manifest", str(manifest), "--out",
                                                                 str(tmp_path / "fp")], capsys)
        assert "evaluation.csv: could not write" in cli_error(
            ["evaluate", "--pred", str(tmp_path / "data" / "labelsTr"), "--ref", str(manifest), "--out",
             str(tmp_path / "scores")], capsys)
    assert not (tmp_path / "more" / "manifest.json").exists()
    _no_partial_files(tmp_path)


def _file_size_limit(limit: int):
    """A child process whose writes past ``limit`` bytes fail (EFBIG), as they would on a full disk."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


@pytest.mark.slow
def test_real_short_writes_through_every_command(model, scans, tmp_path):
    """The kernel itself refusing bytes (a file-size limit): ITK's NIfTI writer returns as if all went well."""
    synth = unetpp3d("synth", "--out", tmp_path / "data", "--cases", "3", "--size", "32",
                     preexec_fn=_file_size_limit(20_000))
    assert synth.returncode == 2 and "could not write the file" in _one_error_line(synth)
    _no_partial_files(tmp_path / "data")

    masks = tmp_path / "masks"
    infer = unetpp3d("infer", scans / "case00.nii.gz", "--out", masks, "--model", model, "--device", "cpu",
                     preexec_fn=_file_size_limit(300))
    assert infer.returncode == 2 and "could not write the file" in infer.stdout, infer.stdout + infer.stderr
    assert not masks.exists() or not any(masks.iterdir())

    manifest = tmp_path / "ok" / "manifest.json"
    assert unetpp3d("synth", "--out", manifest.parent, "--cases", "3", "--size", "32").returncode == 0
    run = tmp_path / "run"
    train = unetpp3d("train", "--manifest", manifest, "--config", SMOKE, "--out", run, "--device", "cpu",
                     *[a for o in TINY + ["train.epochs=1"] for a in ("--set", o)],
                     preexec_fn=_file_size_limit(20_000))
    assert train.returncode == 2 and "last.pt: could not write the file" in _one_error_line(train)

    bundle = unetpp3d("export-bundle", "--model", model, "--out", tmp_path / "bundle",
                      preexec_fn=_file_size_limit(20_000))
    assert bundle.returncode == 2 and "could not write the file" in _one_error_line(bundle)
    assert not (tmp_path / "bundle").exists()


# ---------------------------------------------------------------------------------------------
# FIFOs and devices anywhere a file is read: one line, never a hang
# ---------------------------------------------------------------------------------------------


def _cli_within(args: list[str], timeout: float = 60) -> int:
    """Run the command line in a thread: a regression that blocks on a FIFO fails here instead of hanging."""
    from unetpp3d.commands.cli import main

    outcome: dict = {}

    def target() -> None:
        try:
            main(args)
        except SystemExit as exc:
            outcome["code"] = exc.code

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        pytest.fail(f"unetpp3d {' '.join(args)} blocked for {timeout} s")
    return outcome.get("code", 0)


def test_fifos_and_devices_are_refused_wherever_a_file_is_read(model, scan, tmp_path, capsys):
    fifo = tmp_path / "pipe"
    fifo.mkdir()
    for name in ("scan.nii.gz", "manifest.json", "config.yaml", "model.pt", "mask.nii.gz", "scan.mhd"):
        os.mkfifo(fifo / name)
    (fifo / "scan.raw").symlink_to("/dev/zero")
    out = tmp_path / "out"

    def refused(args: list[str], code: int = 2) -> str:
        assert _cli_within([str(a) for a in args]) == code
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return captured.out + captured.err

    assert "FIFO" in refused(["infer", fifo / "scan.nii.gz", "--out", out, "--model", model, "--device", "cpu"])
    assert "FIFO" in refused(["infer", fifo / "manifest.json", "--out", out, "--model", model, "--device", "cpu"])
    assert "named pipe" in refused(["check", "--manifest", fifo / "manifest.json"])
    assert "named pipe" in refused(["train", "--manifest", fifo / "manifest.json", "--out", out])
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"labels": {"0": "background", "1": "liver"}, "task": "liver",
                                    "training": [{"image": str(fifo / "scan.nii.gz"), "label": str(scan)}]}))
    assert "named pipe" in refused(["check", "--manifest", manifest, "--out", tmp_path / "fp"])  # the case's problem
    assert "named pipe" in refused(["train", "--manifest", manifest, "--config", fifo / "config.yaml", "--out", out])
    assert "named pipe" in refused(["infer", scan, "--out", out, "--model", fifo / "model.pt", "--device", "cpu"])
    assert "FIFO" in refused(["evaluate", "--pred", fifo / "mask.nii.gz", "--ref", scan])
    (fifo / "scan.mhd").unlink()
    (fifo / "scan.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_SHORT\n"
                                   "ElementDataFile = scan.raw\n")
    assert "/dev/zero" in refused(["infer", fifo / "scan.mhd", "--out", out, "--model", model, "--device", "cpu"])
