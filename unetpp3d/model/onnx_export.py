"""ONNX export of the network (``unetpp3d export-onnx``), checked in onnxruntime against PyTorch.

One file per inference mode: accurate or fast (UNet++ L^l). The output is named for what it
holds (:func:`output_name`): in accurate mode ``log_probabilities``, the log of the mean of the
heads' softmax probabilities (as ``unetpp3d infer`` combines them: its softmax is that mean);
in fast mode, and for a network trained without deep supervision (one head), ``logits``. The
network is exported from its reference path (:func:`~unetpp3d.model.portable.portable_network`):
the fused path's channels-last conversions fail in the ONNX exporter ("memory_format not
implemented"), and its oneDNN calls are CPU-only. The batch and the three spatial axes are
dynamic, so the file takes any size the network accepts. After writing, the file passes the
ONNX checker and onnxruntime (CPU) runs it on an input of another size than the traced one;
its output must match PyTorch's.

``onnx`` and ``onnxruntime`` are optional (``pip install 'unetpp3d[onnx]'``).
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from unetpp3d.atomic import atomic_path
from unetpp3d.errors import UserError
from unetpp3d.model.network import UNetPlusPlus3D
from unetpp3d.model.portable import ModeNet, portable_network

INPUT_NAME = "image"
OPSET = 17
# onnxruntime and PyTorch sum the convolutions in different orders: float32 rounding, no more.
TOLERANCE = 1e-4


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote and how well onnxruntime matched PyTorch.

    Attributes:
        path: the ONNX file.
        prune_level: None for accurate mode, else the level of fast mode.
        output_name: the output's name (:func:`output_name`).
        checked_shape: the input shape onnxruntime ran (not the traced one).
        max_abs_diff: the largest difference between onnxruntime's output and PyTorch's.
        size_divisor: each spatial input size must be a multiple of it, per axis.
    """

    path: Path
    prune_level: int | None
    output_name: str
    checked_shape: tuple[int, ...]
    max_abs_diff: float
    size_divisor: tuple[int, int, int]


def output_name(net: UNetPlusPlus3D, prune_level: int | None) -> str:
    """The ONNX output's name in one mode: what the network returns there.

    Args:
        net: the network.
        prune_level: None for accurate mode, else the level of fast mode.

    Returns:
        ``"log_probabilities"`` where the heads are combined (accurate mode with deep
        supervision: the log of the mean of their softmax probabilities), else ``"logits"``
        (fast mode: one head's logits; without deep supervision: the one head's).
    """
    return "log_probabilities" if prune_level is None and net.deep_supervision else "logits"


def _logaddexp(g, a, b):
    """``aten::logaddexp`` in ONNX ops: ``max(a, b) + softplus(-|a - b|)``, exact and overflow-free.

    Accurate mode combines the heads with ``torch.logaddexp``
    (:func:`~unetpp3d.model.network.combine_heads`), which the TorchScript-based exporter has no
    symbolic for at any opset.
    """
    return g.op("Add", g.op("Max", a, b), g.op("Softplus", g.op("Neg", g.op("Abs", g.op("Sub", a, b)))))


@contextlib.contextmanager
def _logaddexp_symbolic(opset: int) -> Iterator[None]:
    """:func:`_logaddexp` registered for one export only: the exporter's table is process-wide."""
    torch.onnx.register_custom_op_symbolic("aten::logaddexp", _logaddexp, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::logaddexp", opset)


def require_onnx() -> tuple[object, object]:
    """Import ``onnx`` and ``onnxruntime``, or say how to install them.

    Raises:
        UserError: either package is missing.
    """
    modules, missing = [], []
    for name in ("onnx", "onnxruntime"):
        try:
            modules.append(importlib.import_module(name))  # optional, heavy: only for this command
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"ONNX export needs the optional package(s) {' and '.join(missing)}, which are not installed; "
                        "install them with `pip install 'unetpp3d[onnx]'` (or `pip install onnx onnxruntime`)")
    return modules[0], modules[1]


def export_onnx(net: UNetPlusPlus3D, out: str | Path, prune_level: int | None = None,
                opset: int = OPSET) -> OnnxExport:
    """Write one inference mode of ``net`` as an ONNX file, then check it in onnxruntime.

    Args:
        net: the network (not modified).
        out: the ONNX file to write (atomically).
        prune_level: None for accurate mode, else fast mode's level (1..depth, deep supervision only).
        opset: the ONNX opset.

    Returns:
        An :class:`OnnxExport` with onnxruntime's largest difference from PyTorch.

    Raises:
        UserError: onnx or onnxruntime is missing.
        RuntimeError: the file fails the ONNX checker or onnxruntime disagrees with PyTorch (a bug).
    """
    onnx, ort = require_onnx()
    module = ModeNet(portable_network(net), prune_level).eval()
    channels, divisor = int(net.model_args["in_channels"]), net.size_divisor
    generator = torch.Generator().manual_seed(0)
    # The smallest sizes with more than one voxel at the deepest level (instance norm needs two);
    # the check runs another batch and other sizes, so the dynamic axes are exercised.
    traced = torch.randn(1, channels, *(2 * d for d in divisor), generator=generator)
    checked = torch.randn(2, channels, *(k * d for k, d in zip((2, 3, 4), divisor)), generator=generator)
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    name = output_name(net, prune_level)
    out = Path(out)
    with atomic_path(out) as tmp:
        with torch.no_grad(), warnings.catch_warnings(), _logaddexp_symbolic(opset):
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation note and tracer notes
            # The TorchScript-based exporter (dynamo=False) takes dynamic axes as they are; the
            # torch.export-based one needs onnxscript and a symbolic proof of the size check.
            torch.onnx.export(module, (traced,), str(tmp), dynamo=False, input_names=[INPUT_NAME],
                              output_names=[name], dynamic_axes={INPUT_NAME: axes, name: axes},
                              opset_version=opset)
        try:
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as exc:
            raise RuntimeError(f"{out}: the exported file fails the ONNX checker: {exc}") from None
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run([name], {INPUT_NAME: checked.numpy()})[0])
        with torch.no_grad():
            want = module(checked)
        diff = float((got - want).abs().max())
        if not diff <= TOLERANCE * max(1.0, float(want.abs().max())):  # raising here leaves no file
            raise RuntimeError(f"{out}: onnxruntime's output differs from PyTorch's by {diff:.3g} on a "
                               f"{tuple(checked.shape)} input")
    return OnnxExport(out, prune_level, name, tuple(checked.shape), diff, tuple(divisor))
