"""Checkpoints: atomic saves and weights-only loads.

A checkpoint is a dict of plain Python types and tensors (see docs/architecture.md for the
keys). It is written to a temporary file that is fsynced and renamed over the target, so a kill
during a save leaves the previous checkpoint intact; and it is read with
``torch.load(weights_only=True)``, whose restricted unpickler refuses any object that would run
code when loaded, so a checkpoint from an untrusted source cannot execute anything.

Weights that are NaN or infinite (a diverged run) are refused both ways: such a model would
segment nothing, or everything, without an error.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from unetpp3d.atomic import atomic_path, write_failed
from unetpp3d.errors import UserError
from unetpp3d.readable import require_file

# What trainer checkpoints carry (docs/architecture.md); a model-only file needs just the first two.
PAYLOAD_KEYS = ("model_args", "state_dict", "preprocessing", "config", "epoch", "optimizer", "scheduler",
                "scaler", "rng", "best_metric", "split")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file, flush, fsync, rename).

    Args:
        path: target file, usually ``RUN/last.pt`` or ``RUN/best.pt``.
        payload: plain Python types and tensors only, so that a weights-only load accepts it.

    Returns:
        The path written.
    """
    return save_state_dict(payload, path)


def save_state_dict(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, checked before the rename (see :func:`verify_zip`).

    Raises:
        UserError: naming ``path`` when the file cannot be written completely (a full disk).
    """
    path = Path(path)
    bad = non_finite_tensors(obj.get("state_dict", obj)) if isinstance(obj, dict) else []
    if bad:
        raise UserError(f"{path}: not saved, the weights are not finite ({_named(bad)})")
    with atomic_path(path, verify=lambda tmp: verify_zip(tmp, path)) as tmp:
        try:
            with open(tmp, "wb") as fh:
                torch.save(obj, fh)
        except RuntimeError as exc:  # torch's zip writer reports a short write (a full disk) this way
            raise write_failed(path, str(exc).strip().splitlines()[-1][:200]) from None
    return path


def verify_zip(tmp: Path, path: Path) -> None:
    """Refuse a written checkpoint (``tmp``, to become ``path``) whose zip directory is missing or points past its end.

    Reading the directory (at the end of the file) and the last entry's extent catches a
    truncated write without reading the whole checkpoint back.
    """
    size = tmp.stat().st_size
    try:
        with zipfile.ZipFile(tmp) as zf:
            end = max((i.header_offset + len(i.filename) + 30 + i.compress_size for i in zf.infolist()), default=0)
    except (zipfile.BadZipFile, OSError) as exc:
        raise write_failed(path, f"the written checkpoint is not a complete zip archive ({exc})") from None
    if end > size:
        raise write_failed(path, f"the written checkpoint is truncated ({size:,} bytes, its entries need {end:,})")


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """The one ``torch.load(weights_only=True)`` of unetpp3d: checkpoints, model files and bundle weights.

    Args:
        path: a file written by ``torch.save``.
        map_location: where to put the tensors.

    Returns:
        What the file holds (plain Python types and tensors only).

    Raises:
        UserError: the file is missing, truncated or not a PyTorch file, or it pickles objects
            other than plain types and tensors (which could run code, so they are refused), or
            its weights (the ``state_dict``, or the file itself when it is a state dict) hold NaN
            or infinite values.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint or weights file")
    require_file(path, "checkpoint")  # a folder, FIFO or device is refused, not read
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path}: refused, it holds objects other than weights and plain values, which could "
                        f"run code when loaded ({_unpickling_reason(exc)}); only load checkpoints written by "
                        f"unetpp3d") from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc}); "
                        f"it may be truncated or not a PyTorch file") from None
    weights = loaded.get("state_dict") if isinstance(loaded, dict) and "state_dict" in loaded else loaded
    bad = non_finite_tensors(weights) if isinstance(weights, dict) else []
    if bad:
        raise UserError(f"{path}: refused, its weights are not finite ({_named(bad)}); the run that wrote it "
                        f"diverged; use an earlier checkpoint or retrain with a lower train.lr")
    return loaded


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """The names of the floating-point tensors in ``state`` (a state dict) holding NaN or inf.

    Args:
        state: name -> tensor (other values are ignored).

    Returns:
        The offending names, in the state dict's order; empty when every weight is finite.
    """
    return [str(name) for name, value in state.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def _named(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return f"{len(names)} tensor(s): {shown}{' ...' if len(names) > 3 else ''}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (or a ``UNetPlusPlus3D.save`` file) with :func:`load_weights_only`.

    Args:
        path: a ``.pt`` file written by :func:`save_checkpoint` (or ``UNetPlusPlus3D.save``).
        map_location: where to put the tensors.

    Raises:
        UserError: as :func:`load_weights_only`, or the file is not a unetpp3d checkpoint (no
            ``model_args`` and ``state_dict``).
    """
    payload = load_weights_only(path, map_location)
    if not isinstance(payload, dict) or "model_args" not in payload or "state_dict" not in payload:
        raise UserError(f"{path}: not a unetpp3d checkpoint (no model_args/state_dict)")
    return payload


def load_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state dict in a weights file (a bundle's ``models/model.pt``), or in a checkpoint.

    Raises:
        UserError: as :func:`load_weights_only`, or the file holds no state dict.
    """
    state = load_weights_only(path, map_location)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def _unpickling_reason(exc: Exception) -> str:
    """The line of torch's message that names the refused object, not its generic advice."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
    return (named or lines or [type(exc).__name__])[0].rstrip(".")


def resolve_model_path(source: str | Path) -> Path:
    """Turn a run folder or checkpoint path into a checkpoint file.

    A run folder gives its ``best.pt`` (the best validation Dice) when there is one, else its
    ``last.pt``.

    Raises:
        UserError: the path does not exist, or a folder holds neither checkpoint.
    """
    source = Path(source)
    if source.is_dir():
        for name in ("best.pt", "last.pt"):
            if (source / name).is_file():
                return source / name
        raise UserError(f"{source}: no best.pt or last.pt in this folder; is it a training run folder?")
    if source.is_file():
        return source
    if source.exists():  # a FIFO or device: refused, never opened
        require_file(source, "checkpoint")
    raise UserError(f"{source}: no such checkpoint or run folder")
