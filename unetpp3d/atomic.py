"""Atomic, verified file writes: write a temporary file beside the target, check it, then rename it.

A crash or kill at any moment leaves either the old file or the new one, never half of one,
because ``os.replace`` is atomic within one filesystem. A write that fails without saying so
(ITK's NIfTI writer on a full disk writes a truncated file and returns normally) is caught by the
checks before the rename: the temporary must exist, must not be empty, and must pass the
caller's own check (an image's header read back, a text's length). Any failure raises a
:class:`UserError` naming the target file, and nothing appears under the final name.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from unetpp3d.errors import UserError

# Suffixes that wrap another one: the format of "x.nii.gz" is ".nii.gz", of "x.img.nii" ".nii".
_WRAPPERS = (".gz", ".bz2", ".xz", ".zst")


def final_suffix(name: str) -> str:
    """The suffix that names a file's format: ``".nii.gz"`` for ``m.img.nii.gz``, ``".pt"`` for ``last.pt``.

    Only the last suffix counts (two when the last is a compression wrapper such as ``.gz``), so
    that a name with extra dots (``abdomen.img.nii.gz``, ``x.nii.nii.gz``) keeps its format.
    """
    suffixes = Path(name).suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() in _WRAPPERS:
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def temp_path_for(path: str | Path) -> Path:
    """A new, empty, uniquely named temporary file beside ``path`` that keeps its format suffix.

    The name is ``.<name without dots>.<random>.part<suffix in lower case>``: it starts with a dot so that a
    leftover of a killed process is never mistaken for a result, and holds no other dots, because
    writers that pick a format from the name also read the dots before it (ITK's NIfTI writer
    turns ``.x.img.part.nii.gz`` into an Analyze ``.hdr``/``.img`` pair, and ``x.nii.part.nii.gz``
    into ``x.nii.gz``).
    """
    path = Path(path)
    suffix = final_suffix(path.name)
    stem = path.name[: len(path.name) - len(suffix)].replace(".", "_")[:100] or "file"
    # Lower case: ITK's NIfTI writer refuses "x.NII.GZ", and no format here depends on case.
    fd, name = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".part{suffix.lower()}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    # mkstemp makes the file private (0600); give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def write_failed(path: str | Path, reason: str) -> UserError:
    """The error for a write that did not complete: names the file, says why and what to do."""
    return UserError(f"{path}: could not write the file ({reason}); nothing was written under this name — "
                     "check that the disk has free space and the folder is writable, then run again")


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"{os.strerror(exc.errno)}: the disk or quota is full"
    return exc.strerror or str(exc) or type(exc).__name__


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; not every filesystem lets a folder be opened or synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is checked, fsynced and renamed to ``path``.

    Args:
        path: the final file; its folder is created if needed.
        verify: called with the temporary path once the body has written it; raises
            :class:`UserError` (or ``OSError``) when what was written is not what was meant.

    Raises:
        UserError: naming ``path``, when the body or ``verify`` fails with an ``OSError`` (a full
            disk, a read-only folder), when the temporary is missing or empty afterwards, or
            when ``verify`` refuses it. The temporary is removed in every case.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_for(path)
    except OSError as exc:
        raise write_failed(path, _reason(exc)) from None
    try:
        try:
            yield tmp
            if not tmp.is_file():
                raise write_failed(path, "the writer left no file under the temporary name")
            with open(tmp, "rb+") as fh:
                fh.flush()
                os.fsync(fh.fileno())
                size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise write_failed(path, "the written file is empty")
            if verify is not None:
                verify(tmp)
            os.replace(tmp, path)
        except OSError as exc:
            raise write_failed(path, _reason(exc)) from None
        _fsync_folder(path.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _check_length(expected: int) -> Callable[[Path], None]:
    def verify(tmp: Path) -> None:
        size = tmp.stat().st_size
        if size != expected:
            raise OSError(errno.EIO, f"{size:,} of {expected:,} bytes reached the disk")

    return verify


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes atomically, checking that all of them reached the file.

    Raises:
        UserError: the file cannot be written completely (see :func:`atomic_path`).
    """
    path = Path(path)
    if not data:
        raise ValueError(f"{path}: refusing to write an empty file")
    with atomic_path(path, verify=_check_length(len(data))) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a UTF-8 text file atomically, checking that all of it reached the file.

    Raises:
        UserError: the file cannot be written completely (see :func:`atomic_path`).
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: str | Path, fieldnames: Sequence[str], rows: Iterable[Mapping[str, Any]],
                     ignore_extra: bool = False) -> Path:
    """Write a CSV table (header, then ``rows``) atomically, as :func:`atomic_write_text` does.

    Args:
        path: the ``.csv`` file.
        fieldnames: the columns, in order.
        rows: one mapping per row; missing columns are left empty.
        ignore_extra: drop keys that are not columns (else they raise ValueError).
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore" if ignore_extra else "raise",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())
