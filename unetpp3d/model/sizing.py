"""What a network costs, measured on the network itself rather than rebuilt by hand.

The planner needs the parameter count and the activation memory of a UNet++ for a candidate
patch. Both are taken from :class:`~unetpp3d.model.network.UNetPlusPlus3D` built on PyTorch's
``meta`` device, where tensors carry shapes and dtypes but no storage, so a 320-channel network
on a 256^3 patch costs a fraction of a second and no memory (dynamic_network_architectures lets
nnU-Net's planner do the same with its networks). A formula kept beside the network drifts from
it: the hand count this replaces was 6% off for ``upsample="trilinear"``.

* :func:`parameter_count`: the sum of the parameters' sizes.
* :func:`saved_activations`: training-mode forward passes on meta tensors; every tensor that
  autograd saves for the backward pass is seen through ``saved_tensors_hooks`` and counted once
  per storage (a tensor kept by several operations is one allocation), the weights left out.
  The network's own input check runs first, so a patch the network refuses is refused here,
  before a run starts.
* :func:`estimate_memory_gb`: the training memory of a batch from those two figures.

Example::

    >>> args = dict(in_channels=1, out_channels=2, features=[8, 16, 32], strides=[[2, 2, 2], [2, 2, 1]])
    >>> parameter_count(args) == sum(p.numel() for p in UNetPlusPlus3D(**args).parameters())
    True
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from unetpp3d.model.network import UNetPlusPlus3D

OVERHEAD_FACTOR = 1.2  # allocator fragmentation and cuDNN workspaces, on the activations


FIXED_GB = 1.0  # CUDA context and libraries


STATE_BYTES_PER_PARAM = 16  # fp32 weights, gradients and two optimizer buffers


LOSS_VALUES_PER_HEAD_VOXEL = 4  # fp32 per class and voxel per head: logits cast up, softmax, target, gradient


def _meta_network(model_args: Mapping[str, Any]) -> UNetPlusPlus3D:
    with torch.device("meta"):
        return UNetPlusPlus3D(**dict(model_args))


def _key(model_args: Mapping[str, Any]) -> str:
    return json.dumps(dict(model_args), sort_keys=True, default=list)


def parameter_count(model_args: Mapping[str, Any]) -> int:
    """Number of weights of ``UNetPlusPlus3D(**model_args)``, from the network built on the meta device.

    Args:
        model_args: the constructor's keyword arguments (``net.model_args`` of a built network).

    Returns:
        The count, equal to ``sum(p.numel() for p in UNetPlusPlus3D(**model_args).parameters())``.
    """
    return _parameter_count(_key(model_args))


@functools.lru_cache(maxsize=64)
def _parameter_count(key: str) -> int:
    return sum(p.numel() for p in _meta_network_cached(key).parameters())


def saved_activations(model_args: Mapping[str, Any], patch: Sequence[int]) -> int:
    """Values autograd keeps for the backward pass of one training sample of size ``patch``.

    Counted in training mode on the meta device, without activation checkpointing (with
    ``train.checkpointing`` a run keeps less). Weights are not counted; the network's input and
    its heads' outputs are. Every saved tensor is either a feature map at some level (its
    channels times the patch's volume over that level's stride product) or a per-channel
    statistic of a norm, so for a patch that is a multiple of the network's size divisor the
    count is exactly ``a * volume + b``: ``a`` and ``b`` come from two forward passes per
    network, which keeps the planner's search over patches fast.

    Args:
        model_args: the constructor's keyword arguments.
        patch: spatial size (x, y, z).

    Returns:
        The number of saved values (elements, not bytes).

    Raises:
        ValueError: the network refuses an input of this size (see
            :meth:`~unetpp3d.model.network.UNetPlusPlus3D.check_input_size`).
    """
    key = _key(model_args)
    patch = tuple(int(p) for p in patch)
    _meta_network_cached(key).check_input_size(patch)
    per_voxel, fixed = _linear_fit(key)
    volume = patch[0] * patch[1] * patch[2]
    return int(round(per_voxel * volume + fixed))


@functools.lru_cache(maxsize=64)
def _meta_network_cached(key: str) -> UNetPlusPlus3D:
    net = _meta_network(json.loads(key)).train()
    # The reference path: it saves the same tensors as the default fused one (tests/test_planning.py
    # compares with a real fused forward pass) and runs three to four times faster on meta tensors.
    net.fused = False
    return net


@functools.lru_cache(maxsize=64)
def _linear_fit(key: str) -> tuple[float, float]:
    div = _meta_network_cached(key).size_divisor
    small = tuple(4 * d for d in div)  # bottleneck 4 voxels per axis: an input every network accepts
    large = tuple(8 * d for d in div)
    n_small, n_large = _count_saved(key, small), _count_saved(key, large)
    v_small, v_large = math.prod(small), math.prod(large)
    per_voxel = (n_large - n_small) / (v_large - v_small)
    return per_voxel, n_small - per_voxel * v_small


def _count_saved(key: str, patch: tuple[int, int, int]) -> int:
    """One forward pass on a meta tensor, counting each saved storage once."""
    net = _meta_network_cached(key)
    weights = {p.untyped_storage()._cdata for p in net.parameters()}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Meta storages have no data pointer, so the storage object's own handle (_cdata) tells
        # them apart.
        storage = t.untyped_storage()
        # One entry per storage: views and tensors saved by several operations are one allocation.
        # The hook holds the tensor until the forward ends, so no storage address is reused meanwhile.
        if storage._cdata not in weights:
            sizes[storage._cdata] = max(sizes.get(storage._cdata, 0), t.numel())
        return t

    x = torch.empty((1, int(net.model_args["in_channels"]), *patch), device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return sum(sizes.values())


def estimate_memory_gb(model_args: Mapping[str, Any], patch: Sequence[int], batch: int, amp: bool = True) -> float:
    """Estimate the GPU memory (GB) that training ``UNetPlusPlus3D(**model_args)`` on ``batch`` patches needs.

    ``batch`` times :func:`saved_activations` at 2 bytes a value under mixed precision (4
    without), plus the loss's fp32 values (:data:`LOSS_VALUES_PER_HEAD_VOXEL` per class, voxel
    and head), all times :data:`OVERHEAD_FACTOR`; then :data:`STATE_BYTES_PER_PARAM` per weight
    (:func:`parameter_count`) and :data:`FIXED_GB` for the CUDA context. For the default widths
    (32..320, four downsamplings by 2) this gives about 15 GB for two 128^3 patches (18 GB
    with ``upsample="trilinear"``, whose interpolated copies are kept at the upper level). A model, not
    a measurement: it leaves out transient buffers of the backward pass and fp32 copies that
    autocast makes for normalisation layers.

    Args:
        model_args: the constructor's keyword arguments.
        patch: spatial size (x, y, z).
        batch: patches per step.
        amp: mixed precision (2-byte activations).

    Returns:
        Gigabytes (1e9 bytes).
    """
    voxels = 1
    for p in patch:
        voxels *= int(p)
    heads = len(model_args["features"]) - 1 if model_args.get("deep_supervision", True) else 1
    loss_bytes = LOSS_VALUES_PER_HEAD_VOXEL * int(model_args.get("out_channels", 2)) * voxels * heads * 4
    per_sample = saved_activations(model_args, patch) * (2 if amp else 4) + loss_bytes
    total = batch * per_sample * OVERHEAD_FACTOR + parameter_count(model_args) * STATE_BYTES_PER_PARAM
    return total / 1e9 + FIXED_GB
