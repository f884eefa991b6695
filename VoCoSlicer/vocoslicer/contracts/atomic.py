"""Atomic file writes: write next to the target, fsync, then ``os.replace``.

A crash or a cancel at any point leaves either the old file or the new one, never a truncated file that a later
run would trust (model weights, cohort manifests, segmentations).

Temporary files and folders are created with modes 0666/0777 *minus the umask*, like any ordinary file:
``tempfile.mkstemp``/``mkdtemp`` use 0600/0700, and after the rename that private mode would stick to the final
file, so colleagues sharing a cohort or models folder could not read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _suffixes(path: Path) -> str:
    # keep compound suffixes such as .nii.gz / .seg.nrrd so writers that pick a format by extension still work
    return "".join(path.suffixes[-2:]) if len(path.suffixes) >= 2 else path.suffix


def make_temp_file(folder: str | os.PathLike[str], prefix: str = ".", suffix: str = ".tmp") -> Path:
    """Create an empty, uniquely named file in ``folder`` (mode 0666 minus the umask) and return its path."""
    for _ in range(100):
        path = Path(folder) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"{folder}: could not create a unique temporary file")


def make_temp_dir(folder: str | os.PathLike[str], prefix: str = ".", suffix: str = ".tmp") -> Path:
    """Create a uniquely named folder in ``folder`` (mode 0777 minus the umask) and return its path."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        path = Path(folder) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{folder}: could not create a unique temporary folder")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``path``, on error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_file(target.parent, prefix=f".{target.name.split('.')[0]}.", suffix=".tmp" + _suffixes(target))
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    """Write JSON atomically (sorted keys would reorder user-facing files, so insertion order is kept)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
