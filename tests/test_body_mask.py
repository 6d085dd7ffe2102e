"""The body mask: a -500 HU threshold, or the body's filled outline that keeps the lungs (issue 15).

Small synthetic chests: a soft-tissue body (40 HU) holding two lungs (-850 HU) with a ground-glass
nodule (-650 HU), surrounded by air (-1000 HU), a table below it; and a nodule-centred crop that
shows only lung, a vessel and the nodule.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from monai.transforms import CropForegroundd

from unetpp3d.config import AugmentConfig, DataConfig, Preprocessing
from unetpp3d.data.body import BODY_KEY, BodyMask, BodyMaskd, body_mask, body_mask_array
from unetpp3d.data.transforms import (
    TRAIN_RANDOM_START,
    eval_transforms,
    preprocessing_specs,
    split_for_cache,
    train_transforms,
)

NO_AUG = AugmentConfig(flip_prob=0, rotate_prob=0, scale_prob=0, intensity_shift_prob=0, intensity_scale_prob=0,
                       noise_prob=0, gamma_prob=0)
LUNG_HU, TISSUE_HU, GLASS_HU, AIR_HU = -850.0, 40.0, -650.0, -1000.0


def chest(shape=(48, 40, 12), seed=0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(x, y, z) HU with noise, and the regions it was drawn from."""
    x, y = np.mgrid[: shape[0], : shape[1]]
    cx, cy = shape[0] / 2, shape[1] / 2 - 3
    body2d = ((x - cx) / 21) ** 2 + ((y - cy) / 15) ** 2 <= 1
    lungs2d = [((x - cx - s * 9) / 7) ** 2 + ((y - cy) / 10) ** 2 <= 1 for s in (-1, 1)]
    table2d = (y >= shape[1] - 3) & (y < shape[1] - 1)
    z = np.ones(shape[2], bool)
    regions = {"body": body2d[..., None] & z, "lung_r": lungs2d[0][..., None] & z, "lung_l": lungs2d[1][..., None] & z,
               "table": table2d[..., None] & z}
    nodule = np.zeros(shape, bool)
    nodule[int(cx) + 8: int(cx) + 11, int(cy) - 1: int(cy) + 2, 4:7] = True
    regions["nodule"] = nodule
    hu = np.full(shape, AIR_HU)
    hu[regions["body"]] = TISSUE_HU
    hu[regions["lung_r"] | regions["lung_l"]] = LUNG_HU
    hu[nodule] = GLASS_HU
    hu[regions["table"]] = 200.0
    hu += np.random.default_rng(seed).normal(0, 15, shape)
    return hu.astype(np.float32), regions


def lung_crop(seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A nodule-centred crop inside the lung: parenchyma, a vessel at one edge, a ground-glass nodule at the other."""
    shape = (24, 24, 6)
    hu = np.random.default_rng(seed).normal(LUNG_HU, 30, shape).astype(np.float32)
    hu[2:4, 2:4, :] = TISSUE_HU  # a vessel
    nodule = np.zeros(shape, bool)
    nodule[15:21, 15:21, 1:5] = True
    hu[nodule] = GLASS_HU
    return hu, nodule


def test_threshold_calls_the_lungs_air_and_the_filled_outline_keeps_them():
    hu, r = chest()
    lungs = r["lung_r"] | r["lung_l"]
    threshold = body_mask_array(hu, -500, "threshold")
    assert not threshold[lungs].any() and not threshold[r["nodule"]].any()
    filled = body_mask_array(hu, -500, "filled")
    assert filled[lungs].all() and filled[r["nodule"]].all() and filled[r["body"]].all()
    assert not filled[r["table"]].any()  # a separate component: not the body
    outside = ~(r["body"] | r["table"])
    assert not filled[outside].any()


def test_a_crop_inside_the_lung_is_body_everywhere():
    """A crop that shows no body wall: lung parenchyma touches the crop's edge but is not air."""
    hu, nodule = lung_crop()
    assert body_mask_array(hu, -500, "filled").all()
    thresholded = body_mask_array(hu, -500, "threshold")
    assert not thresholded[nodule].any()  # ground glass is below -500 HU


def test_the_body_crop_keeps_a_ground_glass_nodule_at_the_crops_edge(make_image):
    hu, nodule = lung_crop()
    case = {"image": str(make_image("crop.nii.gz", hu)), "label": str(make_image("crop_seg.nii.gz", nodule.astype(np.uint8)))}

    def kept(mode: str) -> int:
        prep = Preprocessing(task="lung_nodule", labels={"0": "background", "1": "nodule"},
                             target_spacing=[1.0, 1.0, 1.0], intensity_range=[-1000.0, 400.0],
                             intensity_stats=[0.0, 1.0], patch_size=[8, 8, 4], body_mask=mode)
        return int(eval_transforms(prep)(case)["label"].sum())

    assert kept("threshold") == 0  # the crop box is the vessel's: the nodule is cut away (issue 15)
    assert kept("filled") == nodule.sum()


def test_body_mask_transform_pair():
    hu, r = chest(shape=(40, 36, 4))
    img = torch.from_numpy(hu)[None]
    for mask in (BodyMask(-500, "filled"), BodyMask(-500.0)):
        out = mask(img)
        assert out.dtype == torch.bool and out.shape == img.shape
        np.testing.assert_array_equal(out[0].numpy(), body_mask_array(hu, -500, mask.mode))
        assert np.array_equal(mask(hu[None]), out.numpy())  # NumPy in, NumPy out
        assert repr(pickle.loads(pickle.dumps(mask))) == repr(mask)
    d = BodyMaskd("image", mode="filled")({"image": img})
    assert d[BODY_KEY].dtype == torch.uint8 and d[BODY_KEY].sum() == BodyMask(-500, "filled")(img).sum()
    # nothing above the threshold: everything is body, in either mode
    assert BodyMask(-500, "filled")(torch.full((1, 4, 4, 2), -1000.0)).all()
    with pytest.raises(ValueError, match="mode"):
        BodyMask(-500, "otsu")


def _chest_case(make_image) -> dict[str, str]:
    hu, r = chest()
    return {"image": str(make_image("chest.nii.gz", hu)),
            "label": str(make_image("chest_seg.nii.gz", r["nodule"].astype(np.uint8)))}


def _prep(mode: str) -> Preprocessing:
    return Preprocessing(task="lung_nodule", labels={"0": "background", "1": "nodule"}, target_spacing=[1.0, 1.0, 1.0],
                         intensity_range=[-1000.0, 400.0], intensity_stats=[0.0, 1.0], patch_size=[8, 8, 4],
                         body_mask=mode)


def test_training_and_inference_crop_the_same_box(make_image):
    case = _chest_case(make_image)
    pipe = train_transforms(_prep("filled"), DataConfig(samples_per_volume=1, augment=NO_AUG))
    head, _ = split_for_cache(pipe)
    assert len(head.transforms) == TRAIN_RANDOM_START + 1  # BodyMaskd before the crop
    trained = head(case)
    evaluated = eval_transforms(_prep("filled"))(case)
    assert trained["image"].shape == evaluated["image"].shape
    torch.testing.assert_close(trained["image"].as_tensor(), evaluated["image"].as_tensor())
    assert trained[BODY_KEY].shape == trained["image"].shape and trained[BODY_KEY].dtype == torch.uint8
    # the table is not body: the crop stops above it
    assert evaluated["image"].shape[2] < 40 - 3
    crop = next(t for t in eval_transforms(_prep("filled")).transforms if isinstance(t, CropForegroundd))
    assert repr(crop.cropper.select_fn) == repr(body_mask(_prep("filled")))


@pytest.mark.parametrize("mode, lung_share", [("threshold", 0.0), ("filled", 0.2)])
def test_background_patches_are_drawn_from_the_lungs_with_the_filled_outline(make_image, mode, lung_share):
    """A crop-trained model never sees normal lung as background under the threshold (issue 15)."""
    pipe = train_transforms(_prep(mode), DataConfig(samples_per_volume=40, pos_fraction=0.0, augment=NO_AUG))
    pipe.set_random_state(seed=0)
    patches = pipe(_chest_case(make_image))
    centres = np.array([p["image"][0, 4, 4, 2].item() for p in patches])  # HU: intensity_stats [0, 1]
    share = float(np.mean((centres > -950) & (centres < -700)))  # lung, not air outside (-1000)
    assert share > lung_share if mode == "filled" else share == 0.0
    assert all(BODY_KEY not in p for p in patches)


def test_older_preprocessing_keeps_the_threshold_and_bundles_name_the_mask():
    old = _prep("filled").to_dict()
    del old["body_mask"], old["body_air_hu"]  # a checkpoint saved before the fields existed
    assert repr(body_mask(Preprocessing.from_dict(old))) == repr(BodyMask(-500.0, "threshold"))
    specs = preprocessing_specs(_prep("filled"))
    select = next(s for s in specs if s["_target_"] == "CropForegroundd")["select_fn"]
    assert select == {"_target_": "unetpp3d.data.body.BodyMask", "threshold_hu": -500.0, "mode": "filled",
                      "air_hu": -950.0}
