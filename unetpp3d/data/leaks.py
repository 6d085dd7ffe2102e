"""Data leaks: a validation or test scan that is a training scan under another name.

The manifest refuses a path listed twice, but a symlink, a hard link or a byte copy of a
training scan is another path to the same data, and a validation score on it measures
memory, not generalisation. Two scans are the same when their resolved paths are equal, when
they are one file on disk (device and inode: a hard link), or when their bytes are: sizes are
compared first, and only files of equal size are hashed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def _files(path: Path) -> list[Path]:
    """The file itself, or the files under a folder (a DICOM series) in a stable order."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _identity(path: Path) -> tuple[str, frozenset[tuple[int, int]], int]:
    """Resolved path, the (device, inode) of its files, and their total size."""
    stats = [os.stat(p) for p in _files(path)]
    return str(path.resolve()), frozenset((s.st_dev, s.st_ino) for s in stats), sum(s.st_size for s in stats)


def content_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files' bytes in name order (names not included).

    Args:
        path: a file or a DICOM series folder.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    for f in _files(Path(path)):
        with open(f, "rb") as fh:
            while block := fh.read(_CHUNK):
                digest.update(block)
        digest.update(b"\0")  # file boundary: two files are not their concatenation
    return digest.hexdigest()


def find_leaks(groups: dict[str, Sequence[Any]]) -> list[tuple[str, str, str]]:
    """Scans shared between the groups of a split (training, validation, test), however they are named.

    Only images are compared: a test case has no label, and a copied label alone is no leak.

    Args:
        groups: group name -> its cases (anything with ``name`` and ``image``), e.g.
            ``{"training": [...], "validation": [...], "test": [...]}``.

    Returns:
        ``(case, other, how)`` for each case that is the same scan as a case of an earlier group,
        ``case`` and ``other`` as ``"validation case003"``; ``how`` is ``"the same file (a
        symlink)"``, ``"a hard link"`` or ``"a byte copy"``. Unreadable files are left to the
        per-case checks.
    """
    seen: list[tuple[str, tuple[str, frozenset, int], Path]] = []
    hashes: dict[Path, str] = {}

    def digest(p: Path) -> str:
        if p not in hashes:
            hashes[p] = content_hash(p)
        return hashes[p]

    leaks = []
    for group, cases in groups.items():
        current = []
        for case in cases:
            image = Path(case.image)
            try:
                ident = _identity(image)
            except OSError:
                continue
            label = f"{group} case {case.name}"
            for other, (path, inodes, size), other_image in seen:
                if not other.startswith(group + " "):
                    how = None
                    if ident[0] == path:
                        how = "the same file (a symlink or another path to it)"
                    elif ident[1] & inodes:
                        how = "the same file on disk (a hard link)"
                    elif ident[2] == size:
                        try:
                            how = "a byte copy" if digest(image) == digest(other_image) else None
                        except OSError:
                            how = None
                    if how:
                        leaks.append((label, other, how))
                        break
            current.append((label, ident, image))
        seen.extend(current)
    return leaks


def leak_messages(groups: dict[str, Sequence[Any]]) -> list[tuple[str, str]]:
    """:func:`find_leaks` as ``(case name, message)`` pairs, one line each."""
    out = []
    for case, other, how in find_leaks(groups):
        out.append((case.split(" ", 2)[-1],
                    f"data leak: the image of {case} is {how} of {other}'s; a score on it would measure "
                    f"memory, not generalisation; remove one of them from the manifest"))
    return out
