"""The network as the sliding window sees it: probabilities per window, TTA and fold ensembles."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence

import torch
from torch import nn

from unetpp3d.hardware import autocast_dtype
from unetpp3d.model.network import COMBINE

# All flips of the three spatial axes of a (batch, channel, x, y, z) tensor.
_FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))


def accepts_prune_level(net: nn.Module) -> bool:
    """Whether ``net``'s forward takes ``prune_level`` and ``combine`` per call (a unetpp3d UNet++)."""
    try:
        params = inspect.signature(net.forward).parameters
    except (TypeError, ValueError):
        return False
    return "prune_level" in params and "combine" in params


class ProbabilityNet(nn.Module):
    """Wrap a segmentation network so that each window gives class probabilities.

    Blending probabilities (rather than logits) across overlapping windows makes the test-time
    augmentation an average of probabilities, as specified, and lets the inverse resampling
    interpolate values that stay in [0, 1]. The wrapped network is only called, never changed:
    the pruning level and the way heads are combined go with each call, so several wrappers
    (a fast and an accurate one, say) can share one network.

    Args:
        net: a network returning logits ``(B, C, x, y, z)`` in eval mode.
        tta: average over the 8 flips of the three spatial axes.
        amp: autocast where reduced precision pays on the input's device
            (:func:`~unetpp3d.hardware.autocast_dtype` with ``"auto"``: bf16 or fp16 on CUDA,
            bf16 on CPUs with native bf16); decided per call, so a bundle behaves as ``infer`` does.
        prune_level: run the pruned UNet++ L^l (None: every head); needs a network whose
            forward takes ``prune_level``, as :class:`~unetpp3d.model.network.UNetPlusPlus3D`'s does.
        combine: how such a network combines its heads in accurate mode: ``"probabilities"``
            (their mean probability, the default) or ``"logits"`` (their mean logit).

    Raises:
        ValueError: ``prune_level`` or ``combine`` given for a network that cannot take them.

    Example::

        >>> inferer = SlidingWindowInferer(roi_size=(96, 96, 96), sw_batch_size=2, overlap=0.5, mode="gaussian")
        >>> probs = inferer(image[None], ProbabilityNet(net, tta=True))
    """

    def __init__(self, net: nn.Module, tta: bool = False, amp: bool = False, prune_level: int | None = None,
                 combine: str = "probabilities"):
        super().__init__()
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        self.net = net
        self.tta = bool(tta)
        self.amp = bool(amp)
        self.prune_level = None if prune_level is None else int(prune_level)
        self.combine = combine
        if accepts_prune_level(net):
            self._call_args = {"prune_level": self.prune_level, "combine": combine}
        elif prune_level is not None or combine != "probabilities":
            raise ValueError(f"{type(net).__name__} takes no prune_level or combine; it runs as it is")
        else:
            self._call_args = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        dtype = autocast_dtype("auto", x.device) if self.amp else None
        for dims in _FLIPS if self.tta else _FLIPS[:1]:
            xi = torch.flip(x, dims) if dims else x
            with torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                logits = self.net(xi, **self._call_args)
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
