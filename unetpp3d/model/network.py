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
:func:`on_device` picks the path by measurement (:func:`fused_pays`): fused on the CPU except
for bf16 training, plain on CUDA.
tests/test_network_perf.py checks that the two agree, outputs and gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from unetpp3d.errors import UserError
from unetpp3d.model.checkpoint import load_checkpoint, save_checkpoint
from unetpp3d.model.fused import _keep_convolutions, _node, _run_fused

Stride = int | Sequence[int]


# How eval mode with all heads combines them: "probabilities" averages the heads' softmax outputs,
# as the paper does; "logits" averages their logits (what unetpp3d did before), kept for comparison.
COMBINE = ("probabilities", "logits")


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


def fused_pays(device: torch.device, training: bool = False, dtype: torch.dtype | None = None) -> bool:
    """Whether the fused path is the faster one for this device, use and autocast precision.

    Measured, each time against the plain path in the same run:

    * CPU, inference: fused. bench/RESULTS.md (the forward 1.34x MONAI's per FLOP in fp32); and
      the LIDC full recipe's UNet++ DS (widths 16-128), 8 windows of 48 x 48 x 16 on the 2-core
      development machine: 129-225 against 189-252 ms in bf16, 549-646 against 773-842 ms in fp32.
    * CPU, training: fused in fp32 (a step at batch 2 of that network: 442-457 against 500-563 ms),
      plain in bf16 (276-405 against 482-697 ms: the fused path's bf16 backward is the slow part).
    * CUDA (one H200), training: plain. The bf16 step of the benchmark's network (128^3, batch 2)
      took 199 ms with a 12.4 GiB peak against the fused channels-last path's 273 ms and 19.6 GiB:
      cuDNN's 3D convolutions ran slower channels-last (MONAI's UNet++ too: 304 against 220 ms)
      and CUDA autocast keeps group_norm in fp32. Inference on CUDA was not timed; it gets the same.
    """
    if device.type != "cpu":
        return False
    return not (training and dtype == torch.bfloat16)


def on_device(net: nn.Module, device: str | torch.device, training: bool = False,
              dtype: torch.dtype | None = None) -> nn.Module:
    """``net`` moved to ``device``; the project's own networks also take the path that is faster for
    this use (:func:`fused_pays`). Training passes ``training=True`` and its autocast ``dtype``;
    everything else (the Predictor, the bundle, the pruning table) runs inference."""
    if isinstance(net, SavedArgsNetwork):
        return net.use_device(device, training, dtype)
    return net.to(device)


class SavedArgsNetwork(nn.Module):
    """What the project's segmentation networks share: validated constructor arguments kept as
    ``model_args`` (plain types, so ``torch.load(weights_only=True)`` accepts them), a per-axis
    size divisor, and saving and rebuilding from a checkpoint alone (as nanoGPT does).

    Subclasses call :meth:`_init_args` first in ``__init__``.
    """

    def _init_args(self, in_channels: int, out_channels: int, features: Sequence[int], deep_supervision: bool,
                   strides: Sequence[Stride] | None, norm: str, act: str, upsample: str,
                   dropout: float) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Check the arguments, store ``model_args``, ``depth``, ``deep_supervision`` and ``strides``.

        Returns:
            ``(features, strides)``: the widths as ints and one ``(x, y, z)`` stride per downsampling.
        """
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
        self.model_args: dict[str, Any] = dict(
            in_channels=int(in_channels), out_channels=int(out_channels), features=features,
            deep_supervision=bool(deep_supervision), strides=[list(s) for s in strides3], norm=norm, act=act,
            upsample=upsample, dropout=float(dropout),
        )
        self.depth = depth
        self.deep_supervision = bool(deep_supervision)
        self.strides = strides3
        # Run-time switches, never saved: the fused path (default) or the plain one, and its layout.
        self.fused = True
        self.channels_last = True
        return features, strides3

    @staticmethod
    def _make_encoder(in_channels: int, features: Sequence[int], strides: Sequence[tuple[int, int, int]], norm: str,
                      act: str, dropout: float) -> nn.ModuleList:
        """The encoder X^{0,0} ... X^{L,0}: a ConvBlock per level, each after the first downsampling by its stride."""
        return nn.ModuleList(
            ConvBlock(in_channels if i == 0 else features[i - 1], features[i], norm, act, dropout,
                      stride=1 if i == 0 else strides[i - 1])
            for i in range(len(features))
        )

    @property
    def size_divisor(self) -> tuple[int, int, int]:
        """Per-axis multiple that every spatial input size must be (the product of the strides)."""
        div = [1, 1, 1]
        for s in self.strides:
            div = [d * k for d, k in zip(div, s)]
        return tuple(div)  # type: ignore[return-value]

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write arguments and weights (and any plain-typed ``extra``) atomically to ``path``."""
        save_checkpoint(path, {"model_args": self.model_args, "state_dict": self.state_dict(), **(extra or {})})

    def use_device(self, device: str | torch.device, training: bool = False, dtype: torch.dtype | None = None) -> Any:
        """Move to ``device`` and take the forward path measured fastest for this use (:func:`fused_pays`).

        Activation checkpointing exists on the fused path only, so a network trained with it keeps
        that path (on the H200 the plain path without it peaked no higher: 12.4 GiB against 12.3
        GiB, bench/RESULTS.md). Without gradients it does nothing, so inference ignores it.
        """
        device = torch.device(device)
        self.fused = fused_pays(device, training, dtype) or (training and bool(getattr(self, "checkpointing", False)))
        layout = torch.channels_last_3d if self.fused and self.channels_last else torch.contiguous_format
        return self.to(device=device, memory_format=layout)

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any]) -> Any:
        """Rebuild a network from a loaded checkpoint dict with ``model_args`` and ``state_dict``."""
        net = cls(**payload["model_args"])
        net.load_state_dict(payload["state_dict"])
        return net


class UNetPlusPlus3D(SavedArgsNetwork):
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
    X^{0,1} first, each at the input's resolution. In eval mode it returns one tensor of
    log-probabilities whose softmax is the mean of the heads' softmax probabilities (accurate
    mode, as the paper averages its heads), or, called with ``prune_level=l``, only the nodes
    with ``i + j <= l`` are computed and head X^{0,l}'s logits are returned (the paper's
    UNet++ L^l). The level is an argument of each call, not a setting of the network, so one
    network can serve a fast and an accurate caller at once. Spatial sizes must be multiples of
    :attr:`size_divisor`, and the deepest level must keep more than one voxel.

    Run-time switches, none saved with the model: ``fused`` (default True) picks the fast path
    over the plain reference one (same outputs within float tolerance); ``channels_last``
    (default True) runs the fused path in the NDHWC layout; ``checkpointing`` (default False)
    makes training store only the convolutions' outputs and recompute the concatenations, norms
    and activations in the backward pass: less memory for a little more time.

    Example::

        >>> net = UNetPlusPlus3D(in_channels=1, out_channels=2, features=(8, 16, 32, 64))
        >>> heads = net(torch.zeros(1, 1, 32, 32, 32))           # training: list of 3 heads
        >>> mask = net.eval()(torch.zeros(1, 1, 32, 32, 32)).argmax(1)
        >>> fast = net(torch.zeros(1, 1, 32, 32, 32), prune_level=1)  # fast mode: UNet++ L^1
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
        features, strides3 = self._init_args(in_channels, out_channels, features, deep_supervision, strides, norm,
                                             act, upsample, dropout)
        depth = self.depth
        self.checkpointing = False

        self.encoder = self._make_encoder(in_channels, features, strides3, norm, act, dropout)
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
    def _bottleneck_norm_per_channel(self) -> bool:
        """Whether the deepest block normalises each channel of each sample on its own voxels."""
        for layer in self.encoder[self.depth].modules():
            if isinstance(layer, nn.InstanceNorm3d):
                return True
            if isinstance(layer, nn.GroupNorm) and layer.num_groups == layer.num_channels:
                return True
        return False

    def check_input_size(self, spatial: Sequence[int]) -> None:
        """Raise a ValueError saying how to fix a spatial size that cannot pass the network.

        A size must be a multiple of :attr:`size_divisor` on each axis, and must not leave the
        deepest level (X^{L,0}) a single voxel where its normalisation takes statistics per
        channel (instance norm, or group norm with one channel per group): the normalised
        value of one voxel is 0, so that level would output its norm's bias whatever the
        input, and everything above it would ignore it.
        """
        div = self.size_divisor
        size = tuple(int(n) for n in spatial)
        if len(size) != 3 or any(n % d for n, d in zip(size, div)):
            raise ValueError(
                f"input spatial size {size} must be 3D with each axis a multiple of "
                f"{div} (the product of the strides); pad or crop it, e.g. with monai.transforms.DivisiblePad(k={div})"
            )
        bottleneck = [n // d for n, d in zip(size, div)]
        if math.prod(bottleneck) == 1 and self._bottleneck_norm_per_channel:
            larger = (2 * div[0], *div[1:])
            raise ValueError(
                f"input spatial size {size} leaves the deepest level of the network (X^{{{self.depth},0}}) a single "
                f"voxel, where its {self.model_args['norm']} norm turns every feature into a constant, so the output "
                f"would not depend on that level; use a patch of at least twice the size divisor {div} along one "
                f"axis (e.g. {larger}), or a network with one level fewer (drop the last entry of model.features)"
            )

    def _levels_needed(self, prune_level: int | None) -> int:
        """How far along the top row this forward pass must go."""
        if prune_level is None:
            return self.depth
        if self.training:
            raise ValueError("prune_level is for inference; call net.eval() first (training computes every head)")
        level = int(prune_level)
        if not 1 <= level <= self.depth:
            raise ValueError(f"prune_level must be None or in 1..{self.depth}, got {level}")
        if not self.deep_supervision and level != self.depth:
            raise ValueError("a network without deep supervision has no head to prune to; use prune_level=None")
        return level

    def forward(self, x: torch.Tensor, prune_level: int | None = None,
                combine: str = "probabilities") -> torch.Tensor | list[torch.Tensor]:
        """Run the network.

        Args:
            x: ``(batch, channels, x, y, z)``, each spatial size a multiple of :attr:`size_divisor`.
            prune_level: eval mode only: compute the pruned UNet++ L^l and return head X^{0,l}'s
                logits. None: every head.
            combine: eval mode, every head: ``"probabilities"`` returns ``log(mean_k softmax(head_k))``,
                whose softmax (and argmax) is the mean of the heads' probabilities;
                ``"logits"`` returns the mean of the heads' logits.

        Returns:
            Training with deep supervision: the list of the heads' logits, X^{0,1} first.
            Otherwise one tensor ``(batch, out_channels, x, y, z)``.
        """
        if x.ndim != 5:
            raise ValueError(f"expected a (batch, channels, D, H, W) tensor, got shape {tuple(x.shape)}")
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        self.check_input_size(x.shape[2:])
        top = self._levels_needed(prune_level)
        if not self.fused:
            return self._heads(self._rows_reference(x, top), top, lambda head, t: head(t), prune_level, combine)
        cl = self.channels_last
        if cl:
            # Every op on the fused path keeps the channels-last layout: one conversion in, and
            # one out of the few logit channels.
            x = x.contiguous(memory_format=torch.channels_last_3d)
        out = self._heads(self._rows_fused(x, top), top, lambda head, t: _run_fused(head, t, cl), prune_level, combine)
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

    def _heads(self, rows: list[list[torch.Tensor]], top: int, apply, prune_level: int | None,
               combine: str) -> torch.Tensor | list[torch.Tensor]:
        """The output for the mode; ``apply(head, features)`` runs one head."""
        if not self.deep_supervision:
            return apply(self.heads[0], rows[0][self.depth])
        if self.training:
            return [apply(self.heads[j - 1], rows[0][j]) for j in range(1, self.depth + 1)]
        if prune_level is not None:
            return apply(self.heads[top - 1], rows[0][top])
        return combine_heads([apply(self.heads[j - 1], rows[0][j]) for j in range(1, self.depth + 1)], combine)


def combine_heads(logits: Sequence[torch.Tensor], combine: str = "probabilities") -> torch.Tensor:
    """One output from the heads' logits, as the accurate mode combines them.

    Args:
        logits: each head's ``(batch, classes, x, y, z)`` logits.
        combine: ``"probabilities"``: ``log(mean_k softmax(logits_k))`` in float32, computed as a
            log-sum-exp of log-softmaxes (no underflow), so its softmax is exactly the mean of
            the heads' probabilities; ``"logits"``: the mean of the logits, whose softmax is a
            normalised geometric mean of the heads' probabilities, in which one confident head
            outweighs the others.
    """
    if combine == "logits":
        return sum(logits[1:], logits[0]) / len(logits)
    out = None
    for head in logits:
        log_p = torch.log_softmax(head.float(), dim=1)
        out = log_p if out is None else torch.logaddexp(out, log_p)
    return out - math.log(len(logits))


def network_from_checkpoint(payload: dict[str, Any], source: str | Path) -> UNetPlusPlus3D:
    """:meth:`UNetPlusPlus3D.from_checkpoint`, with a user error naming ``source`` when they do not fit.

    Raises:
        UserError: the model arguments are invalid or the weights do not fit them.
    """
    try:
        _check_declared_size(payload)
        return UNetPlusPlus3D.from_checkpoint(payload)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise UserError(f"{source}: model arguments and weights do not fit ({str(exc).splitlines()[0]})") from None


def _check_declared_size(payload: dict[str, Any]) -> None:
    """Compare the network ``model_args`` declare with the weights before allocating it.

    The network is built on the meta device (shapes, no memory), so a small file that declares
    huge widths is refused before gigabytes are allocated for a network its weights cannot fill.

    Raises:
        ValueError: the declared network's parameters and buffers differ from the state dict's
            (names or shapes), naming the sizes.
    """
    state = payload["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"state_dict is a {type(state).__name__}, not a mapping of tensors")
    with torch.device("meta"):
        declared = UNetPlusPlus3D(**payload["model_args"]).state_dict()
    wanted = sum(v.numel() for v in declared.values())
    held = sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))
    missing = [k for k in declared if k not in state]
    wrong = [k for k in declared if k in state and (not isinstance(state[k], torch.Tensor)
                                                      or tuple(state[k].shape) != tuple(declared[k].shape))]
    if missing or wrong or wanted != held:
        first = (missing or wrong or ["(sizes)"])[0]
        raise ValueError(f"the arguments declare {wanted:,} weights ({wanted * 4 / 2**30:.2f} GiB in float32) but the "
                         f"file holds {held:,}; first mismatch {first}; refused before building the network")


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> UNetPlusPlus3D:
    """Rebuild a saved network from its file alone (:func:`~unetpp3d.model.checkpoint.load_checkpoint`).

    Raises:
        UserError: the file is missing, not a checkpoint, carries objects other than weights, or
            its arguments and weights do not fit.
    """
    return network_from_checkpoint(load_checkpoint(path, map_location), path)
