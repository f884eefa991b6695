"""One validator for every identifier that becomes part of a path, and the containment check for derived paths.

Model ids and versions, case ids and catalog file names arrive from flags, ``model.json``, cohort manifests and
catalogs that other people wrote; each ends up as a folder or file name (``models/<id>/<version>``,
``labels/<case>/``). A conservative character set with no separators and no ``.``/``..`` makes traversal
impossible by construction, and :func:`inside` re-checks every path after resolving symlinks, so a folder that
was replaced by a link to somewhere else is refused too. Standard library only (plus :mod:`vocoslicer.errors`),
so the Slicer glue can import it without torch or SimpleITK.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vocoslicer.errors import UserError

MAX_ID_LENGTH = 128
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# names Windows refuses as files whatever the extension (a cohort or model folder may live on a share)
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def id_problem(value: object) -> str | None:
    """Why ``value`` cannot be used as an id (None when it can)."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if len(value) > MAX_ID_LENGTH:
        return f"is longer than {MAX_ID_LENGTH} characters"
    if not _ID.fullmatch(value):
        return "may only use letters, digits, '.', '_', '+' and '-', starting with a letter or digit"
    if ".." in value or value.endswith("."):
        return "may not contain '..' or end with '.'"
    if value.split(".")[0].lower() in _RESERVED:
        return "is a reserved device name on Windows"
    return None


def check_id(value: object, what: str = "id") -> str:
    """Return ``value`` when it is a safe single path component, else raise a one-line :class:`UserError`."""
    problem = id_problem(value)
    if problem:
        raise UserError(f"{what} {value!r} {problem}")
    return str(value)


def inside(root: str | os.PathLike[str], path: str | os.PathLike[str], what: str = "path") -> Path:
    """Resolve ``path`` (relative paths are taken from ``root``) and require it to lie strictly inside ``root``.

    Both sides are resolved, so ``..`` components and symlinks pointing out of the root are caught. Returns the
    resolved path. Used before every read, write or delete of a path taken from a manifest or a bundle.
    """
    base = Path(root).resolve()
    p = Path(path)
    target = (p if p.is_absolute() else base / p).resolve()
    if target == base or not target.is_relative_to(base):
        raise UserError(f"{what} {str(path)!r} points outside {base}; refusing to use it")
    return target


def relative_inside(root: str | os.PathLike[str], rel: object, what: str = "path") -> Path:
    """A manifest's relative path: a string without absolute or ``..`` parts, resolving inside ``root``."""
    if not isinstance(rel, str) or not rel:
        raise UserError(f"{what} is missing or not a string")
    parts = Path(rel).parts
    if Path(rel).is_absolute() or "\\" in rel or any(part in ("..", ".") for part in parts):
        raise UserError(f"{what} {rel!r} must be a plain relative path inside {Path(root)}")
    return inside(root, rel, what)
