"""Atomic file writes: write next to the target, fsync, then ``os.replace``.

A crash or a cancel at any point leaves either the old file or the new one, never a truncated file that a later
run would trust (model weights, cohort manifests, segmentations).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _suffixes(path: Path) -> str:
    # keep compound suffixes such as .nii.gz / .seg.nrrd so writers that pick a format by extension still work
    return "".join(path.suffixes[-2:]) if len(path.suffixes) >= 2 else path.suffix


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``path``, on error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name.split('.')[0]}.", suffix=".tmp" + _suffixes(target),
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
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
