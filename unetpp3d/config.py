"""Configuration: plain dataclasses loaded from YAML and validated once, here, at the edge.

A config has four sections (``model``, ``data``, ``train``, ``infer``) plus ``task``. Values
spelled ``auto`` are filled in from the dataset fingerprint by :mod:`unetpp3d.model.planning` before
training starts; the resolved config is saved with the run, so a model always knows its own
preprocessing. Spatial lists (spacing, patch size, strides) are in (x, y, z) order of the RAS
array that the transforms produce.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from unetpp3d.errors import UserError
from unetpp3d.tasks import TASKS

AUTO = "auto"


@dataclass
class ModelConfig:
    features: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 320])
    strides: Union[str, list] = AUTO  # "auto" or one int / [x, y, z] per downsampling
    deep_supervision: bool = True
    norm: str = "instance"
    act: str = "leakyrelu"
    upsample: str = "deconv"
    dropout: float = 0.0


@dataclass
class AugmentConfig:
    flip_prob: float = 0.5  # per axis
    rotate_prob: float = 0.2
    rotate_degrees: float = 15.0
    scale_prob: float = 0.2
    scale_range: float = 0.15
    intensity_shift_prob: float = 0.2
    intensity_shift: float = 0.1  # in normalised units
    intensity_scale_prob: float = 0.2
    noise_prob: float = 0.1
    noise_std: float = 0.1
    gamma_prob: float = 0.1


@dataclass
class DataConfig:
    target_spacing: Union[str, list] = AUTO  # mm, [x, y, z]
    intensity_range: Union[str, list] = AUTO  # HU clip [low, high]
    intensity_stats: Union[str, list] = AUTO  # [mean, std] after clipping
    patch_size: Union[str, list] = AUTO  # voxels, [x, y, z]
    batch_size: Union[str, int] = AUTO
    gpu_memory_gb: float = 24.0  # budget that "auto" patch and batch size must fit
    pos_fraction: float = 0.67  # share of patches centred on foreground
    samples_per_volume: int = 2
    crop_foreground: bool = True  # crop to the body before patching
    # What counts as body, for the crop and for where background patches are centred:
    # "threshold" (voxels above -500 HU), "filled" (the body's filled outline: keeps the lungs),
    # or "auto" (the planner's choice per task: filled for lung_nodule, threshold for liver).
    body_mask: Literal["auto", "threshold", "filled"] = AUTO
    cache: Literal["none", "memory", "disk"] = "memory"
    cache_dir: str = ""
    num_workers: int = 4
    validation_fraction: float = 0.2
    folds: int = 5
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainConfig:
    epochs: int = 300
    iterations_per_epoch: int = 250
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    weight_decay: float = 3e-5
    momentum: float = 0.99
    schedule: Literal["poly", "cosine"] = "poly"
    warmup_epochs: int = 0
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    grad_clip: float = 12.0
    val_every: int = 5
    seed: int = 0
    head_weights: Union[str, list] = AUTO  # "auto": equal weights summing to 1
    loss: Literal["dice_ce", "dice_bce"] = "dice_ce"
    compile: bool = False
    # Recompute concatenations, norms and activations in the backward pass instead of storing
    # them (UNetPlusPlus3D.checkpointing): less memory for large patches, a little more time.
    checkpointing: bool = False
    deterministic: bool = False
    # After training, time and score every UNet++ level on the validation cases (pruning.json),
    # from which `infer --mode fast` picks its level. Off: fast mode keeps its fixed default.
    measure_pruning: bool = True


# The pruned UNet++ L^l that fast mode runs when infer.prune_level is null (capped at the depth).
FAST_PRUNE_LEVEL = 2


@dataclass
class InferConfig:
    """Inference settings: the one set of defaults for ``unetpp3d infer``, the predictor and bundles.

    A model's own ``infer`` section (saved with its config) overrides these defaults; a flag of
    ``unetpp3d infer`` overrides the model's value.
    """

    overlap: float = 0.5
    sw_batch_size: int = 2
    mode: Literal["accurate", "fast"] = "accurate"
    prune_level: Union[int, None] = None  # fast mode's UNet++ L^l; null: FAST_PRUNE_LEVEL
    tta: bool = False
    min_component_ml: float = 0.0  # lung nodules: drop components smaller than this


# The inference modes, from InferConfig's one list (the command line's --mode choices).
INFER_MODES: tuple[str, ...] = get_args(get_type_hints(InferConfig)["mode"])


@dataclass
class Config:
    task: str = "liver"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        if value is False and "off" in get_args(hint):  # YAML reads a bare `off` as false
            value = "off"
        if value not in get_args(hint):
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, get_args(hint)))}")
        return value
    if origin is Union:
        for option in get_args(hint):
            try:
                return _check_type(value, option, where)
            except UserError:
                continue
        names = ", ".join(getattr(a, "__name__", str(a)) for a in get_args(hint))
        raise UserError(f"{where}: {value!r} should be one of: {names}")
    if hint is type(None):
        if value is not None:
            raise UserError(f"{where}: expected null")
        return None
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected text, got {value!r}")
        if value != AUTO and where.split(".")[-1] in ("target_spacing", "intensity_range", "intensity_stats",
                                                       "patch_size", "strides", "head_weights", "batch_size"):
            raise UserError(f"{where}: expected 'auto' or a value, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    raise AssertionError(f"unhandled type {hint} at {where}")


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, key)
        else:
            kwargs[name] = _check_type(value, hint, key)
    return cls(**kwargs)


def _validate(cfg: Config, source: str) -> None:
    def bad(msg: str) -> UserError:
        return UserError(f"{source}: {msg}")

    if cfg.task not in TASKS:
        raise bad(f"task {cfg.task!r} is not one of {', '.join(TASKS)}")
    if not cfg.model.features or any(f <= 0 for f in cfg.model.features):
        raise bad(f"model.features must be positive widths, got {cfg.model.features}")
    if cfg.train.lr <= 0:
        raise bad(f"train.lr must be positive, got {cfg.train.lr}")
    if cfg.train.epochs < 1 or cfg.train.iterations_per_epoch < 1 or cfg.train.val_every < 1:
        raise bad("train.epochs, train.iterations_per_epoch and train.val_every must be at least 1")
    if cfg.train.weight_decay < 0 or cfg.train.grad_clip < 0:
        raise bad("train.weight_decay and train.grad_clip must not be negative")
    if not 0.0 <= cfg.data.pos_fraction <= 1.0:
        raise bad(f"data.pos_fraction must be in [0, 1], got {cfg.data.pos_fraction}")
    if not 0.0 <= cfg.infer.overlap < 1.0:
        raise bad(f"infer.overlap must be in [0, 1), got {cfg.infer.overlap}")
    if not 0.0 <= cfg.data.validation_fraction < 1.0:
        raise bad(f"data.validation_fraction must be in [0, 1), got {cfg.data.validation_fraction}")
    for name in ("target_spacing", "patch_size"):
        value = getattr(cfg.data, name)
        if value != AUTO and (len(value) != 3 or any(float(v) <= 0 for v in value)):
            raise bad(f"data.{name} must be 'auto' or three positive numbers [x, y, z], got {value}")
    if cfg.data.batch_size != AUTO and int(cfg.data.batch_size) < 1:
        raise bad(f"data.batch_size must be 'auto' or at least 1, got {cfg.data.batch_size}")
    if cfg.data.intensity_range != AUTO and (len(cfg.data.intensity_range) != 2
                                             or cfg.data.intensity_range[0] >= cfg.data.intensity_range[1]):
        raise bad(f"data.intensity_range must be 'auto' or [low, high] with low < high, got {cfg.data.intensity_range}")
    if cfg.data.intensity_stats != AUTO and (len(cfg.data.intensity_stats) != 2 or cfg.data.intensity_stats[1] <= 0):
        raise bad(f"data.intensity_stats must be 'auto' or [mean, std] with std > 0, got {cfg.data.intensity_stats}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.001"`` -> (["train", "lr"], 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise UserError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=0.001")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def config_from_dict(data: dict[str, Any], source: str = "config", overrides: list[str] | None = None) -> Config:
    """Build and validate a Config from a plain dict, applying ``KEY=VALUE`` overrides first."""
    data = _deep_copy(data or {})
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise UserError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    cfg = _from_dict(Config, data, "")
    _validate(cfg, source)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and validate it."""
    if path is None:
        return config_from_dict({}, "defaults", overrides)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    try:
        return config_from_dict(data, str(path), overrides)
    except UserError as exc:
        msg = str(exc)
        raise UserError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def task_config_path(task: str) -> Path | None:
    """The config shipped for ``task`` (``unetpp3d/resources/configs/<task>.yaml``), or None.

    Package data read through :mod:`importlib.resources`, so an installed wheel finds it as a
    source checkout does (configs/README.md says why the task configs live in the package).
    """
    path = Path(str(resources.files("unetpp3d") / "resources" / "configs" / f"{task}.yaml"))
    return path if path.is_file() else None


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


@dataclass
class Preprocessing:
    """Everything inference needs to reproduce training's input pipeline.

    Resolved from the config and the dataset fingerprint by :mod:`unetpp3d.model.planning`, saved in
    every checkpoint and bundle, and read back by the predictor. All spatial lists are in the
    (x, y, z) order of the RAS-oriented array.
    """

    task: str
    labels: dict[str, str]  # {"0": "background", "1": "liver"}; string keys survive JSON
    target_spacing: list[float]  # mm
    intensity_range: list[float]  # HU clip [low, high]
    intensity_stats: list[float]  # [mean, std] of clipped foreground HU, for the z-score
    patch_size: list[int]  # voxels, a multiple of the network's size divisor
    crop_foreground: bool = True
    body_threshold_hu: float = -500.0  # voxels above this count as body (tissue) for the crop
    # "threshold": the body is the voxels above body_threshold_hu; "filled": their filled outline,
    # lungs included (see unetpp3d.data.body.BodyMask). Older checkpoints lack the field
    # and keep the threshold they were trained with.
    body_mask: Literal["threshold", "filled"] = "threshold"
    body_air_hu: float = -950.0  # "filled": a region outside the outline counts as body unless its median is below
    orientation: str = "RAS"

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        try:
            return _from_dict(cls, data, "preprocessing")
        except TypeError as exc:
            raise UserError(f"preprocessing: incomplete ({exc})") from None
