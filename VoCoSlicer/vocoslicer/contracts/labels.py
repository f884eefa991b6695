"""The labels CSV: value -> name, colour and optional standard terminology codes, one file next to every label map.

One table travels with every model bundle, segmentation output and cohort case, so that Slicer can name and
colour segments and so that a corrected label can be checked against the model that will learn from it. The
layout (``value,name,r,g,b[,category_code,category_meaning,type_code,type_meaning]``, colours 0-255) is easy to
edit by hand and maps onto a Slicer colour table with terminology. The engine (``vocoslicer.labels.LabelTable``)
and the Slicer side (``VoCoSlicerLib.labels_csv``) both read and write it through this module.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vocoslicer.contracts.atomic import atomic_write_text
from vocoslicer.contracts.errors import UserError

CSV_COLUMNS = ("value", "name", "r", "g", "b", "category_code", "category_meaning", "type_code", "type_meaning")
# label-map suffixes replaced by ``.labels.csv`` (compound ones first)
LABEL_MAP_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass(frozen=True)
class Label:
    """One structure of a label map. ``value`` 0 is background and is never listed in tables."""

    value: int
    name: str
    rgb: tuple[int, int, int] = (128, 128, 128)
    category_code: str = ""  # e.g. "SCT^123037004" (Anatomical Structure)
    category_meaning: str = ""
    type_code: str = ""  # e.g. "SCT^10200004" (Liver)
    type_meaning: str = ""

    @property
    def rgb_float(self) -> tuple[float, float, float]:
        """Colour as Slicer wants it (0..1)."""
        return (self.rgb[0] / 255.0, self.rgb[1] / 255.0, self.rgb[2] / 255.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON form used in model.json."""
        d = asdict(self)
        d["rgb"] = list(self.rgb)
        return {k: v for k, v in d.items() if v not in ("", None)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Label:
        """Inverse of :meth:`to_dict`."""
        rgb = tuple(int(c) for c in d.get("rgb", (128, 128, 128)))
        return cls(int(d["value"]), str(d["name"]), rgb,  # type: ignore[arg-type]
                   *(str(d.get(k, "")) for k in CSV_COLUMNS[5:]))


class LabelsCsvError(UserError, ValueError):
    """The labels CSV cannot be used (the message names the file and the problem). A :class:`UserError` for the
    engine's CLI (one line, exit 2), a ``ValueError`` for the Slicer side's error displays."""


def parse_label_rows(text: str, source: str = "labels CSV") -> list[Label]:
    """The rows of CSV text as labels, in file order, background (value 0) dropped; only the ``value`` and
    ``name`` columns are required. Value and name rules are the caller's (:func:`parse_labels_csv`,
    ``LabelTable``)."""
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
        fields = csv.DictReader(io.StringIO(text)).fieldnames
    except csv.Error as exc:  # e.g. a NUL byte: not a table a user could have meant
        raise LabelsCsvError(f"{source}: not a readable CSV table ({exc})") from None
    if fields is None or not {"value", "name"} <= set(fields):
        raise LabelsCsvError(f"{source}: needs at least the columns value,name")
    labels: list[Label] = []
    for line, row in enumerate(rows, start=2):
        try:
            value = int(row["value"])
            rgb = tuple(int(row.get(c) or 128) for c in ("r", "g", "b"))
        except (TypeError, ValueError):
            raise LabelsCsvError(f"{source}: line {line}: value and r,g,b must be integers") from None
        if value == 0:
            continue
        extra = [(row.get(k) or "").strip() for k in CSV_COLUMNS[5:]]
        labels.append(Label(value, (row["name"] or "").strip(), rgb, *extra))  # type: ignore[arg-type]
    return labels


def parse_labels_csv(text: str, source: str = "labels CSV") -> list[Label]:
    """Parse CSV text into labels whose values are unique and positive and which all have a name."""
    labels = parse_label_rows(text, source)
    values = [lb.value for lb in labels]
    if len(set(values)) != len(values) or any(v < 0 for v in values):
        raise LabelsCsvError(f"{source}: label values must be unique and positive, got {values}")
    if any(not lb.name for lb in labels):
        raise LabelsCsvError(f"{source}: every label needs a name")
    return labels


def read_labels_text(path: str | os.PathLike[str]) -> tuple[str, str]:
    """The text of a labels CSV file and the name to report it by."""
    p = Path(path)
    if not p.is_file():
        raise LabelsCsvError(f"{p}: no such labels file")
    try:
        return p.read_text(encoding="utf-8-sig"), str(p)  # a BOM (Excel's "CSV UTF-8") is fine
    except UnicodeDecodeError as exc:
        raise LabelsCsvError(f"{p}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                             "save the labels table as UTF-8") from None
    except OSError as exc:
        raise LabelsCsvError(f"{p}: cannot read the labels file ({exc.strerror or exc})") from None


def read_labels_csv(path: str | os.PathLike[str]) -> list[Label]:
    """Read a labels CSV file (see :func:`parse_labels_csv`)."""
    return parse_labels_csv(*read_labels_text(path))


def labels_to_csv(labels: Iterable[Label]) -> str:
    """CSV text: the header, then one row per label."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for lb in labels:
        w.writerow([lb.value, lb.name, *lb.rgb, lb.category_code, lb.category_meaning, lb.type_code,
                    lb.type_meaning])
    return buf.getvalue()


def write_labels_csv(labels: Iterable[Label], path: str | os.PathLike[str]) -> Path:
    """Write a labels CSV atomically (a reader never sees half a table)."""
    return atomic_write_text(path, labels_to_csv(labels))


def labels_csv_path(label_map_path: str | os.PathLike[str]) -> Path:
    """``seg.nii.gz`` -> ``seg.labels.csv``: where the table of a label map (or segmentation output) goes."""
    p = Path(label_map_path)
    for ext in LABEL_MAP_SUFFIXES:
        if p.name.lower().endswith(ext):
            return p.with_name(p.name[: -len(ext)] + ".labels.csv")
    return p.with_name(p.name + ".labels.csv")
