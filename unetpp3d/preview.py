"""Pictures for a person to look at: training curves and a mask drawn over its scan."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from unetpp3d.atomic import atomic_path
from unetpp3d.tasks import ABDOMEN_WINDOW

# --------------------------------------------------------------------------------------------
# Training curves (metrics.csv -> curves.png)
# --------------------------------------------------------------------------------------------


def _read_metrics(metrics_csv: Path) -> tuple[list[str], list[dict[str, float]]]:
    """Rows of a metrics.csv as floats; empty cells (epochs without validation) become NaN."""
    with open(metrics_csv, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        rows = []
        for raw in reader:
            row = {}
            for key, value in raw.items():
                try:
                    row[key] = float(value) if value not in (None, "") else math.nan
                except ValueError:
                    row[key] = math.nan
            rows.append(row)
    return columns, rows


def save_curves_png(metrics_csv: str | Path, png_path: str | Path) -> Path:
    """Plot training loss and validation Dice per epoch from a run's ``metrics.csv``.

    The left panel shows the training loss; the right one the mean validation Dice and, where
    there are several foreground classes, each class's Dice (columns named ``dice_<class>``).

    Args:
        metrics_csv: the CSV the trainer writes (columns ``epoch``, ``train_loss``,
            ``val_dice``, ``lr``, ``seconds`` and ``dice_<class>`` per foreground class).
        png_path: where to write the picture (atomically).

    Returns:
        The path written.
    """
    # A Figure with its own Agg canvas, not pyplot: no global backend switch, no figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns, rows = _read_metrics(Path(metrics_csv))
    epochs = [r.get("epoch", math.nan) for r in rows]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_dice = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r.get("train_loss", math.nan) for r in rows], marker=".", color="tab:blue")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Loss")
    ax_loss.grid(alpha=0.3)

    def validated(key: str) -> tuple[list[float], list[float]]:
        # Validation runs every few epochs; draw lines through the epochs that have a value.
        pairs = [(e, r[key]) for e, r in zip(epochs, rows) if not math.isnan(r.get(key, math.nan))]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    per_class = [c for c in columns if c.startswith("dice_")]
    if len(per_class) > 1:
        for key in per_class:
            ax_dice.plot(*validated(key), marker=".", linestyle="--", label=key[len("dice_"):])
    ax_dice.plot(*validated("val_dice"), marker="o", color="black", label="mean")
    ax_dice.set(xlabel="epoch", ylabel="validation Dice", title="Validation Dice", ylim=(0.0, 1.0))
    ax_dice.grid(alpha=0.3)
    ax_dice.legend(loc="lower right", fontsize="small")
    for ax in (ax_loss, ax_dice):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return png_path


# --------------------------------------------------------------------------------------------
# Masks over scans
# --------------------------------------------------------------------------------------------

_LABEL_COLOURS = ["#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa", "#ff2d55"]


def _to_lps_axes(array_xyz: np.ndarray, geometry: Any) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip array axes so that they run along L, P, S; returns the array and spacing.

    Each array axis goes to the world axis its direction column points along most (oblique scans
    are shown as their nearest orthogonal orientation), which is enough to draw the usual views.
    """
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    spacing = np.asarray(geometry.spacing, dtype=float)
    world_of_axis = [int(np.argmax(np.abs(direction[:, a]))) for a in range(3)]
    if sorted(world_of_axis) != [0, 1, 2]:  # degenerate direction: show the array as stored
        return array_xyz, spacing
    order = [world_of_axis.index(w) for w in range(3)]
    out = np.transpose(array_xyz, order)
    for w, axis in enumerate(order):
        if direction[w, axis] < 0:
            out = np.flip(out, axis=w)
    return out, spacing[order]


def _display_range(image: np.ndarray, window: tuple[float, float]) -> tuple[float, float]:
    low, high = window
    inside = (image > low) & (image < high)
    # Images that are not in HU (phantoms, MR) would be one flat colour in a CT window.
    if inside.mean() < 0.01:
        low, high = (float(v) for v in np.percentile(image, [1, 99]))
        if high <= low:
            high = low + 1.0
    return low, high


def save_overlay_png(image_xyz: np.ndarray, mask_xyz: np.ndarray, geometry: Any, path: str | Path,
                     title: str | None = None, window: tuple[float, float] | None = None) -> Path:
    """Draw the mask over the scan in axial, coronal and sagittal slices and save a PNG.

    The slices pass through the mask's centre of mass (the scan's centre when the mask is
    empty). Views follow the radiological convention (patient's right on the left of the
    picture, anterior or superior at the top) and keep physical proportions from the spacing.
    The file is written atomically with matplotlib's Agg canvas (no display needed).

    Args:
        image_xyz: the scan (x, y, z), in HU for CT.
        mask_xyz: the integer label map on the same grid; each label gets its own colour.
        geometry: the grid (``spacing`` and SimpleITK ``direction``), e.g. a readers.Geometry.
        path: the PNG to write.
        title: text above the panels (e.g. the case name).
        window: intensity window (low, high), e.g. the task's ``preview_window``
            (:func:`unetpp3d.tasks.task_rules`); default a soft-tissue CT window. Images that are
            not in HU fall back to their 1st-99th percentile.

    Returns:
        The path written.

    Example::

        >>> image, geometry = read_image("ct.nii.gz")
        >>> save_overlay_png(image, mask, geometry, "ct.png", title="ct")
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    image = np.asarray(image_xyz, dtype=np.float32)
    mask = np.asarray(mask_xyz)
    if image.shape != mask.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and mask {mask.shape} must be 3D arrays of the same shape")
    image, spacing = _to_lps_axes(image, geometry)
    mask, _ = _to_lps_axes(mask, geometry)
    if mask.any():
        centre = np.round(np.argwhere(mask > 0).mean(axis=0)).astype(int)
    else:
        centre = np.array(image.shape) // 2
    low, high = _display_range(image, window or ABDOMEN_WINDOW)
    cx, cy, cz = (int(c) for c in centre)
    sx, sy, sz = spacing
    # (image slice, mask slice, row spacing, column spacing, name); rows down, columns right.
    # Axial: columns run R->L (x increases to the left), rows A->P. Coronal and sagittal put
    # superior at the top, so their z axis is reversed.
    views = [
        (image[:, :, cz].T, mask[:, :, cz].T, sy, sx, f"axial  z={cz}"),
        (image[:, cy, ::-1].T, mask[:, cy, ::-1].T, sz, sx, f"coronal  y={cy}"),
        (image[cx, :, ::-1].T, mask[cx, :, ::-1].T, sz, sy, f"sagittal  x={cx}"),
    ]
    labels = int(mask.max()) if mask.size else 0
    cmap = ListedColormap([_LABEL_COLOURS[i % len(_LABEL_COLOURS)] for i in range(max(labels, 1))])

    fig = Figure(figsize=(13, 5), facecolor="black")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, (img, msk, row_mm, col_mm, name) in zip(axes, views):
        ax.imshow(img, cmap="gray", vmin=low, vmax=high, aspect=row_mm / col_mm, interpolation="nearest")
        if msk.any():
            shown = np.ma.masked_where(msk == 0, msk)
            ax.imshow(shown, cmap=cmap, vmin=1, vmax=max(labels, 1), alpha=0.45,
                      aspect=row_mm / col_mm, interpolation="nearest")
            ax.contour(msk > 0, levels=[0.5], colors="yellow", linewidths=0.6)
        ax.set_title(name, color="white", fontsize=10)
        ax.axis("off")
    heading = title or ""
    heading += f"   window [{low:.0f}, {high:.0f}]" + ("" if mask.any() else "   (empty mask)")
    fig.suptitle(heading.strip(), color="white", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, facecolor=fig.get_facecolor())
    return path
