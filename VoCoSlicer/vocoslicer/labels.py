"""Label tables: value → name, colour and optional standard terminology codes.

One table travels with every model bundle, segmentation output and cohort case, so that Slicer can name and
colour segments and so that a corrected label can be checked against the model that will learn from it.
The CSV layout (``value,name,r,g,b[,category_code,category_meaning,type_code,type_meaning]``, colours 0-255)
is easy to edit by hand and maps onto a Slicer colour table with terminology.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vocoslicer.errors import UserError
from vocoslicer.io.atomic import atomic_write_text

CSV_COLUMNS = ("value", "name", "r", "g", "b", "category_code", "category_meaning", "type_code", "type_meaning")


@dataclass(frozen=True)
class Label:
    """One structure of a label map. ``value`` 0 is background and is not listed in tables."""

    value: int
    name: str
    rgb: tuple[int, int, int] = (128, 128, 128)
    category_code: str = ""  # e.g. "SCT^123037004" (Anatomical Structure)
    category_meaning: str = ""
    type_code: str = ""  # e.g. "SCT^10200004" (Liver)
    type_meaning: str = ""

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
                   *(str(d.get(k, "")) for k in ("category_code", "category_meaning", "type_code", "type_meaning")))


@dataclass(frozen=True)
class LabelTable:
    """An ordered set of labels with unique values > 0 and unique names."""

    labels: tuple[Label, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        values = [lb.value for lb in self.labels]
        names = [lb.name for lb in self.labels]
        if any(v <= 0 or v > 65535 for v in values):
            raise UserError(f"label values must be in 1..65535 (0 is background), got {sorted(values)}")
        if len(set(values)) != len(values):
            raise UserError(f"duplicate label values in label table: {sorted(values)}")
        if len(set(names)) != len(names):
            raise UserError(f"duplicate label names in label table: {names}")

    def __iter__(self) -> Iterator[Label]:
        return iter(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def values(self) -> list[int]:
        """Label values in table order."""
        return [lb.value for lb in self.labels]

    @property
    def max_value(self) -> int:
        """Largest value (so a network needs ``max_value + 1`` output channels)."""
        return max(self.values, default=0)

    def by_value(self, value: int) -> Label:
        """Look a label up by value."""
        for lb in self.labels:
            if lb.value == value:
                return lb
        raise KeyError(value)

    def by_name(self, name: str) -> Label:
        """Look a label up by (case-insensitive) name."""
        for lb in self.labels:
            if lb.name.lower() == name.lower():
                return lb
        raise KeyError(name)

    def check_values(self, present: Iterable[int], source: str = "label map") -> None:
        """Raise a clear error when a label map holds values this table does not define."""
        unknown = sorted({int(v) for v in present} - set(self.values) - {0})
        if unknown:
            raise UserError(f"{source}: label values {unknown} are not in the label table "
                            f"(known: {self.values})")

    def to_list(self) -> list[dict[str, Any]]:
        """JSON form used in model.json."""
        return [lb.to_dict() for lb in self.labels]

    @classmethod
    def from_list(cls, items: Iterable[dict[str, Any]]) -> LabelTable:
        """Inverse of :meth:`to_list`."""
        return cls(tuple(Label.from_dict(d) for d in items))

    def to_csv(self) -> str:
        """CSV text (header + one row per label)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for lb in self.labels:
            w.writerow([lb.value, lb.name, *lb.rgb, lb.category_code, lb.category_meaning, lb.type_code,
                        lb.type_meaning])
        return buf.getvalue()

    def write_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write the CSV atomically."""
        return atomic_write_text(path, self.to_csv())

    @classmethod
    def from_csv_text(cls, text: str, source: str = "labels CSV") -> LabelTable:
        """Parse CSV text; only ``value`` and ``name`` columns are required."""
        try:
            rows = list(csv.DictReader(io.StringIO(text)))
        except csv.Error as exc:
            raise UserError(f"{source}: not a readable CSV table ({exc})") from None
        if rows and not {"value", "name"} <= set(rows[0]):
            raise UserError(f"{source}: needs at least the columns value,name")
        labels = []
        for i, row in enumerate(rows, start=2):
            try:
                value = int(row["value"])
                rgb = tuple(int(row.get(c) or 128) for c in ("r", "g", "b"))
            except (TypeError, ValueError):
                raise UserError(f"{source}: line {i}: value and r,g,b must be integers") from None
            if value == 0:
                continue
            if not (row.get("name") or "").strip():
                raise UserError(f"{source}: line {i}: label {value} has no name")
            labels.append(Label(value, row["name"].strip(), rgb,  # type: ignore[arg-type]
                                *((row.get(k) or "").strip() for k in CSV_COLUMNS[5:])))
        return cls(tuple(labels))

    @classmethod
    def read_csv(cls, path: str | os.PathLike[str]) -> LabelTable:
        """Read a labels CSV file."""
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: no such labels file")
        try:
            text = p.read_text(encoding="utf-8-sig")  # a BOM (Excel's "CSV UTF-8") is fine
        except UnicodeDecodeError as exc:
            raise UserError(f"{p}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                            "save the labels table as UTF-8") from None
        except OSError as exc:
            raise UserError(f"{p}: cannot read the labels file ({exc.strerror or exc})") from None
        return cls.from_csv_text(text, str(p))
