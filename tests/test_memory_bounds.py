"""Memory is estimated before it is used: YAML alias bombs, checkpoints that declare huge networks, synth sizes."""

from __future__ import annotations

import pytest
import torch

from unetpp3d import UserError
from unetpp3d.config import load_config
from unetpp3d.model.checkpoint import save_checkpoint
from unetpp3d.model.network import UNetPlusPlus3D, load_model, network_from_checkpoint

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
