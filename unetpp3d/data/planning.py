"""Dataset fingerprint and automatic configuration, after nnU-Net.

MONAI's networks leave spacing, intensity normalisation, patch size, batch size and pooling to
the user; nnU-Net derives them from the data (Isensee et al., "nnU-Net: a self-configuring
method for deep learning-based biomedical image segmentation", Nature Methods 2021). This module
does the same for a config whose values are ``"auto"``:

* :func:`fingerprint` reads the labelled cases once and records spacing, size, foreground
  intensities and label volumes; :func:`unetpp3d.commands.check.run_check` writes it as JSON.
* :func:`plan` turns a :class:`~unetpp3d.config.Config` plus a fingerprint into a config with
  every ``"auto"`` resolved and the :class:`~unetpp3d.config.Preprocessing` that training and
  inference share. Values already set in the config are kept.

All spatial lists (spacing, size, patch, strides) are in the (x, y, z) order of the
RAS-oriented array, the order the transforms produce.

Example::

    >>> fp = fingerprint(manifest.training, manifest.labels)
    >>> cfg, prep = plan(load_config("configs/liver.yaml"), fp)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from unetpp3d.config import AUTO, Config, Preprocessing
from unetpp3d.errors import UserError

ANISOTROPY_RATIO = 3.0  # nnU-Net: a median spacing axis > 3x the finest is "anisotropic"


MAX_PATCH_AXIS = 256  # cap on the starting patch, in voxels per axis


MIN_FEATURE_MAP = 4  # do not pool an axis whose feature map would drop below this


MIN_BATCH = 2


DATASET_FRACTION_PER_BATCH = 0.05  # nnU-Net: one batch covers at most 5% of the dataset's voxels


# Memory model constants (see estimate_memory_gb).
_OVERHEAD_FACTOR = 1.2  # allocator fragmentation and cuDNN workspaces


_FIXED_GB = 1.0  # CUDA context and libraries


_STATE_BYTES_PER_PARAM = 16  # fp32 weights, gradients and two optimizer buffers


def target_spacing(spacings: np.ndarray) -> tuple[list[float], str]:
    """nnU-Net's target spacing: the median, except along a much coarser axis.

    When the coarsest median axis is more than :data:`ANISOTROPY_RATIO` times the finest, that
    axis gets the 10th percentile of its spacings instead (resampling most scans to the median
    of a thick-slice axis would invent slices), but never finer than the other axes.

    Args:
        spacings: (n_cases, 3) spacings in RAS order.

    Returns:
        ``(spacing, reason)``.
    """
    spacings = np.asarray(spacings, dtype=float).reshape(-1, 3)
    median = np.median(spacings, axis=0)
    worst = int(np.argmax(median))
    if median[worst] > ANISOTROPY_RATIO * median.min():
        others = [a for a in range(3) if a != worst]
        coarse = max(float(np.percentile(spacings[:, worst], 10)), float(median[others].max()))
        out = median.copy()
        out[worst] = coarse
        return out.round(6).tolist(), f"median; anisotropic, so {'xyz'[worst]} from its 10th percentile"
    return median.round(6).tolist(), "median"


def compute_strides(spacing: Sequence[float], patch: Sequence[int], depth: int) -> list[list[int]]:
    """Per-level strides, nnU-Net style.

    An axis is downsampled (stride 2) at a level only when its current spacing is at most twice
    the finest current spacing (so thick slices wait until the in-plane axes catch up) and its
    feature map stays at least :data:`MIN_FEATURE_MAP` voxels.

    Args:
        spacing: target spacing (mm), RAS order.
        patch: patch size (voxels), RAS order.
        depth: number of downsamplings (``len(model.features) - 1``).

    Returns:
        ``depth`` lists of three strides.
    """
    cur_spacing = [float(s) for s in spacing]
    cur_size = [int(n) for n in patch]
    strides = []
    for _ in range(depth):
        finest = min(cur_spacing)
        step = [2 if cur_spacing[a] <= 2.0 * finest + 1e-6 and cur_size[a] >= 2 * MIN_FEATURE_MAP else 1
                for a in range(3)]
        strides.append(step)
        cur_spacing = [s * k for s, k in zip(cur_spacing, step)]
        cur_size = [n // k for n, k in zip(cur_size, step)]
    return strides


def _divisor(strides: Sequence[Sequence[int]]) -> list[int]:
    div = [1, 1, 1]
    for s in strides:
        div = [d * int(k) for d, k in zip(div, s)]
    return div


def _triples(strides: Any, depth: int, where: str = "model.strides") -> list[list[int]]:
    if not isinstance(strides, (list, tuple)) or len(strides) != depth:
        raise UserError(f"{where}: needs {depth} entries (one per downsampling, len(model.features) - 1), got {strides!r}")
    out = []
    for s in strides:
        triple = [int(s)] * 3 if isinstance(s, (int, float)) else [int(v) for v in s]
        if len(triple) != 3 or any(v < 1 for v in triple):
            raise UserError(f"{where}: each entry must be a positive int or [x, y, z], got {s!r}")
        out.append(triple)
    return out


def _param_count(features: Sequence[int], strides: Sequence[Sequence[int]], in_channels: int, num_classes: int,
                 deep_supervision: bool) -> int:
    """Weights of :class:`~unetpp3d.model.network.UNetPlusPlus3D` (3x3x3 convs, deconv ups, 1x1x1 heads)."""
    depth = len(features) - 1
    n = 0
    for i, c in enumerate(features):
        cin = in_channels if i == 0 else features[i - 1]
        n += 27 * cin * c + 27 * c * c + 4 * c  # encoder block + two norms
    for i in range(depth):
        c, up = features[i], int(np.prod(strides[i]))
        for j in range(1, depth - i + 1):
            n += up * features[i + 1] * c  # transposed conv
            n += 27 * (j + 1) * c * c + 27 * c * c + 4 * c
    heads = depth if deep_supervision else 1
    return n + heads * (features[0] + 1) * num_classes


def estimate_memory_gb(patch: Sequence[int], batch: int, features: Sequence[int], strides: Sequence[Sequence[int]],
                       num_classes: int, deep_supervision: bool = True, amp: bool = True,
                       in_channels: int = 1) -> float:
    """Estimate the GPU memory (GB) that training a UNet++ on ``batch`` patches needs.

    The model counts what autograd keeps for the backward pass, per sample, at encoder level
    ``i`` with ``C_i`` channels over ``V_i`` voxels (the patch divided by the strides so far):

    * encoder block X^{i,0}: ``4 C_i V_i`` (each of its two conv-norm-activation units keeps its
      convolution output and its activation output);
    * nested node X^{i,j}, ``j = 1..L-i``: ``(j + 1) C_i V_i`` for the concatenated input its
      first convolution keeps, ``4 C_i V_i`` for its block and ``C_i V_i`` for the upsampled
      input (briefly alive beside the concatenation);
    * heads and loss: ``4 K V_0`` per head in fp32 (logits, softmax, target, gradient).

    Activations take 2 bytes under mixed precision (4 without). The sum is multiplied by
    ``batch`` and by 1.2 for allocator fragmentation and cuDNN workspaces, then 16 bytes per
    weight (fp32 weight, gradient, two optimizer buffers) and 1 GB for the CUDA context are
    added. For the default widths (32..320, four downsamplings) this gives about 3 kB per patch
    voxel, i.e. roughly 17 GB for two 128^3 patches.
    """
    depth = len(features) - 1
    voxels = float(np.prod(patch))
    values = 0.0
    div = [1, 1, 1]
    for i, c in enumerate(features):
        if i > 0:
            div = [d * k for d, k in zip(div, strides[i - 1])]
        v = voxels / float(np.prod(div))
        per_voxel = 4 * c
        for j in range(1, depth - i + 1):
            per_voxel += (j + 1) * c + 4 * c + c
        values += per_voxel * v
    act_bytes = 2 if amp else 4
    heads = depth if deep_supervision else 1
    per_sample = values * act_bytes + heads * 4 * num_classes * voxels * 4
    params = _param_count(features, strides, in_channels, num_classes, deep_supervision)
    total = batch * per_sample * _OVERHEAD_FACTOR + params * _STATE_BYTES_PER_PARAM
    return total / 1e9 + _FIXED_GB


def _round_up(patch: Sequence[int], div: Sequence[int]) -> list[int]:
    return [max(d, int(math.ceil(p / d)) * d) for p, d in zip(patch, div)]


def _clipped_stats(intensity: dict[str, Any], low: float, high: float) -> tuple[float, float]:
    """Mean and std of foreground intensities clipped to [low, high], from the stored quantiles.

    Each quantile stands for an equal share of the samples, so clipping the quantiles and
    averaging approximates clipping the samples (within half a percent of the mass).
    """
    q = np.clip(np.asarray(intensity["quantiles"], dtype=float), low, high)
    mids = 0.5 * (q[1:] + q[:-1])  # one value per 0.5 % slice of the distribution
    return float(mids.mean()), float(mids.std())


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == AUTO


def plan(cfg: Config, fp: dict[str, Any], labels: dict[int, str] | None = None,
         echo: Callable[[str], Any] | None = print) -> tuple[Config, Preprocessing]:
    """Resolve every ``"auto"`` in ``cfg`` from the fingerprint.

    * ``data.target_spacing``: :func:`target_spacing` of the cases' spacings.
    * ``data.intensity_range``: foreground 0.5 and 99.5 percentiles.
    * ``data.intensity_stats``: mean and std of the foreground clipped to that range.
    * ``model.strides``: :func:`compute_strides` for the patch at the target spacing.
    * ``data.patch_size``: the median image shape at the target spacing, each axis capped at
      :data:`MAX_PATCH_AXIS` and rounded up to a multiple of the network's size divisor; while
      two patches do not fit ``data.gpu_memory_gb`` (:func:`estimate_memory_gb`), the largest
      axis shrinks by one divisor step.
    * ``data.batch_size``: as many patches as fit the budget, at least 2, and at most a batch
      covering 5% of the dataset's voxels.
    * ``train.head_weights``: equal weights summing to 1.

    Args:
        cfg: the config; not modified.
        fp: a fingerprint from :func:`fingerprint` (or the JSON ``unetpp3d check`` writes).
        labels: class number -> name; default the fingerprint's.
        echo: called once with the summary text from :func:`describe_plan`, which names each
            value and where it came from (default ``print``; ``None`` for silence;
            ``lines.append`` to keep it).

    Returns:
        ``(resolved_config, preprocessing)``.

    Raises:
        UserError: the fingerprint lacks what an ``"auto"`` needs, or explicit values do not fit
            together (a patch that is not a multiple of the strides' product, for instance).
    """
    cfg = copy.deepcopy(cfg)
    if labels is None:
        if "labels" not in fp:
            raise UserError("fingerprint: no 'labels'; pass the manifest's labels")
        labels = {int(k): str(v) for k, v in fp["labels"].items()}
    num_classes = len(labels)
    cases = fp.get("cases") or []
    if not cases:
        raise UserError("fingerprint: no cases; run `unetpp3d check` on the manifest first")
    notes: dict[str, str] = {}
    data, model = cfg.data, cfg.model
    depth = len(model.features) - 1

    if _is_auto(data.target_spacing):
        spacing, why = target_spacing(np.array([c["spacing"] for c in cases]))
        data.target_spacing = spacing
        notes["target_spacing"] = why
    spacing = [float(s) for s in data.target_spacing]

    intensity = fp.get("intensity") or {}
    needs_intensity = _is_auto(data.intensity_range) or _is_auto(data.intensity_stats)
    if needs_intensity and intensity.get("source", "none") == "none":
        raise UserError("fingerprint: no intensity samples; set data.intensity_range and data.intensity_stats "
                        "in the config, or fingerprint labelled cases")
    if _is_auto(data.intensity_range):
        data.intensity_range = [round(intensity["percentile_00_5"], 2), round(intensity["percentile_99_5"], 2)]
        notes["intensity_range"] = f"{intensity['source']} 0.5/99.5 percentiles"
        if data.intensity_range[0] >= data.intensity_range[1]:
            raise UserError(f"fingerprint: foreground intensities are constant ({data.intensity_range[0]}); "
                            "set data.intensity_range in the config")
    if _is_auto(data.intensity_stats):
        low, high = data.intensity_range
        if notes.get("intensity_range"):
            mean, std = intensity["clipped_mean"], intensity["clipped_std"]
        else:
            mean, std = _clipped_stats(intensity, low, high)
        data.intensity_stats = [round(mean, 4), round(max(std, 1e-3), 4)]
        notes["intensity_stats"] = f"{intensity['source']} mean/std after clipping"

    amp = cfg.train.amp != "off"
    budget = float(data.gpu_memory_gb)
    median_shape = np.median([[n * s / t for n, s, t in zip(c["size"], c["spacing"], spacing)] for c in cases], axis=0)
    explicit_strides = None if _is_auto(model.strides) else _triples(model.strides, depth)

    def fits(patch: Sequence[int], strides: Sequence[Sequence[int]], batch: int) -> bool:
        return estimate_memory_gb(patch, batch, model.features, strides, num_classes, model.deep_supervision,
                                  amp) <= budget

    def strides_for(patch: Sequence[int]) -> list[list[int]]:
        return explicit_strides or compute_strides(spacing, patch, depth)

    if _is_auto(data.patch_size):
        patch = [max(1, min(MAX_PATCH_AXIS, int(round(n)))) for n in median_shape]
        while True:
            strides = strides_for(patch)
            patch = _round_up(patch, _divisor(strides))
            strides = strides_for(patch)  # rounding up can only make more axes poolable
            div = _divisor(strides)
            patch = _round_up(patch, div)
            if fits(patch, strides, MIN_BATCH):
                break
            shrinkable = [a for a in range(3) if patch[a] - div[a] >= div[a]]
            if not shrinkable:
                need = estimate_memory_gb(patch, MIN_BATCH, model.features, strides, num_classes,
                                          model.deep_supervision, amp)
                raise UserError(f"data.gpu_memory_gb = {budget:g}: even a {'x'.join(map(str, patch))} patch needs about "
                                f"{need:.1f} GB at batch size {MIN_BATCH}; raise the budget or narrow model.features")
            axis = max(shrinkable, key=lambda a: (patch[a], a))
            patch[axis] -= div[axis]
        data.patch_size = patch
        notes["patch_size"] = "median shape at target spacing, fitted to the memory budget"
    patch = [int(p) for p in data.patch_size]
    strides = strides_for(patch)
    div = _divisor(strides)
    if any(p % d for p, d in zip(patch, div)):
        raise UserError(f"data.patch_size {patch} must be a multiple of {div} on each axis (the product of the "
                        f"strides {strides}); change one of them or set both to auto")
    if _is_auto(model.strides):
        model.strides = strides
        notes["strides"] = f"nnU-Net rule, size divisor {'x'.join(map(str, div))}"

    if _is_auto(data.batch_size):
        dataset_voxels = sum(float(np.prod([n * s / t for n, s, t in zip(c["size"], c["spacing"], spacing)]))
                             for c in cases)
        cap = max(MIN_BATCH, int(DATASET_FRACTION_PER_BATCH * dataset_voxels / float(np.prod(patch))))
        batch = MIN_BATCH
        while batch < cap and fits(patch, strides, batch + 1):
            batch += 1
        data.batch_size = batch
        capped = batch == cap and fits(patch, strides, batch + 1)
        notes["batch_size"] = "capped at 5% of the dataset's voxels" if capped else "fits the memory budget"
    if _is_auto(cfg.train.head_weights):
        heads = depth if model.deep_supervision else 1
        cfg.train.head_weights = [1.0 / heads] * heads
        notes["head_weights"] = "equal"
    elif len(cfg.train.head_weights) != (depth if model.deep_supervision else 1):
        raise UserError(f"train.head_weights: needs {depth if model.deep_supervision else 1} weights (one per head), "
                        f"got {cfg.train.head_weights}")

    prep = Preprocessing(
        task=cfg.task,
        labels={str(k): v for k, v in sorted(labels.items())},
        target_spacing=[float(s) for s in data.target_spacing],
        intensity_range=[float(v) for v in data.intensity_range],
        intensity_stats=[float(v) for v in data.intensity_stats],
        patch_size=patch,
        crop_foreground=bool(data.crop_foreground),
    )
    memory = estimate_memory_gb(patch, int(data.batch_size), model.features, strides, num_classes,
                                model.deep_supervision, amp)
    notes["memory"] = f"about {memory:.1f} of {budget:g} GB"
    if echo is not None:
        echo(describe_plan(cfg, prep, notes))
    return cfg, prep


def describe_plan(cfg: Config, prep: Preprocessing, notes: dict[str, str] | None = None) -> str:
    """A few lines naming each planned value and where it came from ("config" when explicit)."""
    notes = notes or {}

    def src(key: str) -> str:
        return notes.get(key, "config")

    def xyz(values: Sequence[float], unit: str = "") -> str:
        return " x ".join(f"{v:.4g}" for v in values) + unit

    lo, hi = prep.intensity_range
    mean, std = prep.intensity_stats
    lines = [
        "plan:",
        f"  target spacing   {xyz(prep.target_spacing, ' mm')}  ({src('target_spacing')})",
        f"  intensity clip   [{lo:.4g}, {hi:.4g}]  ({src('intensity_range')})",
        f"  z-score          mean {mean:.4g}, std {std:.4g}  ({src('intensity_stats')})",
        f"  patch            {xyz(prep.patch_size, ' voxels')}  ({src('patch_size')})",
        f"  batch size       {cfg.data.batch_size}  ({src('batch_size')}; {notes.get('memory', '')})",
        f"  strides          {cfg.model.strides}  ({src('strides')})",
        f"  head weights     {', '.join(f'{w:.3g}' for w in cfg.train.head_weights)}  ({src('head_weights')})",
    ]
    return "\n".join(lines)
