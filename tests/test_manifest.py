"""manifest: both JSON forms, clear errors, splits, and the example manifests shipped in data_manifests/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unetpp3d.data.manifest import (
    Case,
    case_name,
    load_manifest,
    split_cases,
    write_manifest,
)
from unetpp3d.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def msd(n: int = 5, **extra) -> dict:
    data = {
        "name": "Task03_Liver",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "training": [{"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"}
                     for i in range(n)],
        "test": ["./imagesTs/liver_132.nii.gz"],
    }
    data.update(extra)
    return data


def test_msd_form(tmp_path):
    m = load_manifest(write_json(tmp_path / "ds" / "dataset.json", msd()))
    assert m.task is None and m.labels == {0: "background", 1: "liver", 2: "tumour"} and m.num_classes == 3
    assert [c.name for c in m.training] == [f"liver_{i}" for i in range(5)]
    assert m.training[0].image == (tmp_path / "ds" / "imagesTr" / "liver_0.nii.gz").resolve()
    assert m.training[0].label == (tmp_path / "ds" / "labelsTr" / "liver_0.nii.gz").resolve()
    assert m.validation is None
    assert m.test == [Case("liver_132", (tmp_path / "ds" / "imagesTs" / "liver_132.nii.gz").resolve(), None)]


def test_our_form_with_task_validation_and_names(tmp_path):
    data = msd(3, task="lung_nodule", labels={"0": "background", "1": "nodule"},
               validation=[{"image": "v/a.nrrd", "label": "v/a_label.nrrd"}],
               test=[{"name": "scan1", "image": "dicom/series"}])
    m = load_manifest(write_json(tmp_path / "m.json", data))
    assert m.task == "lung_nodule"
    assert [c.name for c in m.validation] == ["a"]
    assert m.test[0].name == "scan1" and m.test[0].image.name == "series"


def test_nnunet_v2_labels_and_discovery(tmp_path):
    root = tmp_path / "Dataset001"
    for case in ("liver_000", "liver_001"):
        write_json(root / "imagesTr" / f"{case}_0000.nii.gz", "x")
        write_json(root / "labelsTr" / f"{case}.nii.gz", "x")
    data = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 2,
            "file_ending": ".nii.gz"}
    m = load_manifest(write_json(root / "dataset.json", data))
    assert m.labels == {0: "background", 1: "liver"}
    assert [(c.name, c.image.name, c.label.name) for c in m.training] == [
        ("liver_000", "liver_000_0000.nii.gz", "liver_000.nii.gz"),
        ("liver_001", "liver_001_0000.nii.gz", "liver_001.nii.gz"),
    ]


@pytest.mark.parametrize("data, match", [
    ("{not json", "not valid JSON"),
    ([1, 2], "expected a JSON object"),
    ({"training": []}, "missing key 'labels'"),
    ({"labels": {"0": "background"}}, "missing key 'training'"),
    (msd(task="brain"), "task 'brain' is not one of liver, lung_nodule"),
    (msd(labels={"0": "background", "2": "liver"}), "must be 0..1"),
    (msd(labels={"background": 0, "liver": [1, 2]}), "region-based"),
    (msd(labels={"0": "background", "1": 7}), "neither"),
    (msd(modality={"0": "CT", "1": "PET"}), "2 input channels"),
    (msd(training=[{"image": "a.nii.gz"}]), r"training\[0\]: missing key 'label'"),
    (msd(training=[{"label": "a.nii.gz"}]), r"training\[0\]: missing key 'image'"),
    (msd(training=[{"image": "x/a.nii.gz", "label": "l1.nii.gz"}, {"image": "y/a.nii.gz", "label": "l2.nii.gz"}]),
     "duplicate case name 'a'"),
    (msd(training=[{"image": "a.nii.gz", "label": "l.nii.gz"}, {"image": "b.nii.gz", "label": "l.nii.gz"}]),
     "listed twice"),
    (msd(training=[], test=[]), "lists no cases"),
])
def test_invalid_manifests(tmp_path, data, match):
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(UserError, match=match) as info:
        load_manifest(path)
    assert str(path) in str(info.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(UserError, match="manifest not found"):
        load_manifest(tmp_path / "nope.json")


def test_case_name():
    assert case_name("imagesTr/liver_3.nii.gz") == "liver_3"
    assert case_name("a/b.nrrd") == "b" and case_name("a/b.mha") == "b"
    assert case_name("data/patient7") == "patient7"  # DICOM folder
    assert case_name("x.v2.nii.gz") == "x.v2"


def test_dicom_folders_with_generic_names_are_named_after_their_parents_everywhere(tmp_path):
    """Two series in p1/dicom and p2/dicom are the cases p1 and p2 for check and train, as infer names
    its outputs (p1.nii.gz): not a "duplicate case name dicom"."""
    from unetpp3d.inference.inputs import expand_inputs

    for patient in ("p1", "p2"):
        (tmp_path / patient / "dicom").mkdir(parents=True)
        (tmp_path / patient / "seg.nii.gz").write_bytes(b"")
    data = {"labels": {"0": "background", "1": "liver"},
            "training": [{"image": f"{p}/dicom", "label": f"{p}/seg.nii.gz"} for p in ("p1", "p2")]}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    assert [c.name for c in load_manifest(path).training] == ["p1", "p2"]
    assert case_name(tmp_path / "p1" / "dicom") == "p1" and case_name(tmp_path / "p1" / "seg.nii.gz") == "seg"
    assert case_name(tmp_path / "absent" / "dicom") == "dicom"  # not a folder (yet): its own name
    assert [c.name for c in expand_inputs([tmp_path / "p1" / "dicom", tmp_path / "p2" / "dicom"])] == ["p1", "p2"]


def test_split_is_seeded_and_independent_of_listing_order(tmp_path):
    data = msd(10)
    m = load_manifest(write_json(tmp_path / "a.json", data))
    data["training"] = data["training"][::-1]
    m_rev = load_manifest(write_json(tmp_path / "b.json", data))
    train, val = split_cases(m, val_fraction=0.2, seed=0)
    assert len(train) == 8 and len(val) == 2
    assert {c.name for c in train} | {c.name for c in val} == {c.name for c in m.training}
    assert [c.name for c in split_cases(m_rev, seed=0)[1]] == [c.name for c in val]
    assert split_cases(m, seed=1)[1] != val or split_cases(m, seed=2)[1] != val


def test_kfold_covers_every_case_once(tmp_path):
    m = load_manifest(write_json(tmp_path / "a.json", msd(11)))
    held = [c.name for k in range(5) for c in split_cases(m, fold=k, folds=5)[1]]
    assert sorted(held) == sorted(c.name for c in m.training)
    train, val = split_cases(m, fold=2, folds=5)
    assert not {c.name for c in train} & {c.name for c in val}
    with pytest.raises(UserError, match="outside 0..4"):
        split_cases(m, fold=5, folds=5)


def test_split_edge_cases(tmp_path):
    m = load_manifest(write_json(tmp_path / "a.json", msd(2)))
    assert [len(x) for x in split_cases(m, val_fraction=0.2)] == [1, 1]  # at least one validation case
    assert [len(x) for x in split_cases(m, val_fraction=0.0)] == [2, 0]
    with pytest.raises(UserError, match="cannot make 5 folds"):
        split_cases(m, fold=0, folds=5)


def test_validation_list_wins_and_refuses_fold(tmp_path):
    data = msd(4, validation=[{"image": "v.nii.gz", "label": "vl.nii.gz"}])
    m = load_manifest(write_json(tmp_path / "a.json", data))
    train, val = split_cases(m, val_fraction=0.5)
    assert len(train) == 4 and [c.name for c in val] == ["v"]
    with pytest.raises(UserError, match="--fold does not apply"):
        split_cases(m, fold=0)


def nnunet_v2_dataset(root: Path, n: int = 4) -> Path:
    """A fake nnU-Net v2 raw dataset: empty image files, found by file_ending."""
    for i in range(n):
        write_json(root / "imagesTr" / f"liver_{i:03d}_0000.nii.gz", "x")
        write_json(root / "labelsTr" / f"liver_{i:03d}.nii.gz", "x")
    return write_json(root / "dataset.json", {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                                              "numTraining": n, "file_ending": ".nii.gz"})


def test_nnunet_splits_final_fixes_the_folds(tmp_path):
    path = nnunet_v2_dataset(tmp_path / "Dataset001")
    splits = [{"train": ["liver_001", "liver_002", "liver_003"], "val": ["liver_000"]},
              {"train": ["liver_000", "liver_003"], "val": ["liver_001", "liver_002"]}]
    write_json(path.parent / "splits_final.json", splits)
    m = load_manifest(path)
    assert m.folds_source == str(path.parent / "splits_final.json")
    for k, fold in enumerate(splits):
        train, val = split_cases(m, fold=k, folds=5)  # the dataset's 2 folds, whatever data.folds says
        assert [c.name for c in train] == fold["train"] and [c.name for c in val] == fold["val"]
    assert train[0].image.name == "liver_000_0000.nii.gz"
    # without --fold the seeded split applies as before
    assert len(split_cases(m, val_fraction=0.25)[1]) == 1
    with pytest.raises(UserError, match=r"--fold 2: .*splits_final.json defines 2 fold\(s\), numbered 0..1"):
        split_cases(m, fold=2)


def test_splits_final_naming_unknown_cases_says_which(tmp_path):
    path = nnunet_v2_dataset(tmp_path / "Dataset001")
    write_json(path.parent / "splits_final.json", [{"train": ["liver_000", "liver_042"], "val": ["liver_001"]},
                                                   {"train": ["liver_000"], "val": ["liver_000"]}])
    m = load_manifest(path)
    with pytest.raises(UserError, match=r"splits_final.json: fold 0 names 1 case\(s\) .*: liver_042 \(its cases: "
                                        r"liver_000, liver_001"):
        split_cases(m, fold=0)
    with pytest.raises(UserError, match="fold 1 both trains and validates on liver_000"):
        split_cases(m, fold=1)


def test_splits_final_is_read_only_beside_a_dataset_json(tmp_path):
    path = write_json(tmp_path / "ours.json", msd(5))
    write_json(tmp_path / "splits_final.json", [{"train": ["liver_0"], "val": ["liver_1"]}])
    m = load_manifest(path)
    assert m.folds is None and len(split_cases(m, fold=0, folds=5)[1]) == 1  # the seeded 5 folds


@pytest.mark.parametrize("splits, match", [
    ("[oops", "cannot read the cross-validation splits"),
    ([], "non-empty list"),
    ([{"train": ["a"]}], r"fold 0: expected \{\"train\""),
    ([{"train": ["a", "a"], "val": []}], "fold 0: train: case\\(s\\) listed twice: a"),
    ([{"train": "a", "val": []}], "fold 0: train: expected a list of case names"),
])
def test_malformed_splits_final_is_refused(tmp_path, splits, match):
    path = nnunet_v2_dataset(tmp_path / "Dataset001", n=2)
    write_json(path.parent / "splits_final.json", splits)
    with pytest.raises(UserError, match=match) as info:
        load_manifest(path)
    assert "splits_final.json" in str(info.value)


def auto3dseg_datalist(folds: list) -> dict:
    """An Auto3DSeg datalist (with the labels it lacks added): 'fold' per training entry, 'testing'."""
    return {"labels": {"0": "background", "1": "liver"},
            "training": [{"fold": k, "image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"}
                         for i, k in enumerate(folds)],
            "testing": [{"image": "imagesTs/t0.nii.gz"}]}


def test_auto3dseg_datalist_folds(tmp_path):
    m = load_manifest(write_json(tmp_path / "datalist.json", auto3dseg_datalist([0, 1, 2, 0, 1, 2])))
    assert [c.name for c in m.test] == ["t0"]
    assert "'fold' keys" in m.folds_source
    train, val = split_cases(m, fold=1, folds=5)
    assert [c.name for c in val] == ["c1", "c4"] and [c.name for c in train] == ["c0", "c2", "c3", "c5"]
    with pytest.raises(UserError, match=r"--fold 3: .*'fold' keys defines 3 fold\(s\), numbered 0..2"):
        split_cases(m, fold=3)


@pytest.mark.parametrize("folds, match", [
    ([0, None, 1], r"1 training entry has no 'fold' key \(training\[1\]\)"),
    ([0, "1", 1], r"training\[1\].fold: expected a fold number"),
    ([0, True, 1], r"training\[1\].fold: expected a fold number"),
])
def test_bad_datalist_folds_are_refused(tmp_path, folds, match):
    data = auto3dseg_datalist(folds)
    for entry in data["training"]:
        if entry["fold"] is None:
            del entry["fold"]
    with pytest.raises(UserError, match=match):
        load_manifest(write_json(tmp_path / "datalist.json", data))


def test_folds_given_twice_are_refused(tmp_path):
    path = write_json(tmp_path / "dataset.json", auto3dseg_datalist([0, 1]))
    write_json(tmp_path / "splits_final.json", [{"train": ["c0"], "val": ["c1"]}])
    with pytest.raises(UserError, match="folds are given twice"):
        load_manifest(path)


def test_write_manifest_round_trip(tmp_path):
    out = tmp_path / "data" / "manifest.json"
    training = [Case("a", tmp_path / "data" / "img" / "a.nii.gz", tmp_path / "data" / "lab" / "a.nii.gz"),
                (tmp_path / "data" / "img" / "b.nii.gz", tmp_path / "data" / "lab" / "b.nii.gz")]
    write_manifest(out, training, {0: "background", 1: "liver"}, task="liver",
                   validation=[(tmp_path / "elsewhere" / "c.nii.gz", tmp_path / "elsewhere" / "cl.nii.gz")],
                   test=[tmp_path / "data" / "t.nii.gz", Case("named", tmp_path / "data" / "dicom")])
    raw = json.loads(out.read_text())
    assert raw["training"][0] == {"image": "img/a.nii.gz", "label": "lab/a.nii.gz"}  # relative paths
    assert raw["validation"][0]["image"] == "../elsewhere/c.nii.gz"
    m = load_manifest(out)
    assert m.task == "liver" and m.labels == {0: "background", 1: "liver"}
    assert [c.name for c in m.training] == ["a", "b"] and [c.name for c in m.test] == ["t", "named"]
    assert m.validation[0].label == (tmp_path / "elsewhere" / "cl.nii.gz").resolve()
    with pytest.raises(UserError, match="task"):
        write_manifest(out, training, {0: "background"}, task="heart")


@pytest.mark.parametrize("name, task, classes, n_train", [
    ("msd_task03_liver.json", "liver", 3, 131),
    ("msd_task06_lung.json", "lung_nodule", 2, 63),
    ("synthetic_liver_example.json", "liver", 2, 6),
])
def test_shipped_example_manifests_load(name, task, classes, n_train):
    m = load_manifest(REPO / "data_manifests" / name)
    assert (m.task, m.num_classes, len(m.training)) == (task, classes, n_train)
    assert all(c.label is not None for c in m.training)
