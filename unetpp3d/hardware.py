"""What the machine can do, and process-wide settings that make the CPU faster.

* :func:`inference_autocast_dtype`: the reduced precision that pays on a device. On CUDA bf16
  (fp16 where the card lacks bf16). On the CPU bf16 only where the cores compute it natively
  (AMX or AVX512-BF16): there oneDNN ran this network's 96^3 forward about 3x faster than in
  fp32 (bench/RESULTS.md); elsewhere bf16 is emulated and slower than fp32, so fp32 it is.
* :func:`keep_freed_memory`: glibc serves allocations above its mmap threshold (32 MiB at most)
  with a fresh ``mmap`` and unmaps them on free, so every large activation of a 3D network is
  faulted in page by page, on every window. Measured on the 2-core development machine: a
  convolution ran 2.4x and a concatenation 5x slower into fresh pages than into reused memory.
  Raising the mmap and trim thresholds keeps freed pages in the process; the resident size then
  stays at its peak until the process ends, which for a command-line run is what happens anyway.
"""

from __future__ import annotations

import ctypes
import os
import platform

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX tiles or AVX512-BF16)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence the care
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def inference_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype that makes inference faster on ``device``, or None for fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; True if it took effect.

    A no-op on other platforms and C libraries, or with ``UNETPP3D_MALLOC_TUNING=0`` (for
    comparing, or where another process needs the memory back).
    """
    if platform.system() != "Linux" or os.environ.get("UNETPP3D_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    big = ctypes.c_int(2**31 - 1)
    return bool(mallopt(_M_MMAP_THRESHOLD, big)) and bool(mallopt(_M_TRIM_THRESHOLD, big))
