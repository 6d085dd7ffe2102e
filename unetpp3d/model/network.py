"""The 3D UNet++ network.

Zhou, Rahman Siddiquee, Tajbakhsh and Liang, "UNet++: A Nested U-Net Architecture for Medical
Image Segmentation", DLMIA 2018 (arXiv:1807.10165).

Notation follows the paper's figure: X^{i,j} is the node at encoder level ``i`` (0 = full
resolution) and position ``j`` along the skip pathway. ``X^{i,0}`` are the encoder blocks and

    X^{i,j} = H([X^{i,0}, ..., X^{i,j-1}, Up(X^{i+1,j-1})])      for j >= 1,

where ``H`` is two 3x3x3 conv-norm-activation units. Heads (1x1x1 convs) sit on the top row
X^{0,1} ... X^{0,L}. In the code the nodes are held as ``self.encoder[i]`` (X^{i,0}) and
``self.nodes[i][j - 1]`` (X^{i,j}); ``self.up[i][j - 1]`` is the Up() feeding X^{i,j}.

Two forward paths compute the same function from the same weights (``net.fused`` picks one):
the plain reference path, written to read like the figure, and the default fused path, which
runs the convolutions channels-last, computes instance norm as a per-channel group norm (whose
CPU kernel keeps channels-last instead of copying to contiguous), and can recompute the cheap
operations in the backward pass instead of storing them (``net.checkpointing``).
tests/test_network_perf.py checks that the two agree, outputs and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from unetpp3d.atomic import atomic_path
from unetpp3d.errors import UserError
from unetpp3d.model.fused import _keep_convolutions, _node, _run_fused

Stride = int | Sequence[int]


def _as_triple(stride: Stride) -> tuple[int, int, int]:
    if isinstance(stride, int):
        return (stride, stride, stride)
    stride = tuple(int(s) for s in stride)
    if len(stride) != 3:
        raise ValueError(f"a stride needs 1 or 3 values, got {stride}")
    return stride  # type: ignore[return-value]


def _norm_spec(norm: str | tuple, channels: int) -> tuple:
    """Instance norm gets learnable affine parameters; group norm a group count that divides."""
    if isinstance(norm, tuple):
        return norm
    name = norm.lower()
    if name == "instance":
        return ("instance", {"affine": True})
    if name == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return ("group", {"num_groups": groups})
    if name == "batch":
        return ("batch", {})
    raise ValueError(f"unknown norm {norm!r}; use 'instance', 'batch' or 'group'")


def _act_spec(act: str | tuple) -> tuple:
    if isinstance(act, tuple):
        return act
    name = act.lower()
    if name == "leakyrelu":  # nnU-Net's default slope
        return ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
    if name in ("relu", "prelu", "gelu", "elu", "swish", "mish"):
        return (name, {"inplace": True} if name in ("relu", "elu") else {})
    raise ValueError(f"unknown activation {act!r}; use leakyrelu, relu, prelu, gelu, elu, swish or mish")


class ConvBlock(nn.Sequential):
    """H(): two conv-norm-activation units, the first optionally strided to downsample.

    Args:
        in_channels: input channels.
        out_channels: output channels of both convolutions.
        norm: "instance", "batch" or "group" (or a MONAI ``(name, kwargs)`` tuple).
        act: activation name (or a MONAI ``(name, kwargs)`` tuple).
        dropout: dropout probability after the first unit (0 disables it).
        stride: stride of the first convolution (1 keeps the resolution).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: str | tuple = "instance",
        act: str | tuple = "leakyrelu",
        dropout: float = 0.0,
        stride: Stride = 1,
    ):
        layers: list[nn.Module] = []
        for k, (cin, s) in enumerate([(in_channels, _as_triple(stride)), (out_channels, (1, 1, 1))]):
            # A bias before a normalisation layer is cancelled by it, so leave it out.
            layers.append(nn.Conv3d(cin, out_channels, kernel_size=3, stride=s, padding=1, bias=False))
            layers.append(get_norm_layer(_norm_spec(norm, out_channels), spatial_dims=3, channels=out_channels))
            layers.append(get_act_layer(_act_spec(act)))
            if k == 0 and dropout > 0:
                layers.append(nn.Dropout3d(dropout))
        super().__init__(*layers)


class UNetPlusPlus3D(nn.Module):
    """3D UNet++ with dense skip pathways, deep supervision and pruned inference.

    Args:
        in_channels: image channels (1 for CT).
        out_channels: classes including background (2 for liver vs. rest).
        features: width of each encoder level, full resolution first; ``L = len(features) - 1``
            is the depth (number of downsamplings) and the number of top-row heads.
        deep_supervision: build a head on every top-row node X^{0,1..L} and train all of them.
            Without it there is one head, on X^{0,L}.
        strides: the downsampling between level ``i`` and ``i + 1``, one entry per step
            (``L`` entries), each an int or a 3-tuple; ``(1, 2, 2)`` keeps thick slices intact.
            Default: 2 everywhere.
        norm: "instance" (default), "batch" or "group".
        act: "leakyrelu" (default), "relu", "prelu", "gelu", "elu", "swish" or "mish".
        upsample: "deconv" (transposed convolution, default) or "trilinear" (interpolation then
            a 1x1x1 convolution).
        dropout: dropout probability inside each block.

    In training mode with deep supervision, ``forward`` returns the list of the L head outputs,
    X^{0,1} first, each at the input's resolution. In eval mode it returns one tensor: the mean
    of the heads' logits (accurate mode, ``prune_level = None``), or with ``prune_level = l`` only
    the nodes with ``i + j <= l`` are computed and head X^{0,l} is returned (the paper's
    UNet++ L^l). Spatial sizes must be multiples of :attr:`size_divisor`.

    Run-time switches, none saved with the model: ``fused`` (default True) picks the fast path
    over the plain reference one (same outputs within float tolerance); ``channels_last``
    (default True) runs the fused path in the NDHWC layout; ``checkpointing`` (default False)
    makes training store only the convolutions' outputs and recompute the concatenations, norms
    and activations in the backward pass: less memory for a little more time.

    Example::

        >>> net = UNetPlusPlus3D(in_channels=1, out_channels=2, features=(8, 16, 32, 64))
        >>> heads = net(torch.zeros(1, 1, 32, 32, 32))           # training: list of 3 heads
        >>> mask = net.eval()(torch.zeros(1, 1, 32, 32, 32)).argmax(1)
        >>> net.prune_level = 1                                   # fast mode: UNet++ L^1
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256, 320),
        deep_supervision: bool = True,
        strides: Sequence[Stride] | None = None,
        norm: str = "instance",
        act: str = "leakyrelu",
        upsample: str = "deconv",
        dropout: float = 0.0,
    ):
        super().__init__()
        features = [int(f) for f in features]
        depth = len(features) - 1
        if depth < 1:
            raise ValueError(f"features needs at least two levels, got {features}")
        if strides is None:
            strides = [2] * depth
        if len(strides) != depth:
            raise ValueError(f"strides needs {depth} entries (one per downsampling), got {len(strides)}")
        strides3 = [_as_triple(s) for s in strides]
        if upsample not in ("deconv", "trilinear"):
            raise ValueError(f"upsample must be 'deconv' or 'trilinear', got {upsample!r}")

        # Stored so that a saved model can be rebuilt from its file alone (plain types only, so
        # that torch.load(weights_only=True) accepts them).
        self.model_args: dict[str, Any] = dict(
            in_channels=int(in_channels),
            out_channels=int(out_channels),
            features=features,
            deep_supervision=bool(deep_supervision),
            strides=[list(s) for s in strides3],
            norm=norm,
            act=act,
            upsample=upsample,
            dropout=float(dropout),
        )
        self.depth = depth
        self.deep_supervision = bool(deep_supervision)
        self.strides = strides3
        self.prune_level: int | None = None
        self.fused = True
        self.channels_last = True
        self.checkpointing = False

        self.encoder = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else features[i - 1], features[i], norm, act, dropout,
                      stride=1 if i == 0 else strides3[i - 1])
            for i in range(depth + 1)
        )
        # Node X^{i,j} (j >= 1, i + j <= L) sees j same-level features plus one upsampled one.
        self.up = nn.ModuleList()
        self.nodes = nn.ModuleList()
        for i in range(depth):
            ups, nodes = nn.ModuleList(), nn.ModuleList()
            for j in range(1, depth - i + 1):
                ups.append(self._make_up(features[i + 1], features[i], strides3[i], upsample))
                nodes.append(ConvBlock(features[i] * (j + 1), features[i], norm, act, dropout))
            self.up.append(ups)
            self.nodes.append(nodes)
        n_heads = depth if self.deep_supervision else 1
        self.heads = nn.ModuleList(nn.Conv3d(features[0], out_channels, kernel_size=1) for _ in range(n_heads))
        # Convolution weights live channels-last (see _run_fused): converted once here rather than
        # on every call, and kept a leaf tensor, whose bf16 copy autocast caches across windows.
        # Values, state_dict keys and saved files are unchanged; only the strides differ.
        self.to(memory_format=torch.channels_last_3d)

    @staticmethod
    def _make_up(cin: int, cout: int, stride: tuple[int, int, int], mode: str) -> nn.Module:
        if mode == "deconv":
            return nn.ConvTranspose3d(cin, cout, kernel_size=stride, stride=stride, bias=False)
        return nn.Sequential(
            nn.Upsample(scale_factor=stride, mode="trilinear", align_corners=False),
            nn.Conv3d(cin, cout, kernel_size=1, bias=False),
        )

    @property
    def size_divisor(self) -> tuple[int, int, int]:
        """Per-axis multiple that every spatial input size must be (the product of the strides)."""
        div = [1, 1, 1]
        for s in self.strides:
            div = [d * k for d, k in zip(div, s)]
        return tuple(div)  # type: ignore[return-value]

    def check_input_size(self, spatial: Sequence[int]) -> None:
        """Raise a ValueError naming the multiple needed when a size cannot pass the network."""
        div = self.size_divisor
        if len(spatial) != 3 or any(int(n) % d for n, d in zip(spatial, div)):
            raise ValueError(
                f"input spatial size {tuple(int(n) for n in spatial)} must be 3D with each axis a multiple of "
                f"{div} (the product of the strides); pad or crop it, e.g. with monai.transforms.DivisiblePad(k={div})"
            )

    def _levels_needed(self) -> int:
        """How far along the top row this forward pass must go."""
        if self.training or self.prune_level is None:
            return self.depth
        level = int(self.prune_level)
        if not 1 <= level <= self.depth:
            raise ValueError(f"prune_level must be None or in 1..{self.depth}, got {level}")
        if not self.deep_supervision and level != self.depth:
            raise ValueError("a network without deep supervision has no head to prune to; set prune_level=None")
        return level

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.ndim != 5:
            raise ValueError(f"expected a (batch, channels, D, H, W) tensor, got shape {tuple(x.shape)}")
        self.check_input_size(x.shape[2:])
        top = self._levels_needed()
        if not self.fused:
            return self._heads(self._rows_reference(x, top), top, lambda head, t: head(t))
        cl = self.channels_last
        if cl:
            # Every op on the fused path keeps the channels-last layout: one conversion in, and
            # one out of the few logit channels.
            x = x.contiguous(memory_format=torch.channels_last_3d)
        out = self._heads(self._rows_fused(x, top), top, lambda head, t: _run_fused(head, t, cl))
        if not cl:
            return out
        if isinstance(out, list):
            return [o.contiguous() for o in out]
        return out.contiguous()

    def _rows_reference(self, x: torch.Tensor, top: int) -> list[list[torch.Tensor]]:
        """The plain path: the nodes X^{i,j} as ``rows[i][j]``, module calls only."""
        # rows[i] holds X^{i,0}, X^{i,1}, ... as they are computed. Computing column by column
        # (anti-diagonals of the figure) means each node's inputs already exist.
        rows: list[list[torch.Tensor]] = [[] for _ in range(top + 1)]
        feats = x
        for i in range(top + 1):
            feats = self.encoder[i](feats)
            rows[i].append(feats)
            # Having X^{i,0}, every node X^{i-k,k} on this anti-diagonal can now be computed.
            for k in range(1, i + 1):
                lvl = i - k
                up = self.up[lvl][k - 1](rows[lvl + 1][k - 1])
                rows[lvl].append(self.nodes[lvl][k - 1](torch.cat([*rows[lvl], up], dim=1)))
        return rows

    def _rows_fused(self, x: torch.Tensor, top: int) -> list[list[torch.Tensor]]:
        """The same nodes in the same order as :meth:`_rows_reference`, through :func:`_run_fused`."""
        cl = self.channels_last
        run = _node
        if self.checkpointing and torch.is_grad_enabled():
            run = partial(checkpoint, _node, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, _keep_convolutions))
        rows: list[list[torch.Tensor]] = [[] for _ in range(top + 1)]
        feats = x
        for i in range(top + 1):
            feats = run(self.encoder[i], None, cl, feats)
            rows[i].append(feats)
            for k in range(1, i + 1):
                lvl = i - k
                node, up = self.nodes[lvl][k - 1], self.up[lvl][k - 1]
                rows[lvl].append(run(node, up, cl, *rows[lvl], rows[lvl + 1][k - 1]))
        return rows

    def _heads(self, rows: list[list[torch.Tensor]], top: int, apply) -> torch.Tensor | list[torch.Tensor]:
        """The output for the current mode; ``apply(head, features)`` runs one head."""
        if not self.deep_supervision:
            return apply(self.heads[0], rows[0][self.depth])
        if self.training:
            return [apply(self.heads[j - 1], rows[0][j]) for j in range(1, self.depth + 1)]
        if self.prune_level is not None:
            return apply(self.heads[top - 1], rows[0][top])
        # Accurate mode: average the heads' logits, all at full resolution.
        out = apply(self.heads[0], rows[0][1])
        for j in range(2, self.depth + 1):
            out = out + apply(self.heads[j - 1], rows[0][j])
        return out / self.depth

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write arguments and weights (and any plain-typed ``extra``) atomically to ``path``."""
        payload = {"model_args": self.model_args, "state_dict": self.state_dict(), **(extra or {})}
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any]) -> UNetPlusPlus3D:
        """Rebuild a network from a loaded checkpoint dict with ``model_args`` and ``state_dict``."""
        net = cls(**payload["model_args"])
        net.load_state_dict(payload["state_dict"])
        return net


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> UNetPlusPlus3D:
    """Rebuild a saved network from its file alone, loading with ``weights_only=True``.

    Raises:
        UserError: the file is missing, not a checkpoint, or carries objects other than weights.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for unsafe or corrupt files
        raise UserError(f"{path}: cannot load as a weights-only checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(payload, dict) or "model_args" not in payload or "state_dict" not in payload:
        raise UserError(f"{path}: not a unetpp3d model (no model_args/state_dict)")
    try:
        return UNetPlusPlus3D.from_checkpoint(payload)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: model arguments or weights do not fit: {exc}") from None
