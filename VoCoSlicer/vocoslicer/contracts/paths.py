"""Where VoCoSlicer keeps user data: one user-writable home, overridable with ``VOCOSLICER_HOME``.

Models, run directories, preprocessing caches and GPU locks live here, never inside the Slicer extension's
install folder (which may be read-only and is replaced on every extension update). The Slicer side lists runs and
opens the models folder at the same places, so the rule is written once, here.

``create=False`` gives the path without making it: a client that only lists what is there must not leave empty
folders behind (and may not be allowed to write).
"""

from __future__ import annotations

import os
from pathlib import Path

from vocoslicer.contracts.errors import UserError

HOME_ENV = "VOCOSLICER_HOME"


def _folder(path: Path, what: str) -> Path:
    # a file (or a dangling link) where a folder belongs is the user's setup, not a crash: one line, exit 2
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is not a folder (a file is in the way)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be created ({exc.strerror or exc})") from None
    return path


def home(create: bool = True) -> Path:
    """The VoCoSlicer home folder (``$VOCOSLICER_HOME``, default ``~/.vocoslicer``), created unless ``create``
    is False."""
    env = os.environ.get(HOME_ENV)
    root = Path(env or Path.home() / ".vocoslicer").expanduser()
    return _folder(root, HOME_ENV if env else "the VoCoSlicer home folder") if create else root


def _sub(name: str, create: bool) -> Path:
    p = home(create) / name
    return _folder(p, "the VoCoSlicer folder") if create else p


def models_dir(create: bool = True) -> Path:
    """Installed model bundles (``<id>/<version>/model.json`` ...)."""
    return _sub("models", create)


def runs_dir(create: bool = True) -> Path:
    """Default parent of run directories."""
    return _sub("runs", create)


def cache_dir(create: bool = True) -> Path:
    """Preprocessing caches (bounded in size by their owners)."""
    return _sub("cache", create)


def locks_dir(create: bool = True) -> Path:
    """Inter-process locks (one file per GPU)."""
    return _sub("locks", create)
