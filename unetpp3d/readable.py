"""What may be read: regular files (and folders where a folder is meant), never FIFOs or devices.

Opening a FIFO blocks until something writes to it, and a device such as ``/dev/zero`` never
ends; both look like files to ``open``. Everything unetpp3d reads (scans, label maps, the data
files a header names, DICOM slices, manifests, configs, checkpoints) goes through these checks
first, so such a path gives one clear line instead of a hang or a traceback.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from unetpp3d.errors import UserError


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def path_kind(path: str | Path) -> str:
    """``"file"``, ``"folder"``, ``"missing"`` or ``"other"`` (FIFO, device, socket), following symlinks."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "other"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return "other"


def not_regular_reason(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a file (missing, a folder, a FIFO or device), or None when it can."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    return f"is {_kind(mode)}, not a regular file; give a file"


def require_file(path: str | Path, what: str = "file") -> Path:
    """Refuse anything but an existing regular file (symlinks to one are fine).

    Args:
        path: the path to check.
        what: what the file is, for the message ("manifest", "config file", "checkpoint").

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        UserError: ``"<path>: <what> ..."`` when it is missing, a folder, a FIFO, a device or a socket.
    """
    path = Path(path)
    reason = not_regular_reason(path)
    if reason is not None:
        raise UserError(f"{path}: {what}: {reason}")
    return path


def require_file_or_folder(path: str | Path, what: str = "input") -> str:
    """``"file"`` or ``"folder"`` for an existing regular file or folder; refuse anything else.

    Raises:
        UserError: missing, or a FIFO, device or socket.
    """
    kind = path_kind(path)
    if kind == "missing":
        raise UserError(f"{path}: no such file or folder")
    if kind == "other":
        raise UserError(f"{path}: {what} {_other(path)}")
    return kind


def _other(path: str | Path) -> str:
    try:
        return f"is {_kind(os.stat(path).st_mode)}, not a regular file or folder; give a file or a folder"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"


def read_bytes(path: str | Path, what: str = "file", limit: int | None = None) -> bytes:
    """Read a regular file's bytes (at most ``limit``), refusing FIFOs and devices without blocking.

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor, so a FIFO
    swapped in after a check cannot make the read wait.

    Raises:
        UserError: the path is not a readable regular file.
    """
    path = Path(path)
    require_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UserError(f"{path}: {what}: cannot be opened ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise UserError(f"{path}: {what}: is {_kind(mode)}, not a regular file; give a file")
        try:
            return fh.read() if limit is None else fh.read(limit)
        except OSError as exc:
            raise UserError(f"{path}: {what}: cannot be read ({exc.strerror or exc})") from None


def read_text(path: str | Path, what: str = "file") -> str:
    """A regular file's text as UTF-8 (see :func:`read_bytes`).

    Raises:
        UserError: not a readable regular file, or not UTF-8 text.
    """
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: {what}: not UTF-8 text (byte {exc.start:,}); save it as UTF-8") from None


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` resolves (symlinks followed) to a place inside ``folder`` (also resolved)."""
    resolved, root = Path(path).resolve(), Path(folder).resolve()
    return resolved != root and root in resolved.parents
