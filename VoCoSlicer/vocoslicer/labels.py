"""Label tables: value → name, colour and optional standard terminology codes.

One table travels with every model bundle, segmentation output and cohort case, so that Slicer can name and
colour segments and so that a corrected label can be checked against the model that will learn from it.
The CSV layout (``value,name,r,g,b[,category_code,category_meaning,type_code,type_meaning]``, colours 0-255)
is easy to edit by hand and maps onto a Slicer colour table with terminology.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vocoslicer.contracts.labels import (
    CSV_COLUMNS,
    Label,
    labels_to_csv,
    parse_label_rows,
    read_labels_text,
    write_labels_csv,
)
from vocoslicer.errors import UserError

__all__ = ["CSV_COLUMNS", "Label", "LabelTable"]


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
        return labels_to_csv(self.labels)

    def write_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write the CSV atomically."""
        return write_labels_csv(self.labels, path)

    @classmethod
    def from_csv_text(cls, text: str, source: str = "labels CSV") -> LabelTable:
        """Parse CSV text; only ``value`` and ``name`` columns are required."""
        labels = parse_label_rows(text, source)
        for lb in labels:
            if not lb.name:
                raise UserError(f"{source}: label {lb.value} has no name")
        return cls(tuple(labels))

    @classmethod
    def read_csv(cls, path: str | os.PathLike[str]) -> LabelTable:
        """Read a labels CSV file."""
        return cls.from_csv_text(*read_labels_text(path))
