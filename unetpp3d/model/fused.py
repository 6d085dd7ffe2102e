"""The fused fast path of :class:`~unetpp3d.model.network.UNetPlusPlus3D`: same weights, same maths.

Channels-last convolutions with channels-last weights and instance norm computed as group norm,
which oneDNN runs much faster on CPUs. ``tests/test_network_perf.py`` keeps it equal to the
reference path in :mod:`unetpp3d.model.network` (outputs and gradients).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils.checkpoint import CheckpointPolicy

if TYPE_CHECKING:  # the network imports this module
    from unetpp3d.model.network import ConvBlock


def _run_fused(module: nn.Module, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Run ``module`` (a conv, norm, activation or a Sequential of them) as the fused path does.

    Two changes, neither altering the function:
      * convolutions get their weights in channels-last layout. oneDNN and cuDNN choose the
        output layout from input *and* weight, and the network's input (one channel) is
        ambiguous, so with ordinary weights the whole network would silently run NCDHW.
      * instance norm runs as group norm with one group per channel (the same statistics):
        ``InstanceNorm3d`` reshapes to (1, N*C, ...) and copies a channels-last tensor to
        contiguous and back; the group-norm kernel reads channels-last directly.
    The activation that follows runs in place on the norm's fresh output, as in the modules.
    """
    if isinstance(module, nn.Sequential):
        for layer in module:
            x = _run_fused(layer, x, channels_last)
        return x
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)) and module.padding_mode == "zeros":
        w = module.weight
        if channels_last and not w.is_contiguous(memory_format=torch.channels_last_3d):
            w = w.contiguous(memory_format=torch.channels_last_3d)  # e.g. weights assigned after __init__
        if isinstance(module, nn.ConvTranspose3d):
            return F.conv_transpose3d(x, w, module.bias, module.stride, module.padding, module.output_padding,
                                      module.groups, module.dilation)
        if _small_fp32_cpu_batch(x):
            return torch.ops.aten.mkldnn_convolution(x, w, module.bias, module.padding, module.stride,
                                                     module.dilation, module.groups)
        return F.conv3d(x, w, module.bias, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, nn.InstanceNorm3d) and not module.track_running_stats:
        return torch.group_norm(x, x.shape[1], module.weight, module.bias, module.eps)
    return module(x)


def _small_fp32_cpu_batch(x: torch.Tensor) -> bool:
    """Whether to call oneDNN's convolution directly (inference only). For fp32 batch-1 inputs with
    ``C * D * H <= 20480`` (a heuristic tuned on 2D shapes) PyTorch picks its reference CPU
    convolution, 4-6x slower than oneDNN on this network's lower levels and its first layer.
    Not under autocast: that op is not on autocast's list, so it would not be cast to bf16; nor
    under torch.compile, which chooses its own convolution kernels."""
    return (not torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and x.shape[0] == 1 and _ONEDNN and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu"))


_ONEDNN = torch.backends.mkldnn.is_available()


def _mkldnn_convolution_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


def flop_counter_mode(**kwargs) -> flop_counter.FlopCounterMode:
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts the fused path's direct oneDNN calls.

    PyTorch's counter knows ``aten.convolution`` only, so without this it would miss the
    convolutions :func:`_run_fused` sends to ``aten.mkldnn_convolution`` and under-count the
    network. The formula is given to this counter alone (``custom_mapping``), not registered in
    torch's process-wide table.

    Args:
        **kwargs: passed to ``FlopCounterMode`` (``display``, ``depth``).

    Example::

        >>> with flop_counter_mode(display=False) as counter, torch.no_grad():
        ...     net.eval()(x)
        >>> counter.get_total_flops()
    """
    return flop_counter.FlopCounterMode(custom_mapping={torch.ops.aten.mkldnn_convolution: _mkldnn_convolution_flops},
                                        **kwargs)


# Under activation checkpointing, keep what is costly to recompute (3x3x3 convolutions: the
# FLOPs) and recompute what is cheap but large: the dense-skip concatenation, norm, activation,
# dropout, and the Up() transposed convolutions (kernel = stride: an eighth of a 3x3x3's FLOPs
# per output voxel at most, and their outputs are full-size C-channel volumes).
_CONVOLUTIONS = {
    torch.ops.aten.convolution.default,
    torch.ops.aten.mkldnn_convolution.default,
    torch.ops.aten.cudnn_convolution.default,
}


def _keep_convolutions(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op is torch.ops.aten.convolution.default and args[6]:  # transposed
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE if op in _CONVOLUTIONS else CheckpointPolicy.PREFER_RECOMPUTE


def _node(block: ConvBlock, up: nn.Module | None, channels_last: bool, *parts: torch.Tensor) -> torch.Tensor:
    """X^{i,j} = H([X^{i,0}, ..., X^{i,j-1}, Up(X^{i+1,j-1})]), the last of ``parts`` being the
    lower node that ``up`` upsamples (no ``up``: an encoder block on one input). One function,
    so that checkpointing covers the upsampling and concatenation too."""
    if up is None:
        return _run_fused(block, parts[0], channels_last)
    upsampled = _run_fused(up, parts[-1], channels_last)
    return _run_fused(block, torch.cat([*parts[:-1], upsampled], dim=1), channels_last)
