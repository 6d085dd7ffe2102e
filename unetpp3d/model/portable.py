"""Device-neutral exports of the network: TorchScript with every inference mode, and the modules ONNX traces.

An export must run wherever the file goes, at any input size the network accepts, and in
either inference mode. The default fused path serves none of these: on the CPU it calls
``aten::mkldnn_convolution`` (oneDNN, CPU-only) for batch-1 fp32 inputs, and a trace records
whatever prune level the network had. So exports trace :func:`portable_network`, a copy on the
plain reference path (module calls only, contiguous weights), through small wrappers that give
each mode its own entry point:

* :class:`ModeNet`: one mode as ``forward(x)`` (what ONNX export traces, one file per mode);
* :func:`trace_modes`: one TorchScript module holding the weights once, whose ``forward`` is
  accurate mode and whose methods ``fast_l1`` ... ``fast_lL`` are the pruned networks UNet++ L^l.

:func:`eval_output` is the one place these wrappers call the network.
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
from torch import nn

from unetpp3d.model.network import UNetPlusPlus3D

# Graph operators that exist only on the CPU: oneDNN ("mkldnn") convolutions, layouts and
# conversions. A device-neutral export holds none of them.
CPU_ONLY_OP_MARKERS = ("mkldnn",)


def eval_output(net: UNetPlusPlus3D, x: torch.Tensor, prune_level: int | None) -> torch.Tensor:
    """The network's eval-mode output in one mode: accurate (``prune_level=None``) or UNet++ L^l.

    Args:
        net: a network in eval mode.
        x: a ``(B, C, x, y, z)`` input, each spatial size a multiple of ``net.size_divisor``.
        prune_level: None for accurate mode, else the pruned network's level ``l``.

    Returns:
        What ``net`` returns in that mode: in accurate mode the log of the mean of the heads'
        softmax probabilities (``combine="probabilities"``, as ``unetpp3d infer``), in fast mode
        head X^{0,l}'s logits.
    """
    return net(x, prune_level=prune_level, combine="probabilities")


def fast_method_name(level: int) -> str:
    """The name of the traced method that runs fast mode at ``level`` (``fast_l2`` for UNet++ L^2)."""
    return f"fast_l{int(level)}"


def prune_levels(net: UNetPlusPlus3D) -> list[int]:
    """The levels fast mode can run: 1..depth with deep supervision, none without (one head)."""
    return list(range(1, net.depth + 1)) if net.deep_supervision else []


def portable_network(net: UNetPlusPlus3D) -> UNetPlusPlus3D:
    """A copy of ``net`` on the CPU, in eval mode, on the reference path with contiguous weights.

    The reference path calls the modules (``aten::_convolution``, ``aten::instance_norm``), which
    every backend implements; contiguous weights keep the exported graph free of the fused path's
    layout choice, so each device picks its own.
    """
    portable = copy.deepcopy(net).cpu().eval()
    portable.to(memory_format=torch.contiguous_format)
    portable.fused = False
    portable.checkpointing = False
    return portable


class ModeNet(nn.Module):
    """One inference mode of a network as a module with a plain ``forward(x)``.

    Args:
        net: the network (used as given: pass :func:`portable_network` for an export).
        prune_level: None for accurate mode, else the level of fast mode.
    """

    def __init__(self, net: UNetPlusPlus3D, prune_level: int | None = None):
        super().__init__()
        self.net = net
        self.prune_level = prune_level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return eval_output(self.net, x, self.prune_level)


class _AllModes(nn.Module):
    """Accurate mode as ``forward`` and fast mode at level l as ``fast_l<l>``, sharing one network."""

    def __init__(self, net: UNetPlusPlus3D):
        super().__init__()
        self.net = net
        for level in prune_levels(net):
            # Plain callables, not modules: torch.jit.trace_module traces each as a method.
            object.__setattr__(self, fast_method_name(level), functools.partial(self._fast, level))

    def _fast(self, level: int, x: torch.Tensor) -> torch.Tensor:
        return eval_output(self.net, x, level)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return eval_output(self.net, x, None)


def cpu_only_ops(module: torch.jit.ScriptModule) -> list[str]:
    """CPU-only operators in the inlined graph of every method of a TorchScript module.

    Args:
        module: a traced or loaded TorchScript module.

    Returns:
        ``"method: op"`` for each CPU-only operator found (empty for a device-neutral module).
    """
    found = []
    for name in module._c._method_names():
        graph = getattr(module, name).inlined_graph
        kinds = sorted({node.kind() for node in graph.nodes()})
        found += [f"{name}: {k}" for k in kinds if any(m in k.lower() for m in CPU_ONLY_OP_MARKERS)]
    return found


def trace_modes(net: UNetPlusPlus3D, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace every inference mode of ``net`` into one device-neutral TorchScript module.

    ``forward(x)`` is accurate mode and ``fast_l<l>(x)`` fast mode at level ``l`` (absent for a
    network without deep supervision). The weights are stored once. The trace generalises to
    any batch and any spatial size that the network accepts: the only shape-dependent Python
    code is the input check, which the trace leaves out.

    Args:
        net: the network (not modified: a :func:`portable_network` copy is traced).
        example: an input of a valid size, on the CPU.

    Returns:
        The traced module, on the CPU.

    Raises:
        RuntimeError: the trace holds a CPU-only operator (a bug in the reference path).
    """
    modes = _AllModes(portable_network(net))
    inputs = {"forward": example, **{fast_method_name(level): example for level in prune_levels(net)}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on the Python-side size check, which holds for any size
        traced = torch.jit.trace_module(modes, inputs, check_trace=False)
    found = cpu_only_ops(traced)
    if found:
        raise RuntimeError(f"the traced network holds CPU-only operators ({', '.join(found)}); it would fail on "
                           "a GPU. Exports must trace the reference path (portable_network).")
    return traced
