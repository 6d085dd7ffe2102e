"""The network as the sliding window sees it: probabilities per window, TTA and fold ensembles."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from unetpp3d.hardware import inference_autocast_dtype

# All flips of the three spatial axes of a (batch, channel, x, y, z) tensor.
_FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))


class ProbabilityNet(nn.Module):
    """Wrap a segmentation network so that each window gives class probabilities.

    Blending probabilities (rather than logits) across overlapping windows makes the test-time
    augmentation an average of probabilities, as specified, and lets the inverse resampling
    interpolate values that stay in [0, 1].

    Args:
        net: a network returning logits ``(B, C, x, y, z)`` in eval mode.
        tta: average over the 8 flips of the three spatial axes.
        amp: autocast where reduced precision pays on the input's device
            (:func:`~unetpp3d.hardware.inference_autocast_dtype`: bf16 or fp16 on CUDA, bf16 on
            CPUs with native bf16); decided per call, so a bundle behaves as ``infer`` does.
        prune_level: set as ``net.prune_level`` when the network has one (None: all heads), so
            that a bundle's JSON can choose fast mode with a plain value.

    Example::

        >>> inferer = SlidingWindowInferer(roi_size=(96, 96, 96), sw_batch_size=2, overlap=0.5, mode="gaussian")
        >>> probs = inferer(image[None], ProbabilityNet(net, tta=True))
    """

    def __init__(self, net: nn.Module, tta: bool = False, amp: bool = False, prune_level: int | None = None):
        super().__init__()
        self.net = net
        self.tta = bool(tta)
        self.amp = bool(amp)
        if hasattr(net, "prune_level"):
            net.prune_level = prune_level
        elif prune_level is not None:
            raise ValueError(f"{type(net).__name__} has no prune_level; it cannot run pruned")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        dtype = inference_autocast_dtype(x.device) if self.amp else None
        for dims in _FLIPS if self.tta else _FLIPS[:1]:
            xi = torch.flip(x, dims) if dims else x
            with torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                logits = self.net(xi)
            probs = torch.softmax(logits.float(), dim=1)
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total + probs
        return total / (len(_FLIPS) if self.tta else 1)


class EnsembleNet(nn.Module):
    """Average the class probabilities of several :class:`ProbabilityNet` on each window.

    The fold ensemble of a cross-validation, as nnU-Net does it: every model sees the same
    preprocessed window and their softmax outputs are averaged, so the ensemble's argmax is the
    class with the highest mean probability.

    Args:
        members: modules returning probabilities ``(B, C, x, y, z)``, all with the same classes.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.members[0](x)
        for member in self.members[1:]:
            total = total + member(x)
        return total / len(self.members)
