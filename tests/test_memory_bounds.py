"""Memory is estimated before it is used: YAML alias bombs, checkpoints that declare huge networks, synth sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetpp3d import UserError, hardware
from unetpp3d.config import Preprocessing, load_config
from unetpp3d.imageio.readers import read_image
from unetpp3d.inference.memory import inference_peak_bytes
from unetpp3d.inference.predictor import Predictor
from unetpp3d.model.checkpoint import save_checkpoint
from unetpp3d.model.network import UNetPlusPlus3D, load_model, network_from_checkpoint
from unetpp3d.synth.phantom import write_dataset

BOMB = """a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
"""


@pytest.mark.parametrize("text", [BOMB, "train:\n  lr: &x 0.01\n  weight_decay: *x\n",
                                  "model: &m {dropout: 0.0}\n"])
def test_yaml_anchors_and_aliases_are_refused(tmp_path, text):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=r"bomb\.yaml: line \d+: YAML anchors and aliases"):
        load_config(path)


def test_an_override_with_aliases_is_refused():
    with pytest.raises(UserError, match="anchors and aliases"):
        load_config(None, ["model.features=[&a 4, *a]"])


def _small() -> UNetPlusPlus3D:
    torch.manual_seed(0)
    return UNetPlusPlus3D(1, 2, features=(4, 8))


def test_a_checkpoint_declaring_a_huge_network_is_refused_before_it_is_built(tmp_path, monkeypatch):
    net = _small()
    args = {**net.model_args, "features": [1024, 2048, 4096], "strides": None}
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, {"model_args": args, "state_dict": net.state_dict()})
    built = []
    real_init = UNetPlusPlus3D.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        built.append(next(self.parameters()).device.type)

    monkeypatch.setattr(UNetPlusPlus3D, "__init__", spy)
    with pytest.raises(UserError, match=r"tiny\.pt: .*declare 1,516,317,700 weights \(5\.65 GiB.*holds 4,758"):
        load_model(path)
    assert built == ["meta"]  # counted on the meta device; no real network was allocated


def test_weights_of_the_declared_size_load(tmp_path):
    net = _small()
    rebuilt = network_from_checkpoint({"model_args": net.model_args, "state_dict": net.state_dict()}, "x.pt")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), net.state_dict().values()))


def test_a_bundle_goes_through_the_same_size_check(tmp_path):
    net = _small()
    state = net.state_dict()
    state.pop(next(iter(state)))  # one tensor missing
    with pytest.raises(UserError, match="first mismatch"):
        network_from_checkpoint({"model_args": net.model_args, "state_dict": state}, tmp_path / "bundle")


def _cgroup(tmp_path, monkeypatch, limit: str, usage: str, system: int | None = 64 * 2**30) -> None:
    (tmp_path / "memory.max").write_text(limit + "\n")
    (tmp_path / "memory.current").write_text(usage + "\n")
    monkeypatch.setattr(hardware, "CGROUP_FILES", ((str(tmp_path / "memory.max"), str(tmp_path / "memory.current")),))
    monkeypatch.setattr(hardware, "system_memory_available", lambda: system)


def test_available_memory_is_bounded_by_the_cgroup_limit(tmp_path, monkeypatch):
    _cgroup(tmp_path, monkeypatch, str(2**30), str(200 * 2**20))
    assert hardware.available_memory() == 2**30 - 200 * 2**20
    _cgroup(tmp_path, monkeypatch, "max", "0")  # no limit: the machine's memory
    assert hardware.available_memory() == 64 * 2**30
    _cgroup(tmp_path, monkeypatch, str(2**30), "0", system=None)
    assert hardware.available_memory() == 2**30


def test_reading_a_scan_counts_the_cgroup_limit(tmp_path, monkeypatch, make_image):
    path = make_image("scan.nii.gz", np.zeros((32, 32, 32), np.int16))
    _cgroup(tmp_path, monkeypatch, str(64 * 2**10), "0")  # 64 KiB left in the container
    with pytest.raises(UserError, match=r"scan\.nii\.gz: reading it needs about .* only 64\.0 KiB"):
        read_image(path)


@pytest.mark.parametrize("random_geometry", [False, True])
def test_synth_refuses_a_size_that_does_not_fit_in_memory(tmp_path, monkeypatch, random_geometry):
    monkeypatch.setattr(hardware, "available_memory", lambda: 2 * 2**30)
    out = tmp_path / "synth"
    with pytest.raises(UserError, match=r"--size 800: one phantom needs about \d+\.\d GiB .* only 2\.0 GiB"):
        write_dataset("liver", 2, out, size=800, random_geometry=random_geometry)
    assert not out.exists()
    write_dataset("liver", 1, out, size=16)  # a size that fits is written


def test_the_inference_estimate_covers_the_inverse_resampling_peak():
    # The reported case: a 600x600x900 scan passed 13.7 GB during the inverse resampling.
    need = inference_peak_bytes((600, 600, 900), (300, 300, 450), num_classes=2)
    assert 12 * 2**30 <= need <= 20 * 2**30
    assert inference_peak_bytes((64, 64, 64), (32, 32, 32), 3) > inference_peak_bytes((64, 64, 64), (32, 32, 32), 2)


def test_infer_refuses_a_scan_whose_pipeline_does_not_fit_before_running_windows(make_image, monkeypatch):
    scan = make_image("big.nii.gz", np.full((32, 32, 32), -1000, np.int16), spacing=(2.0, 2.0, 2.0))
    prep = Preprocessing(task="liver", labels={"0": "background", "1": "liver"}, target_spacing=[8.0, 8.0, 8.0],
                         intensity_range=[-1000.0, 1000.0], intensity_stats=[0.0, 100.0], patch_size=[32, 32, 32])
    predictor = Predictor(_small().eval(), prep, device="cpu", overlap=0.0, progress=False)
    need = inference_peak_bytes((32, 32, 32), (8, 8, 8), 2)
    ran = []
    monkeypatch.setattr(predictor, "inferer", lambda *a: ran.append(1))
    monkeypatch.setattr(hardware, "available_memory", lambda: need - 1)
    with pytest.raises(UserError, match=rf"big\.nii\.gz: inference \(32x32x32 voxels as read.*needs about "
                                        rf"{hardware.human_bytes(need)}"):
        predictor.predict(scan)
    assert ran == []
