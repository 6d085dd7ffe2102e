"""Configuration: plain dataclasses loaded from YAML and validated once, here, at the edge.

A config has four sections (``model``, ``data``, ``train``, ``infer``) plus ``task``. Values
spelled ``auto`` are filled in from the dataset fingerprint by :mod:`unetpp3d.model.planning` before
training starts; the resolved config is saved with the run, so a model always knows its own
preprocessing. Spatial lists (spacing, patch size, strides) are in (x, y, z) order of the RAS
array that the transforms produce.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from unetpp3d.errors import UserError
from unetpp3d.readable import read_text
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
    # Validation cases that are training cases (the same file, a link or a byte copy) are refused:
    # their score would measure memory. true only for a deliberate fit check
    # (pipelines/real_ct_check.py), and the run log then says so.
    allow_leaks: bool = False
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
    # A step whose loss is NaN or infinite is skipped; this many skipped steps in a row (or an
    # epoch with no finite step, or non-finite weights) stop training with a one-line error and
    # keep the last checkpoint whose weights are finite (unetpp3d.training.trainer).
    max_nonfinite_steps: int = 5
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
    if origin is Union or origin is types.UnionType:  # Union[X, Y] or X | Y
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
        if not math.isfinite(value):  # .nan / .inf pass every range check below (NaN compares False)
            raise UserError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        if origin is list and get_args(hint):  # list[float]: every item checked, e.g. a checkpoint's spacing
            return [_check_type(v, get_args(hint)[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        item = get_args(hint)[1]
        if item is str:
            return {str(k): str(v) for k, v in value.items()}
        return {str(k): _check_type(v, item, f"{where}.{k}") for k, v in value.items()}
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


NORMS = ("instance", "batch", "group")
ACTIVATIONS = ("leakyrelu", "relu", "prelu", "gelu", "elu", "swish", "mish")
UPSAMPLES = ("deconv", "trilinear")


# Bounds of every numeric setting: (low, high, low included, high included). The upper bounds
# are far beyond any sensible value; they are there so that a typo (an extra zero or three)
# gets one line naming the key instead of an allocation failure or a traceback much later.
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "model.dropout": (0.0, 1.0, True, False),
    "data.gpu_memory_gb": (0.0, 1e5, False, True),
    "data.pos_fraction": (0.0, 1.0, True, True),
    "data.samples_per_volume": (1, 1024, True, True),
    "data.num_workers": (0, 256, True, True),
    "data.validation_fraction": (0.0, 1.0, True, False),
    "data.folds": (2, 100, True, True),
    "data.augment.rotate_degrees": (0.0, 180.0, True, True),
    "data.augment.scale_range": (0.0, 1.0, True, False),
    "data.augment.intensity_shift": (0.0, 100.0, True, True),
    "data.augment.noise_std": (0.0, 100.0, True, True),
    "train.epochs": (1, 1_000_000, True, True),
    "train.max_nonfinite_steps": (1, 1_000_000, True, True),
    "train.iterations_per_epoch": (1, 10_000_000, True, True),
    "train.lr": (0.0, 10.0, False, True),
    "train.weight_decay": (0.0, 1.0, True, True),
    "train.momentum": (0.0, 1.0, True, False),
    "train.warmup_epochs": (0, 1_000_000, True, True),
    "train.grad_clip": (0.0, 1e6, True, True),
    "train.val_every": (1, 1_000_000, True, True),
    "train.seed": (0, 2**32 - 1, True, True),  # NumPy's and MONAI's seeds are 32-bit
    "infer.overlap": (0.0, 1.0, True, False),
    "infer.sw_batch_size": (1, 1024, True, True),
    "infer.min_component_ml": (0.0, 1e6, True, True),
}
_RANGES.update({f"data.augment.{f.name}": (0.0, 1.0, True, True) for f in dataclasses.fields(AugmentConfig)
                if f.name.endswith("_prob")})


def _interval(lo: float, hi: float, lo_in: bool, hi_in: bool) -> str:
    def fmt(v: float) -> str:
        return f"{v:,}" if isinstance(v, int) else f"{v:g}"

    return f"{'[' if lo_in else '('}{fmt(lo)}, {fmt(hi)}{']' if hi_in else ')'}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> bool:
    return _number(value) and float(value).is_integer()


def _numbers(bad: Any, key: str, value: Any, count: int, what: str, ok: Any) -> None:
    """Refuse ``value`` unless it is ``count`` numbers each passing ``ok`` (``count`` 0: any length)."""
    if (not isinstance(value, list) or (count and len(value) != count) or not value
            or not all(_number(v) and ok(v) for v in value)):
        raise bad(f"{key} must be 'auto' or {what}, got {value!r}")


def _validate(cfg: Config, source: str) -> None:
    """Check every value against its range (the types were checked while reading); name the key."""

    def bad(msg: str) -> UserError:
        return UserError(f"{source}: {msg}")

    if cfg.task not in TASKS:
        raise bad(f"task {cfg.task!r} is not one of {', '.join(TASKS)}")
    sections = {"model": cfg.model, "data": cfg.data, "data.augment": cfg.data.augment, "train": cfg.train,
                "infer": cfg.infer}
    for key, (lo, hi, lo_in, hi_in) in _RANGES.items():
        section, name = key.rsplit(".", 1)
        value = getattr(sections[section], name)
        inside = (lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)
        if not inside:
            raise bad(f"{key} must be in {_interval(lo, hi, lo_in, hi_in)}, got {value!r}")

    m = cfg.model
    features = m.features
    if (not isinstance(features, list) or not 2 <= len(features) <= 8
            or not all(isinstance(f, int) and not isinstance(f, bool) and 1 <= f <= 4096 for f in features)):
        raise bad(f"model.features must be 2 to 8 whole widths from 1 to 4096 (one per level), got {features!r}")
    if m.strides != AUTO:
        depth = len(features) - 1
        if not isinstance(m.strides, list) or len(m.strides) != depth:
            raise bad(f"model.strides: needs {depth} entries (one per downsampling, len(model.features) - 1), "
                      f"got {m.strides!r}")
        for st in m.strides:
            triple = [st] * 3 if not isinstance(st, list) else st
            if len(triple) != 3 or not all(_whole(v) and 1 <= v <= 8 for v in triple):
                raise bad(f"model.strides: each entry must be a whole number from 1 to 8 or [x, y, z] of them, "
                          f"got {st!r}")
    for key, value, allowed in (("model.norm", m.norm, NORMS), ("model.act", m.act, ACTIVATIONS),
                                ("model.upsample", m.upsample, UPSAMPLES)):
        if value.lower() not in allowed:
            raise bad(f"{key} {value!r} is not one of {', '.join(allowed)}")

    d = cfg.data
    if d.target_spacing != AUTO:
        _numbers(bad, "data.target_spacing", d.target_spacing, 3, "three spacings in mm [x, y, z], each in (0, 100]",
                 lambda v: 0 < v <= 100)
    if d.patch_size != AUTO:
        _numbers(bad, "data.patch_size", d.patch_size, 3, "three whole numbers of voxels [x, y, z], each 1 to 1024",
                 lambda v: _whole(v) and 1 <= v <= 1024)
    if d.intensity_range != AUTO:
        _numbers(bad, "data.intensity_range", d.intensity_range, 2, "[low, high] in HU with low < high",
                 lambda v: True)
        if d.intensity_range[0] >= d.intensity_range[1]:
            raise bad(f"data.intensity_range must be 'auto' or [low, high] with low < high, got {d.intensity_range}")
    if d.intensity_stats != AUTO:
        _numbers(bad, "data.intensity_stats", d.intensity_stats, 2, "[mean, std] with std > 0", lambda v: True)
        if d.intensity_stats[1] <= 0:
            raise bad(f"data.intensity_stats must be 'auto' or [mean, std] with std > 0, got {d.intensity_stats}")
    if d.batch_size != AUTO and not (isinstance(d.batch_size, int) and 1 <= d.batch_size <= 1024):
        raise bad(f"data.batch_size must be 'auto' or a whole number from 1 to 1024, got {d.batch_size!r}")

    t = cfg.train
    if t.head_weights != AUTO:
        _numbers(bad, "train.head_weights", t.head_weights, 0, "a list of non-negative weights, one per head",
                 lambda v: v >= 0)
        if sum(t.head_weights) <= 0:
            raise bad(f"train.head_weights must not all be zero, got {t.head_weights}")
    if cfg.infer.prune_level is not None and not 1 <= cfg.infer.prune_level <= 8:
        raise bad(f"infer.prune_level must be null or a level from 1 to 8, got {cfg.infer.prune_level}")


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` of a config, refusing anchors and aliases.

    An alias is a reference, so a few hundred bytes of nested aliases (a "billion laughs") stand
    for gigabytes once the config is copied or written out; no config needs one.

    Args:
        text: the YAML text.
        where: the file or flag it came from, for messages.

    Raises:
        UserError: not valid YAML, or it uses an anchor (``&name``) or alias (``*name``).
    """
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                line = event.start_mark.line + 1
                raise UserError(f"{where}: line {line}: YAML anchors and aliases (&{event.anchor}, *{event.anchor}) "
                                f"are not allowed in configs; write the values out")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: not valid YAML ({_yaml_reason(exc)})") from None


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """PyYAML's finding on one line (its message quotes the offending text over several lines)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())[:200]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.001"`` -> (["train", "lr"], 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise UserError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=0.001")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(k.strip() for k in keys):
        raise UserError(f"override {text!r}: {key.strip()!r} is not a KEY such as train.lr")
    return [k.strip() for k in keys], load_yaml(raw, f"override {text!r}")


def config_from_dict(data: dict[str, Any], source: str = "config", overrides: list[str] | None = None) -> Config:
    """Build and validate a Config from a plain dict, applying ``KEY=VALUE`` overrides first."""
    if not isinstance(data or {}, dict):
        raise UserError(f"{source}: expected a mapping of sections (model, data, train, infer), got {data!r:.80}")
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
    text = read_text(path, "config file")  # a FIFO or device is refused, not waited on
    data = load_yaml(text, str(path)) or {}
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
    # Class number -> [smallest, largest] label volume (mL) among the training cases, for
    # inference's warning about a volume far outside it. Older checkpoints lack it: no warning.
    volume_range_ml: dict[str, list[float]] | None = None
    # The training cases' largest field of view per axis (mm, x y z): a model that saw only
    # nodule-centred crops has never seen the rest of a chest as background, and inference on a
    # much larger scan warns (unetpp3d.data.plausibility.view_warnings). Older checkpoints lack it.
    field_of_view_mm: list[float] | None = None

    def __post_init__(self) -> None:
        fov = self.field_of_view_mm
        if fov is not None and (len(fov) != 3 or min(fov) <= 0):
            raise UserError(f"preprocessing.field_of_view_mm: expected three positive extents in mm, got {fov!r}")

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
