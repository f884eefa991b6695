"""Where VoCoSlicer keeps user data: one user-writable home, overridable with ``VOCOSLICER_HOME``.

Models, run directories, preprocessing caches and GPU locks live here, never inside the Slicer extension's
install folder (which may be read-only and is replaced on every extension update).
"""

from __future__ import annotations

import os
from pathlib import Path

from vocoslicer.errors import UserError


def _folder(path: Path, what: str) -> Path:
    # a file (or a dangling link) where a folder belongs is the user's setup, not a crash: one line, exit 2
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is not a folder (a file is in the way)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be created ({exc.strerror or exc})") from None
    return path


def home() -> Path:
    """The VoCoSlicer home folder (created on first use)."""
    env = os.environ.get("VOCOSLICER_HOME")
    root = Path(env or Path.home() / ".vocoslicer").expanduser()
    return _folder(root, "VOCOSLICER_HOME" if env else "the VoCoSlicer home folder")


def _sub(name: str) -> Path:
    return _folder(home() / name, "the VoCoSlicer folder")


def models_dir() -> Path:
    """Installed model bundles (``<id>/model.json`` ...)."""
    return _sub("models")


def runs_dir() -> Path:
    """Default parent of run directories."""
    return _sub("runs")


def cache_dir() -> Path:
    """Preprocessing caches (bounded in size by their owners)."""
    return _sub("cache")


def locks_dir() -> Path:
    """Inter-process locks (one file per GPU)."""
    return _sub("locks")


def resources_dir() -> Path:
    """Read-only data shipped inside the package (demo model, sample catalog)."""
    return Path(__file__).resolve().parent / "resources"
