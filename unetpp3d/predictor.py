"""Inference: segment scans with a trained UNet++ and write masks on each scan's own grid.

One case goes through these steps, each a MONAI component, so that an exported MONAI Bundle's
``inference.json`` can list the same ones and get the same voxels:

1. ``preprocessing``: ``transforms.inference_transforms(prep)``: load (``SitkReader``), orient
   to RAS, resample to the model's spacing, crop to the body, clip and z-score intensities; the
   model's own :class:`~unetpp3d.config.Preprocessing`, read from its checkpoint.
2. ``inferer``: ``SlidingWindowInferer(roi_size, sw_batch_size, overlap, mode="gaussian")``
   (:meth:`Predictor.inferer`) over ``network`` = ``ProbabilityNet(net, tta, prune_level)``,
   which gives each window's softmax probabilities (averaged over the 8 flips of the three
   axes with test-time augmentation); with several models (the folds of a cross-validation),
   ``EnsembleNet`` averages their probabilities. ``roi_size`` is ``prep.patch_size`` rounded up to the
   network's size divisor; inputs smaller than it are padded. Windows run on the GPU; the
   whole-volume output is stitched there when it fits in free GPU memory, else on the CPU.
3. ``postprocessing``: ``Invertd(keys="pred", transform=preprocessing, orig_keys="image",
   nearest_interp=False)`` takes the probabilities back through crop, resampling (linear) and
   orientation onto the input's grid; ``AsDiscreted(keys="pred", argmax=True)``; then
   :meth:`Predictor.postprocess_transforms`: largest component with holes filled for the liver,
   components of at least ``infer.min_component_ml`` for lung nodules (which are also measured
   and reported in JSON and CSV).

:func:`run_inference` is the ``unetpp3d infer`` command: it expands its inputs into cases, runs
the :class:`Predictor` on each, writes every output atomically (mask last, so an existing mask
means a finished case), keeps going past a case that fails, and prints a summary table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unetpp3d.config import Preprocessing
from unetpp3d.errors import UserError
from unetpp3d.hardware import inference_autocast_dtype

__all__ = [
    "EnsembleNet",
    "Prediction",
    "Predictor",
    "ProbabilityNet",
    "InputCase",
    "BUNDLE_METADATA_KEY",
    "bundle_metadata",
    "expand_inputs",
    "find_default_model",
    "run_inference",
]

log = logging.getLogger("unetpp3d")

MODES = ("accurate", "fast")
DEFAULT_FAST_LEVEL = 2
MODEL_ENV = "UNETPP3D_MODEL"
# The section of a bundle's configs/metadata.json that unetpp3d writes and reads: plain JSON
# holding model_args, preprocessing and (optionally) the training config.
BUNDLE_METADATA_KEY = "unetpp3d"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
MANIFEST_SUFFIXES = (".json",)
MASK_SUFFIXES = (".nii.gz", ".nii")
# Folder names that say nothing about the case: a DICOM series in ``case7/dicom`` is "case7".
_GENERIC_FOLDER_NAMES = {"dicom", "dcm", "series", "images", "image", "ct", "scan"}
# All flips of the three spatial axes of a (batch, channel, x, y, z) tensor.
_FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))
# GPU memory kept free beside the stitched output for the windows' activations and allocator slack.
_GPU_HEADROOM_BYTES = 2 * 1024**3


# --------------------------------------------------------------------------------------------
# The network as the sliding window sees it
# --------------------------------------------------------------------------------------------


class ProbabilityNet(nn.Module):
    """Wrap a segmentation network so that each window gives class probabilities.

    Blending probabilities (rather than logits) across overlapping windows makes the test-time
    augmentation an average of probabilities, as specified, and lets the inverse resampling
    interpolate values that stay in [0, 1].

    Args:
        net: a network returning logits ``(B, C, x, y, z)`` in eval mode.
        tta: average over the 8 flips of the three spatial axes.
        amp: autocast where reduced precision pays on the input's device
            (:func:`~unetpp3d.hardware.inference_autocast_dtype`: bf16 or fp16 on CUDA, bf16 on
            CPUs with native bf16); decided per call, so a bundle behaves as ``infer`` does.
        prune_level: set as ``net.prune_level`` when the network has one (None: all heads), so
            that a bundle's JSON can choose fast mode with a plain value.

    Example::

        >>> inferer = SlidingWindowInferer(roi_size=(96, 96, 96), sw_batch_size=2, overlap=0.5, mode="gaussian")
        >>> probs = inferer(image[None], ProbabilityNet(net, tta=True))
    """

    def __init__(self, net: nn.Module, tta: bool = False, amp: bool = False, prune_level: int | None = None):
        super().__init__()
        self.net = net
        self.tta = bool(tta)
        self.amp = bool(amp)
        if hasattr(net, "prune_level"):
            net.prune_level = prune_level
        elif prune_level is not None:
            raise ValueError(f"{type(net).__name__} has no prune_level; it cannot run pruned")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        dtype = inference_autocast_dtype(x.device) if self.amp else None
        for dims in _FLIPS if self.tta else _FLIPS[:1]:
            xi = torch.flip(x, dims) if dims else x
            with torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                logits = self.net(xi)
            probs = torch.softmax(logits.float(), dim=1)
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total + probs
        return total / (len(_FLIPS) if self.tta else 1)


class EnsembleNet(nn.Module):
    """Average the class probabilities of several :class:`ProbabilityNet` on each window.

    The fold ensemble of a cross-validation, as nnU-Net does it: every model sees the same
    preprocessed window and their softmax outputs are averaged, so the ensemble's argmax is the
    class with the highest mean probability.

    Args:
        members: modules returning probabilities ``(B, C, x, y, z)``, all with the same classes.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.members[0](x)
        for member in self.members[1:]:
            total = total + member(x)
        return total / len(self.members)


# --------------------------------------------------------------------------------------------
# Finding and loading the model
# --------------------------------------------------------------------------------------------


def find_default_model(runs_dir: str | Path = "runs") -> Path:
    """The model to use when none is given: ``$UNETPP3D_MODEL``, else the newest run in ``./runs``.

    The newest run is the one whose ``best.pt`` or ``last.pt`` was written last.

    Raises:
        UserError: neither exists, saying how to get a model.
    """
    env = os.environ.get(MODEL_ENV, "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.exists():
            raise UserError(f"${MODEL_ENV}={env}: no such checkpoint, run folder or bundle; fix or unset it")
        return path.resolve()
    runs = Path(runs_dir)
    candidates = []
    if runs.is_dir():
        for run in runs.iterdir():
            stamps = [(run / n).stat().st_mtime for n in ("best.pt", "last.pt") if (run / n).is_file()]
            if stamps:
                candidates.append((max(stamps), run))
    if not candidates:
        raise UserError(
            f"no model given and none found (no ${MODEL_ENV}, no run with best.pt or last.pt in {runs.resolve()}); "
            "train one with `unetpp3d train --manifest dataset.json` (or try `unetpp3d demo`), "
            "or pass --model CHECKPOINT|RUN_FOLDER|BUNDLE_FOLDER"
        )
    return max(candidates, key=lambda c: c[0])[1].resolve()


def _is_bundle(folder: Path) -> bool:
    return (folder / "configs" / "metadata.json").is_file()


def bundle_metadata(payload: dict[str, Any]) -> dict[str, Any]:
    """The ``unetpp3d`` section a bundle's ``configs/metadata.json`` needs so that ``infer`` trusts it.

    Plain JSON: the network's constructor arguments, the :class:`Preprocessing` and the training
    config. With it, :meth:`Predictor.from_source` rebuilds the network itself and reads the
    weights from ``models/model.pt`` with ``weights_only=True``; nothing in the bundle is executed.

    Args:
        payload: a loaded checkpoint (``model_args``, ``preprocessing``, optionally ``config``).
    """
    return {
        "format": 1,
        "model_args": payload["model_args"],
        "preprocessing": payload["preprocessing"],
        "config": payload.get("config"),
    }


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: missing; a bundle keeps its weights in models/model.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unsafe or corrupt files
        raise UserError(f"{path}: cannot load as weights only ({type(exc).__name__}); "
                        "it may be truncated or hold objects other than tensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def _load_bundle(folder: Path, trust_bundle: bool) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Network, preprocessing dict and config dict of an exported MONAI Bundle.

    A bundle carrying our metadata section is read as data only. Any other bundle can only be
    run by building its ``network_def`` with MONAI's ConfigParser, whose ``$`` expressions are
    Python code: that happens only with ``trust_bundle``.
    """
    meta_path = folder / "configs" / "metadata.json"
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{meta_path}: not readable JSON ({exc})") from None
    ours = metadata.get(BUNDLE_METADATA_KEY) if isinstance(metadata, dict) else None
    weights = folder / "models" / "model.pt"
    if isinstance(ours, dict) and "model_args" in ours and "preprocessing" in ours:
        from unetpp3d.network import UNetPlusPlus3D

        state = _load_weights(weights)
        try:
            net = UNetPlusPlus3D.from_checkpoint({"model_args": ours["model_args"], "state_dict": state})
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"{folder}: the bundle's model_args and weights do not fit ({exc})") from None
        return net, ours["preprocessing"], ours.get("config") or {}
    if not trust_bundle:
        raise UserError(
            f"{folder}: this bundle was not exported by unetpp3d (no '{BUNDLE_METADATA_KEY}' section with model_args "
            f"and preprocessing in configs/metadata.json); running it means executing the Python expressions in its "
            f"configs. If you trust its author, pass --trust-bundle; or run it with `python -m monai.bundle run`"
        )
    from monai.bundle import ConfigParser

    configs = [folder / "configs" / n for n in ("inference.json", "inference.yaml", "inference.yml")]
    config_path = next((p for p in configs if p.is_file()), None)
    if config_path is None:
        raise UserError(f"{folder}: no configs/inference.json (or .yaml) to build the network from")
    parser = ConfigParser()
    parser.read_meta(str(meta_path))
    parser.read_config(str(config_path))
    prep = (ours or {}).get("preprocessing") if isinstance(ours, dict) else None
    if prep is None and "preprocessing" in parser.config:
        prep = parser.get_parsed_content("preprocessing")
    if prep is None:
        raise UserError(f"{folder}: the bundle does not give unetpp3d preprocessing (a '{BUNDLE_METADATA_KEY}."
                        f"preprocessing' entry in metadata.json or 'preprocessing' in {config_path.name}), so its "
                        "input pipeline cannot be reproduced; run it with `python -m monai.bundle run` instead")
    try:
        net = parser.get_parsed_content("network_def")
    except Exception as exc:  # anything the bundle's own code raises
        raise UserError(f"{config_path}: cannot build 'network_def' ({type(exc).__name__}: {exc})") from None
    try:
        net.load_state_dict(_load_weights(weights))
    except RuntimeError as exc:
        raise UserError(f"{weights}: does not fit the bundle's network_def ({str(exc).splitlines()[0]})") from None
    config = ours.get("config") if isinstance(ours, dict) else None
    return net, dict(prep), config or {}


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available here (PyTorch {torch.__version__}); "
                            "use --device cpu or install a CUDA build of PyTorch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) present")
    elif dev.type != "cpu":
        raise UserError(f"--device {device}: unsupported; use cpu, cuda or cuda:N")
    return dev


def _load_model(model: str | Path | None, trust_bundle: bool) -> tuple[nn.Module, dict, dict, Path]:
    """Network, preprocessing dict, config dict and resolved path of one model source (see ``from_source``)."""
    path = Path(model) if model is not None else find_default_model()
    if path.is_dir() and _is_bundle(path):
        net, prep, config = _load_bundle(path, trust_bundle)
    else:
        from unetpp3d.checkpoint import load_checkpoint, resolve_model_path
        from unetpp3d.network import UNetPlusPlus3D

        ckpt = resolve_model_path(path)
        payload = load_checkpoint(ckpt)
        if "preprocessing" not in payload:
            raise UserError(f"{ckpt}: has no preprocessing, so its input pipeline is unknown; use a checkpoint "
                            "written by `unetpp3d train` (best.pt or last.pt)")
        try:
            net = UNetPlusPlus3D.from_checkpoint(payload)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"{ckpt}: model arguments and weights do not fit ({exc})") from None
        prep, config = payload["preprocessing"], payload.get("config") or {}
        path = ckpt
    log.info("model: %s", path)
    return net, prep, config or {}, path


def _preprocessing_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``"name: value_a vs value_b"`` for each field of two models' preprocessing that differs."""
    a, b = Preprocessing.from_dict(dict(a)).to_dict(), Preprocessing.from_dict(dict(b)).to_dict()
    return [f"{key}: {a[key]} vs {b[key]}" for key in a if a[key] != b[key]]


# --------------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """The result of one case, everything on the input's own grid.

    Attributes:
        mask_xyz: integer labels (x, y, z), post-processed.
        probabilities: class probabilities ``(C, x, y, z)`` float32 after ``Invertd``, or None
            when the predictor was not asked to keep them (they are large).
        geometry: the input's :class:`~unetpp3d.readers.Geometry`.
        image_xyz: the input scan (x, y, z) as read, for previews.
        seconds: wall time of the whole prediction.
        nodules: for lung nodules, the measured components (largest first); else None.
        info: what the predictor decided (stitching device, sizes, timings).
    """

    mask_xyz: np.ndarray
    probabilities: np.ndarray | None
    geometry: Any
    image_xyz: np.ndarray
    seconds: float
    nodules: list | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _round_up(values: Sequence[int], divisor: Sequence[int]) -> tuple[int, int, int]:
    rounded = (int(math.ceil(int(v) / int(d)) * int(d)) for v, d in zip(values, divisor))
    return tuple(rounded)  # type: ignore[return-value]


class Predictor:
    """Segment one scan at a time with a trained network and its preprocessing.

    Args:
        network: the segmentation network (a :class:`~unetpp3d.network.UNetPlusPlus3D`, or any
            module returning logits in eval mode), or a list of them sharing ``preprocessing``:
            an ensemble whose softmax probabilities are averaged (:class:`EnsembleNet`).
        preprocessing: the model's :class:`Preprocessing` (or its dict).
        mode: "accurate" (mean of all deep-supervision heads) or "fast" (the pruned UNet++ L^l).
        prune_level: l for fast mode; default 2, capped at the network's depth.
        tta: test-time augmentation: average the probabilities of the 8 flips of the three axes.
        overlap: sliding-window overlap in [0, 1).
        sw_batch_size: windows per forward pass.
        device: "cpu", "cuda", "cuda:N" or None (CUDA when available).
        amp: reduced precision where it pays: bf16 (fp16 where unsupported) on CUDA, bf16 on
            CPUs that compute it natively (AMX, AVX512-BF16), else fp32.
        min_component_ml: lung nodules smaller than this are dropped.
        series_uid: the DICOM series to read from folders holding several.
        keep_probabilities: return the probabilities in :class:`Prediction` (default: for lung
            nodules only, whose report needs them).
        progress: show a progress bar over the windows.
        source: where the model came from, for messages.

    Raises:
        UserError: a setting is out of range for this model.

    Example::

        >>> predictor = Predictor.from_source("runs/liver-0101", device="cuda", mode="fast")
        >>> result = predictor.predict("ct.nii.gz")
        >>> write_mask(result.mask_xyz, result.geometry, "ct_liver.nii.gz")
    """

    def __init__(self, network: nn.Module | Sequence[nn.Module], preprocessing: Preprocessing | dict[str, Any], *,
                 mode: str = "accurate", prune_level: int | None = None, tta: bool = False, overlap: float = 0.5,
                 sw_batch_size: int = 2, device: str | torch.device | None = None, amp: bool = True,
                 min_component_ml: float = 0.0,
                 series_uid: str | None = None, keep_probabilities: bool | None = None, progress: bool = True,
                 source: str = "model"):
        if not isinstance(preprocessing, Preprocessing):
            preprocessing = Preprocessing.from_dict(preprocessing)
        self.prep = preprocessing
        self.source = source
        self.device = _resolve_device(device)
        if mode not in MODES:
            raise UserError(f"--mode {mode!r}: use accurate or fast")
        if not 0.0 <= float(overlap) < 1.0:
            raise UserError(f"--overlap {overlap}: must be in [0, 1)")
        if int(sw_batch_size) < 1:
            raise UserError(f"--batch-size {sw_batch_size}: must be at least 1")
        if float(min_component_ml) < 0:
            raise UserError(f"min_component_ml {min_component_ml}: must not be negative")
        self.mode = mode
        networks = list(network) if isinstance(network, (list, tuple)) else [network]
        if not networks:
            raise UserError("no model given")
        levels = [self._check_prune_level(net, mode, prune_level) for net in networks]
        self.prune_level = levels[0]
        self.tta = bool(tta)
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.min_component_ml = float(min_component_ml)
        self.series_uid = series_uid
        if keep_probabilities is None:
            keep_probabilities = self.prep.task == "lung_nodule"
        self.keep_probabilities = bool(keep_probabilities)
        self.progress = progress
        self.amp_dtype = inference_autocast_dtype(self.device) if amp else None

        self.networks = [net.to(self.device).eval() for net in networks]
        self.network = self.networks[0]  # the model a bundle exports; the first of an ensemble
        members = [ProbabilityNet(net, tta=self.tta, amp=amp, prune_level=level)
                   for net, level in zip(self.networks, levels)]
        self.window_net = (members[0] if len(members) == 1 else EnsembleNet(members)).eval()
        # Every member's size divisor, per axis (the same for the folds of one config).
        divisor = tuple(math.lcm(*axis) for axis in zip(*(tuple(getattr(net, "size_divisor", (1, 1, 1)))
                                                            for net in self.networks)))
        # Every window must pass the network: round the patch up to the strides' product.
        self.roi_size = _round_up(self.prep.patch_size, divisor)
        if list(self.roi_size) != [int(p) for p in self.prep.patch_size]:
            log.info("patch size %s rounded up to %s, a multiple of the network's size divisor %s",
                     tuple(self.prep.patch_size), self.roi_size, divisor)
        self._transforms = None
        self._reader = None

    @staticmethod
    def _check_prune_level(network: nn.Module, mode: str, prune_level: int | None) -> int | None:
        if mode == "accurate":
            if prune_level is not None:
                raise UserError(f"--prune-level {prune_level} applies to the pruned network; add --mode fast")
            return None
        if not hasattr(network, "prune_level"):
            raise UserError("--mode fast: this network cannot be pruned (it is not a unetpp3d UNet++); "
                            "use --mode accurate")
        depth = int(getattr(network, "depth", DEFAULT_FAST_LEVEL))
        if not getattr(network, "deep_supervision", True):
            raise UserError("--mode fast: this model was trained without deep supervision, so it has no heads to "
                            "prune to; use --mode accurate")
        if prune_level is None:
            return min(DEFAULT_FAST_LEVEL, depth)
        if not 1 <= int(prune_level) <= depth:
            raise UserError(f"--prune-level {prune_level}: this model has depth {depth}; use 1..{depth} "
                            f"(1 is fastest, {depth} the full network)")
        return int(prune_level)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_source(cls, model: str | Path | Sequence[str | Path] | None = None,
                    device: str | torch.device | None = None, trust_bundle: bool = False, *,
                    overlap: float | None = None, batch_size: int | None = None,
                    min_component_ml: float | None = None, **options: Any) -> Predictor:
        """Build a predictor from a checkpoint, a run folder or an exported MONAI Bundle, or an ensemble of them.

        Args:
            model: a checkpoint file (``.pt``), a training run folder (its ``best.pt``, else
                ``last.pt``), a bundle folder (``configs/metadata.json`` + ``models/model.pt``),
                or None: ``$UNETPP3D_MODEL``, else the newest run in ``./runs``. A list of
                several is an ensemble (e.g. the folds of a cross-validation): their softmax
                probabilities are averaged, so they must share their preprocessing (task,
                labels, spacing, intensities, patch size); the sliding-window and post-processing
                defaults come from the first.
            device: see :class:`Predictor`.
            trust_bundle: allow a bundle that unetpp3d did not export. Such a bundle's network is
                built with ``monai.bundle.ConfigParser`` from its ``network_def``, which evaluates
                the ``$`` Python expressions in its JSON/YAML: only for bundles you trust. A
                unetpp3d bundle is always read as data: its metadata's ``unetpp3d`` section
                (model_args, preprocessing) and the weights, loaded with ``weights_only=True``.
            overlap: sliding-window overlap (default: the model's ``infer.overlap``).
            batch_size: windows per forward pass (default: the model's ``infer.sw_batch_size``).
            min_component_ml: smallest nodule kept (default: the model's ``infer.min_component_ml``).
            **options: the other keyword arguments of :class:`Predictor` (mode, prune_level, tta,
                amp, series_uid, keep_probabilities, progress).

        Raises:
            UserError: no model found, an unreadable or untrusted model, models of an ensemble
                whose preprocessing differs, or bad settings.
        """
        sources = list(model) if isinstance(model, (list, tuple)) else [model]
        loaded = [_load_model(source, trust_bundle) for source in sources or [None]]
        net, prep, config, path = loaded[0]
        for _, other_prep, _, other_path in loaded[1:]:
            differences = _preprocessing_differences(prep, other_prep)
            if differences:
                raise UserError(f"{other_path}: its preprocessing differs from {path}'s ({'; '.join(differences)}), "
                                "so the models cannot be ensembled (their probabilities must be on the same grid "
                                "and classes); ensemble models trained on one dataset with one config, such as the "
                                "folds of a cross-validation")
        infer = (config or {}).get("infer") or {}
        source = str(path)
        if len(loaded) > 1:
            source = f"ensemble of {len(loaded)} ({', '.join(str(entry[3]) for entry in loaded)})"
        return cls(
            [entry[0] for entry in loaded] if len(loaded) > 1 else net, prep, device=device,
            overlap=overlap if overlap is not None else float(infer.get("overlap", 0.5)),
            sw_batch_size=batch_size if batch_size is not None else int(infer.get("sw_batch_size", 2)),
            min_component_ml=(min_component_ml if min_component_ml is not None
                              else float(infer.get("min_component_ml", 0.0))),
            source=source, **options,
        )

    # -- the MONAI pieces, shared with the bundle ---------------------------------------------

    @property
    def transforms(self):
        """``inference_transforms(prep)``: the Compose whose ``inverse`` Invertd applies."""
        if self._transforms is None:
            from unetpp3d.readers import SitkReader
            from unetpp3d.transforms import inference_transforms

            self._reader = SitkReader(series_uid=self.series_uid)
            self._transforms = inference_transforms(self.prep, reader=self._reader)
        return self._transforms

    def inferer(self, stitch_device: torch.device | str | None = None):
        """The ``SlidingWindowInferer`` this predictor runs (Gaussian blending, padding for small inputs)."""
        from monai.inferers import SlidingWindowInferer

        from unetpp3d.transforms import pad_value

        # Pad small inputs as training did (with air), not with 0, which is soft tissue after the z-score.
        return SlidingWindowInferer(
            roi_size=self.roi_size, sw_batch_size=self.sw_batch_size, overlap=self.overlap, mode="gaussian",
            padding_mode="constant", cval=pad_value(self.prep), sw_device=self.device,
            device=stitch_device or self.device,
            progress=self.progress,
        )

    def postprocess_transforms(self, keys: str = "pred") -> list:
        """The task's post-processing as MONAI dictionary transforms (what a bundle lists after argmax)."""
        from unetpp3d.postprocess import postprocess_transforms

        labels = [int(k) for k in self.prep.labels if int(k) != 0]
        return postprocess_transforms(self.prep.task, labels, self.min_component_ml, keys=keys)

    def _stitch_device(self, shapes: Sequence[Sequence[int]]) -> tuple[torch.device, str]:
        """Where to hold the whole-volume output: the GPU when it fits in its free memory, else the CPU."""
        if self.device.type != "cuda":
            return self.device, "on the CPU"
        voxels = max(int(np.prod(s)) for s in shapes)
        # The blended output and its weight map, held twice around the inverse resampling.
        need = voxels * 4 * (self.prep.num_classes + 1) * 2
        free, _ = torch.cuda.mem_get_info(self.device)
        gib = 1024**3
        if need + _GPU_HEADROOM_BYTES > free:
            return torch.device("cpu"), (f"on the CPU: the full-volume output needs ~{need / gib:.1f} GiB and only "
                                         f"{free / gib:.1f} GiB of {self.device} memory is free (windows still run on "
                                         f"{self.device})")
        return self.device, f"on {self.device} (~{need / gib:.1f} GiB of {free / gib:.1f} GiB free)"

    # -- one case ----------------------------------------------------------------------------

    def _load(self, path: Path) -> tuple[dict[str, Any], np.ndarray, Any]:
        """Run the preprocessing; return the transformed dict, the scan as read, and its geometry."""
        from monai.transforms import Compose, LoadImaged

        from unetpp3d.readers import Geometry, read_image

        steps = list(self.transforms.transforms)
        if not steps or not isinstance(steps[0], LoadImaged):
            image_xyz, geometry = read_image(path, series_uid=self.series_uid)
            return self.transforms({"image": str(path)}), image_xyz, geometry
        # Run the loader on its own to keep the scan as read (for the preview) without reading it
        # twice. The remaining steps are the same objects, so the Compose's inverse still
        # matches the operations traced on the tensor. Naming the reader at call time stops
        # MONAI from trying its other readers after ours refused the file, which would bury our
        # UserError under their tracebacks.
        data = steps[0]({"image": str(path)}, reader=self._reader)
        raw = data["image"]
        image_xyz = np.asarray(raw[0]).copy()
        geometry = Geometry.from_dict(raw.meta["geometry"])
        return Compose(steps[1:])(data), image_xyz, geometry

    @torch.no_grad()
    def predict(self, image_path: str | Path) -> Prediction:
        """Segment one scan.

        Args:
            image_path: a NIfTI/NRRD/MHA file or a DICOM series folder.

        Returns:
            A :class:`Prediction` on the input's grid, post-processed for the model's task.

        Raises:
            UserError: the scan cannot be read.
        """
        from monai.transforms import Invertd

        from unetpp3d.postprocess import largest_component_filled, nodule_components

        start = time.perf_counter()
        path = Path(image_path)
        data, image_xyz, geometry = self._load(path)
        image = data["image"]
        loaded = time.perf_counter()

        stitch, why = self._stitch_device([image.shape[1:], geometry.size])
        log.info("%s: %s -> %s at %s mm; %d window(s) of %s, stitching %s", path.name, geometry.describe(),
                 "x".join(map(str, image.shape[1:])), "x".join(f"{s:g}" for s in self.prep.target_spacing),
                 self._count_windows(image.shape[1:]), "x".join(map(str, self.roi_size)), why)
        probs = self.inferer(stitch)(image[None], self.window_net)[0]
        windows = time.perf_counter()

        # Invertd copies the image's trace of applied transforms onto the prediction and undoes
        # them: crop -> pad back, spacing -> linear resampling to the input's grid, orientation.
        invert = Invertd(keys="pred", transform=self.transforms, orig_keys="image", nearest_interp=False,
                         to_tensor=True)
        try:
            inverted = invert({**data, "pred": probs})["pred"]
        except RuntimeError as exc:
            if probs.device.type == "cpu":
                raise
            # Out of GPU memory (the input's grid can be far larger than the resampled one) or
            # a GPU-only failure: the CPU gives the same result, more slowly.
            log.warning("%s: resampling back to the input grid failed on %s (%s); redoing it on the CPU",
                        path.name, probs.device, str(exc).splitlines()[0][:120])
            probs = probs.cpu()
            torch.cuda.empty_cache()
            inverted = invert({**data, "pred": probs})["pred"]
        del data, probs
        probabilities = inverted.as_tensor() if hasattr(inverted, "as_tensor") else inverted
        if tuple(probabilities.shape[1:]) != tuple(geometry.size):
            raise RuntimeError(f"inverse transforms gave {tuple(probabilities.shape[1:])}, expected {geometry.size}")
        mask = probabilities.argmax(dim=0).to(torch.uint8).cpu().numpy()
        probs_np = probabilities.float().cpu().numpy() if (self.keep_probabilities or self.prep.task == "lung_nodule") \
            else None
        del inverted, probabilities

        labels = [int(k) for k in self.prep.labels if int(k) != 0]
        nodules = None
        if self.prep.task == "liver":
            mask = largest_component_filled(mask, labels)
        elif self.prep.task == "lung_nodule":
            mask, nodules = nodule_components(mask, geometry, probs_np, self.min_component_ml)
        end = time.perf_counter()
        info = {"stitch": str(stitch), "resampled_shape": [int(s) for s in image.shape[1:]],
                "load_s": loaded - start, "windows_s": windows - loaded, "post_s": end - windows}
        log.info("%s: %.1f s (read+preprocess %.1f, windows %.1f, inverse+postprocess %.1f)", path.name,
                 end - start, info["load_s"], info["windows_s"], info["post_s"])
        return Prediction(mask_xyz=mask, probabilities=probs_np if self.keep_probabilities else None,
                          geometry=geometry, image_xyz=image_xyz, seconds=end - start, nodules=nodules, info=info)

    def _count_windows(self, shape: Sequence[int]) -> int:
        n = 1
        for size, roi in zip(shape, self.roi_size):
            size = max(int(size), roi)
            step = max(int(roi * (1 - self.overlap)), 1)
            n *= int(math.ceil((size - roi) / step)) + 1
        return n

    def describe(self) -> str:
        """One line: model, mode, TTA, window and device."""
        mode = self.mode if self.prune_level is None else f"fast (UNet++ L^{self.prune_level})"
        return (f"{self.source}: task {self.prep.task}, mode {mode}, tta {'on' if self.tta else 'off'}, "
                f"window {'x'.join(map(str, self.roi_size))} overlap {self.overlap:g} x{self.sw_batch_size}, "
                f"device {self.device}{' amp ' + str(self.amp_dtype).replace('torch.', '') if self.amp_dtype else ''}")


# --------------------------------------------------------------------------------------------
# Inputs and outputs of the command
# --------------------------------------------------------------------------------------------


@dataclass
class InputCase:
    """One scan to segment: a name for its outputs, its path, or why it cannot be read."""

    name: str
    path: Path
    error: str | None = None


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_dicom_folder(folder: Path) -> bool:
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return any(_is_dicom_file(p) for p in files[:16])


def _image_name(path: Path) -> str:
    from unetpp3d.manifest import case_name

    if path.is_dir() and path.name.lower() in _GENERIC_FOLDER_NAMES and path.resolve().parent.name:
        return path.resolve().parent.name
    return case_name(path)


def expand_inputs(inputs: Sequence[str | Path]) -> list[InputCase]:
    """Turn command-line inputs into cases.

    Each input is an image file, a DICOM series folder, a folder of such inputs (image files and
    DICOM series subfolders directly inside it), or a manifest (its test cases, else its
    training images). A missing or unsupported input becomes a case with an ``error``, so that
    a batch reports it and carries on. Names are made unique by prefixing the parent folder.

    Raises:
        UserError: no inputs given, or a manifest that cannot be read.
    """
    from unetpp3d.manifest import load_manifest

    if not inputs:
        raise UserError("no inputs given; pass scan files, DICOM folders, folders of scans or a manifest")
    found: list[InputCase] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            found.append(InputCase(_image_name(path), path, "no such file or folder"))
        elif path.is_file() and path.name.lower().endswith(MANIFEST_SUFFIXES):
            manifest = load_manifest(path)
            cases = manifest.test or manifest.training
            if not manifest.test:
                log.info("%s: no test cases; segmenting its %d training image(s)", path, len(cases))
            found.extend(InputCase(c.name, Path(c.image)) for c in cases)
        elif path.is_file():
            if path.name.lower().endswith(IMAGE_SUFFIXES) or _is_dicom_file(path):
                found.append(InputCase(_image_name(path), path))
            else:
                found.append(InputCase(_image_name(path), path,
                                       f"not a supported scan (use {', '.join(IMAGE_SUFFIXES)}, a DICOM folder "
                                       "or a manifest .json)"))
        elif _is_dicom_folder(path):
            found.append(InputCase(_image_name(path), path))
        else:
            before = len(found)
            for entry in sorted(path.iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
                    found.append(InputCase(_image_name(entry), entry))
                elif entry.is_dir() and _is_dicom_folder(entry):
                    found.append(InputCase(_image_name(entry), entry))
            if len(found) == before:
                found.append(InputCase(_image_name(path), path, "no scans in this folder (image files or DICOM series "
                                                                 "folders directly inside it)"))
    if not found:
        raise UserError(f"{', '.join(map(str, inputs))}: no scans to segment (the manifest lists no cases)")
    # Unique output names: prefix the parent folder's name, then number what still collides.
    counts: dict[str, int] = {}
    for case in found:
        counts[case.name] = counts.get(case.name, 0) + 1
    seen: set[str] = set()
    for case in found:
        if counts[case.name] > 1 and case.path.resolve().parent.name:
            case.name = f"{case.path.resolve().parent.name}_{case.name}"
        name, k = case.name, 2
        while name in seen:
            name, k = f"{case.name}_{k}", k + 1
        case.name = name
        seen.add(name)
    return found


def _mask_outputs(cases: Sequence[InputCase], out: Path) -> dict[str, Path]:
    is_file = out.name.lower().endswith(MASK_SUFFIXES)
    if not is_file and not out.is_dir() and out.name.lower().endswith(IMAGE_SUFFIXES + (".png",)):
        raise UserError(f"--out {out}: masks are written as compressed NIfTI; name the file .nii.gz (or give a folder)")
    if is_file and len(cases) > 1:
        raise UserError(f"--out {out}: {len(cases)} inputs need a folder for their masks, not a file name")
    if is_file:
        return {cases[0].name: out}
    return {c.name: out / f"{c.name}.nii.gz" for c in cases}


def _preview_outputs(cases: Sequence[InputCase], preview: Path | None) -> dict[str, Path]:
    if preview is None:
        return {}
    if preview.suffix.lower() == ".png":
        if len(cases) > 1:
            raise UserError(f"--preview {preview}: {len(cases)} inputs need a folder for their previews")
        return {cases[0].name: preview}
    return {c.name: preview / f"{c.name}.png" for c in cases}


def _report_paths(mask_path: Path) -> tuple[Path, Path]:
    from unetpp3d.manifest import case_name

    stem = case_name(mask_path)
    return mask_path.with_name(f"{stem}.nodules.json"), mask_path.with_name(f"{stem}.nodules.csv")


@contextlib.contextmanager
def _logging_to_console() -> Iterator[None]:
    """Show the unetpp3d log on the console, above the progress bars, unless the application set up logging."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    if log.hasHandlers():
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        # Swaps our console handler for one that writes through tqdm, so bars are not torn.
        with logging_redirect_tqdm(loggers=[log]):
            yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@dataclass
class _Outcome:
    name: str
    status: str
    seconds: float = 0.0
    voxels: int | None = None
    volume_ml: float | None = None
    note: str = ""


def _summary(outcomes: Sequence[_Outcome]) -> str:
    rows = [["case", "status", "seconds", "voxels", "volume mL", "note"]]
    for o in outcomes:
        rows.append([o.name, o.status, f"{o.seconds:.1f}" if o.status == "ok" else "",
                     "" if o.voxels is None else f"{o.voxels:,}", "" if o.volume_ml is None else f"{o.volume_ml:.2f}",
                     (o.note.splitlines() or [""])[0]])  # tracebacks and details stay in the log
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}
    lines.append(f"{counts['ok']} segmented, {counts['skipped']} skipped, {counts['failed']} failed")
    return "\n".join(lines)


def _run_case(predictor: Predictor, case: InputCase, mask_path: Path, preview_path: Path | None) -> _Outcome:
    from unetpp3d.postprocess import write_nodule_report
    from unetpp3d.preview import LUNG_WINDOW, save_overlay_png
    from unetpp3d.writer import write_mask

    result = predictor.predict(case.path)
    written: list[Path] = []
    try:
        note = ""
        if result.nodules is not None:
            json_path, csv_path = _report_paths(mask_path)
            write_nodule_report(result.nodules, json_path, csv_path, source=str(case.path),
                                min_volume_ml=predictor.min_component_ml)
            written += [json_path, csv_path]
            note = f"{len(result.nodules)} nodule(s)"
        if preview_path is not None:
            window = LUNG_WINDOW if predictor.prep.task == "lung_nodule" else None
            save_overlay_png(result.image_xyz, result.mask_xyz, result.geometry, preview_path, title=case.name,
                             window=window)
            written.append(preview_path)
        # The mask goes last: an existing mask means the case finished (what --skip-existing checks).
        write_mask(result.mask_xyz, result.geometry, mask_path)
    except BaseException:
        for p in written:  # a failed case leaves nothing behind
            p.unlink(missing_ok=True)
        raise
    voxels = int(np.count_nonzero(result.mask_xyz))
    return _Outcome(case.name, "ok", result.seconds, voxels, voxels * float(np.prod(result.geometry.spacing)) / 1000,
                    note)


def run_inference(inputs: Sequence[str | Path], out: str | Path, model: str | Path | Sequence[str | Path] | None = None,
                  mode: str = "accurate", prune_level: int | None = None, tta: bool = False,
                  overlap: float | None = None, batch_size: int | None = None, device: str | None = None,
                  amp: bool = True, preview: str | Path | None = None, skip_existing: bool = False,
                  series_uid: str | None = None, trust_bundle: bool = False) -> int:
    """Segment scans and write one mask per scan on that scan's own grid (``unetpp3d infer``).

    Args:
        inputs: scan files (NIfTI, NRRD, MHA), DICOM series folders, folders of those, or a
            manifest (its test cases, else its training images).
        out: the mask file (``.nii.gz``) for one scan, or a folder receiving ``<case>.nii.gz``.
            Lung-nodule models also write ``<case>.nodules.json`` and ``.csv`` beside each mask.
        model: checkpoint, run folder or exported bundle, or a list of them to ensemble (their
            probabilities averaged); see :meth:`Predictor.from_source`.
        mode: "accurate" or "fast".
        prune_level: UNet++ L^l for fast mode (default 2, capped at the depth).
        tta: flip test-time augmentation (8 flips, probabilities averaged).
        overlap: sliding-window overlap (default: the model's).
        batch_size: windows per forward pass (default: the model's).
        device: cpu, cuda or cuda:N (default: CUDA when available).
        amp: reduced precision where it pays (see :class:`Predictor`).
        preview: a PNG (one scan) or a folder of ``<case>.png`` showing the mask over the scan.
        skip_existing: leave cases whose mask already exists.
        series_uid: the DICOM series to read from folders holding several.
        trust_bundle: allow a bundle not exported by unetpp3d (see :meth:`Predictor.from_source`).

    Returns:
        0 when every case was segmented or skipped, 1 when any failed (each is listed in the
        summary table printed at the end).

    Raises:
        UserError: no usable model, bad settings, or outputs that cannot be named (checked
            before any case runs). Problems with one scan are reported, not raised.
    """
    from tqdm import tqdm

    out = Path(out)
    cases = expand_inputs(inputs)
    masks = _mask_outputs(cases, out)
    previews = _preview_outputs(cases, Path(preview) if preview is not None else None)
    with _logging_to_console():
        predictor = Predictor.from_source(
            model, device=device, trust_bundle=trust_bundle, overlap=overlap, batch_size=batch_size, mode=mode,
            prune_level=prune_level, tta=tta, amp=amp, series_uid=series_uid,
        )
        log.info("%s", predictor.describe())
        outcomes: list[_Outcome] = []
        for case in tqdm(cases, desc="cases", unit="case", disable=len(cases) < 2):
            mask_path = masks[case.name]
            if case.error:
                log.error("%s: %s: %s", case.name, case.path, case.error)
                outcomes.append(_Outcome(case.name, "failed", note=f"{case.path}: {case.error}"))
                continue
            if skip_existing and mask_path.exists():
                log.info("%s: %s exists, skipped", case.name, mask_path)
                outcomes.append(_Outcome(case.name, "skipped", note=str(mask_path)))
                continue
            try:
                outcomes.append(_run_case(predictor, case, mask_path, previews.get(case.name)))
                log.info("%s: wrote %s", case.name, mask_path)
            except UserError as exc:
                log.error("%s: %s", case.name, exc)
                outcomes.append(_Outcome(case.name, "failed", note=str(exc)))
            except (RuntimeError, ValueError, OSError, MemoryError) as exc:
                # Not a user mistake we recognised: keep the traceback in the log, keep going.
                log.exception("%s: failed", case.name)
                outcomes.append(_Outcome(case.name, "failed", note=f"{type(exc).__name__}: {exc}"))
    print(_summary(outcomes))
    return 1 if any(o.status == "failed" for o in outcomes) else 0
