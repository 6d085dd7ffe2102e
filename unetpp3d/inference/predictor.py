"""Inference: segment scans with a trained UNet++ and write masks on each scan's own grid.

One case goes through the pipeline that :mod:`unetpp3d.inference.pipeline` describes once, as
MONAI component specs that an exported MONAI Bundle's ``inference.json`` lists too:

1. ``preprocessing``: load (``SitkReader``), orient to RAS, resample to the model's spacing,
   crop to the body, clip and z-score intensities; the model's own
   :class:`~unetpp3d.config.Preprocessing`, read from its checkpoint.
2. ``inferer``: ``SlidingWindowInferer(roi_size, sw_batch_size, overlap, mode="gaussian")``
   (:meth:`Predictor.inferer`) over ``ProbabilityNet(net, tta, prune_level)``, which gives each
   window's softmax probabilities (averaged over the 8 flips of the three axes with test-time
   augmentation); with several models (the folds of a cross-validation), ``EnsembleNet``
   averages their probabilities. ``roi_size`` is ``prep.patch_size`` rounded up to the
   network's size divisor; inputs smaller than it are padded. Windows run on the GPU; the
   whole-volume output is stitched there when it fits in free GPU memory, else on the CPU.
3. ``postprocessing``: ``Invertd`` takes the probabilities back through crop, resampling
   (linear) and orientation onto the input's grid; ``AsDiscreted(argmax=True)``; then the
   task's clean-up (:mod:`unetpp3d.tasks`): the largest component with holes filled for the
   liver, components of at least ``infer.min_component_ml`` for lung nodules, which are then
   measured for their report.

The ``unetpp3d infer`` command (:mod:`unetpp3d.commands.infer`) runs a :class:`Predictor` on
each case of a batch and writes the outputs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose, LoadImaged
from torch import nn

from unetpp3d.config import FAST_PRUNE_LEVEL, INFER_MODES, InferConfig, Preprocessing
from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry
from unetpp3d.hardware import autocast_dtype, resolve_device
from unetpp3d.imageio.readers import SitkReader, read_image
from unetpp3d.inference.memory import check_inference_memory
from unetpp3d.inference.model_loading import (
    _load_model,
    _preprocessing_differences,
    ensemble_training_data,
    model_infer_config,
    model_mode,
)
from unetpp3d.inference.nodules import nodule_components
from unetpp3d.inference.pipeline import (
    PRED_KEY,
    build_pipeline,
    inferer_args,
    pipeline_config,
    window_network_args,
)
from unetpp3d.inference.quality import HeadQualityNet, disagreement, has_heads
from unetpp3d.inference.windows import EnsembleNet, ProbabilityNet, accepts_prune_level
from unetpp3d.model.network import COMBINE, on_device
from unetpp3d.tasks import task_rules

log = logging.getLogger("unetpp3d")


MODES = INFER_MODES


# The defaults of every inference setting (the predictor's, `infer`'s, a bundle's).
_DEFAULTS = InferConfig()


# GPU memory kept free beside the stitched output for the windows' activations and allocator slack.
_GPU_HEADROOM_BYTES = 2 * 1024**3


@dataclass
class Prediction:
    """The result of one case, everything on the input's own grid.

    Attributes:
        mask_xyz: integer labels (x, y, z), post-processed.
        probabilities: class probabilities ``(C, x, y, z)`` float32 after ``Invertd``, summing
            to one in every voxel (:func:`complete_probabilities`), before the task's clean-up;
            None when the predictor was not asked to keep them (they are large).
        geometry: the input's :class:`~unetpp3d.geometry.Geometry`.
        image_xyz: the input scan (x, y, z) as read, for previews.
        seconds: wall time of the whole prediction.
        nodules: for lung nodules, the measured components (largest first); else None.
        info: what the predictor decided (stitching device, sizes, timings).
        quality: the heads' disagreement inside the mask (:mod:`unetpp3d.inference.quality`;
            0 when all heads agree, higher means review the mask), or None when it was not
            computed (no deep supervision, fast mode) or the mask is empty.
        spread_xyz: the per-voxel head spread on the input's grid when quality was computed
            and the predictor keeps probabilities, else None.
    """

    mask_xyz: np.ndarray
    probabilities: np.ndarray | None
    geometry: Any
    image_xyz: np.ndarray
    seconds: float
    nodules: list | None = None
    info: dict[str, Any] = field(default_factory=dict)
    quality: float | None = None
    spread_xyz: np.ndarray | None = None


def _plain(t: Any) -> torch.Tensor:
    """A tensor without MONAI's metadata (a MetaTensor's ``as_tensor``), from a tensor or an array."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def complete_probabilities(probs: np.ndarray) -> np.ndarray:
    """Make class probabilities that ``Invertd`` left incomplete sum to one again, in place.

    Inverting the body crop pads with zeros, so outside the crop every class has probability 0,
    and the linear resampling back to the scan's grid blends those zeros into the crop's edge.
    Outside the crop the background gets probability 1 (the network never saw it; the mask
    calls it background); elsewhere each voxel's probabilities are divided by their sum, which
    keeps their argmax, so the probabilities agree with the mask before the task's clean-up.

    Args:
        probs: ``(C, x, y, z)`` float probabilities, background first.

    Returns:
        ``probs``, changed in place.
    """
    total = probs.sum(axis=0)
    inside = total > 0
    for channel in probs:  # one channel at a time: no second copy of the whole array
        np.divide(channel, total, out=channel, where=inside)
    probs[0][~inside] = 1.0
    return probs


def _round_up(values: Sequence[int], divisor: Sequence[int]) -> tuple[int, int, int]:
    rounded = (int(math.ceil(int(v) / int(d)) * int(d)) for v, d in zip(values, divisor))
    return tuple(rounded)  # type: ignore[return-value]


class Predictor:
    """Segment one scan at a time with a trained network and its preprocessing.

    Every setting defaults to :class:`~unetpp3d.config.InferConfig`'s default;
    :meth:`from_source` takes the model's own ``infer`` settings instead.

    Args:
        network: the segmentation network (a :class:`~unetpp3d.model.network.UNetPlusPlus3D`, or any
            module returning logits in eval mode), or a list of them sharing ``preprocessing``:
            an ensemble whose softmax probabilities are averaged (:class:`EnsembleNet`).
        preprocessing: the model's :class:`Preprocessing` (or its dict).
        mode: "accurate" (the mean of all deep-supervision heads' probabilities) or "fast" (the
            pruned UNet++ L^l).
        prune_level: l for fast mode; default ``FAST_PRUNE_LEVEL`` (2), capped at the network's depth.
        tta: test-time augmentation: average the probabilities of the 8 flips of the three axes.
        overlap: sliding-window overlap in [0, 1).
        sw_batch_size: windows per forward pass.
        device: "cpu", "cuda", "cuda:N", "gpu" or None (CUDA when available).
        amp: reduced precision where it pays (:func:`~unetpp3d.hardware.autocast_dtype` "auto"):
            bf16 (fp16 where unsupported) on CUDA, bf16 on CPUs that compute it natively (AMX,
            AVX512-BF16), else fp32.
        min_component_ml: lung nodules smaller than this are dropped.
        series_uid: the DICOM series to read from folders holding several.
        keep_probabilities: return the probabilities in :class:`Prediction` (default: where the
            task keeps them, :attr:`~unetpp3d.tasks.TaskRules.keep_probabilities`).
        progress: show a progress bar over the windows.
        source: where the model came from, for messages.
        combine: how accurate mode combines the heads: "probabilities" (their mean
            probability, as the UNet++ paper does) or "logits" (their mean logit).
        quality: compute the heads' disagreement per case and per nodule
            (:class:`~unetpp3d.inference.quality.HeadQualityNet`); default: in accurate mode with
            probabilities combined, whenever every network is a UNet++ with deep supervision. It
            costs nothing extra on the network (accurate mode runs every head anyway), one more
            channel through the inverse resampling.

    Raises:
        UserError: a setting is out of range for this model, or its window is too small for it.

    Example::

        >>> predictor = Predictor.from_source("runs/liver-0101", device="cuda", mode="fast")
        >>> result = predictor.predict("ct.nii.gz")
        >>> write_mask(result.mask_xyz, result.geometry, "ct_liver.nii.gz")
    """

    def __init__(self, network: nn.Module | Sequence[nn.Module], preprocessing: Preprocessing | dict[str, Any], *,
                 mode: str = _DEFAULTS.mode, prune_level: int | None = _DEFAULTS.prune_level,
                 tta: bool = _DEFAULTS.tta, overlap: float = _DEFAULTS.overlap,
                 sw_batch_size: int = _DEFAULTS.sw_batch_size, device: str | torch.device | None = None,
                 amp: bool = True, min_component_ml: float = _DEFAULTS.min_component_ml,
                 series_uid: str | None = None, keep_probabilities: bool | None = None, progress: bool = True,
                 source: str = "model", combine: str = "probabilities", quality: bool | None = None):
        if not isinstance(preprocessing, Preprocessing):
            preprocessing = Preprocessing.from_dict(preprocessing)
        self.prep = preprocessing
        self.rules = task_rules(self.prep.task)
        self.source = source
        self.device = resolve_device(device)
        if mode not in MODES:
            raise UserError(f"--mode {mode!r}: use accurate or fast")
        if combine not in COMBINE:
            raise UserError(f"combine {combine!r}: use {' or '.join(COMBINE)}")
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
        self.combine = combine
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.min_component_ml = float(min_component_ml)
        self.series_uid = series_uid
        if keep_probabilities is None:
            keep_probabilities = self.rules.keep_probabilities
        self.keep_probabilities = bool(keep_probabilities)
        self.progress = progress
        self.amp = bool(amp)
        self.amp_dtype = autocast_dtype(self.amp, self.device)

        self.networks = [on_device(net, self.device).eval() for net in networks]
        self.network = self.networks[0]  # the model a bundle exports; the first of an ensemble
        possible = mode == "accurate" and combine == "probabilities" and all(has_heads(n) for n in self.networks)
        if quality and not possible:
            raise UserError("the quality signal compares the heads of a UNet++ trained with deep supervision in "
                            "accurate mode with probabilities combined; this model or mode has none to compare")
        self.quality = possible if quality is None else bool(quality)
        if self.quality:
            # The heads' mean probability (the same accurate mode) plus their spread, as one more channel.
            members = [HeadQualityNet(net, tta=self.tta, amp=self.amp) for net in self.networks]
        else:
            # One wrapper per member, each passing its own level per call: the networks are not changed.
            members = [ProbabilityNet(net, combine=combine if accepts_prune_level(net) else "probabilities",
                                      **window_network_args(self.tta, level, self.amp))
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
        for net in self.networks:
            check = getattr(net, "check_input_size", None)
            try:
                if check is not None:
                    check(self.roi_size)
            except ValueError as exc:
                raise UserError(f"{source}: its windows of {'x'.join(map(str, self.roi_size))} voxels "
                                f"(preprocessing.patch_size) do not fit the network: {exc}") from None
        # The one description of the pipeline, instantiated as a bundle instantiates it.
        self.pipeline_config = pipeline_config(self.prep, self.min_component_ml, series_uid)
        self.pipeline = build_pipeline(self.pipeline_config)
        self._reader = SitkReader(series_uid=series_uid)

    @staticmethod
    def _check_prune_level(network: nn.Module, mode: str, prune_level: int | None) -> int | None:
        if mode == "accurate":
            if prune_level is not None:
                raise UserError(f"--prune-level {prune_level} applies to the pruned network; add --mode fast")
            return None
        if not accepts_prune_level(network):
            raise UserError("--mode fast: this network cannot be pruned (it is not a unetpp3d UNet++); "
                            "use --mode accurate")
        depth = int(getattr(network, "depth", FAST_PRUNE_LEVEL))
        if not getattr(network, "deep_supervision", True):
            raise UserError("--mode fast: this model was trained without deep supervision, so it has no heads to "
                            "prune to; use --mode accurate")
        if prune_level is None:
            return min(FAST_PRUNE_LEVEL, depth)
        if not 1 <= int(prune_level) <= depth:
            raise UserError(f"--prune-level {prune_level}: this model has depth {depth}; use 1..{depth} "
                            f"(1 is fastest, {depth} the full network)")
        return int(prune_level)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_source(cls, model: str | Path | Sequence[str | Path] | None = None,
                    device: str | torch.device | None = None, trust_bundle: bool = False, *,
                    mode: str | None = None, prune_level: int | None = None, tta: bool | None = None,
                    overlap: float | None = None, batch_size: int | None = None,
                    min_component_ml: float | None = None, **options: Any) -> Predictor:
        """Build a predictor from a checkpoint, a run folder or an exported MONAI Bundle, or an ensemble of them.

        Each setting left None is the model's own (its config's ``infer`` section, e.g.
        ``tta: true`` in ``configs/lung_nodule.yaml``), else :class:`~unetpp3d.config.InferConfig`'s
        default. The model's ``prune_level`` applies where the mode is fast.

        Args:
            model: a checkpoint file (``.pt``), a training run folder (its ``best.pt``, else
                ``last.pt``), a bundle folder (``configs/metadata.json`` + ``models/model.pt``),
                or None: the newest run in ``./runs`` (logged). A list of several is an ensemble
                (e.g. the folds of a cross-validation): their softmax probabilities are averaged,
                so they must share their preprocessing (task, labels, spacing, intensities,
                patch size); the settings come from the first.
            device: see :class:`Predictor`.
            trust_bundle: allow a bundle that unetpp3d did not export. Such a bundle's network is
                built with ``monai.bundle.ConfigParser`` from its ``network_def``, which evaluates
                the ``$`` Python expressions in its JSON/YAML: only for bundles you trust. A
                unetpp3d bundle is always read as data: its metadata's ``unetpp3d`` section
                (model_args, preprocessing) and the weights, loaded with ``weights_only=True``.
            mode: "accurate" or "fast" (default: the model's ``infer.mode``).
            prune_level: fast mode's level (default: the model's ``infer.prune_level``).
            tta: flip test-time augmentation (default: the model's ``infer.tta``).
            overlap: sliding-window overlap (default: the model's ``infer.overlap``).
            batch_size: windows per forward pass (default: the model's ``infer.sw_batch_size``).
            min_component_ml: smallest nodule kept (default: the model's ``infer.min_component_ml``).
            **options: the other keyword arguments of :class:`Predictor` (amp, series_uid,
                keep_probabilities, progress, combine).

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
        if len(loaded) > 1:
            prep = {**dict(prep), **ensemble_training_data([dict(entry[1]) for entry in loaded])}
        own = model_infer_config(config, path)
        mode, prune_level = model_mode(own, path, mode, prune_level, pruning_table=len(loaded) == 1)
        source = str(path)
        if len(loaded) > 1:
            source = f"ensemble of {len(loaded)} ({', '.join(str(entry[3]) for entry in loaded)})"
        return cls(
            [entry[0] for entry in loaded] if len(loaded) > 1 else net, prep, device=device, mode=mode,
            prune_level=prune_level, tta=own.tta if tta is None else tta,
            overlap=own.overlap if overlap is None else overlap,
            sw_batch_size=own.sw_batch_size if batch_size is None else batch_size,
            min_component_ml=own.min_component_ml if min_component_ml is None else min_component_ml,
            source=source, **options,
        )

    # -- the MONAI pieces, shared with the bundle ---------------------------------------------

    @property
    def transforms(self) -> Compose:
        """The preprocessing ``Compose`` (from :attr:`pipeline_config`), whose inverse ``Invertd`` applies."""
        return self.pipeline.preprocessing

    def inferer(self, stitch_device: torch.device | str | None = None) -> SlidingWindowInferer:
        """The ``SlidingWindowInferer`` this predictor runs (:func:`~unetpp3d.inference.pipeline.inferer_args`)."""
        return SlidingWindowInferer(**inferer_args(self.roi_size, self.sw_batch_size, self.overlap, self.prep),
                                    sw_device=self.device, device=stitch_device or self.device,
                                    progress=self.progress)

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

    def _load(self, path: Path) -> tuple[dict[str, Any], np.ndarray, Geometry]:
        """Run the preprocessing; return the transformed dict, the scan as read, and its geometry."""
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

    def _invert(self, data: dict[str, Any], probs: torch.Tensor, name: str) -> torch.Tensor:
        """The pipeline's ``Invertd``: the probabilities back on the input's grid."""
        try:
            return self.pipeline.invert({**data, PRED_KEY: probs})[PRED_KEY]
        except RuntimeError as exc:
            if probs.device.type == "cpu":
                raise
            # Out of GPU memory (the input's grid can be far larger than the resampled one) or
            # a GPU-only failure: the CPU gives the same result, more slowly.
            log.warning("%s: resampling back to the input grid failed on %s (%s); redoing it on the CPU",
                        name, probs.device, str(exc).splitlines()[0][:120])
            probs = probs.cpu()
            torch.cuda.empty_cache()
            return self.pipeline.invert({**data, PRED_KEY: probs})[PRED_KEY]

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
        start = time.perf_counter()
        path = Path(image_path)
        data, image_xyz, geometry = self._load(path)
        image = data["image"]
        resampled = [int(v) for v in image.shape[1:]]
        # The peak is the inverse resampling, after the windows: refuse before spending them.
        check_inference_memory(path.name, geometry.size, resampled, self.prep.num_classes)
        loaded = time.perf_counter()

        stitch, why = self._stitch_device([image.shape[1:], geometry.size])
        log.info("%s: %s -> %s at %s mm; %d window(s) of %s, stitching %s", path.name, geometry.describe(),
                 "x".join(map(str, image.shape[1:])), "x".join(f"{s:g}" for s in self.prep.target_spacing),
                 self._count_windows(image.shape[1:]), "x".join(map(str, self.roi_size)), why)
        try:
            probs = self.inferer(stitch)(image[None], self.window_net)[0]
        except torch.OutOfMemoryError as exc:
            if stitch.type != "cuda":
                raise
            # The headroom left beside the output is a fixed guess; a large network's windows can
            # need more. The CPU holds the output instead (same values); windows stay on the GPU.
            log.warning("%s: out of GPU memory with the output on %s (%s); stitching on the CPU instead",
                        path.name, stitch, str(exc).splitlines()[0][:120])
            torch.cuda.empty_cache()
            stitch = torch.device("cpu")
            probs = self.inferer(stitch)(image[None], self.window_net)[0]
        windows = time.perf_counter()

        # Invertd copies the image's trace of applied transforms onto the prediction and undoes
        # them: crop -> pad back, spacing -> linear resampling to the input's grid, orientation.
        inverted = self._invert(data, probs, path.name)
        del data, probs, image
        if tuple(inverted.shape[1:]) != tuple(geometry.size):
            raise RuntimeError(f"inverse transforms gave {tuple(inverted.shape[1:])}, expected {geometry.size}")
        spread = None
        if self.quality:  # the last channel is the heads' spread, not a class
            spread = _plain(inverted[-1]).float().cpu().numpy()
            inverted = inverted[:-1]
        # The rest of the pipeline: argmax, then the task's clean-up, as a bundle runs them.
        label = self.pipeline.after_invert({PRED_KEY: inverted})[PRED_KEY]
        keep = self.keep_probabilities or self.rules.nodule_report
        # After the argmax: the NumPy view may share the tensor's memory, and is completed in place.
        probs_np = complete_probabilities(_plain(inverted).float().cpu().numpy()) if keep else None
        del inverted
        mask = _plain(label)[0].to(torch.uint8).cpu().numpy()
        nodules = None
        if self.rules.nodule_report:
            # Measurement only: the pipeline has already dropped components below min_component_ml.
            _, nodules = nodule_components(mask, geometry, probs_np, spread=spread)
        end = time.perf_counter()
        info = {"stitch": str(stitch), "resampled_shape": resampled,
                "load_s": loaded - start, "windows_s": windows - loaded, "post_s": end - windows}
        log.info("%s: %.1f s (read+preprocess %.1f, windows %.1f, inverse+postprocess %.1f)", path.name,
                 end - start, info["load_s"], info["windows_s"], info["post_s"])
        quality = disagreement(spread, mask) if spread is not None else None
        return Prediction(mask_xyz=mask, probabilities=probs_np if self.keep_probabilities else None,
                          quality=quality, spread_xyz=spread if self.keep_probabilities else None,
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
        if self.prune_level is None and self.combine != "probabilities":
            mode += f" (heads combined as {self.combine})"
        return (f"{self.source}: task {self.prep.task}, mode {mode}, tta {'on' if self.tta else 'off'}, "
                f"window {'x'.join(map(str, self.roi_size))} overlap {self.overlap:g} x{self.sw_batch_size}, "
                f"device {self.device}{' amp ' + str(self.amp_dtype).replace('torch.', '') if self.amp_dtype else ''}"
                f"{', head-disagreement quality signal' if self.quality else ''}")
