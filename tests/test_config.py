"""config: every value of every section is checked at the edge, with one line naming the key."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from unetpp3d.config import (
    AugmentConfig,
    Config,
    DataConfig,
    InferConfig,
    ModelConfig,
    TrainConfig,
    load_config,
)
from unetpp3d.errors import UserError

SECTIONS = {"model": ModelConfig, "data": DataConfig, "data.augment": AugmentConfig, "train": TrainConfig,
            "infer": InferConfig}


def _fields():
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(hints[f.name]):
                yield f"{section}.{f.name}", hints[f.name]


def _bad_values(hint) -> list[str]:
    """Values no field of this type may take: out of any sensible range, non-finite, or of the wrong kind."""
    if hint is float:
        return [".nan", ".inf", "-.inf", "-1.0", "1.0e12", "true", "text"]
    if hint is int:
        return ["-1", "1000000000000", "1.5", "true", "text"]
    if hint is bool:
        return ["maybe", "2"]
    return ["bogus", "[.nan, 1, 1]", "-1", "{a: 1}"]


@pytest.mark.parametrize("key, hint", list(_fields()), ids=[k for k, _ in _fields()])
def test_every_field_refuses_values_outside_its_range_naming_the_key(key, hint):
    refused = 0
    for value in _bad_values(hint):
        try:
            load_config(None, [f"{key}={value}"])
        except UserError as exc:
            assert key.split(".")[-1] in str(exc) and "\n" not in str(exc), str(exc)
            refused += 1
    # data.cache_dir, a folder name, takes any text ("bogus"); every other field refuses all of these.
    assert refused == len(_bad_values(hint)) - (key == "data.cache_dir")


@pytest.mark.parametrize("override, message", [
    ("model.dropout=5", r"model\.dropout must be in \[0, 1\), got 5"),
    ("model.norm=bogus", r"model\.norm 'bogus' is not one of instance, batch, group"),
    ("model.act=sigmoidish", r"model\.act 'sigmoidish' is not one of"),
    ("model.upsample=nearest", r"model\.upsample 'nearest' is not one of deconv, trilinear"),
    ("model.features=[4, 8, 0]", r"model\.features must be"),
    ("model.features=[4]", r"model\.features must be"),
    ("model.strides=[2, x, 2, 2]", r"model\.strides: each entry must be"),
    ("data.samples_per_volume=0", r"data\.samples_per_volume must be in \[1, 1,024\], got 0"),
    ("data.num_workers=-1", r"data\.num_workers must be in \[0, 256\], got -1"),
    ("data.patch_size=[a, b, c]", r"data\.patch_size must be 'auto' or three whole numbers"),
    ("data.patch_size=[64.5, 64, 64]", r"data\.patch_size must be 'auto' or three whole numbers"),
    ("data.target_spacing=[1, 1, .nan]", r"data\.target_spacing must be 'auto' or three spacings"),
    ("data.intensity_range=[100, -100]", r"data\.intensity_range"),
    ("data.folds=1", r"data\.folds must be in \[2, 100\]"),
    ("data.augment.flip_prob=1.5", r"data\.augment\.flip_prob must be in \[0, 1\]"),
    ("train.lr=.nan", r"train\.lr: expected a finite number, got nan"),
    ("train.lr=.inf", r"train\.lr: expected a finite number, got inf"),
    ("train.seed=-1", r"train\.seed must be in \[0, 4,294,967,295\]"),
    ("train.momentum=1", r"train\.momentum must be in \[0, 1\)"),
    ("train.head_weights=[0, 0, 0, 0]", r"train\.head_weights must not all be zero"),
    ("infer.overlap=1", r"infer\.overlap must be in \[0, 1\)"),
    ("infer.prune_level=0", r"infer\.prune_level must be null or a level from 1 to 8"),
    ("train.lr=[", r"override 'train\.lr=\[': not valid YAML"),
    ("train..lr=1", r"is not a KEY"),
])
def test_the_issues_examples_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_the_shipped_configs_and_the_defaults_are_valid():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for path in [*sorted((repo / "configs").glob("*.yaml")), repo / "unetpp3d" / "resources" / "demo.yaml"]:
        load_config(path)
    assert load_config(None) == Config()


def test_a_config_file_that_is_not_a_mapping_is_one_line(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(path, ["train.lr=0.1"])
