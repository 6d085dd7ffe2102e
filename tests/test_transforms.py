"""Transforms: patch shapes and labels, class-balanced sampling, caching, exact inversion; the task configs."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from monai.data.image_reader import NibabelReader
from monai.transforms import Invertd, RandomizableTrait

from unetpp3d import UserError
from unetpp3d.config import (
    AugmentConfig,
    Config,
    DataConfig,
    Preprocessing,
    load_config,
    task_config_path,
)
from unetpp3d.data.transforms import (
    TRAIN_RANDOM_START,
    BodyMask,
    RandRotateScaled,
    eval_transforms,
    inference_transforms,
    make_dataset,
    split_for_cache,
    train_transforms,
)
from unetpp3d.imageio.readers import read_image
from unetpp3d.synth.phantom import write_dataset

PATCH = [16, 16, 16]
NO_AUG = AugmentConfig(flip_prob=0, rotate_prob=0, scale_prob=0, intensity_shift_prob=0, intensity_scale_prob=0,
                       noise_prob=0, gamma_prob=0)
ALL_AUG = AugmentConfig(flip_prob=1, rotate_prob=1, scale_prob=1, intensity_shift_prob=1, intensity_scale_prob=1,
                        noise_prob=1, gamma_prob=1)


def _prep(task: str = "liver", spacing=(10.0, 10.0, 10.0), **kwargs) -> Preprocessing:
    args = dict(task=task, labels={"0": "background", "1": "liver" if task == "liver" else "nodule"},
                target_spacing=list(spacing), intensity_range=[-200.0, 300.0], intensity_stats=[60.0, 40.0],
                patch_size=list(PATCH))
    args.update(kwargs)
    return Preprocessing(**args)


def _cases(manifest: Path) -> list[dict[str, str]]:
    data = json.loads(manifest.read_text())
    return [{"image": str(manifest.parent / c["image"]), "label": str(manifest.parent / c["label"])}
            for c in data["training"]]


@pytest.fixture(scope="module")
def liver_cases(tmp_path_factory) -> list[dict[str, str]]:
    """Two plain and two random-geometry (permuted, flipped, anisotropic) liver phantoms of ~32 voxels."""
    root = tmp_path_factory.mktemp("synth")
    plain = _cases(write_dataset("liver", 2, root / "plain", seed=1, size=32))
    odd = _cases(write_dataset("liver", 2, root / "odd", seed=2, size=32, random_geometry=True))
    return plain + odd


@pytest.fixture(scope="module")
def nodule_case(tmp_path_factory) -> dict[str, str]:
    case = _cases(write_dataset("lung_nodule", 1, tmp_path_factory.mktemp("chest"), seed=2, size=48))[0]
    label, _ = read_image(case["label"], is_label=True)
    assert 0 < label.sum() < 0.005 * label.size  # a few nodule voxels at 7.5 mm
    return case


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("augment", [NO_AUG, ALL_AUG], ids=["plain", "every-augmentation"])
def test_train_patches_have_the_patch_size_and_binary_labels(liver_cases, augment):
    pipe = train_transforms(_prep(), DataConfig(samples_per_volume=3, augment=augment))
    pipe.set_random_state(seed=0)
    for case in (liver_cases[0], liver_cases[3]):
        patches = pipe(case)
        assert len(patches) == 3
        for p in patches:
            assert p["image"].shape == (1, *PATCH) and p["label"].shape == (1, *PATCH)
            assert p["image"].dtype == torch.float32 and not isinstance(p["image"], MetaTensor)
            assert set(torch.unique(p["label"]).tolist()) <= {0.0, 1.0}
            assert torch.isfinite(p["image"]).all()


def test_patches_larger_than_the_cropped_volume_are_padded(liver_cases):
    big = [48, 48, 48]  # more than the ~40-voxel body at 10 mm
    pipe = train_transforms(_prep(patch_size=big), DataConfig(samples_per_volume=1, augment=NO_AUG))
    (patch,) = pipe(liver_cases[0])
    assert patch["image"].shape == (1, *big)
    # Padding uses the value of air after normalisation, not the mean.
    assert patch["image"].min().item() == pytest.approx((-200.0 - 60.0) / 40.0)


def test_high_pos_fraction_puts_nodules_in_patches(nodule_case):
    """Nodules fill < 0.5 % of the scan: patches find them only when sampling is class-balanced."""
    prep = _prep("lung_nodule", spacing=(7.5, 7.5, 7.5), intensity_range=[-1000.0, 400.0],
                 intensity_stats=[-500.0, 400.0])

    def share_with_nodule(pos: float) -> float:
        pipe = train_transforms(prep, DataConfig(samples_per_volume=12, pos_fraction=pos, augment=NO_AUG))
        pipe.set_random_state(seed=3)
        return float(np.mean([p["label"].sum().item() > 0 for p in pipe(nodule_case)]))

    assert share_with_nodule(1.0) == 1.0
    assert share_with_nodule(0.9) >= 0.75
    assert share_with_nodule(0.0) <= 0.5


def test_thick_slices_rotate_in_plane_only():
    def axes(spacing):
        pipe = train_transforms(_prep(spacing=spacing), DataConfig())
        return next(t for t in pipe.transforms if isinstance(t, RandRotateScaled)).rotate_axes

    assert axes((1.0, 1.0, 5.0)) == (2,) and axes((4.0, 0.8, 0.8)) == (0,) and axes((1.0, 1.0, 2.0)) == (0, 1, 2)
    # An image that changes along z only keeps every z slice uniform under an in-plane rotation.
    rotate = RandRotateScaled(["image"], (8, 8, 8), rotate_prob=1.0, rotate_degrees=30.0, scale_prob=0.0,
                              scale_range=0.0, rotate_axes=(2,))
    rotate.set_random_state(seed=0)
    image = torch.arange(12.0).repeat(1, 12, 12, 1)  # value = z index
    out = rotate({"image": image})["image"]
    assert rotate._angles is not None and out.shape == (1, 8, 8, 8)
    for k in range(8):
        torch.testing.assert_close(out[0, :, :, k], torch.full((8, 8), k + 2.0), atol=1e-4, rtol=0)


def test_random_part_starts_where_documented(liver_cases):
    for crop, start in ((True, TRAIN_RANDOM_START), (False, TRAIN_RANDOM_START - 1)):
        pipe = train_transforms(_prep(crop_foreground=crop), DataConfig())
        first_random = next(i for i, t in enumerate(pipe.transforms) if isinstance(t, RandomizableTrait))
        assert first_random == start
        head, tail = split_for_cache(pipe)
        assert len(head.transforms) == start and len(head.transforms) + len(tail.transforms) == len(pipe.transforms)
        assert not any(isinstance(t, RandomizableTrait) for t in head.transforms)
    # The deterministic head is what a cache would hold: a whole preprocessed volume.
    cached = head(liver_cases[0])
    assert cached["image"].ndim == 4 and min(cached["image"].shape[1:]) >= min(PATCH)


def test_make_dataset_caches(liver_cases, tmp_path):
    pipe = train_transforms(_prep(), DataConfig(samples_per_volume=2, augment=NO_AUG))
    items = liver_cases[:2]
    assert type(make_dataset(items, pipe, "none")) is Dataset
    pickle.loads(pickle.dumps(pipe))  # DataLoader workers get a copy
    memory = make_dataset(items, pipe, "memory")
    assert isinstance(memory, CacheDataset) and len(memory[1]) == 2
    disk = make_dataset(items, pipe, "disk", tmp_path / "cache")
    assert isinstance(disk, PersistentDataset)
    assert disk[0][0]["image"].shape == (1, *PATCH)
    folders = list((tmp_path / "cache").iterdir())
    assert [f.name for f in folders] == [pipe.cache_key] and list(folders[0].glob("*.pt"))
    # Other preprocessing, other cache folder: a stale cache is never reused.
    other = train_transforms(_prep(spacing=(12.0, 12.0, 12.0)), DataConfig())
    assert other.cache_key != pipe.cache_key
    assert train_transforms(_prep(), DataConfig()).cache_key == pipe.cache_key
    with pytest.raises(UserError, match="cache_dir"):
        make_dataset(items, pipe, "disk", "")
    with pytest.raises(UserError, match="not one of"):
        make_dataset(items, pipe, "ram")


def test_every_scan_comes_out_in_ras_order(liver_cases):
    """Whatever the file's axis order and flips, array axis 0 runs to the patient's right, 2 to the head.

    The liver lies on the right and in the upper abdomen, so its centroid sits at higher x and z
    indices than the body's centroid.
    """
    pipe = eval_transforms(_prep(crop_foreground=False))
    for case in liver_cases:
        sample = pipe(case)
        liver = np.argwhere(sample["label"][0].numpy() > 0).mean(0)
        body = np.argwhere(sample["image"][0].numpy() > (-150 - 60) / 40).mean(0)
        assert liver[0] > body[0] + 2 and liver[2] > body[2] + 2


def test_eval_output_is_clipped_and_z_scored(liver_cases):
    sample = eval_transforms(_prep())(liver_cases[0])
    image = sample["image"]
    assert image.min().item() == pytest.approx((-200 - 60) / 40)
    assert image.max().item() <= (300 - 60) / 40 + 1e-6
    assert set(torch.unique(sample["label"]).tolist()) == {0.0, 1.0}
    assert "foreground_start_coord" in sample and "foreground_end_coord" in sample
    np.testing.assert_allclose(image.pixdim.tolist(), [10.0, 10.0, 10.0], rtol=1e-5)


@pytest.mark.parametrize("index", [0, 2, 3], ids=["plain", "random-geometry-a", "random-geometry-b"])
def test_label_through_eval_and_invertd_is_the_original_label(liver_cases, index):
    """At the native spacing the round trip is exact, whatever the axis order, flips and origin."""
    case = liver_cases[index]
    original, geometry = read_image(case["label"], is_label=True)
    prep = _prep(spacing=geometry.to_ras().spacing)
    pipe = eval_transforms(prep)
    sample = pipe(case)
    if index > 0:  # random geometry: the preprocessed array really is re-indexed
        assert tuple(sample["label"].shape[1:]) != geometry.size
    sample["pred"] = MetaTensor(sample["label"].as_tensor().clone())
    back = Invertd("pred", transform=pipe, orig_keys="image", nearest_interp=True)(sample)["pred"]
    assert tuple(back.shape) == (1, *geometry.size)
    np.testing.assert_array_equal(back[0].numpy().astype(np.uint8), original)


@pytest.mark.parametrize("index", [1, 3])
def test_label_resampled_then_inverted_stays_on_the_original_grid(liver_cases, index):
    case = liver_cases[index]
    original, geometry = read_image(case["label"], is_label=True)
    pipe = eval_transforms(_prep(spacing=(6.0, 7.0, 9.0)))
    sample = pipe(case)
    sample["pred"] = MetaTensor(sample["label"].as_tensor().clone())
    back = Invertd("pred", transform=pipe, orig_keys="image", nearest_interp=True)(sample)["pred"]
    assert tuple(back.shape) == (1, *geometry.size)
    assert _dice(back[0].numpy() > 0.5, original > 0) > 0.9


def test_inference_probabilities_invert_to_the_scans_grid(liver_cases):
    case = liver_cases[2]
    _, geometry = read_image(case["image"])
    pipe = inference_transforms(_prep())
    sample = pipe({"image": case["image"]})
    assert sample["image"].shape[0] == 1
    sample["pred"] = MetaTensor(torch.rand(2, *sample["image"].shape[1:]))
    back = Invertd("pred", transform=pipe, orig_keys="image", nearest_interp=False)(sample)["pred"]
    assert tuple(back.shape) == (2, *geometry.size)
    assert 0.0 <= back.min().item() and back.max().item() <= 1.0


def test_real_ct_label_round_trip(shared_data):
    """The TotalSegmentator abdomen case (direction diag(-1, -1, 1), 3 mm) comes back voxel for voxel."""
    folder = shared_data / "abdomen_ct_ts"
    case = {"image": str(folder / "ct.nii.gz"), "label": str(folder / "liver.nii.gz")}
    original, _ = read_image(case["label"], is_label=True)
    pipe = eval_transforms(_prep(spacing=(3.0, 3.0, 3.0), intensity_range=[-100.0, 250.0]))
    sample = pipe(case)
    assert sample["label"].sum().item() == original.sum()
    sample["pred"] = MetaTensor(sample["label"].as_tensor().clone())
    back = Invertd("pred", transform=pipe, orig_keys="image", nearest_interp=True)(sample)["pred"]
    np.testing.assert_array_equal(back[0].numpy().astype(np.uint8), original)


def test_works_with_monais_nibabel_reader_too(liver_cases):
    case = liver_cases[3]
    ours = eval_transforms(_prep())(case)
    theirs = eval_transforms(_prep(), reader=NibabelReader())(case)
    assert ours["image"].shape == theirs["image"].shape
    torch.testing.assert_close(ours["image"].as_tensor(), theirs["image"].as_tensor(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours["image"].affine.numpy(), theirs["image"].affine.numpy(), atol=1e-4)


def test_body_crop_keeps_scans_without_a_body(make_image):
    air = make_image("air.nii.gz", np.full((20, 20, 20), -1000, np.int16))
    sample = eval_transforms(_prep(spacing=(1.0, 1.0, 1.0)), keys=("image",))({"image": str(air)})
    assert sample["image"].shape == (1, 20, 20, 20)
    mask = BodyMask(-500)(torch.tensor([[-1000.0, 0.0]]))
    assert mask.tolist() == [[False, True]]


def _fields(cls) -> dict:
    return {f.name: (_fields(f.default_factory) if dataclasses.is_dataclass(f.default_factory) else None)
            for f in dataclasses.fields(cls)}


def _keys_of(data: dict) -> dict:
    return {k: (_keys_of(v) if isinstance(v, dict) else None) for k, v in data.items()}


@pytest.mark.parametrize("task", ["liver", "lung_nodule"])
def test_shipped_configs_are_complete_and_valid(task, liver_cases):
    path = task_config_path(task)
    cfg = load_config(path)
    assert cfg.task == task
    # Every key of every section is spelled out, so the file documents all the choices.
    assert _keys_of(yaml.safe_load(path.read_text())) == _fields(Config)
    if task == "lung_nodule":
        assert cfg.data.pos_fraction == 0.9 and cfg.infer.min_component_ml > 0
    else:
        assert cfg.data.pos_fraction == 0.67 and cfg.data.target_spacing == "auto"
    patches = train_transforms(_prep(), cfg.data)(liver_cases[0])
    assert len(patches) == cfg.data.samples_per_volume and patches[0]["image"].shape == (1, *PATCH)


def test_unresolved_preprocessing_is_a_user_error():
    prep = dataclasses.replace(_prep(), target_spacing="auto")
    with pytest.raises(UserError, match="target_spacing"):
        eval_transforms(prep)
