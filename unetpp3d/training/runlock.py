"""One run per run folder: an OS file lock that any exit of its holder releases.

``unetpp3d train`` holds an exclusive ``fcntl.flock`` on ``RUN/.train.lock`` from before it
writes anything into the folder until it ends. The kernel drops the lock when the holder's file
descriptor closes, which includes a SIGKILL or a crash, so a stale lock never blocks a resume;
a second ``train`` into the same folder meanwhile is refused with the holder's PID. (POSIX
only; on a system without ``fcntl`` the lock is not taken.)
"""

from __future__ import annotations

import os
from pathlib import Path

from unetpp3d.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; the run folder is then not locked
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".train.lock"


class RunLock:
    """An exclusive lock on a run folder, held by this process until :meth:`release` or exit.

    Args:
        folder: the run folder (created by :meth:`acquire` when missing).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (a no-op when already held), recording this process's PID in the lock file.

        Raises:
            UserError: another process holds it; the message names its PID.
        """
        if self._fd is not None or fcntl is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held elsewhere
            holder = _read_pid(fd)
            os.close(fd)
            raise UserError(f"--out {self.folder}: another `unetpp3d train` (PID {holder}) is using this run "
                            f"folder; wait for it to end (or stop it), or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a process about to lock it)."""
        if self._fd is None:
            return
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"
