"""JSON that refuses duplicate keys, for every file unetpp3d reads.

``json.loads`` keeps the last of two equal keys in an object, silently, and other readers keep
the first (or refuse): a manifest with ``"training"`` twice would mean one dataset to one tool
and another to the next. Every JSON input (manifests, splits, fingerprints, bundle metadata,
statistics) is read with :func:`strict_loads`, which refuses a duplicate key at any depth.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKeyError(json.JSONDecodeError):
    """An object holds one key twice; a :class:`json.JSONDecodeError`, so existing handlers catch it."""

    def __init__(self, key: str):
        ValueError.__init__(self, f"duplicate key {key!r} in one object; remove one of them")
        self.msg, self.doc, self.pos, self.lineno, self.colno = str(self), "", 0, 0, 0
        self.key = key

    def __reduce__(self):  # picklable across worker processes, like its parent
        return DuplicateKeyError, (self.key,)


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise DuplicateKeyError(key)
        data[key] = value
    return data


def strict_loads(text: str | bytes) -> Any:
    """:func:`json.loads`, refusing an object with a duplicate key (at any depth).

    Raises:
        json.JSONDecodeError: not JSON, or a :class:`DuplicateKeyError`.
    """
    return json.loads(text, object_pairs_hook=_unique)
