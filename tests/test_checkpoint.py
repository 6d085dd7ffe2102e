"""Checkpoints: round trip, refusal of pickles that run code, atomic saves, run-folder lookup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from unetpp3d import UNetPlusPlus3D, UserError, load_model
from unetpp3d.bundle.components import load_network
from unetpp3d.config import Preprocessing
from unetpp3d.inference.model_loading import bundle_metadata
from unetpp3d.inference.predictor import Predictor
from unetpp3d.model.checkpoint import (
    load_checkpoint,
    resolve_model_path,
    save_checkpoint,
)


def payload(value: float = 1.0, n: int = 10) -> dict:
    return {
        "model_args": {"features": [4, 8], "strides": [[2, 2, 2]], "norm": "instance"},
        "state_dict": {"w": torch.full((n,), value)},
        "epoch": 3,
        "best_metric": 0.5,
        "rng": {"python": [1, 2, 3], "numpy": {"state": torch.arange(4)}},
        "split": {"training": ["a", "b"], "validation": ["c"]},
    }


def test_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", payload(2.0))
    loaded = load_checkpoint(path)
    torch.testing.assert_close(loaded["state_dict"]["w"], torch.full((10,), 2.0))
    assert loaded["epoch"] == 3 and loaded["split"]["validation"] == ["c"]
    assert loaded["model_args"]["strides"] == [[2, 2, 2]]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


class RunsCode:
    """Unpickling this would call os.mkdir(marker): a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({**payload(), "extra": RunsCode(marker)}, evil)  # plain torch.save pickles anything
    with pytest.raises(UserError, match="refused.*could run code"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_every_model_loader_refuses_such_a_pickle_alike(tmp_path):
    """Checkpoints, model files, a bundle's weights through infer and through MONAI's runner: one
    weights-only loader, one refusal."""
    marker = tmp_path / "code-ran"
    net = UNetPlusPlus3D(in_channels=1, out_channels=2, features=(4, 8))
    prep = Preprocessing(task="liver", labels={"0": "background", "1": "liver"}, target_spacing=[1.0] * 3,
                         intensity_range=[-1.0, 1.0], intensity_stats=[0.0, 1.0], patch_size=[8] * 3)
    payload = {"model_args": net.model_args, "state_dict": net.state_dict(), "preprocessing": prep.to_dict()}
    evil = tmp_path / "evil.pt"
    torch.save({**payload, "extra": RunsCode(marker)}, evil)
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"unetpp3d": bundle_metadata(payload)}))
    torch.save({**net.state_dict(), "extra": RunsCode(marker)}, bundle / "models" / "model.pt")
    loaders = [lambda: load_checkpoint(evil), lambda: load_model(evil),
               lambda: Predictor.from_source(evil, device="cpu"),
               lambda: load_network(net, bundle / "models" / "model.pt"),
               lambda: Predictor.from_source(bundle, device="cpu")]
    for load in loaders:
        with pytest.raises(UserError, match="refused, it holds objects other than weights.*could run code"):
            load()
    assert not marker.exists()


def test_unreadable_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    good = save_checkpoint(tmp_path / "good.pt", payload())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(UserError, match="truncated"):
        load_checkpoint(truncated)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(UserError, match="not a unetpp3d checkpoint"):
        load_checkpoint(other)


def test_failed_rename_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", payload(1.0))

    def crash(*args, **kwargs):
        raise OSError("simulated crash at rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(UserError, match=r"last\.pt: could not write the file \(simulated crash at rename\)"):
        save_checkpoint(path, payload(2.0))
    monkeypatch.undo()
    torch.testing.assert_close(load_checkpoint(path)["state_dict"]["w"], torch.full((10,), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_kill_during_saves_leaves_a_complete_checkpoint(tmp_path):
    """SIGKILL a process that keeps overwriting a checkpoint: the file is always a whole one."""
    path = tmp_path / "last.pt"
    script = textwrap.dedent(f"""
        import sys, torch
        from unetpp3d.model.checkpoint import save_checkpoint
        i = 0
        while True:
            w = torch.full((1_000_000,), float(i))
            save_checkpoint({str(path)!r}, {{"model_args": {{}}, "state_dict": {{"w": w}}}})
            print(i, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
    try:
        assert proc.stdout.readline().strip() == "0"  # at least one save completed
        time.sleep(0.3)  # several more saves in flight; the kill lands at an arbitrary point
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    w = load_checkpoint(path)["state_dict"]["w"]
    assert w.shape == (1_000_000,) and torch.all(w == w[0])


def test_resolve_model_path(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(UserError, match="no best.pt or last.pt"):
        resolve_model_path(run)
    save_checkpoint(run / "last.pt", payload())
    assert resolve_model_path(run) == run / "last.pt"
    save_checkpoint(run / "best.pt", payload())
    assert resolve_model_path(run) == run / "best.pt"
    assert resolve_model_path(run / "last.pt") == run / "last.pt"
    with pytest.raises(UserError, match="no such checkpoint or run folder"):
        resolve_model_path(tmp_path / "nowhere")
