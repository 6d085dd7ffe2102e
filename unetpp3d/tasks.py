"""What each task means after the network: one table, read by every stage that differs per task.

A task (``liver``, ``lung_nodule``) decides how a predicted label map is cleaned up, whether a
nodule report is written, which intensity window a preview uses, whether the class
probabilities are kept after they are resampled to the scan's grid, and what the foreground
label is called. Those rules live here and nowhere else: the predictor, the post-processing
specs, the bundle, the ``infer`` command and the config validation look them up with
:func:`task_rules`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from unetpp3d.errors import UserError

# Soft-tissue window (W400/L40) widened a little so that fat and contrast stay distinguishable.
ABDOMEN_WINDOW = (-160.0, 240.0)
LUNG_WINDOW = (-1350.0, 150.0)  # W1500 / L-600


@dataclass(frozen=True)
class TaskRules:
    """The per-task rules of everything downstream of the network.

    Attributes:
        name: the task's name in configs, manifests and checkpoints.
        foreground: what label 1 means (the label name phantoms and new manifests use).
        targets: what the task segments, in words, for documents.
        postprocessing: ``"largest_component"``: keep the largest connected component of the
            foreground (all foreground labels together, each voxel keeping its label) and give
            the background it encloses the first label; ``"min_volume"``: drop components
            smaller than ``infer.min_component_ml``.
        nodule_report: measure each component and write ``<case>.nodules.json`` and ``.csv``.
        keep_probabilities: keep the class probabilities on the scan's grid (the nodule
            report's mean probability needs them; they are as large as the scan several times).
        preview_window: the HU window the preview PNG draws the scan in.
    """

    name: str
    foreground: str
    targets: str
    postprocessing: Literal["largest_component", "min_volume"]
    nodule_report: bool
    keep_probabilities: bool
    preview_window: tuple[float, float]


TASK_RULES: dict[str, TaskRules] = {
    "liver": TaskRules(name="liver", foreground="liver", targets="liver", postprocessing="largest_component",
                       nodule_report=False, keep_probabilities=False, preview_window=ABDOMEN_WINDOW),
    "lung_nodule": TaskRules(name="lung_nodule", foreground="nodule", targets="lung nodules",
                             postprocessing="min_volume", nodule_report=True, keep_probabilities=True,
                             preview_window=LUNG_WINDOW),
}


TASKS: tuple[str, ...] = tuple(TASK_RULES)


def task_rules(task: str) -> TaskRules:
    """The rules of ``task``.

    Args:
        task: a task name, as in a config, manifest or checkpoint's preprocessing.

    Returns:
        Its :class:`TaskRules`.

    Raises:
        UserError: the task is not one this version knows.
    """
    try:
        return TASK_RULES[task]
    except (KeyError, TypeError):
        raise UserError(f"task {task!r} is not one of {', '.join(TASKS)}; a model or manifest for another task "
                        "needs a unetpp3d version that knows it") from None
