"""Which files of a data folder a pretraining run trains on: the one input finder of every recipe.

Pretraining folders are usually segmentation data sets (nnU-Net ``imagesTr``/``labelsTr``, TotalSegmentator
``segmentations/``, ``*_seg.nii.gz`` next to the image). Training a self-supervised model on the label maps teaches
it masks, silently, so the rule is strict and the same for VoCo and PUMIT: a file is skipped when its name, or the
name of any folder between the given root and the file, has a word that starts with ``label``, ``seg``, ``mask`` or
``truth``. Files named on the command line are taken as given. Recipes differ only in the file types they read.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from vocoslicer.errors import UserError

LABEL_HINTS = ("label", "truth", "seg", "mask")  # word starts of label maps and their folders
IMAGE_2D_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_WORDS = re.compile(r"[_\-.\s]+")


def _volume_extensions() -> tuple[str, ...]:
    from vocoslicer.io.volume import VOLUME_EXTENSIONS

    return VOLUME_EXTENSIONS


@dataclass(frozen=True)
class Source:
    """An input volume: a file, or a DICOM series (folder + series UID)."""

    path: str
    series_uid: str | None = None

    def label(self) -> str:
        """Human-readable name for logs."""
        return self.path + (f" [{self.series_uid}]" if self.series_uid else "")

    def signature(self) -> dict[str, Any]:
        """Path + modification time + size: changes whenever the data may have changed."""
        p = Path(self.path)
        if p.is_dir():
            files = [f for f in p.rglob("*") if f.is_file()]
            st = [f.stat() for f in files]
            return {"path": str(p.resolve()), "uid": self.series_uid, "mtime_ns": max((s.st_mtime_ns for s in st),
                    default=0), "size": sum(s.st_size for s in st), "files": len(files)}
        s = p.stat()
        return {"path": str(p.resolve()), "mtime_ns": s.st_mtime_ns, "size": s.st_size}


def is_label_name(name: str) -> bool:
    """True for ``case_seg.nii.gz``, ``labelsTr``, ``masks``, ``ground_truth``... (any word starting with a hint)."""
    return any(word.startswith(LABEL_HINTS) for word in _WORDS.split(name.lower()))


def find_sources(paths: Sequence[str | os.PathLike[str]],
                 extensions: Sequence[str] | None = None) -> list[Source]:
    """Every image file (``extensions``, default: 3D volumes) and DICOM series below ``paths``, label maps skipped
    (see the module docstring); files are taken as given. Sorted, so every rank and every run sees one order."""
    from vocoslicer.io.volume import list_dicom_series

    exts = tuple(extensions) if extensions is not None else _volume_extensions()
    out: list[Source] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"{p}: no such file or folder")
        if p.is_file():
            out.append(Source(str(p)))
            continue
        dicom_dirs: set[Path] = set()
        for f in sorted(p.rglob("*")):
            if not f.is_file() or any(is_label_name(part) for part in f.relative_to(p).parts):
                continue
            name = f.name.lower()
            if name.endswith(exts):
                out.append(Source(str(f)))
            elif name.endswith(".dcm") or ("." not in name and f.stat().st_size > 132):
                dicom_dirs.add(f.parent)
        for d in sorted(dicom_dirs):
            out.extend(Source(str(d), s.uid) for s in list_dicom_series(d) if Path(s.files[0]).parent == d)
    return sorted(set(out), key=lambda s: (s.path, s.series_uid or ""))


def print_inputs(paths: Sequence[str | os.PathLike[str]] | None,
                 finder: Callable[[Sequence[str | os.PathLike[str]]], list[Source]] = find_sources,
                 out: TextIO | None = None) -> int:
    """``--list-inputs``: the volumes a run would train on, one per line on stdout; returns the exit code 0.

    ``finder`` is the recipe's (VoCo: :func:`find_sources`; PUMIT adds 2D images). Users check their folder with it
    before a week-long run, so it reads nothing but the folder listing (and DICOM headers) and builds no model.
    """
    if not paths:
        raise UserError("--data is required (folders or files of images)")
    sources = finder(paths)
    if not sources:
        raise UserError(f"{', '.join(map(str, paths))}: no images found")
    stream = out or sys.stdout
    for s in sources:
        stream.write(s.label() + "\n")
    stream.flush()
    return 0
