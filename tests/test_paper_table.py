"""Smoke test of bench/paper_table.py: two training steps per model on tiny liver phantoms."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "paper_table.py"


def _load():
    spec = importlib.util.spec_from_file_location("paper_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_paper_table_writes_every_model_row(tmp_path):
    paper_table = _load()
    threads = torch.get_num_threads()
    out = tmp_path / "table.md"
    try:
        rc = paper_table.main(["--out", str(out), "--quick", "--iterations", "2", "--seeds", "1", "--tasks", "liver",
                               "--train-cases", "3", "--test-cases", "1", "--size", "32", "--patch", "32",
                               "--work-dir", str(tmp_path / "data")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    text = out.read_text(encoding="utf-8")
    raw = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    models = ["U-Net (BasicUNet)", "UNet++ (no DS)", "UNet++ (DS)",
              "UNet++ L1 (pruned DS)", "UNet++ L2 (pruned DS)", "UNet++ L3 (pruned DS)"]
    for name in models:
        assert f"| {name} |" in text
    for key in ("command", "date", "commit", "machine"):
        assert key in raw["header"]
    assert "load average" in text and "commit:" in text
    task = raw["tasks"]["liver"]
    assert list(task["models"]) == models
    assert task["n_train"] == 3 and task["n_test"] == 1
    for name, row in task["models"].items():
        assert len(row["seeds"]) == 1, name
        result = row["seeds"][0]
        assert 0.0 <= result["iou"] <= result["dice"] <= 1.0
        assert result["seconds"] > 0 and len(result["cases"]) == 1
    # The U-Net is matched to the UNet++ within 10% of parameters; the pruned models are smaller.
    params = {name: row["params"] for name, row in task["models"].items()}
    assert abs(params["U-Net (BasicUNet)"] - params["UNet++ (DS)"]) <= 0.1 * params["UNet++ (DS)"]
    assert params["UNet++ L1 (pruned DS)"] < params["UNet++ L2 (pruned DS)"] < params["UNet++ L3 (pruned DS)"]
