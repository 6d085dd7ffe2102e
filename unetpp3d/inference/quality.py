"""A per-case quality signal from the disagreement of a deep-supervised UNet++'s heads.

The heads X^{0,1} ... X^{0,L} of a UNet++ trained with deep supervision are L segmentations of
increasing depth sharing one encoder. Where the case is easy they agree; where the model is
unsure (faint ground-glass, a nodule touching the pleura, an unusual scan) the shallow heads
and the deep ones part. Two scores measure that, both 0 when every head agrees:

* :func:`head_spread`: per voxel, the mean over heads of the total-variation distance between
  a head's class probabilities and the heads' mean, ``mean_h 0.5 * sum_c |p_hc - mean_h' p_h'c|``
  (in [0, 1]; for two classes the mean absolute deviation of the foreground probability).
  :func:`disagreement` averages it inside the predicted mask: the score ``infer`` reports.
* :func:`dice_gap`: ``1 - Dice`` between two masks, e.g. the shallowest head's and the
  averaged one's.

:class:`HeadQualityNet` is the sliding window's network for this: each window gives the heads'
mean probabilities (the accurate mode, averaging probabilities as the UNet++ paper does) plus
one extra channel, the spread, so that both are stitched and resampled back to the scan's grid
together.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from unetpp3d.hardware import autocast_dtype
from unetpp3d.inference.windows import _FLIPS, accepts_prune_level


def has_heads(net: nn.Module) -> bool:
    """Whether ``net`` has several heads to compare (a UNet++ trained with deep supervision)."""
    return accepts_prune_level(net) and bool(getattr(net, "deep_supervision", False)) \
        and int(getattr(net, "depth", 1)) > 1


def head_logits(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every head's logits, X^{0,1} first, from one forward pass in inference mode.

    The network returns the list of its heads when its ``training`` flag is set. Only the top
    module's flag is raised, for the duration of the call: its layers (norms, dropout) keep
    their eval behaviour, so each head equals what the network returns pruned at that level.

    Args:
        net: a :class:`~unetpp3d.model.network.UNetPlusPlus3D` with deep supervision.
        x: the input batch.

    Raises:
        ValueError: the network has no heads to compare.
    """
    if not has_heads(net):
        raise ValueError(f"{type(net).__name__} has no deep-supervision heads to compare")
    was = net.training
    net.training = True
    try:
        out = net(x)
    finally:
        net.training = was
    return list(out)


def head_spread(probs: torch.Tensor) -> torch.Tensor:
    """Per-voxel disagreement of heads: ``(H, B, C, ...)`` probabilities -> ``(B, ...)`` in [0, 1].

    The mean over the H heads of each head's total-variation distance from the heads' mean
    class distribution; 0 where all heads give the same probabilities.
    """
    mean = probs.mean(dim=0, keepdim=True)
    return 0.5 * (probs - mean).abs().sum(dim=2).mean(dim=0)


def disagreement(spread: np.ndarray, mask: np.ndarray) -> float | None:
    """Mean head spread inside ``mask`` (any non-zero voxel); None when the mask is empty."""
    inside = np.asarray(mask) != 0
    if not inside.any():
        return None
    return float(np.asarray(spread, dtype=np.float64)[inside].mean())


def dice_gap(a: np.ndarray, b: np.ndarray) -> float:
    """``1 - Dice`` of two binary masks (non-zero = inside); 0 when both are empty."""
    a, b = np.asarray(a) != 0, np.asarray(b) != 0
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 0.0
    return 1.0 - 2.0 * int(np.logical_and(a, b).sum()) / total


class HeadQualityNet(nn.Module):
    """Window network giving the heads' mean probabilities and their spread, ``C + 1`` channels.

    Args:
        net: a UNet++ with deep supervision (see :func:`head_logits`).
        tta: average over the 8 flips of the three spatial axes (probabilities and spread alike).
        amp: autocast where reduced precision pays (as :class:`~unetpp3d.inference.windows.ProbabilityNet`).

    Example::

        >>> out = sliding_window_inference(image, roi, 2, HeadQualityNet(net))
        >>> probs, spread = out[:, :-1], out[:, -1]
    """

    def __init__(self, net: nn.Module, tta: bool = False, amp: bool = False):
        super().__init__()
        if not has_heads(net):
            raise ValueError(f"{type(net).__name__} has no deep-supervision heads to compare")
        self.net = net
        self.tta = bool(tta)
        self.amp = bool(amp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        dtype = autocast_dtype("auto", x.device) if self.amp else None
        flips = _FLIPS if self.tta else _FLIPS[:1]
        for dims in flips:
            xi = torch.flip(x, dims) if dims else x
            with torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                heads = head_logits(self.net, xi)
            probs = torch.stack([torch.softmax(h.float(), dim=1) for h in heads])
            out = torch.cat([probs.mean(dim=0), head_spread(probs)[:, None]], dim=1)
            out = torch.flip(out, dims) if dims else out
            total = out if total is None else total + out
        return total / len(flips)
