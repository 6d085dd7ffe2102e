"""Deep-supervision loss: one Dice + cross-entropy term on every top-row head X^{0,1} ... X^{0,L}.

Zhou et al. (UNet++, arXiv:1807.10165) train every head against the full-resolution label and
average the terms; nnU-Net (Isensee et al., Nature Methods 2021) uses the same Dice + CE sum.
Here the per-head weights are configurable and always normalised to sum to 1, so the loss has
the same scale whatever the depth, and a single tensor (no deep supervision) is one head.

Two kinds:

The sum over the heads is MONAI's ``DeepSupervisionLoss``. Our own code only does what MONAI
cannot express: the ``"auto"`` weighting (equal weights summing to 1 for however many heads a call
brings), checks that every head matches the label (MONAI would silently resize the label for a
smaller head), and the ``dice_bce`` term.

- ``dice_ce``: softmax over the classes. MONAI ``DiceCELoss`` with ``to_onehot_y`` and
  ``softmax``; the soft Dice is taken over the foreground classes and over the whole batch
  (nnU-Net's "batch Dice"), because a patch without foreground would otherwise give a Dice
  term of 1 whatever the network predicts.
- ``dice_bce``: an independent sigmoid per channel (multi-label). MONAI ``DiceLoss`` with
  ``sigmoid`` plus ``BCEWithLogitsLoss`` against the one-hot label (MONAI's ``DiceCELoss`` uses
  binary cross-entropy only for a single output channel, so this sum is ours). Every channel, background
  included, is trained, so the network keeps ``num_classes`` outputs and ``argmax`` over them
  still gives a label map at inference (the sigmoid is monotonic).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DeepSupervisionLoss as MonaiDeepSupervisionLoss
from monai.losses import DiceCELoss, DiceLoss
from monai.networks.utils import one_hot
from torch import nn

KINDS = ("dice_ce", "dice_bce")


def normalise_head_weights(n_heads: int, weights: str | Sequence[float] | None = "auto") -> list[float]:
    """Per-head weights normalised to sum to 1.

    Args:
        n_heads: number of heads (``L`` with deep supervision, else 1).
        weights: ``"auto"`` or None for equal weights, or one non-negative number per head,
            X^{0,1} first.

    Raises:
        ValueError: wrong count, a negative weight, or all zero.
    """
    if weights is None or weights == "auto":
        return [1.0 / n_heads] * n_heads
    values = [float(w) for w in weights]
    if len(values) != n_heads:
        raise ValueError(f"head_weights needs {n_heads} values (one per head X^{{0,1}}..X^{{0,{n_heads}}}), "
                         f"got {len(values)}")
    if any(w < 0 for w in values) or sum(values) <= 0:
        raise ValueError(f"head_weights must be non-negative and not all zero, got {values}")
    total = sum(values)
    return [w / total for w in values]


class DiceBCELoss(nn.Module):
    """Soft Dice with a sigmoid per channel plus binary cross-entropy, against the one-hot label.

    MONAI's ``DiceCELoss`` switches to binary cross-entropy only for one output channel; a
    multi-label sigmoid over ``num_classes`` channels needs this sum.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = int(num_classes)
        self.dice = DiceLoss(sigmoid=True, include_background=True, batch=True)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        onehot = one_hot(target.long(), num_classes=self.num_classes, dim=1).to(logits.dtype)
        return self.dice(logits, onehot) + self.bce(logits, onehot)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a Dice + (binary) cross-entropy term over the network's heads.

    Args:
        num_classes: classes including background (the network's output channels).
        head_weights: ``"auto"`` (equal) or one weight per head, X^{0,1} first; normalised to
            sum to 1. With ``"auto"`` the number of heads is taken from each call, so the same
            loss serves a list of heads and a single tensor.
        kind: ``"dice_ce"`` (softmax) or ``"dice_bce"`` (per-channel sigmoid).

    ``forward(outputs, target)`` takes the list of head logits (each ``(B, C, *spatial)``), or
    one logits tensor, and a label map ``(B, 1, *spatial)`` of class indices. The loss is
    float32 whatever the logits' precision: MONAI's wrapper computes every term in float32,
    because softmax/log of half-precision logits loses the small probabilities that the CE
    gradient lives on.

    Example::

        >>> loss_fn = DeepSupervisionLoss(num_classes=2)
        >>> heads = [torch.randn(2, 2, 8, 8, 8) for _ in range(3)]
        >>> loss = loss_fn(heads, torch.randint(0, 2, (2, 1, 8, 8, 8)))
    """

    def __init__(self, num_classes: int, head_weights: str | Sequence[float] | None = "auto",
                 kind: str = "dice_ce"):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background too and must be at least 2, got {num_classes}")
        if kind not in KINDS:
            raise ValueError(f"loss kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.num_classes = int(num_classes)
        self.kind = kind
        self.weights = head_weights
        fixed = None
        if isinstance(head_weights, (list, tuple)):
            fixed = normalise_head_weights(len(head_weights), head_weights)  # fail early on bad values
        term: nn.Module = (DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
                           if kind == "dice_ce" else DiceBCELoss(num_classes))
        # weight_mode "same" (all 1) serves "auto": forward divides by the number of heads. Every
        # head joins the graph, a zero-weight one too: DistributedDataParallel expects a
        # gradient (here zero) for every parameter.
        self.deep_supervision = MonaiDeepSupervisionLoss(term, weight_mode="same", weights=fixed)

    def _check(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} channels, expected {self.num_classes} classes")
        if logits.shape[2:] != target.shape[2:]:
            # MONAI would resize the label to the head; every UNet++ head is full size, so a
            # smaller one is a bug to report.
            raise ValueError(f"head size {tuple(logits.shape[2:])} differs from the label's {tuple(target.shape[2:])}")

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        heads = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        if not heads:
            raise ValueError("no network outputs to compute a loss on")
        if target.ndim == heads[0].ndim - 1:  # (B, *spatial) -> (B, 1, *spatial)
            target = target.unsqueeze(1)
        normalise_head_weights(len(heads), self.weights)  # the right number of weights for these heads
        for logits in heads:
            self._check(logits, target)
        if len(heads) == 1:
            return self.deep_supervision(heads[0], target)  # one head: weight 1
        total = self.deep_supervision(heads, target)
        return total if self.deep_supervision.weights is not None else total / len(heads)
