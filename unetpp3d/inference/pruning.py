"""Measured pruning: validation Dice and time per case of every UNet++ level, and the level fast mode uses.

The UNet++ paper's case for pruning (Zhou et al., arXiv:1807.10165, section 2) is a trade-off
read off a table: UNet++ L^l for small ``l`` is several times faster and, on some tasks, barely
worse. After training, :func:`measure_pruning` fills that table for the run's own model on its
own validation cases: Dice (on the preprocessed grid, as the training's validation) and
milliseconds per case of the sliding window at every level L^1 ... L^L and in accurate mode
(all heads). ``unetpp3d train`` writes it beside ``best.pt`` as ``pruning.json`` and draws it
as ``pruning.png``; ``unetpp3d infer --mode fast`` without ``--prune-level`` then runs the
smallest level whose Dice is within :data:`TOLERANCE` of the best entry (:func:`choose_level`),
and says which it picked. Without a table, fast mode keeps its fixed default level.

Dice of every level comes from one pass: head X^{0,l} of the full network *is* the pruned
network L^l's output (its inputs are the nodes with ``i + j <= l``), so the heads of one forward
pass give every level's segmentation. Times are measured separately, one pruned pass per level.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from monai.networks.utils import one_hot
from torch import nn

from unetpp3d.atomic import atomic_path, atomic_write_text
from unetpp3d.evaluation.metrics import dice_per_class
from unetpp3d.inference.quality import has_heads, head_logits
from unetpp3d.model.network import on_device

log = logging.getLogger("unetpp3d")


TOLERANCE = 0.01  # Dice: how much worse than the best a pruned level may be and still be chosen


TABLE_NAME = "pruning.json"


PLOT_NAME = "pruning.png"


class _AllHeads(nn.Module):
    """Window network: every head's class probabilities, concatenated along the channels."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.softmax(h.float(), dim=1) for h in head_logits(self.net, x)], dim=1)


class _Pruned(nn.Module):
    """Window network: probabilities of the network at one prune level (None: accurate mode)."""

    def __init__(self, net: nn.Module, level: int | None):
        super().__init__()
        self.net, self.level = net, level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x, prune_level=self.level).float(), dim=1)


def _dice(probs: torch.Tensor, label: torch.Tensor, num_classes: int) -> float:
    """Mean foreground Dice of the argmax of ``probs`` (1, C, ...) against ``label`` (1, 1, ...), as
    training's validation scores it (:func:`~unetpp3d.evaluation.metrics.dice_per_class`); NaN if undefined."""
    pred = one_hot(probs.argmax(1, keepdim=True), num_classes)
    dice = dice_per_class(pred, one_hot(label.long(), num_classes))[0]
    known = dice[~torch.isnan(dice)]
    return float(known.mean()) if len(known) else math.nan


@torch.no_grad()
def measure_pruning(net: nn.Module, cases: Iterable[dict[str, torch.Tensor]], patch_size: list[int], *,
                    num_classes: int, sw_batch_size: int = 2, overlap: float = 0.5, cval: float = 0.0,
                    device: torch.device | str = "cpu", timing_cases: int = 5) -> dict[str, Any]:
    """Validation Dice and ms per case of every prune level and of accurate mode.

    Args:
        net: a UNet++ trained with deep supervision (eval mode is set here).
        cases: preprocessed whole volumes, ``{"image": (1, 1, ...), "label": (1, 1, ...)}`` each
            (what the training's validation loader yields).
        patch_size: the sliding window's size.
        num_classes: classes including background.
        sw_batch_size: windows per forward pass.
        overlap: sliding-window overlap.
        cval: the value to pad with (the training's pad value).
        device: where to run.
        timing_cases: how many of the cases (the first ones) are timed per level.

    Returns:
        ``{"levels": [{"name": "L1", "level": 1, "dice": ..., "ms_per_case": ...}, ..., {"name":
        "accurate", "level": None, ...}], "cases": n, "timed_cases": k, "device": ...}``.

    Raises:
        ValueError: the network has no heads to prune to.
    """
    if not has_heads(net):
        raise ValueError(f"{type(net).__name__} has no deep-supervision heads to prune to")
    device = torch.device(device)
    net = on_device(net, device).eval()
    depth = int(net.depth)
    dice: dict[str, list[float]] = {f"L{lvl}": [] for lvl in range(1, depth + 1)}
    dice["accurate"] = []
    timed: list[torch.Tensor] = []
    all_heads = _AllHeads(net)
    for case in cases:
        image = _plain(case["image"]).to(device)
        label = _plain(case["label"]).to(device)
        probs = sliding_window_inference(image, patch_size, sw_batch_size, all_heads, overlap=overlap,
                                         mode="gaussian", cval=cval)
        heads = probs.view(probs.shape[0], depth, num_classes, *probs.shape[2:])
        for lvl in range(1, depth + 1):
            dice[f"L{lvl}"].append(_dice(heads[:, lvl - 1], label, num_classes))
        dice["accurate"].append(_dice(heads.mean(1), label, num_classes))  # the paper's mean probability
        if len(timed) < timing_cases:
            timed.append(image)
    levels = []
    for name, level in [*[(f"L{lvl}", lvl) for lvl in range(1, depth + 1)], ("accurate", None)]:
        window = _Pruned(net, level)

        def run(image: torch.Tensor, window: nn.Module = window) -> None:
            sliding_window_inference(image, patch_size, sw_batch_size, window, overlap=overlap, mode="gaussian",
                                     cval=cval)

        if timed:
            run(timed[0])  # warm-up: allocator, kernel choice
        _sync(device)
        start = time.perf_counter()
        for image in timed:
            run(image)
        _sync(device)
        ms = 1000.0 * (time.perf_counter() - start) / len(timed) if timed else math.nan
        known = [d for d in dice[name] if not math.isnan(d)]
        levels.append({"name": name, "level": level, "dice": sum(known) / len(known) if known else math.nan,
                       "ms_per_case": ms})
    return {"levels": levels, "cases": len(dice["accurate"]), "timed_cases": len(timed), "device": str(device)}


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_level(table: dict[str, Any], tolerance: float = TOLERANCE) -> tuple[int | None, str]:
    """The smallest prune level whose Dice is within ``tolerance`` of the best entry, and why.

    The best entry may be accurate mode; when no level is close enough the answer is None
    (accurate mode is what the table recommends, but fast mode then runs the full network L^L).

    Args:
        table: from :func:`measure_pruning` (or its JSON).
        tolerance: Dice difference allowed.

    Returns:
        ``(level, reason)``; level None when no pruned level has a measured Dice.
    """
    entries = [e for e in table["levels"] if e.get("dice") is not None and not math.isnan(float(e["dice"]))]
    if not entries:
        return None, "the pruning table holds no validation Dice"
    best = max(entries, key=lambda e: float(e["dice"]))
    for entry in sorted((e for e in entries if e["level"] is not None), key=lambda e: int(e["level"])):
        if float(entry["dice"]) >= float(best["dice"]) - tolerance:
            return int(entry["level"]), (
                f"L^{entry['level']} is the smallest level within {tolerance:g} Dice of the best "
                f"({best['name']} {float(best['dice']):.4f}; L^{entry['level']} {float(entry['dice']):.4f}, "
                f"{_ms(entry)} per case vs {_ms(best)})")
    levels = [e for e in entries if e["level"] is not None]
    deepest = max(levels, key=lambda e: int(e["level"])) if levels else None
    if deepest is None:
        return None, "the pruning table holds no pruned level"
    return int(deepest["level"]), (f"no pruned level is within {tolerance:g} Dice of {best['name']} "
                                   f"({float(best['dice']):.4f}); using the deepest, L^{deepest['level']}")


def _ms(entry: dict[str, Any]) -> str:
    ms = entry.get("ms_per_case")
    return "? ms" if ms is None or math.isnan(float(ms)) else f"{float(ms):.0f} ms"


def format_table(table: dict[str, Any]) -> str:
    """The table as aligned text lines (for the training log)."""
    lines = [f"pruning table ({table['cases']} validation case(s), {table['timed_cases']} timed, {table['device']}):",
             f"  {'mode':<9} {'Dice':>7} {'ms/case':>9}"]
    for e in table["levels"]:
        dice = "n/a" if e["dice"] is None or math.isnan(float(e["dice"])) else f"{float(e['dice']):.4f}"
        ms = "n/a" if e["ms_per_case"] is None or math.isnan(float(e["ms_per_case"])) else f"{e['ms_per_case']:.1f}"
        lines.append(f"  {e['name']:<9} {dice:>7} {ms:>9}")
    return "\n".join(lines)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_pruning_table(table: dict[str, Any], checkpoint: str | Path, tolerance: float = TOLERANCE) -> Path:
    """Write ``pruning.json`` (with the level :func:`choose_level` picks) and ``pruning.png`` beside ``checkpoint``.

    The JSON records the checkpoint's name and SHA-256, so that a table never speaks for other
    weights (:func:`load_pruning_choice` ignores it once the checkpoint changes).

    Returns:
        The JSON's path.
    """
    checkpoint = Path(checkpoint)
    level, reason = choose_level(table, tolerance)
    payload = {**table, "checkpoint": checkpoint.name, "checkpoint_sha256": file_sha256(checkpoint),
               "tolerance": tolerance, "chosen_level": level, "reason": reason}
    path = checkpoint.with_name(TABLE_NAME)
    atomic_write_text(path, json.dumps(_finite(payload), indent=2) + "\n")
    save_pruning_png(payload, checkpoint.with_name(PLOT_NAME))
    return path


def save_pruning_png(table: dict[str, Any], png_path: str | Path) -> Path:
    """Draw validation Dice against ms per case, one point per level and one for accurate mode."""
    # matplotlib is heavy and only needed here: imported on use.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    points = [e for e in table["levels"] if e["dice"] is not None and e["ms_per_case"] is not None]
    ax.plot([e["ms_per_case"] for e in points if e["level"] is not None],
            [e["dice"] for e in points if e["level"] is not None], marker="o", color="tab:blue", label="pruned L^l")
    for e in points:
        ax.annotate("accurate" if e["level"] is None else f"L{e['level']}", (e["ms_per_case"], e["dice"]),
                    textcoords="offset points", xytext=(4, 4), fontsize="small")
    acc = [e for e in points if e["level"] is None]
    if acc:
        ax.plot([acc[0]["ms_per_case"]], [acc[0]["dice"]], marker="s", color="black", linestyle="", label="accurate")
    if table.get("chosen_level") is not None:
        chosen = next(e for e in points if e["level"] == table["chosen_level"])
        ax.plot([chosen["ms_per_case"]], [chosen["dice"]], marker="*", markersize=14, color="tab:red", linestyle="",
                label=f"fast mode (within {table.get('tolerance', TOLERANCE):g})")
    ax.set(xlabel="ms per validation case", ylabel="validation Dice", title="UNet++ pruning")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return png_path


def load_pruning_choice(checkpoint: str | Path) -> tuple[int, str] | None:
    """The level a run's ``pruning.json`` chose for ``checkpoint``, with its reason; None without a valid table.

    A table written for other weights (the checkpoint's SHA-256 differs, e.g. training went on)
    is ignored with a warning.
    """
    checkpoint = Path(checkpoint)
    path = checkpoint.with_name(TABLE_NAME)
    if not path.is_file() or not checkpoint.is_file():
        return None
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable (%s); fast mode keeps its default level", path, exc)
        return None
    if table.get("checkpoint") != checkpoint.name or table.get("checkpoint_sha256") != file_sha256(checkpoint):
        log.warning("%s: measured for other weights than %s; fast mode keeps its default level", path, checkpoint)
        return None
    if table.get("chosen_level") is None:
        return None
    return int(table["chosen_level"]), f"{table.get('reason', '')} [{path}]"


def _finite(value: Any) -> Any:
    """NaN -> None, so that the JSON is standard."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
