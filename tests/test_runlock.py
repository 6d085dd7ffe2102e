"""A run folder belongs to one run: an OS lock against a second train, and resume only on the run's own data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unetpp3d import UserError
from unetpp3d.commands.train import RUN_FINGERPRINT, run_training
from unetpp3d.data.fingerprint import dataset_differences
from unetpp3d.data.manifest import load_manifest
from unetpp3d.synth.phantom import write_dataset
from unetpp3d.training.runlock import LOCK_NAME, RunLock

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
TINY = ["model.features=[4,8,16]", "data.patch_size=[32,32,32]", "data.batch_size=1", "data.num_workers=0",
        "train.iterations_per_epoch=1", "train.val_every=1", "train.amp=off", "train.epochs=1"]

HOLDER = """
import sys, time
from unetpp3d.training.runlock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_dataset("liver", 3, tmp_path_factory.mktemp("phantoms"), seed=0, size=32)


def _hold(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_train_into_a_locked_folder_is_refused_until_the_holder_dies(phantoms, tmp_path):
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        with pytest.raises(UserError, match=rf"another `unetpp3d train` \(PID {holder.pid}\) is using"):
            RunLock(run).acquire()
        # The command refuses before reading a case or writing a file, --force or not.
        with pytest.raises(UserError, match=rf"PID {holder.pid}"):
            run_training(phantoms, SMOKE, run, force=True, device="cpu", overrides=TINY)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()  # SIGKILL: no clean-up in the holder; the kernel drops its lock
        holder.wait()
    with RunLock(run) as lock:
        assert lock.held
    assert not RunLock(run).held


def test_the_lock_is_released_when_training_ends(phantoms, tmp_path):
    run = run_training(phantoms, SMOKE, tmp_path / "run", device="cpu", overrides=TINY)
    with RunLock(run) as lock:  # not left held by the finished run
        assert lock.held
    assert (run / RUN_FINGERPRINT).is_file()


def test_resume_with_other_data_under_the_same_case_names_is_refused(phantoms, tmp_path):
    data = shutil.copytree(phantoms.parent, tmp_path / "data") / phantoms.name
    run = run_training(data, SMOKE, tmp_path / "run", device="cpu", overrides=TINY)
    other = write_dataset("liver", 3, tmp_path / "other", seed=7, size=32)
    case = load_manifest(data).training[0]
    shutil.copyfile(load_manifest(other).training[0].image, case.image)  # another scan, the same name
    with pytest.raises(UserError, match=rf"not the data this run started with: {case.name}: "):
        run_training(data, out_dir=run, resume=True, device="cpu", overrides=["train.epochs=2"])
    assert json.loads((run / RUN_FINGERPRINT).read_text())["cases"]  # the record stays


def test_resume_on_the_same_data_copied_elsewhere_goes_on(phantoms, tmp_path):
    data = shutil.copytree(phantoms.parent, tmp_path / "data") / phantoms.name
    run = run_training(data, SMOKE, tmp_path / "run", device="cpu", overrides=TINY)
    # New modification times, the same bytes.
    moved = shutil.copytree(data.parent, tmp_path / "moved", copy_function=shutil.copyfile) / data.name
    run_training(moved, out_dir=run, resume=True, device="cpu", overrides=["train.epochs=2"])


def test_dataset_differences_names_each_change():
    case = {"name": "a", "spacing": [1.0, 1.0, 1.0], "size": [32, 32, 32], "intensity_min": -1000.0,
            "intensity_max": 400.0, "label_volumes_ml": {"1": 10.0}, "files": {"image": {"size": 100}}}
    changed = {**case, "spacing": [0.8, 0.8, 2.5], "intensity_max": 900.0, "files": {"image": {"size": 120}}}
    lines = dataset_differences({"cases": [case]}, {"cases": [changed, {**case, "name": "b"}]})
    assert lines == ["b: not in the recorded dataset", "a: spacing [1.0, 1.0, 1.0] -> [0.8, 0.8, 2.5]",
                     "a: intensity_max 400.0 -> 900.0", "a: image file size 100 -> 120 bytes"]
    assert dataset_differences({"cases": [case]}, {"cases": [dict(case)]}) == []
