"""A plain 3D U-Net built from the UNet++'s own blocks: the fair baseline for the paper's comparison.

Zhou et al. (UNet++, arXiv:1807.10165) compare UNet++ with a U-Net of the same depth and
blocks, and with a "wide U-Net" whose widths are raised until it has as many parameters as the
UNet++. :class:`UNet3D` is that U-Net: the same encoder X^{i,0} as
:class:`~unetpp3d.model.network.UNetPlusPlus3D` (``ConvBlock``, strides, norm, activation,
dropout), the same ``Up()`` (transposed convolution or trilinear + 1x1x1), and one decoder node
per level,

    D^{L} = X^{L,0},    D^{i} = H([X^{i,0}, Up(D^{i+1})])      for i = L-1 ... 0,

which is the UNet++ with only its outer skip pathway (its node X^{i,L-i} fed by X^{i,0} alone).
Only the nested nodes and dense skips differ, so a difference in the table is the architecture's.

Deep supervision (optional, off in the paper's U-Net): a 1x1x1 head on every decoder node
D^0 ... D^{L-1}, the lower-resolution logits upsampled trilinearly to the input's size, full
resolution first, so that the same :class:`~unetpp3d.training.loss.DeepSupervisionLoss` trains
it. In eval mode only the full-resolution head D^0 is returned (as nnU-Net does: the deeper
heads only help training).

:func:`matched_features` scales the widths until the parameter count matches a target (the
wide U-Net); counting builds the network on PyTorch's ``meta`` device, so no memory is used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unetpp3d.model.fused import _node, _run_fused
from unetpp3d.model.network import ConvBlock, SavedArgsNetwork, Stride, UNetPlusPlus3D


class UNet3D(SavedArgsNetwork):
    """3D U-Net with the encoder, blocks, strides and upsampling of :class:`UNetPlusPlus3D`.

    Args:
        in_channels: image channels (1 for CT).
        out_channels: classes including background.
        features: width of each level, full resolution first; ``L = len(features) - 1``
            downsamplings.
        deep_supervision: a head on every decoder level, trained together (see the module
            docstring); eval mode returns the full-resolution head only.
        strides: the downsampling between level ``i`` and ``i + 1`` (``L`` entries, each an
            int or a 3-tuple); default 2 everywhere.
        norm: "instance" (default), "batch" or "group".
        act: "leakyrelu" (default), "relu", "prelu", "gelu", "elu", "swish" or "mish".
        upsample: "deconv" (default) or "trilinear".
        dropout: dropout probability inside each block.

    Like the UNet++, ``fused`` (default True) runs the channels-last fast path and
    ``channels_last`` picks its layout; the plain path (``fused = False``) computes the same
    function from the same weights.

    Example::

        >>> net = UNet3D(in_channels=1, out_channels=2, features=(8, 16, 32, 64))
        >>> logits = net.eval()(torch.zeros(1, 1, 32, 32, 32))
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256, 320),
        deep_supervision: bool = False,
        strides: Sequence[Stride] | None = None,
        norm: str = "instance",
        act: str = "leakyrelu",
        upsample: str = "deconv",
        dropout: float = 0.0,
    ):
        super().__init__()
        features, strides3 = self._init_args(in_channels, out_channels, features, deep_supervision, strides, norm,
                                             act, upsample, dropout)
        depth = self.depth

        self.encoder = self._make_encoder(in_channels, features, strides3, norm, act, dropout)
        self.up = nn.ModuleList(UNetPlusPlus3D._make_up(features[i + 1], features[i], strides3[i], upsample)
                                for i in range(depth))
        self.decoder = nn.ModuleList(ConvBlock(2 * features[i], features[i], norm, act, dropout) for i in range(depth))
        n_heads = depth if self.deep_supervision else 1
        self.heads = nn.ModuleList(nn.Conv3d(features[i], out_channels, kernel_size=1) for i in range(n_heads))
        self.to(memory_format=torch.channels_last_3d)  # as the UNet++ does, for the fused path

    def check_input_size(self, spatial: Sequence[int]) -> None:
        """Raise a ValueError naming the multiple needed when a size cannot pass the network."""
        div = self.size_divisor
        if len(spatial) != 3 or any(int(n) % d for n, d in zip(spatial, div)):
            raise ValueError(
                f"input spatial size {tuple(int(n) for n in spatial)} must be 3D with each axis a multiple of "
                f"{div} (the product of the strides); pad or crop it, e.g. with monai.transforms.DivisiblePad(k={div})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.ndim != 5:
            raise ValueError(f"expected a (batch, channels, D, H, W) tensor, got shape {tuple(x.shape)}")
        self.check_input_size(x.shape[2:])
        cl = self.fused and self.channels_last
        if cl:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if self.fused:
            def run(block: nn.Module, up: nn.Module | None, *parts: torch.Tensor) -> torch.Tensor:
                return _node(block, up, cl, *parts)

            def head(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
                return _run_fused(module, t, cl)
        else:
            def run(block: nn.Module, up: nn.Module | None, *parts: torch.Tensor) -> torch.Tensor:
                if up is None:
                    return block(parts[0])
                return block(torch.cat([parts[0], up(parts[1])], dim=1))

            def head(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
                return module(t)

        skips = []
        feats = x
        for i in range(self.depth + 1):
            feats = run(self.encoder[i], None, feats)
            skips.append(feats)
        decoded: list[torch.Tensor] = [skips[self.depth]] * (self.depth + 1)
        for i in range(self.depth - 1, -1, -1):
            decoded[i] = run(self.decoder[i], self.up[i], skips[i], decoded[i + 1])
        out = self._outputs(decoded, x.shape[2:], head)
        if not cl:
            return out
        return [o.contiguous() for o in out] if isinstance(out, list) else out.contiguous()

    def _outputs(self, decoded: list[torch.Tensor], size: Sequence[int],
                 head: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        top = head(self.heads[0], decoded[0])
        if not (self.deep_supervision and self.training):
            return top
        outs = [top]
        for i in range(1, self.depth):
            # The loss compares every head with the full-resolution label.
            outs.append(F.interpolate(head(self.heads[i], decoded[i]), size=tuple(size), mode="trilinear",
                                      align_corners=False))
        return outs


def count_parameters(build: Callable[[], nn.Module]) -> int:
    """Trainable parameters of the network ``build()`` returns, built on the meta device (no memory)."""
    with torch.device("meta"):
        net = build()
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def matched_features(target_params: int, features: Sequence[int], tolerance: float = 0.03,
                     **unet_args: Any) -> tuple[list[int], int]:
    """Widths for a "wide U-Net": ``features`` scaled by one factor until the parameter count matches.

    Every level is multiplied by the same factor and rounded to a whole number of channels (to a
    multiple of 8 with group norm, which needs divisible channel counts to keep its groups), so
    the shape of the width profile is kept, as in the paper's wide U-Net; the deepest level may
    then move by a few channels, where rounding leaves the count too far from the target.

    Args:
        target_params: the parameter count to reach (e.g. that of a UNet++).
        features: the U-Net's base widths, full resolution first.
        tolerance: largest relative difference accepted.
        **unet_args: the other :class:`UNet3D` arguments (channels, strides, norm, ...).

    Returns:
        ``(widths, parameters)``: the closest widths found and their parameter count.

    Raises:
        ValueError: no single factor brings the count within ``tolerance`` of the target.
    """
    base = [int(f) for f in features]
    step = 8 if str(unet_args.get("norm", "instance")).lower() == "group" else 1

    def widths(scale: float) -> list[int]:
        return [max(step, int(round(f * scale / step)) * step) for f in base]

    def params(scale: float) -> int:
        return count_parameters(lambda: UNet3D(features=widths(scale), **unet_args))

    lo, hi = 0.05, 1.0
    while params(hi) < target_params:
        hi *= 2.0
        if hi > 64:
            raise ValueError(f"no width scale up to 64x reaches {target_params} parameters")
    for _ in range(40):  # the count grows with the scale (about quadratically): bisect on it
        mid = (lo + hi) / 2.0
        if params(mid) < target_params:
            lo = mid
        else:
            hi = mid
    # Rounding makes the count a step function of the scale, with steps too coarse for narrow
    # networks: try the deepest level (the most parameters per channel) a few channels either way.
    def closest(candidates: list[list[int]]) -> tuple[list[int], int]:
        counted = [(w, count_parameters(lambda w=w: UNet3D(features=w, **unet_args))) for w in candidates]
        return min(counted, key=lambda item: abs(item[1] - target_params))

    best, count = closest([widths(lo), widths(hi)])
    if abs(count - target_params) > tolerance * target_params:
        best, count = closest([[*w[:-1], w[-1] + delta] for w in (widths(lo), widths(hi))
                               for delta in range(-3 * step, 3 * step + 1, step) if w[-1] + delta >= step])
    if abs(count - target_params) > tolerance * target_params:
        raise ValueError(f"widths {best} give {count} parameters, more than {tolerance:.0%} from {target_params}")
    return best, count
