"""What the machine can do: the device to run on, the precision that pays there, and a CPU memory setting.

* :func:`device_name`, :func:`resolve_device`: the one reading of ``--device`` for the command
  line, training and inference (``gpu`` means ``cuda``).
* :func:`autocast_dtype`: the one mixed-precision policy, for ``train.amp`` and ``infer --amp``.
  ``auto`` means reduced precision where the device computes it natively: on CUDA bf16 (fp16
  where the card lacks bf16); on the CPU bf16 only where the cores compute it natively (AMX or
  AVX512-BF16): there oneDNN ran this network's 96^3 forward about 3x faster than in fp32
  (bench/RESULTS.md); elsewhere bf16 is emulated and slower than fp32, so fp32 it is.
* :func:`keep_freed_memory`: glibc serves allocations above its mmap threshold (32 MiB at most)
  with a fresh ``mmap`` and unmaps them on free, so every large activation of a 3D network is
  faulted in page by page, on every window. Measured on the 2-core development machine: a
  convolution ran 2.4x and a concatenation 5x slower into fresh pages than into reused memory.
  Raising the mmap and trim thresholds keeps freed pages in the process; the resident size then
  stays at its peak until the process ends, which for a command-line run is what happens anyway.
  The command line does it unless given ``--no-malloc-tuning``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re

import torch

from unetpp3d.errors import UserError

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


AMP_SETTINGS = ("auto", "bf16", "fp16", "off")


def device_name(request: str | torch.device) -> str:
    """A ``--device`` value as PyTorch names it: ``cpu``, ``cuda`` or ``cuda:N`` (``gpu`` means ``cuda``).

    Only the name is checked (any case); :func:`resolve_device` also checks the machine.

    Raises:
        UserError: not a device name.
    """
    text = re.sub(r"^gpu", "cuda", str(request).strip().lower())
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise UserError(f"{str(request)!r} is not a device; use cpu, cuda, cuda:N or gpu (= cuda)")
    return text


def resolve_device(request: str | torch.device | None = None, local_rank: int | None = None) -> torch.device:
    """The device a ``--device`` value names, checked against this machine.

    Args:
        request: ``cpu``, ``cuda``, ``cuda:N``, ``gpu`` (the same as ``cuda``), a
            ``torch.device``, or None or "" (CUDA when available, else the CPU).
        local_rank: in a multi-process run, this process's GPU: it replaces the index of a
            CUDA request.

    Returns:
        The device; a CUDA device always carries its index (the current device for ``cuda``),
        as DDP and messages need.

    Raises:
        UserError: not a device name, CUDA asked for where there is none, or a GPU number that
            is not present.
    """
    text = str(request).strip() if request is not None else ""
    if text == "":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        text = device_name(text)
    except UserError as exc:
        raise UserError(f"--device {exc}") from None
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"--device {request}: CUDA is not available here (PyTorch {torch.__version__}); "
                        "use --device cpu or install a CUDA build of PyTorch")
    device = torch.device(f"cuda:{local_rank}" if local_rank is not None else text)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) present")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX tiles or AVX512-BF16)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence the care
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(setting: str | bool, device: torch.device, name: str = "amp") -> torch.dtype | None:
    """The autocast dtype for a precision setting on ``device``, or None for fp32.

    Training (``train.amp``) and inference (``infer --amp/--no-amp``, the bundle's window
    network) both ask this function, so a model runs in the precision it would be trained in.

    Args:
        setting: ``"auto"`` (reduced precision where the device computes it natively: bf16 on
            CUDA, fp16 on cards without bf16, bf16 on CPUs with AMX or AVX512-BF16, else fp32),
            ``"bf16"``, ``"fp16"`` or ``"off"``; True means ``"auto"`` and False ``"off"``.
        device: where the forward pass runs.
        name: the setting's name in messages (``train.amp``, ``--amp``).

    Raises:
        UserError: a setting the device cannot run (fp16 on the CPU, bf16 on a card without it)
            or an unknown setting.
    """
    if setting is True:
        setting = "auto"
    elif setting is False:
        setting = "off"
    if setting not in AMP_SETTINGS:
        raise UserError(f"{name}: {setting!r} is not one of {', '.join(AMP_SETTINGS)}")
    if setting == "off":
        return None
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if setting == "bf16" and not bf16_ok:
            raise UserError(f"{name}: {torch.cuda.get_device_name(device)} does not support bf16; use fp16 or auto")
        if setting == "fp16":
            return torch.float16
        return torch.bfloat16 if bf16_ok else torch.float16
    if setting == "fp16":
        raise UserError(f"{name}: fp16 needs a CUDA device; use bf16 or off on the CPU")
    if setting == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def keep_freed_memory(enabled: bool = True) -> bool:
    """Ask glibc to keep freed memory for reuse; True if it took effect.

    Args:
        enabled: False does nothing (the command line's ``--no-malloc-tuning``: for comparing,
            or where another process needs the memory back).

    Returns:
        Whether the setting took effect (never on other platforms and C libraries).
    """
    if not enabled or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    big = ctypes.c_int(2**31 - 1)
    return bool(mallopt(_M_MMAP_THRESHOLD, big)) and bool(mallopt(_M_TRIM_THRESHOLD, big))


# cgroup v2, then v1: (limit file, usage file). A container's limit is not in /proc/meminfo.
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _read_int(path: str) -> int | None:
    """An integer file's value; None when missing, unreadable or "max" (no limit)."""
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_memory_left() -> int | None:
    """Bytes this process's cgroup may still allocate (limit minus usage), or None without a limit.

    A v1 "no limit" is a huge number (about 2**63), which is returned as None too.
    """
    for limit_file, usage_file in CGROUP_FILES:
        limit = _read_int(limit_file)
        if limit is None or limit >= 1 << 60:
            continue
        usage = _read_int(usage_file) or 0
        return max(limit - usage, 0)
    return None


def system_memory_available() -> int | None:
    """``MemAvailable`` from /proc/meminfo (free plus reclaimable), else free pages; None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory() -> int | None:
    """Bytes a new allocation may use: the smaller of the machine's available memory and the cgroup's room.

    Returns:
        The bytes, or None where neither is known.
    """
    known = [n for n in (system_memory_available(), cgroup_memory_left()) if n is not None]
    return min(known) if known else None


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def refuse_unless_memory(need: int, what: str, advice: str) -> None:
    """Raise a :class:`UserError` with the estimate when ``need`` bytes exceed :func:`available_memory`.

    Args:
        need: the estimated peak, bytes.
        what: the subject of the message, e.g. ``"scan.nii.gz: inference"``.
        advice: what to do instead.

    Raises:
        UserError: more is needed than is available (machine or cgroup limit).
    """
    available = available_memory()
    if available is not None and need > available:
        raise UserError(f"{what} needs about {human_bytes(need)} of memory at its peak but only "
                        f"{human_bytes(available)} is available (free memory and the cgroup limit); {advice}")
