"""Read and write the engine's labels CSV without importing the engine.

The engine's ``vocoslicer.labels`` pulls in its I/O package (SimpleITK, numpy) for atomic writes; the Slicer
process only needs to read the table next to a segmentation and write one next to a cohort label, so the small
format (``value,name,r,g,b,category_code,category_meaning,type_code,type_meaning``, colours 0-255) is parsed
here with :mod:`csv`.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

CSV_COLUMNS = ("value", "name", "r", "g", "b", "category_code", "category_meaning", "type_code", "type_meaning")


@dataclass(frozen=True)
class LabelInfo:
    """One structure of a label map (value 0, background, is never listed)."""

    value: int
    name: str
    rgb: tuple[int, int, int] = (128, 128, 128)
    category_code: str = ""  # "SCT^123037004"
    category_meaning: str = ""
    type_code: str = ""  # "SCT^10200004"
    type_meaning: str = ""

    @property
    def rgb_float(self) -> tuple[float, float, float]:
        """Colour as Slicer wants it (0..1)."""
        return (self.rgb[0] / 255.0, self.rgb[1] / 255.0, self.rgb[2] / 255.0)


class LabelsCsvError(ValueError):
    """The labels CSV cannot be used (message names the file and the problem)."""


def parse_labels_csv(text: str, source: str = "labels CSV") -> list[LabelInfo]:
    """Parse CSV text; only ``value`` and ``name`` are required, values must be unique and > 0."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"value", "name"} <= set(reader.fieldnames):
        raise LabelsCsvError(f"{source}: needs at least the columns value,name")
    labels: list[LabelInfo] = []
    for line, row in enumerate(reader, start=2):
        try:
            value = int(row["value"])
            rgb = tuple(int(row.get(c) or 128) for c in ("r", "g", "b"))
        except (TypeError, ValueError):
            raise LabelsCsvError(f"{source}: line {line}: value and r,g,b must be integers") from None
        if value == 0:
            continue
        extra = [(row.get(k) or "").strip() for k in CSV_COLUMNS[5:]]
        labels.append(LabelInfo(value, (row["name"] or "").strip(), rgb, *extra))  # type: ignore[arg-type]
    values = [lb.value for lb in labels]
    if len(set(values)) != len(values) or any(v < 0 for v in values):
        raise LabelsCsvError(f"{source}: label values must be unique and positive, got {values}")
    if any(not lb.name for lb in labels):
        raise LabelsCsvError(f"{source}: every label needs a name")
    return labels


def read_labels_csv(path: str | os.PathLike[str]) -> list[LabelInfo]:
    """Read a labels CSV file."""
    p = Path(path)
    if not p.is_file():
        raise LabelsCsvError(f"{p}: no such labels file")
    return parse_labels_csv(p.read_text(encoding="utf-8"), str(p))


def write_labels_csv(labels: list[LabelInfo], path: str | os.PathLike[str]) -> Path:
    """Write a labels CSV (temp file + rename, so a reader never sees half a table)."""
    p = Path(path)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for lb in labels:
        w.writerow([lb.value, lb.name, *lb.rgb, lb.category_code, lb.category_meaning, lb.type_code,
                    lb.type_meaning])
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, p)
    return p


def labels_csv_path(label_map_path: str | os.PathLike[str]) -> Path:
    """``seg.nii.gz`` -> ``seg.labels.csv``: the engine's convention for the table next to a label map."""
    p = Path(label_map_path)
    for ext in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha"):
        if p.name.lower().endswith(ext):
            return p.with_name(p.name[: -len(ext)] + ".labels.csv")
    return p.with_name(p.name + ".labels.csv")
