"""``unetpp3d export-onnx MODEL --out model.onnx [--mode accurate|fast --prune-level L]``."""

from __future__ import annotations

from pathlib import Path

from unetpp3d.errors import UserError
from unetpp3d.inference.model_loading import _load_model, model_infer_config, model_mode
from unetpp3d.inference.predictor import MODES, Predictor
from unetpp3d.model.network import UNetPlusPlus3D
from unetpp3d.model.onnx_export import INPUT_NAME, OnnxExport, export_onnx, require_onnx


def run_export_onnx(model: str | Path, out: str | Path, mode: str | None = None,
                    prune_level: int | None = None) -> OnnxExport:
    """Export one inference mode of a trained model as ONNX, checked in onnxruntime against PyTorch.

    Args:
        model: a checkpoint, a training run folder (its ``best.pt``, else ``last.pt``) or a
            bundle written by ``unetpp3d export-bundle``.
        out: the ONNX file to write; an existing file is replaced.
        mode: "accurate" (every head, their probabilities averaged) or "fast" (the pruned UNet++ L^l);
            default: the model's own ``infer.mode``, as ``unetpp3d infer``.
        prune_level: fast mode's level; default as ``unetpp3d infer``: the model's
            ``infer.prune_level``, else the level its run measured, else 2.

    Returns:
        What was written (see :class:`~unetpp3d.model.onnx_export.OnnxExport`).

    Raises:
        UserError: onnx or onnxruntime is missing, the model cannot be read, the mode or level
            does not fit the model, or ``out`` is a folder.
    """
    require_onnx()  # before the model is read: the usual mistake costs no time
    if mode is not None and mode not in MODES:
        raise UserError(f"--mode {mode!r}: use accurate or fast")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give the ONNX file to write, e.g. {out / 'model.onnx'}")
    net, _, config, source = _load_model(Path(model), trust_bundle=False)
    if not isinstance(net, UNetPlusPlus3D):  # only a bundle written elsewhere could give another network
        raise UserError(f"{source}: not a unetpp3d UNet++; only models trained by unetpp3d can be exported")
    mode, prune_level = model_mode(model_infer_config(config, source), source, mode, prune_level)
    level = Predictor._check_prune_level(net, mode, prune_level)
    return export_onnx(net, out, prune_level=level)


def describe(result: OnnxExport) -> str:
    """One line for the console: the file, the mode, the input and onnxruntime's agreement."""
    mode = "accurate mode" if result.prune_level is None else f"fast mode (UNet++ L^{result.prune_level})"
    what = ("the log of the mean of the heads' probabilities" if result.output_name == "log_probabilities"
            else "logits")
    return (f"wrote {result.path}: {mode}; input '{INPUT_NAME}' (batch, channels, x, y, z), each of x, y, z a "
            f"multiple of {list(result.size_divisor)}; output "
            f"'{result.output_name}' ({what}); onnxruntime matches PyTorch to {result.max_abs_diff:.1g} on a "
            f"{tuple(result.checked_shape)} input")
