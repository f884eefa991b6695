"""The model catalog as the GUI shows it: rows for the model manager table and entries for model selectors.

The catalog comes from ``python -m vocoslicer models list --json`` (run as a child process, since the catalog
code lives in the engine). Parsing is tolerant of extra fields and of a bare list or ``{"models": [...]}`` so
small engine changes do not break the panel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vocoslicer.contracts.models import version_key
from vocoslicer.contracts.paths import models_dir as models_dir  # the folder the model manager opens

COLUMNS = ("Model", "Version", "Task", "Status", "Size", "Licence")


@dataclass(frozen=True)
class ModelRow:
    """One model version in the catalog."""

    id: str
    version: str
    task: str = "segmentation"
    installed: bool = False
    size_bytes: int | None = None
    license: str = ""
    title: str = ""
    path: str = ""
    description: str = ""
    parent: str = ""  # the model this one was finetuned from

    @property
    def spec(self) -> str:
        """What ``--model`` takes: an installed path when known, else ``ID@VERSION``."""
        return self.path or (f"{self.id}@{self.version}" if self.version else self.id)

    @property
    def display_name(self) -> str:
        """Selector text, e.g. ``demo-abdomen 1.0.1 (finetuned from demo-abdomen@1.0.0)``."""
        text = f"{self.title or self.id} {self.version}".strip()
        return f"{text} (finetuned from {self.parent})" if self.parent else text

    def cells(self) -> tuple[str, ...]:
        """Texts for :data:`COLUMNS`."""
        return (self.title or self.id, self.version, self.task, "installed" if self.installed else "available",
                format_size(self.size_bytes), self.license)


def format_size(size_bytes: int | None) -> str:
    """Human-readable size ("" when unknown)."""
    if size_bytes is None:
        return ""
    size = float(size_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def _row(d: dict[str, Any]) -> ModelRow:
    size = d.get("size_bytes", d.get("size"))
    if size is None and d.get("size_mb") is not None:
        size = int(float(d["size_mb"]) * 1e6)
    parent = d.get("parent") or d.get("parent_model") or ""
    if isinstance(parent, dict):
        parent = f"{parent.get('id', '')}@{parent.get('version', '')}".strip("@")
    return ModelRow(
        id=str(d["id"]), version=str(d.get("version", "")), task=str(d.get("task", "segmentation")),
        installed=bool(d.get("installed", bool(d.get("path")))),
        size_bytes=int(size) if size is not None else None,
        license=str(d.get("license", d.get("licence", "")) or ""), title=str(d.get("title", d.get("name", "")) or ""),
        path=str(d.get("path", "") or ""), description=str(d.get("description", "") or ""), parent=str(parent))


def parse_catalog(text: str | dict | list) -> list[ModelRow]:
    """Rows from the JSON ``models list --json`` prints, installed first, then by id and version.

    The engine prints ``{"catalog": [...], "installed": [...]}``: downloadable entries and the bundles on disk.
    An installed bundle that is also in the catalog gets the catalog's size and licence. A bare list or
    ``{"models": [...]}`` is accepted too.
    """
    data = json.loads(text) if isinstance(text, str) else text
    if isinstance(data, dict) and ("catalog" in data or "installed" in data):
        entries = [d for d in data.get("catalog") or [] if isinstance(d, dict)]
        catalog = {(d.get("id"), str(d.get("version", ""))): d for d in entries}
        items = []
        for d in data.get("installed") or []:
            if isinstance(d, dict):
                base = catalog.pop((d.get("id"), str(d.get("version", ""))), {})
                items.append({**base, **{k: v for k, v in d.items() if v not in ("", None)}, "installed": True})
        items += [{**d, "installed": False} for d in catalog.values()]
    else:
        items = data.get("models", []) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError("model catalog: expected a list of models")
    rows = [_row(d) for d in items if isinstance(d, dict) and d.get("id")]
    return sorted(rows, key=lambda r: (not r.installed, r.id, version_key(r.version)))


def selectable(rows: list[ModelRow], task: str) -> list[ModelRow]:
    """Installed models for a task (segmentation/classification), newest version of each id first."""
    chosen = [r for r in rows if r.installed and r.task == task]
    chosen.sort(key=lambda r: version_key(r.version), reverse=True)
    return sorted(chosen, key=lambda r: r.id)  # a stable sort: each id keeps its newest version first


def find(rows: list[ModelRow], spec: str) -> ModelRow | None:
    """The row a ``--model`` spec refers to (path, ID@VERSION or ID = newest installed)."""
    for r in rows:
        if spec and spec in (r.path, f"{r.id}@{r.version}"):
            return r
    matches = [r for r in rows if r.id == spec and r.installed]
    return max(matches, key=lambda r: version_key(r.version)) if matches else None


def list_args() -> list[str]:
    """``models list --json``."""
    return ["models", "list", "--json"]


def download_args(row: ModelRow) -> list[str]:
    """``models download ID@VERSION --events stdout`` (verifies the sha256, installs into the model folder)."""
    return ["models", "download", f"{row.id}@{row.version}" if row.version else row.id, "--events", "stdout"]


def import_args(path: str) -> list[str]:
    """``models import PATH`` (a bundle folder or zip; offline installs)."""
    return ["models", "import", str(path)]


def remove_args(row: ModelRow) -> list[str]:
    """``models remove ID@VERSION``."""
    return ["models", "remove", f"{row.id}@{row.version}" if row.version else row.id]
