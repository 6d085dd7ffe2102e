"""MONAI dictionary transforms from a resolved :class:`~unetpp3d.config.Preprocessing`.

Every pipeline starts with the same deterministic preprocessing, so training, validation and
inference see identical inputs:

1. ``LoadImaged`` with :class:`~unetpp3d.imageio.readers.SitkReader` (channel first, float32),
2. ``Orientationd`` to ``prep.orientation`` (RAS), so spatial lists are in (x, y, z) RAS order,
3. ``Spacingd`` to ``prep.target_spacing`` (bilinear for the image, nearest for label maps),
4. ``CropForegroundd`` to the body (:class:`BodyMask` from ``prep.body_mask``: the voxels above
   ``prep.body_threshold_hu``, or the body's filled outline, lungs included) when
   ``prep.crop_foreground``; the crop box is also stored under ``foreground_start_coord`` /
   ``foreground_end_coord``,
5. one ``ScaleIntensityRanged`` that clips to ``prep.intensity_range`` and z-scores with
   ``prep.intensity_stats`` in the same step.

Steps 2-4 are traced on the MetaTensor, so ``Invertd`` brings a prediction made on the
preprocessed array back onto the input's own grid. Training adds padding to the patch size
(still deterministic), then random patches and augmentation; :data:`TRAIN_RANDOM_START`
is the index of the first random transform, which is also where MONAI's ``CacheDataset`` and
``PersistentDataset`` stop caching (they cache up to the first ``Randomizable`` transform).

Keys: ``"image"`` is the CT; every other key is treated as a label map (nearest-neighbour
resampling, no intensity change).

Example:
    >>> pipe = eval_transforms(prep)
    >>> sample = pipe({"image": "ct.nii.gz", "label": "liver.nii.gz"})
    >>> sample["image"].shape  # (1, x, y, z) on the target spacing, cropped to the body
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.config import KeysCollection
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.image_reader import ImageReader
from monai.transforms import (
    Affine,
    CenterSpatialCrop,
    Compose,
    DeleteItemsd,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandomizableTrait,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from unetpp3d.config import DataConfig, Preprocessing
from unetpp3d.data.body import BODY_KEY, BodyMask, BodyMaskd
from unetpp3d.errors import UserError
from unetpp3d.imageio.readers import SitkReader

IMAGE_KEY = "image"


# Training: load, EnsureType, orientation, spacing, crop foreground, intensity, pad image,
# pad labels; RandCropByPosNegLabeld is transform 8 (7 without the foreground crop, one more
# with the filled body mask, which BodyMaskd computes before the crop).
TRAIN_RANDOM_START = 8


CROP_MARGIN_VOXELS = 2  # keep the skin line inside the crop


INTENSITY_SCALE = 0.1  # RandScaleIntensityd: multiply by 1 + U(-0.1, 0.1)


GAMMA_RANGE = (0.7, 1.5)  # RandAdjustContrastd, as in nnU-Net


MAX_CONTEXT = 1.6  # cap on how much larger than the patch the pre-rotation crop may be


# Beyond this ratio of coarsest to finest target spacing, rotate in-plane only (nnU-Net uses 3):
# rotating thick-slice voxels out of plane would shear the anatomy.
ANISOTROPY_LIMIT = 3.0


class RandRotateScaled(RandomizableTransform, MapTransform):
    """Random rotation and scaling, each with its own probability, resampled once, then a centre crop.

    The input is expected to be larger than ``spatial_size`` (see :func:`train_transforms`), so
    that a rotated or zoomed-out patch is filled with real anatomy rather than padding. When
    neither augmentation fires the centre crop is all that happens.

    Args:
        keys: keys to transform; ``"image"`` is resampled bilinearly, others with nearest neighbour.
        spatial_size: output patch size (x, y, z).
        rotate_prob: probability of a rotation.
        rotate_degrees: each of the three angles is drawn from U(-rotate_degrees, rotate_degrees).
        scale_prob: probability of scaling.
        scale_range: each axis' factor is drawn from 1 + U(-scale_range, scale_range)
            (MONAI's convention: a factor above 1 zooms out).
        rotate_axes: the axes rotated about (default all three); ``(2,)`` rotates in the x-y plane only.
    """

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int], rotate_prob: float, rotate_degrees: float,
                 scale_prob: float, scale_range: float, rotate_axes: Sequence[int] = (0, 1, 2)) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.rotate_prob, self.rotate = float(rotate_prob), math.radians(rotate_degrees)
        self.scale_prob, self.scale_range = float(scale_prob), float(scale_range)
        self.rotate_axes = tuple(int(a) for a in rotate_axes)
        self._angles: tuple[float, float, float] | None = None
        self._scales: tuple[float, float, float] | None = None
        self._crop = CenterSpatialCrop(self.spatial_size)

    def randomize(self, data: Any = None) -> None:
        rotate = self.R.rand() < self.rotate_prob
        scale = self.R.rand() < self.scale_prob
        angles = self.R.uniform(-self.rotate, self.rotate, 3)
        angles[[a for a in range(3) if a not in self.rotate_axes]] = 0.0
        scales = 1.0 + self.R.uniform(-self.scale_range, self.scale_range, 3)
        # Plain floats: numpy float64 parameters make MONAI mix float64 and float32 matrices.
        self._angles = tuple(float(a) for a in angles) if rotate else None
        self._scales = tuple(float(s) for s in scales) if scale else None

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            if self._angles is None and self._scales is None:
                d[key] = self._crop(d[key])
                continue
            affine = Affine(rotate_params=self._angles, scale_params=self._scales, spatial_size=self.spatial_size,
                            mode="bilinear" if key == IMAGE_KEY else "nearest", padding_mode="border",
                            image_only=True)
            d[key] = affine(d[key])
        return d


def _floats(value: Any, n: int, name: str) -> list[float]:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        out = []
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise UserError(f"preprocessing.{name}: expected {n} numbers, got {value!r}; "
                        "resolve 'auto' values with the planner before building transforms")
    return out


def _checked(prep: Preprocessing) -> tuple[list[float], list[float], list[float], list[int]]:
    spacing = _floats(prep.target_spacing, 3, "target_spacing")
    low_high = _floats(prep.intensity_range, 2, "intensity_range")
    mean_std = _floats(prep.intensity_stats, 2, "intensity_stats")
    patch = [int(round(v)) for v in _floats(prep.patch_size, 3, "patch_size")]
    if min(spacing) <= 0 or low_high[0] >= low_high[1] or mean_std[1] <= 0 or min(patch) < 1:
        raise UserError(f"preprocessing: need positive spacing, low < high, std > 0 and a positive patch size; "
                        f"got target_spacing={spacing}, intensity_range={low_high}, intensity_stats={mean_std}, "
                        f"patch_size={patch}")
    return spacing, low_high, mean_std, patch


def _keys(keys: KeysCollection) -> tuple[str, ...]:
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    if IMAGE_KEY not in keys:
        raise ValueError(f"transform keys {keys} must include {IMAGE_KEY!r}")
    return keys


def _normalised(hu: float, mean_std: Sequence[float]) -> float:
    return (float(hu) - mean_std[0]) / mean_std[1]


def pad_value(prep: Preprocessing) -> float:
    """The normalised intensity to pad with: the low end of the intensity clip (air, fat).

    Training pads volumes smaller than its crop with this value (:func:`train_transforms`), so the
    sliding windows of validation and inference must pad with it too. Padding with 0 instead (the
    clipped foreground mean, i.e. soft tissue) surrounds a scan thinner than the patch, such as a
    few-slice series, with tissue the network never saw beside real anatomy.
    """
    _, (low, _high), mean_std, _ = _checked(prep)
    return _normalised(low, mean_std)


# Where the specs find unetpp3d's own components (derived from the classes, so a move is followed).
_READER_TARGET = f"{SitkReader.__module__}.{SitkReader.__qualname__}"
_BODY_MASK_TARGET = f"{BodyMask.__module__}.{BodyMask.__qualname__}"
_BODY_MASKD_TARGET = f"{BodyMaskd.__module__}.{BodyMaskd.__qualname__}"


def preprocessing_specs(prep: Preprocessing, keys: KeysCollection = (IMAGE_KEY, "label"),
                        series_uid: str | None = None, body_key: str | None = None) -> list[dict[str, Any]]:
    """The deterministic preprocessing (steps 1-5 of the module docstring) as ``{"_target_": ...}`` specs.

    The one description of the preprocessing: training and validation
    (:func:`preprocess_transforms`), the predictor and an exported bundle's ``inference.json``
    all instantiate these specs, with MONAI's ``ConfigParser`` (:func:`instantiate`). Plain
    JSON: MONAI class names, the dotted paths of unetpp3d's reader and body mask, and numbers.

    Args:
        prep: resolved preprocessing (no ``"auto"`` values).
        keys: ``"image"`` plus any label-map keys.
        series_uid: the DICOM series to read from folders holding several (None: the only one).
        body_key: training with the filled body mask: keep the mask under this key (for the
            patch sampler) and crop with it, which gives the same box as cropping with
            :func:`body_mask` directly.

    Returns:
        One spec per transform: LoadImaged (with :class:`~unetpp3d.imageio.readers.SitkReader`),
        EnsureTyped, Orientationd, Spacingd, CropForegroundd (when ``prep.crop_foreground``),
        ScaleIntensityRanged.

    Raises:
        UserError: ``prep`` has unresolved or invalid values.
    """
    keys = list(_keys(keys))
    spacing, (low, high), mean_std, _ = _checked(prep)
    reader: dict[str, Any] = {"_target_": _READER_TARGET}
    if series_uid is not None:
        reader["series_uid"] = str(series_uid)
    specs: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": keys, "reader": reader, "image_only": True, "ensure_channel_first": True},
        {"_target_": "EnsureTyped", "keys": keys, "dtype": "float32"},
        # The MetaTensor affine is RAS by the readers' contract; naming the axis labels says so.
        {"_target_": "Orientationd", "keys": keys, "axcodes": prep.orientation,
         "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
        {"_target_": "Spacingd", "keys": keys, "pixdim": spacing,
         "mode": ["bilinear" if k == IMAGE_KEY else "nearest" for k in keys]},
    ]
    body = {"threshold_hu": float(prep.body_threshold_hu), "mode": prep.body_mask, "air_hu": float(prep.body_air_hu)}
    if body_key is not None:
        specs.append({"_target_": _BODY_MASKD_TARGET, "keys": IMAGE_KEY, "mask_key": body_key, **body})
        if prep.crop_foreground:
            specs.append({"_target_": "CropForegroundd", "keys": [*keys, body_key], "source_key": body_key,
                          "margin": CROP_MARGIN_VOXELS, "allow_smaller": True})
    elif prep.crop_foreground:
        specs.append({"_target_": "CropForegroundd", "keys": keys, "source_key": IMAGE_KEY,
                      "select_fn": {"_target_": _BODY_MASK_TARGET, **body},
                      "margin": CROP_MARGIN_VOXELS, "allow_smaller": True})
    # Clip to [low, high] and z-score in one affine map: (low, high) -> ((low-mean)/std, (high-mean)/std).
    specs.append({"_target_": "ScaleIntensityRanged", "keys": IMAGE_KEY, "a_min": low, "a_max": high,
                  "b_min": _normalised(low, mean_std), "b_max": _normalised(high, mean_std), "clip": True})
    return specs


def instantiate(config: dict[str, Any], key: str) -> Any:
    """Build ``config[key]`` with MONAI's ``ConfigParser``, as ``python -m monai.bundle run`` builds a bundle.

    Args:
        config: a dict of specs (``{"_target_": ...}`` entries, lists of them, ``@`` references
            to other entries of ``config``, plain values; a value may also be a ready object).
        key: the entry to build; what it references is built too.
    """
    return ConfigParser(config).get_parsed_content(key)


def preprocess_transforms(prep: Preprocessing, keys: KeysCollection = (IMAGE_KEY, "label"),
                          reader: ImageReader | None = None) -> list[MapTransform]:
    """The deterministic preprocessing shared by every pipeline, built from :func:`preprocessing_specs`.

    Args:
        prep: resolved preprocessing (no ``"auto"`` values).
        keys: ``"image"`` plus any label-map keys.
        reader: replaces the :class:`~unetpp3d.imageio.readers.SitkReader` of the specs (e.g.
            MONAI's ``NibabelReader``, for comparisons).

    Returns:
        A list of MONAI dictionary transforms.
    """
    return _preprocess(prep, _keys(keys), reader, body_key=None)


def _preprocess(prep: Preprocessing, keys: tuple[str, ...], reader: ImageReader | None,
                body_key: str | None) -> list[MapTransform]:
    """:func:`preprocess_transforms`, optionally keeping the body mask under ``body_key`` (training)."""
    specs = preprocessing_specs(prep, keys, body_key=body_key)
    if reader is not None:
        specs[0] = {**specs[0], "reader": reader}
    return instantiate({"preprocessing": specs}, "preprocessing")


def _context_size(patch: Sequence[int], data_cfg: DataConfig) -> list[int]:
    """Crop size before rotation/scaling, large enough that the rotated patch stays inside real data."""
    aug = data_cfg.augment
    factor = 1.0
    if aug.rotate_prob > 0:
        a = math.radians(min(abs(aug.rotate_degrees), 45.0))
        factor *= math.cos(a) + math.sin(a)
    if aug.scale_prob > 0:
        factor *= 1.0 + abs(aug.scale_range)
    factor = min(factor, MAX_CONTEXT)
    return [int(math.ceil(p * factor)) for p in patch]


def train_transforms(prep: Preprocessing, data_cfg: DataConfig, keys: KeysCollection = (IMAGE_KEY, "label"),
                     reader: ImageReader | None = None) -> Compose:
    """Training pipeline: preprocessing, padding, class-balanced patches, augmentation.

    After :func:`preprocess_transforms` come (the first random one at index
    :data:`TRAIN_RANDOM_START`, one less without the foreground crop):

    - ``SpatialPadd`` image (with the value of air after normalisation) and labels (0) up to the
      crop size, so small volumes still yield full patches;
    - ``RandCropByPosNegLabeld``: ``data_cfg.samples_per_volume`` crops per volume, a share
      ``data_cfg.pos_fraction`` centred on foreground, the rest on background: with
      ``prep.body_mask == "filled"`` anywhere inside the body's filled outline (lungs included;
      :class:`BodyMaskd` keeps the mask beside the image until here), otherwise on body voxels
      only where the intensity clip keeps air apart from tissue, i.e. its low end is below the
      body threshold (the body crop has already removed most of the air in any case);
      the crops are larger than ``prep.patch_size`` when rotation or scaling may follow;
    - :class:`RandRotateScaled` (rotation and scaling, each with its own probability) and a
      centre crop to ``prep.patch_size``; about the slice axis only when the target spacing is
      more than :data:`ANISOTROPY_LIMIT` times coarser along it;
    - ``RandFlipd`` on each axis, ``RandScaleIntensityd``, ``RandShiftIntensityd``,
      ``RandGaussianNoised``, ``RandAdjustContrastd`` (gamma), each with its probability from
      ``data_cfg.augment``;
    - ``EnsureTyped`` to plain float32 tensors (no meta: training never inverts).

    Args:
        prep: resolved preprocessing.
        data_cfg: ``pos_fraction``, ``samples_per_volume`` and ``augment`` are used.
        keys: ``"image"`` and the label key (the first other key guides the patch sampling).
        reader: passed to :func:`load_transforms`.

    Returns:
        A ``Compose``; each call on a data dict returns a list of ``samples_per_volume`` dicts.
    """
    keys = _keys(keys)
    labels = [k for k in keys if k != IMAGE_KEY]
    if not labels:
        raise ValueError(f"training keys {keys} need a label key besides {IMAGE_KEY!r}")
    spacing, (low, _high), mean_std, patch = _checked(prep)
    aug = data_cfg.augment
    anisotropic = max(spacing) / min(spacing) > ANISOTROPY_LIMIT
    rotate_axes = (int(np.argmax(spacing)),) if anisotropic else (0, 1, 2)
    context = _context_size(patch, data_cfg)
    pos = float(data_cfg.pos_fraction)
    # With the filled outline, background patches are centred anywhere in the body, lungs
    # included: the mask travels beside the image until the patch is drawn.
    body = BODY_KEY if prep.body_mask == "filled" else None
    steps: list[Any] = _preprocess(prep, keys, reader, body)
    if body is None:
        sampler = RandCropByPosNegLabeld(keys, label_key=labels[0], spatial_size=context, pos=pos, neg=1.0 - pos,
                                         num_samples=int(data_cfg.samples_per_volume), image_key=IMAGE_KEY,
                                         image_threshold=_normalised(prep.body_threshold_hu, mean_std))
    else:
        sampler = RandCropByPosNegLabeld([*keys, body], label_key=labels[0], spatial_size=context, pos=pos,
                                         neg=1.0 - pos, num_samples=int(data_cfg.samples_per_volume),
                                         image_key=body, image_threshold=0.5)
    steps += [
        SpatialPadd(IMAGE_KEY, spatial_size=context, value=pad_value(prep)),
        SpatialPadd(labels + ([body] if body else []), spatial_size=context, value=0),
        sampler,
        *([DeleteItemsd(body)] if body else []),
        RandRotateScaled(keys, patch, aug.rotate_prob, aug.rotate_degrees, aug.scale_prob, aug.scale_range,
                         rotate_axes),
    ]
    steps += [RandFlipd(keys, prob=aug.flip_prob, spatial_axis=axis) for axis in range(3)]
    steps += [
        RandScaleIntensityd(IMAGE_KEY, factors=INTENSITY_SCALE, prob=aug.intensity_scale_prob),
        RandShiftIntensityd(IMAGE_KEY, offsets=aug.intensity_shift, prob=aug.intensity_shift_prob),
        RandGaussianNoised(IMAGE_KEY, prob=aug.noise_prob, std=aug.noise_std),
        RandAdjustContrastd(IMAGE_KEY, prob=aug.gamma_prob, gamma=GAMMA_RANGE, retain_stats=True),
        EnsureTyped(keys, dtype=torch.float32, track_meta=False),
    ]
    return _compose(steps, prep, keys, "train")


def eval_transforms(prep: Preprocessing, keys: KeysCollection = (IMAGE_KEY, "label"),
                    reader: ImageReader | None = None) -> Compose:
    """Validation pipeline on whole volumes: the deterministic preprocessing only, invertible.

    The crop keeps what lies beyond the image out (``allow_smaller``) and records its box, so
    ``Invertd(keys="pred", transform=<this>, orig_keys="image")`` puts a prediction back on the
    original grid.

    Args:
        prep: resolved preprocessing.
        keys: ``"image"`` plus any label-map keys.
        reader: passed to :func:`load_transforms`.
    """
    return _compose(preprocess_transforms(prep, keys, reader), prep, _keys(keys), "eval")


def inference_transforms(prep: Preprocessing, reader: ImageReader | None = None) -> Compose:
    """Inference pipeline: :func:`eval_transforms` on ``"image"`` alone.

    Args:
        prep: the model's preprocessing (from its checkpoint).
        reader: e.g. ``SitkReader(series_uid=...)`` for a DICOM folder holding several series.
    """
    return eval_transforms(prep, (IMAGE_KEY,), reader)


def _compose(steps: list, prep: Preprocessing, keys: Sequence[str], kind: str) -> Compose:
    compose = Compose(steps)
    # A disk cache is only valid for the preprocessing that produced it: make_dataset keeps one
    # cache folder per (preprocessing, keys).
    description = json.dumps({"prep": prep.to_dict(), "keys": list(keys), "version": 1}, sort_keys=True)
    compose.cache_key = f"{kind}-{hashlib.sha1(description.encode()).hexdigest()[:12]}"
    return compose


def split_for_cache(transform: Compose) -> tuple[Compose, Compose]:
    """Split a pipeline into its deterministic head and its random tail.

    The split is at the first randomizable transform, exactly where MONAI's ``CacheDataset``
    stops caching, for callers that cache by other means.
    """
    steps = list(transform.transforms)
    start = next((i for i, t in enumerate(steps) if isinstance(t, RandomizableTrait)), len(steps))
    return Compose(steps[:start]), Compose(steps[start:])


def make_dataset(data_dicts: Sequence[dict], transform: Compose, cache: str = "none",
                 cache_dir: str | Path | None = None, num_workers: int = 0, progress: bool = False) -> Dataset:
    """Wrap data dicts in a MONAI dataset that caches the deterministic part of ``transform``.

    Args:
        data_dicts: ``[{"image": path, "label": path}, ...]``.
        transform: a pipeline from this module.
        cache: ``"none"`` (read every time), ``"memory"`` (``CacheDataset``: everything up to the
            first random transform, computed once, held in RAM) or ``"disk"`` (``PersistentDataset``
            in ``cache_dir``, kept between runs, one subfolder per preprocessing).
        cache_dir: required for ``"disk"``.
        num_workers: threads that fill the memory cache (0: MONAI's default).
        progress: show a progress bar while filling the memory cache.

    Returns:
        A ``Dataset``, ``CacheDataset`` or ``PersistentDataset``.
    """
    data = list(data_dicts)
    if cache == "none":
        return Dataset(data, transform)
    if cache == "memory":
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=num_workers or None, progress=progress)
    if cache == "disk":
        if not cache_dir:
            raise UserError("data.cache_dir: empty; a disk cache needs a folder "
                            "(set data.cache_dir, or use cache: memory)")
        folder = Path(cache_dir) / getattr(transform, "cache_key", "default")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{cache_dir}: cannot create the cache folder ({exc.strerror}); "
                            "pick a writable data.cache_dir") from None
        return PersistentDataset(data, transform, cache_dir=folder)
    raise UserError(f"data.cache: {cache!r} is not one of none, memory, disk")
