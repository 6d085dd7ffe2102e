"""Automatic configuration of the network and its input, after nnU-Net's experiment planning.

MONAI's networks leave spacing, intensity normalisation, patch size, batch size, pooling and
depth to the user; nnU-Net derives them from the data (Isensee et al., "nnU-Net: a
self-configuring method for deep learning-based biomedical image segmentation", Nature Methods
2021). :func:`plan` does the same for a config whose values are ``"auto"``: it turns a
:class:`~unetpp3d.config.Config` plus a dataset fingerprint (:mod:`unetpp3d.data.fingerprint`,
written by ``unetpp3d check``) into a config with every ``"auto"`` resolved and the
:class:`~unetpp3d.config.Preprocessing` that training and inference share. Values already set in
the config are kept.

It sits with the model because it sizes the network: the depth, the strides, and the memory
that a patch and batch cost are those of :class:`~unetpp3d.model.network.UNetPlusPlus3D`
itself, measured on the meta device (:mod:`unetpp3d.model.sizing`).

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
from unetpp3d.model.sizing import estimate_memory_gb

ANISOTROPY_RATIO = 3.0  # nnU-Net: a median spacing axis > 3x the finest is "anisotropic"


MAX_PATCH_AXIS = 256  # cap on the starting patch, in voxels per axis


MIN_FEATURE_MAP = 4  # do not pool an axis whose feature map would drop below this (nnU-Net's value)


# An automatic patch lets the finest axes (in-plane for CT) pool at least this often, padding
# small images up to MIN_FEATURE_MAP * 2**MIN_POOLINGS voxels: with fewer poolings the network
# is hardly more than its first level, whatever model.features says.
MIN_POOLINGS = 2


SAME_SPACING = 1.1  # axes within 10% of the finest spacing count as finest (x and y of CT)


MIN_BOTTLENECK = 2  # voxels per axis at the deepest level; a 1-voxel axis there is refused by the network


MIN_BATCH = 2


DATASET_FRACTION_PER_BATCH = 0.05  # nnU-Net: one batch covers at most 5% of the dataset's voxels


BODY_MASK_BY_TASK = {
    # Nodules sit in the lungs, whose parenchyma (about -850 HU) a -500 HU threshold calls air:
    # the filled outline keeps them, and background patches are drawn from them too.
    "lung_nodule": "filled",
    # The abdomen has no large air-filled organ; the threshold crop is kept (docs/lidc.md measures both).
    "liver": "threshold",
}


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


def compute_strides(spacing: Sequence[float], patch: Sequence[int], max_depth: int) -> list[list[int]]:
    """Per-level strides and so the depth, nnU-Net style (``get_pool_and_conv_props``).

    At each level an axis is downsampled (stride 2) when its feature map stays at least
    :data:`MIN_FEATURE_MAP` voxels and its current spacing is at most twice the finest current
    spacing among the axes still large enough (so thick slices wait until the in-plane axes
    catch up, and pool once those have stopped). Levels are added while some axis pools, at
    most ``max_depth`` of them: every level downsamples, and a small patch gets a shallow
    network rather than levels that only add channels at the same resolution.

    Args:
        spacing: target spacing (mm), RAS order.
        patch: patch size (voxels), RAS order.
        max_depth: the most downsamplings the widths allow (``len(model.features) - 1``).

    Returns:
        Up to ``max_depth`` lists of three strides (1 or 2), none all ones; its length is the depth.
    """
    cur_spacing = [float(s) for s in spacing]
    cur_size = [int(n) for n in patch]
    strides: list[list[int]] = []
    while len(strides) < max_depth:
        large = [a for a in range(3) if cur_size[a] >= 2 * MIN_FEATURE_MAP]
        if not large:
            break
        finest = min(cur_spacing[a] for a in large)
        step = [2 if a in large and cur_spacing[a] <= 2.0 * finest + 1e-6 else 1 for a in range(3)]
        strides.append(step)
        cur_spacing = [s * k for s, k in zip(cur_spacing, step)]
        cur_size = [n // k for n, k in zip(cur_size, step)]
    return strides


def minimum_patch(spacing: Sequence[float]) -> list[int]:
    """The smallest automatic patch: room for one pooling on every axis, :data:`MIN_POOLINGS` on the finest.

    Args:
        spacing: target spacing (mm), RAS order.

    Returns:
        Voxels per axis: ``MIN_FEATURE_MAP * 2**MIN_POOLINGS`` along axes within
        :data:`SAME_SPACING` of the finest spacing, ``2 * MIN_FEATURE_MAP`` along the others.
    """
    finest = min(float(s) for s in spacing)
    return [MIN_FEATURE_MAP * 2 ** MIN_POOLINGS if float(s) <= SAME_SPACING * finest else 2 * MIN_FEATURE_MAP
            for s in spacing]


def _divisor(strides: Sequence[Sequence[int]]) -> list[int]:
    div = [1, 1, 1]
    for s in strides:
        div = [d * int(k) for d, k in zip(div, s)]
    return div


def _triples(strides: Any, depth: int, where: str = "model.strides") -> list[list[int]]:
    if not isinstance(strides, (list, tuple)) or len(strides) != depth:
        raise UserError(f"{where}: needs {depth} entries (one per downsampling, len(model.features) - 1), got {strides!r}")
    out = []
    for i, s in enumerate(strides):
        triple = [int(s)] * 3 if isinstance(s, (int, float)) else [int(v) for v in s]
        if len(triple) != 3 or any(v < 1 for v in triple):
            raise UserError(f"{where}: each entry must be a positive int or [x, y, z], got {s!r}")
        if triple == [1, 1, 1]:
            # A level that does not downsample adds width and compute at the same resolution
            # and no receptive field; the planner never makes one, so a config asks for it by mistake.
            raise UserError(f"{where}: entry {i + 1} ({s!r}) does not downsample any axis; remove it and the "
                            f"matching width from model.features, or set model.strides: auto to let the planner "
                            f"choose the depth")
        out.append(triple)
    return out


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


def _xyz(values: Sequence[Any]) -> str:
    return "x".join(str(v) for v in values)


def plan(cfg: Config, fp: dict[str, Any], labels: dict[int, str] | None = None,
         echo: Callable[[str], Any] | None = print) -> tuple[Config, Preprocessing]:
    """Resolve every ``"auto"`` in ``cfg`` from the fingerprint.

    * ``data.target_spacing``: :func:`target_spacing` of the cases' spacings.
    * ``data.intensity_range``: foreground 0.5 and 99.5 percentiles.
    * ``data.intensity_stats``: mean and std of the foreground clipped to that range.
    * ``model.strides`` and the depth: :func:`compute_strides` for the patch at the target
      spacing, at most ``len(model.features) - 1`` levels; ``model.features`` keeps the first
      ``depth + 1`` widths. Explicit strides keep every width and may not hold an all-ones entry.
    * ``data.patch_size``: the median image shape at the target spacing, each axis capped at
      :data:`MAX_PATCH_AXIS` and raised to :func:`minimum_patch` (small crops are padded, not
      refused), then rounded up to a multiple of the network's size divisor (an axis that is
      never pooled keeps the median instead of padding that buys nothing). While two patches do
      not fit ``data.gpu_memory_gb`` (:func:`~unetpp3d.model.sizing.estimate_memory_gb`, measured
      on the network itself) the largest axis shrinks by one divisor step, the depth following.
    * ``data.batch_size``: as many patches as fit the budget, at least 2, and at most a batch
      covering 5% of the dataset's voxels.
    * ``data.body_mask``: :data:`BODY_MASK_BY_TASK`.
    * ``train.head_weights``: equal weights summing to 1.

    No plan leaves the deepest level less than :data:`MIN_BOTTLENECK` voxels along an axis.

    Args:
        cfg: the config; not modified.
        fp: a fingerprint from :func:`~unetpp3d.data.fingerprint.fingerprint` (or the JSON
            ``unetpp3d check`` writes).
        labels: class number -> name; default the fingerprint's.
        echo: called once with the summary text from :func:`describe_plan`, which names each
            value and where it came from (default ``print``; ``None`` for silence;
            ``lines.append`` to keep it).

    Returns:
        ``(resolved_config, preprocessing)``.

    Raises:
        UserError: the fingerprint lacks what an ``"auto"`` needs, or explicit values do not fit
            together (a patch that is not a multiple of the strides' product, or too small to
            pool, for instance).
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
    max_depth = len(model.features) - 1

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
    explicit_strides = None if _is_auto(model.strides) else _triples(model.strides, max_depth)

    def strides_for(patch: Sequence[int]) -> list[list[int]]:
        return explicit_strides or compute_strides(spacing, patch, max_depth)

    def model_args(strides: Sequence[Sequence[int]]) -> dict[str, Any]:
        return dict(in_channels=1, out_channels=num_classes, features=list(model.features[:len(strides) + 1]),
                    deep_supervision=model.deep_supervision, strides=[list(s) for s in strides], norm=model.norm,
                    act=model.act, upsample=model.upsample, dropout=model.dropout)

    def memory(patch: Sequence[int], strides: Sequence[Sequence[int]], batch: int) -> float:
        try:
            return estimate_memory_gb(model_args(strides), patch, batch, amp)
        except ValueError as exc:  # the network's own input checks
            raise UserError(f"data.patch_size {list(patch)} with model.strides {list(strides)}: {exc}") from None

    def fits(patch: Sequence[int], strides: Sequence[Sequence[int]], batch: int) -> bool:
        return memory(patch, strides, batch) <= budget

    if _is_auto(data.patch_size):
        start = [max(1, min(MAX_PATCH_AXIS, int(round(n)))) for n in median_shape]
        floor = minimum_patch(spacing)
        want = [max(s, f) for s, f in zip(start, floor)]
        while True:
            patch, strides = _fit_patch(want, start, strides_for, explicit_strides is not None)
            div = _divisor(strides)
            if fits(patch, strides, MIN_BATCH):
                break
            low = [max(f, MIN_BOTTLENECK * d) for f, d in zip(floor, div)]
            shrinkable = [a for a in range(3) if patch[a] - div[a] >= low[a]]
            if not shrinkable:
                need = memory(patch, strides, MIN_BATCH)
                raise UserError(f"data.gpu_memory_gb = {budget:g}: even a {_xyz(patch)} patch needs about "
                                f"{need:.1f} GB at batch size {MIN_BATCH}; raise the budget or narrow model.features")
            axis = max(shrinkable, key=lambda a: (patch[a], a))
            want = list(patch)
            want[axis] -= div[axis]
        data.patch_size = patch
        padded = [a for a in range(3) if patch[a] > max(start[a], 1) and start[a] < floor[a]]
        notes["patch_size"] = ("median shape at target spacing" + (f", {'/'.join('xyz'[a] for a in padded)} padded "
                               "up so the network can pool" if padded else "") + ", fitted to the memory budget")
    patch = [int(p) for p in data.patch_size]
    strides = strides_for(patch)
    div = _divisor(strides)
    if not strides:
        raise UserError(f"data.patch_size {patch}: too small to downsample at spacing {spacing} (an axis pools only "
                        f"from {2 * MIN_FEATURE_MAP} voxels); enlarge the patch or set it to auto")
    if any(p % d for p, d in zip(patch, div)):
        raise UserError(f"data.patch_size {patch} must be a multiple of {div} on each axis (the product of the "
                        f"strides {strides}); change one of them or set both to auto")
    thin = [a for a in range(3) if patch[a] // div[a] < MIN_BOTTLENECK]
    if thin:
        raise UserError(f"data.patch_size {patch} with strides {strides} leaves the deepest level "
                        f"{_xyz([p // d for p, d in zip(patch, div)])} voxels, under {MIN_BOTTLENECK} along "
                        f"{', '.join('xyz'[a] for a in thin)}; enlarge the patch there or pool that axis less")
    depth = len(strides)
    if _is_auto(model.strides):
        model.strides = strides
        model.features = list(model.features[:depth + 1])
        notes["strides"] = f"nnU-Net rule, size divisor {_xyz(div)}"
        notes["depth"] = (f"{depth} of at most {max_depth}: the patch allows {depth} poolings" if depth < max_depth
                          else f"{depth}, all the widths")

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
    heads = depth if model.deep_supervision else 1
    if _is_auto(cfg.train.head_weights):
        cfg.train.head_weights = [1.0 / heads] * heads
        notes["head_weights"] = "equal"
    elif len(cfg.train.head_weights) != heads:
        raise UserError(f"train.head_weights: needs {heads} weights (one per head of the {depth}-level network "
                        f"planned), got {cfg.train.head_weights}")
    if _is_auto(data.body_mask):
        data.body_mask = BODY_MASK_BY_TASK.get(cfg.task, "threshold")
        notes["body_mask"] = f"{cfg.task} task"

    prep = Preprocessing(
        task=cfg.task,
        labels={str(k): v for k, v in sorted(labels.items())},
        target_spacing=[float(s) for s in data.target_spacing],
        intensity_range=[float(v) for v in data.intensity_range],
        intensity_stats=[float(v) for v in data.intensity_stats],
        patch_size=patch,
        crop_foreground=bool(data.crop_foreground),
        body_mask=str(data.body_mask),
    )
    notes["memory"] = f"about {memory(patch, strides, int(data.batch_size)):.1f} of {budget:g} GB"
    if echo is not None:
        echo(describe_plan(cfg, prep, notes))
    return cfg, prep


def _fit_patch(want: Sequence[int], start: Sequence[int], strides_for: Callable[[Sequence[int]], list[list[int]]],
               explicit: bool) -> tuple[list[int], list[list[int]]]:
    """Round ``want`` up to the divisor of its strides (rounding up can only make more axes poolable, so twice)."""
    strides = strides_for(want)
    patch = _round_up(want, _divisor(strides))
    strides = strides_for(patch)
    div = _divisor(strides)
    patch = [max(p, MIN_BOTTLENECK * d) for p, d in zip(_round_up(patch, div), div)]
    if not explicit:
        # Padding an axis that is never pooled buys nothing: it keeps the median (at least MIN_BOTTLENECK).
        patch = [max(MIN_BOTTLENECK, min(p, s)) if d == 1 else p for p, s, d in zip(patch, start, div)]
    return patch, strides


def describe_plan(cfg: Config, prep: Preprocessing, notes: dict[str, str] | None = None) -> str:
    """A few lines naming each planned value and where it came from ("config" when explicit)."""
    notes = notes or {}

    def src(key: str) -> str:
        return notes.get(key, "config")

    def xyz(values: Sequence[float], unit: str = "") -> str:
        return " x ".join(f"{v:.4g}" for v in values) + unit

    lo, hi = prep.intensity_range
    mean, std = prep.intensity_stats
    strides = cfg.model.strides
    lines = [
        "plan:",
        f"  target spacing   {xyz(prep.target_spacing, ' mm')}  ({src('target_spacing')})",
        f"  intensity clip   [{lo:.4g}, {hi:.4g}]  ({src('intensity_range')})",
        f"  z-score          mean {mean:.4g}, std {std:.4g}  ({src('intensity_stats')})",
        f"  body mask        {prep.body_mask}  ({src('body_mask')})",
        f"  patch            {xyz(prep.patch_size, ' voxels')}  ({src('patch_size')})",
        f"  batch size       {cfg.data.batch_size}  ({src('batch_size')}; {notes.get('memory', '')})",
        f"  depth            {len(strides)}, widths {list(cfg.model.features)}  ({src('depth')})",
        f"  strides          {strides}  ({src('strides')})",
        f"  head weights     {', '.join(f'{w:.3g}' for w in cfg.train.head_weights)}  ({src('head_weights')})",
    ]
    return "\n".join(lines)
