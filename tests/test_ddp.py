"""Distributed training: two processes on gloo (CPU) under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from unetpp3d.synth.phantom import write_dataset

REPO = Path(__file__).resolve().parents[1]

# Runs in each torchrun process: records a fingerprint of every batch the rank trains on and the
# final weights, by wrapping two Trainer hooks, then trains as `unetpp3d train` would.
WORKER = textwrap.dedent("""
    import hashlib, os, sys
    import torch
    from unetpp3d.commands.train import run_training
    from unetpp3d.training import trainer as T

    manifest, config, run, out = sys.argv[1:5]
    seen, final = [], {}
    step, end = T.Trainer.train_step, T.Trainer.on_train_end

    def spy_step(self, batch):
        seen.append(hashlib.sha1(torch.as_tensor(batch["image"]).numpy().tobytes()).hexdigest())
        return step(self, batch)

    def spy_end(self):
        final.update({k: v.detach().clone() for k, v in self.net.state_dict().items()})
        end(self)

    T.Trainer.train_step, T.Trainer.on_train_end = spy_step, spy_end
    run_training(manifest, config, run, device="cpu", overrides=[
        "model.features=[4,8,16]", "data.patch_size=[32,32,32]", "data.batch_size=2", "data.num_workers=0",
        "train.epochs=2", "train.iterations_per_epoch=3", "train.val_every=1", "train.amp=off"])
    torch.save({"seen": seen, "state": final}, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
""")


@pytest.mark.slow
def test_two_gloo_ranks_see_different_patches_and_end_with_the_same_weights(tmp_path):
    manifest = write_dataset("liver", 5, tmp_path / "data", seed=1, size=32)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on a shared 2-core machine
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
         str(manifest), str(REPO / "configs" / "smoke.yaml"), str(run), str(tmp_path)],
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 2 * 3
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"]), "both ranks trained on the same patches"
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key

    # Only rank 0 writes the run folder, and its checkpoint holds the shared weights.
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (run / "metrics.csv").read_text().count("\n") == 1 + 2
    assert "x 2 process(es)" in (run / "train.log").read_text()
    last = torch.load(run / "last.pt", weights_only=True)
    for key, value in ranks[0]["state"].items():
        assert torch.equal(last["state_dict"][key], value), key


def test_a_torchrun_process_alone_still_joins_a_process_group(monkeypatch):
    """`torchrun --nproc_per_node=1` runs the distributed path (DDP, collectives), so that one GPU
    can check it with NCCL; a plain run does not."""
    import socket

    from unetpp3d.training.distributed import Dist

    for name in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    alone, _ = Dist.from_env("cpu")
    assert not alone.enabled and alone.backend is None

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"TORCHELASTIC_RUN_ID": "test", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    dist, device = Dist.from_env("cpu")
    try:
        assert dist.enabled and dist.backend == "gloo" and device.type == "cpu"
        assert dist.all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]
    finally:
        dist.close()
    assert not torch.distributed.is_initialized()
