"""`unetpp3d export-onnx`: a file onnxruntime runs on the CPU, in either mode, at any valid size.

A tiny model (features 4, 8, 16: sizes are multiples of 4) with random weights. The tests that
run onnxruntime skip where it is not installed (it is in the `test` extra, so CI runs them).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from unetpp3d.commands.cli import main
from unetpp3d.config import Preprocessing
from unetpp3d.model import onnx_export
from unetpp3d.model.checkpoint import save_checkpoint
from unetpp3d.model.network import UNetPlusPlus3D

HAVE_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="onnx and onnxruntime are not installed "
                                                      "(pip install 'unetpp3d[onnx]'); CI installs them")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    net = UNetPlusPlus3D(in_channels=1, out_channels=2, features=(4, 8, 16))
    prep = Preprocessing(task="liver", labels={"0": "background", "1": "liver"}, target_spacing=[1.5, 1.5, 1.5],
                         intensity_range=[-1000.0, 1000.0], intensity_stats=[50.0, 100.0], patch_size=[32, 32, 32])
    path = tmp_path_factory.mktemp("run") / "best.pt"
    save_checkpoint(path, {"model_args": net.model_args, "state_dict": net.state_dict(),
                           "preprocessing": prep.to_dict(), "epoch": 1})
    return path, net.eval()


@needs_onnx
@pytest.mark.parametrize("flags, level", [([], None), (["--mode", "fast", "--prune-level", "1"], 1)])
def test_onnxruntime_gives_the_eager_output_at_another_size(model, tmp_path, capsys, flags, level):
    import onnx
    import onnxruntime as ort

    path, net = model
    out = tmp_path / "model.onnx"
    with pytest.raises(SystemExit) as info:
        main(["export-onnx", str(path), "--out", str(out), *flags])
    assert info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and ("accurate" if level is None else "L^1") in printed

    graph = onnx.load(str(out)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "x", "y", "z"]
    # Accurate mode combines the heads' probabilities (log of their mean); fast mode is one head's logits.
    name = "log_probabilities" if level is None else "logits"
    assert [o.name for o in graph.output] == [name] and f"'{name}'" in printed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 12, 20, 8)  # neither the traced size nor the command's own check
    with torch.no_grad():
        want = net(x, prune_level=level).numpy()  # the default fused path, as unetpp3d infer combines heads
    got = session.run([name], {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@needs_onnx
@pytest.mark.parametrize("flags, message", [
    (["--prune-level", "1"], "add --mode fast"),
    (["--mode", "fast", "--prune-level", "7"], "use 1..2"),
    (["--mode", "quick"], "use accurate or fast"),
])
def test_mode_and_level_that_do_not_fit_are_user_errors(model, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as info:
        main(["export-onnx", str(model[0]), "--out", str(tmp_path / "m.onnx"), *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_missing_onnxruntime_is_refused_with_the_install_command(model, tmp_path, capsys, monkeypatch):
    real = importlib.import_module

    def without_onnxruntime(name, *args):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *args)

    monkeypatch.setattr(onnx_export.importlib, "import_module", without_onnxruntime)
    with pytest.raises(SystemExit) as info:
        main(["export-onnx", str(model[0]), "--out", str(tmp_path / "m.onnx")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "onnxruntime" in err and "pip install 'unetpp3d[onnx]'" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


@needs_onnx
def test_the_models_own_infer_mode_is_the_default_as_in_infer(model, tmp_path, capsys):
    """A model trained with infer.mode fast (level 1) exports fast mode unless --mode says otherwise."""
    from unetpp3d.config import Config

    path, net = model
    payload = torch.load(path, weights_only=True)
    cfg = Config(task="liver")
    cfg.infer.mode, cfg.infer.prune_level = "fast", 1
    fast_model = tmp_path / "fast" / "best.pt"
    save_checkpoint(fast_model, {**payload, "config": cfg.to_dict()})
    for flags, expected in (([], "fast mode (UNet++ L^1)"), (["--mode", "accurate"], "accurate mode")):
        with pytest.raises(SystemExit) as info:
            main(["export-onnx", str(fast_model), "--out", str(tmp_path / "m.onnx"), *flags])
        assert info.value.code in (0, None)
        assert expected in capsys.readouterr().out
