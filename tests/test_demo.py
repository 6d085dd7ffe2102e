"""`unetpp3d demo`, end to end on a budget far too small to learn: the plumbing, not the Dice."""

from __future__ import annotations

import pytest

from unetpp3d.commands import demo


@pytest.mark.slow
def test_demo_writes_everything_it_promises(tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "task: liver\n"
        "model: {features: [4, 8, 16]}\n"
        "data: {patch_size: [32, 32, 32], batch_size: 2, samples_per_volume: 1, cache: memory, num_workers: 0}\n"
        "train: {epochs: 1, iterations_per_epoch: 2, val_every: 1, amp: 'off'}\n"
        "infer: {overlap: 0.0, sw_batch_size: 1}\n"
    )
    monkeypatch.setattr(demo, "demo_config_path", lambda: config)
    monkeypatch.setattr(demo, "DEMO_CASES", 5)
    monkeypatch.setattr(demo, "DEMO_SIZE", 32)

    status = demo.run_demo(tmp_path / "out", device="cpu")

    out = tmp_path / "out"
    printed = capsys.readouterr().out
    assert "held-out liver Dice: mean" in printed
    assert status in (0, 1)  # two iterations cannot be expected to reach the demo's target
    assert (status == 1) == ("below the demo's target" in printed)
    for path in ["data/manifest.json", "run/best.pt", "run/curves.png", "run/metrics.csv", "evaluation.csv"]:
        assert (out / path).is_file(), path
    masks = sorted((out / "masks").glob("*.nii.gz"))
    previews = sorted((out / "previews").glob("*.png"))
    assert masks and len(previews) == len(masks)


def test_demo_config_ships_with_the_package():
    from unetpp3d.config import load_config

    cfg = load_config(demo.demo_config_path())
    assert cfg.task == "liver" and cfg.model.deep_supervision
