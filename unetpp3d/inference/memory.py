"""The whole inference pipeline's peak host memory, estimated before the windows run.

Reading a scan is estimated by the readers; the peak comes later. A 600x600x900 scan (a 6 MB
file) passed 13.7 GB during the inverse resampling: the probabilities go back to the input's
grid as ``C`` float32 channels, through a sampling grid of three float32 coordinates per input
voxel and a second copy for the orientation, while the scan as read and the stitched output on
the model's grid are still held. :func:`inference_peak_bytes` adds these up;
:func:`check_inference_memory` refuses a case whose estimate exceeds the memory available to
this process (the machine's and the cgroup's, :func:`unetpp3d.hardware.available_memory`),
with the estimate in the message, before any window runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from unetpp3d.hardware import refuse_unless_memory

FLOAT = 4


def inference_peak_bytes(input_size: Sequence[int], resampled_size: Sequence[int], num_classes: int) -> int:
    """The estimated peak host memory of one case, in bytes.

    Args:
        input_size: the scan's voxels per axis as read.
        resampled_size: the voxels per axis on the model's grid (after resampling and cropping).
        num_classes: the model's classes, background included.

    Returns:
        At the inverse resampling, the largest stage: the scan as read (float32), the stitched
        probabilities and weight map on the model's grid, the sampling grid (three coordinates
        per input voxel), the probabilities on the input grid twice (resampled, then reoriented),
        and the int64 argmax.
    """
    n_in, n_model = math.prod(int(v) for v in input_size), math.prod(int(v) for v in resampled_size)
    scan = n_in * FLOAT
    stitched = n_model * FLOAT * (num_classes + 1)
    inversion = n_in * FLOAT * (3 + 2 * num_classes)
    argmax = n_in * 8
    return scan + stitched + inversion + argmax


def check_inference_memory(name: str, input_size: Sequence[int], resampled_size: Sequence[int],
                           num_classes: int) -> int:
    """Refuse a case whose :func:`inference_peak_bytes` exceeds the available memory.

    Returns:
        The estimate, bytes (for the log).

    Raises:
        UserError: it does not fit; the message gives the estimate and the sizes.
    """
    need = inference_peak_bytes(input_size, resampled_size, num_classes)
    shape = "x".join(map(str, input_size))
    refuse_unless_memory(need, f"{name}: inference ({shape} voxels as read, "
                               f"{'x'.join(map(str, resampled_size))} on the model's grid, {num_classes} classes)",
                         "crop the scan to the region of interest or use a machine with more memory")
    return need
