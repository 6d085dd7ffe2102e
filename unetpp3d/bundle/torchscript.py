"""A bundle's ``models/model.ts``: the network traced in eval mode, with the bundle's configs inside."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import save_net_with_metadata
from torch import nn

from unetpp3d.atomic import atomic_path


def save_torchscript(network: nn.Module, roi_size: Sequence[int], meta: dict[str, Any], inference: dict[str, Any],
                     path: str | Path) -> None:
    """Trace ``network`` in eval mode on one window and save it with ``metadata.json`` and ``inference.json`` inside.

    Args:
        network: a network with ``model_args`` (its ``in_channels``).
        roi_size: the window it is traced on.
        meta: the bundle's metadata.json content.
        inference: the bundle's inference.json content.
        path: the ``.ts`` file to write (atomically).
    """
    network = network.eval()
    example = torch.zeros(1, int(network.model_args["in_channels"]), *(int(v) for v in roi_size))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on Python-side shape checks, which hold for any window
        traced = torch.jit.trace(network, example, check_trace=False)
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        save_net_with_metadata(traced, stream, include_config_vals=False, append_timestamp=False, meta_values=meta,
                               more_extra_files={"inference.json": json.dumps(inference).encode()})
