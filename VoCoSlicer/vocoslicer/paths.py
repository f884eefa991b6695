"""Where VoCoSlicer keeps user data: one user-writable home, overridable with ``VOCOSLICER_HOME``.

Models, run directories, preprocessing caches and GPU locks live here, never inside the Slicer extension's
install folder (which may be read-only and is replaced on every extension update).
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The VoCoSlicer home folder (created on first use)."""
    root = Path(os.environ.get("VOCOSLICER_HOME") or Path.home() / ".vocoslicer").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sub(name: str) -> Path:
    p = home() / name
    p.mkdir(parents=True, exist_ok=True)
    return p


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
