"""A bundle's ``models/model.ts``: every inference mode traced device-neutrally, with the bundle's configs inside."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import save_net_with_metadata
from torch import nn

from unetpp3d.atomic import atomic_path, write_failed
from unetpp3d.model.checkpoint import verify_zip
from unetpp3d.model.portable import trace_modes


def save_torchscript(network: nn.Module, roi_size: Sequence[int] | None, meta: dict[str, Any],
                     inference: dict[str, Any], path: str | Path) -> None:
    """Trace every inference mode into one file and save it with ``metadata.json`` and ``inference.json`` inside.

    ``forward`` is accurate mode and ``fast_l<l>`` the pruned network UNet++ L^l
    (:func:`~unetpp3d.model.portable.trace_modes`: the reference path, so no CPU-only operator).
    The trace is shape-generic, so the smallest input the network accepts with more than one
    voxel at its deepest level is enough; ``roi_size`` is accepted for callers that know the
    window but not needed.

    Args:
        network: a network with ``model_args`` (its ``in_channels``) and ``size_divisor``.
        roi_size: the sliding window (unused; the trace works at any valid size).
        meta: the bundle's metadata.json content.
        inference: the bundle's inference.json content.
        path: the ``.ts`` file to write (atomically).
    """
    example = torch.zeros(1, int(network.model_args["in_channels"]), *(2 * d for d in network.size_divisor))
    traced = trace_modes(network, example)
    path = Path(path)
    with atomic_path(path, verify=lambda tmp: verify_zip(tmp, path)) as tmp, open(tmp, "wb") as stream:
        try:
            save_net_with_metadata(traced, stream, include_config_vals=False, append_timestamp=False,
                                   meta_values=meta, more_extra_files={"inference.json": json.dumps(inference).encode()})
        except RuntimeError as exc:  # TorchScript's zip writer reports a short write (a full disk) this way
            raise write_failed(path, str(exc).strip().splitlines()[-1][:200]) from None
