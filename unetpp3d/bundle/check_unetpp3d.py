"""Refuse, in one line, to run a bundle where unetpp3d is missing or older than the bundle needs.

``unetpp3d export-bundle`` copies this file into every bundle as ``scripts/check_unetpp3d.py``,
and the first step of each config's ``initialize`` runs it (``runpy.run_path``) before anything
names a unetpp3d component. It therefore imports nothing from unetpp3d, which may be absent: it
finds the package with ``importlib.util.find_spec`` (without importing it) and reads the
``__version__`` line of the copy Python would import, falling back to the installed
distribution's metadata (``importlib.metadata``). The version needed is the bundle's own
``required_packages_version["unetpp3d"]`` in ``configs/metadata.json``, one folder up.

Run it alone to check an environment: ``python BUNDLE/scripts/check_unetpp3d.py``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

PACKAGE = "unetpp3d"


def _release(version: str) -> tuple[int, int, int]:
    """``"0.2.0rc1+local"`` -> ``(0, 2, 0)``, ``"0.2"`` -> ``(0, 2, 0)``: the release numbers that order versions."""
    numbers = [int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3]]
    major, minor, patch = numbers + [0] * (3 - len(numbers))
    return major, minor, patch


def install_command(required: str) -> str:
    """The pip command that installs unetpp3d at ``required`` or newer, with MONAI's bundle tools."""
    return f"pip install 'unetpp3d[bundle]>={required}'"


def installed_version() -> str | None:
    """The version of the unetpp3d that ``import unetpp3d`` would load, or None where there is none."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        return None
    if spec.origin and Path(spec.origin).is_file():
        match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""",
                          Path(spec.origin).read_text(encoding="utf-8", errors="replace"), re.MULTILINE)
        if match:
            return match.group(1)
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def problem(required: str, found: str | None) -> str | None:
    """Why unetpp3d ``found`` cannot run a bundle that needs ``required``, or None when it can."""
    if found is None:
        return (f"this bundle needs the unetpp3d package (>= {required}), which is not installed; "
                f"install it with: {install_command(required)}")
    if found == "unknown" or _release(found) < _release(required):
        return (f"this bundle needs unetpp3d >= {required}, but unetpp3d {found} is installed; "
                f"upgrade with: {install_command(required)}")
    return None


def required_version(metadata_path: str | Path) -> str:
    """``required_packages_version["unetpp3d"]`` of a bundle's ``configs/metadata.json``."""
    metadata = json.loads(Path(metadata_path).read_text(encoding="utf-8"))
    return str(metadata["required_packages_version"][PACKAGE])


def check(metadata_path: str | Path) -> None:
    """Return when the unetpp3d that would be imported can run the bundle.

    Raises:
        SystemExit: with a one-line message and the command that fixes it. A ``SystemExit``
            rather than an exception: Python prints its message without a traceback, and
            MONAI's config runner, which wraps exceptions, lets it through.
    """
    required = required_version(metadata_path)
    why = problem(required, installed_version())
    if why is not None:
        raise SystemExit(f"error: {why}")


if __name__ == "__main__":
    check(Path(__file__).resolve().parents[1] / "configs" / "metadata.json")
