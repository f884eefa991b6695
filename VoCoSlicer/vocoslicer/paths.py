"""Where VoCoSlicer keeps user data (the rule is :mod:`vocoslicer.contracts.paths`), and the package resources.

``resources_dir`` stays here: it is where this package is installed, which only the engine needs.
"""

from __future__ import annotations

from pathlib import Path

from vocoslicer.contracts.paths import HOME_ENV, cache_dir, home, locks_dir, models_dir, runs_dir

__all__ = ["HOME_ENV", "cache_dir", "home", "locks_dir", "models_dir", "resources_dir", "runs_dir"]


def resources_dir() -> Path:
    """Read-only data shipped inside the package (demo model, sample catalog)."""
    return Path(__file__).resolve().parent / "resources"
