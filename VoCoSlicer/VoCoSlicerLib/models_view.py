"""The model catalog as the GUI shows it: rows for the model manager table and entries for model selectors.

The catalog comes from ``python -m vocoslicer models list --json`` (run as a child process, since the catalog
code lives in the engine). Parsing is tolerant of extra fields and of a bare list or ``{"models": [...]}`` so
small engine changes do not break the panel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vocoslicer.contracts.models import DEMO_MODEL_ID, version_key
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
    licence_url: str = ""

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
        path=str(d.get("path", "") or ""), description=str(d.get("description", "") or ""), parent=str(parent),
        licence_url=str(d.get("licence_url", d.get("license_url", "")) or ""))


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


# the real segmentation models the default prefers, best first (bigger VoComni = more accurate, same labels);
# other installed real segmentation models (imported, finetuned) follow, newest first
PREFERRED = ("vocomni-h", "vocomni-l", "vocomni-b")
RECOMMENDED_DOWNLOAD = "vocomni-b"  # offered on the first Segment when no real model is installed: the smallest
DEMO_TEXT = "Demo (synthetic phantoms only)"


def is_demo(row: ModelRow) -> bool:
    """The bundled demo model, or one finetuned from it: trained on synthetic phantoms, wrong on a real CT."""
    return row.id == DEMO_MODEL_ID or row.parent.split("@")[0] == DEMO_MODEL_ID


def best_segmentation(rows: list[ModelRow]) -> ModelRow | None:
    """The installed real segmentation model a user who just clicks Segment should get (None: only the demo)."""
    real = [r for r in selectable(rows, "segmentation") if not is_demo(r)]
    rank = {mid: i for i, mid in enumerate(PREFERRED)}
    return min(real, key=lambda r: rank.get(r.id, len(rank)), default=None)


@dataclass(frozen=True)
class Entry:
    """One item of VoCoSegment's model selector: an installed model, a model offered for download, the demo."""

    text: str
    spec: str  # what --model takes; for a download offer the catalog ID@VERSION
    kind: str  # "model", "download" or "demo"
    row: ModelRow | None = None


def selector_entries(rows: list[ModelRow]) -> list[Entry]:
    """Selector items, the default first: the best real segmentation model, the other installed models, then
    (when no real segmentation model is installed) VoComni-B to download, and the demo last."""
    best = best_segmentation(rows)
    models = [r for r in selectable(rows, "segmentation") if not is_demo(r) and r != best]
    models = ([best] if best else []) + models + selectable(rows, "classification")
    out = [Entry(f"{r.display_name}  [{r.task}]", r.spec, "model", r) for r in models]
    if best is None:
        offer = [r for r in rows if r.id == RECOMMENDED_DOWNLOAD and not r.installed]
        if offer:
            r = max(offer, key=lambda r: version_key(r.version))
            size = format_size(r.size_bytes)
            out.insert(0, Entry(f"{r.title or r.id} (download{', ' + size if size else ''})",
                                f"{r.id}@{r.version}" if r.version else r.id, "download", r))
    demos = [r for r in selectable(rows, "segmentation") if is_demo(r)]
    out += [Entry(DEMO_TEXT if r.id == DEMO_MODEL_ID else f"{r.display_name} (synthetic phantoms only)",
                  r.spec, "demo", r) for r in demos]
    if not demos:
        out.append(Entry(DEMO_TEXT, DEMO_MODEL_ID, "demo"))  # the engine bundles it even when unlisted
    return out


def default_index(entries: list[Entry], current: str) -> int:
    """Keep the user's choice when it is still offered; otherwise the first entry (the best real model)."""
    for i, e in enumerate(entries):
        if current and current in (e.spec, e.row.id if e.row else None):
            return i
    return 0


def info_text(entry: Entry | None) -> str:
    """The line under the selector: what the model is, and a warning for the demo."""
    if entry is None:
        return ""
    r = entry.row
    if entry.kind == "download" and r is not None:
        return (f"Not installed: Segment offers to download {r.title or r.id} {r.version} "
                f"({format_size(r.size_bytes) or 'size unknown'}). Licence: {r.license or 'not stated'}.")
    if entry.kind == "demo":
        return ("Trained on synthetic phantoms only: for trying the workflow, not for a real CT. "
                "Download a VoComni model in the VoCoSlicer module.")
    if r is None:
        return ""
    text = f"{r.title or r.id} {r.version}: {r.task}"
    return text + (f", finetuned from {r.parent}" if r.parent else "")


def download_question(entry: Entry) -> str:
    """The confirmation text before a download: what, how big, under which licence."""
    r = entry.row
    if r is None:
        return f"Download {entry.spec}?"
    lines = [f"{r.title or r.id} {r.version} is not installed. Download it now?", "",
             f"Size: {format_size(r.size_bytes) or 'unknown'}", f"Licence: {r.license or 'not stated'}"]
    if r.licence_url:
        lines.append(f"Licence details: {r.licence_url}")
    lines += ["", "The download runs in the background (progress below, Cancel stops it); the file's checksum "
              "is verified. Segmentation starts when it is installed."]
    return "\n".join(lines)



def list_args() -> list[str]:
    """``models list --json``."""
    return ["models", "list", "--json"]


def download_args(row: ModelRow) -> list[str]:
    """``models download ID@VERSION --events stdout`` (verifies the sha256, installs into the model folder)."""
    return ["models", "download", f"{row.id}@{row.version}" if row.version else row.id, "--events", "stdout"]


def import_args(path: str) -> list[str]:
    """``models import PATH`` (a bundle folder or zip, or a checkpoint; a picked ``model.json`` means its folder)."""
    p = Path(path)
    return ["models", "import", str(p.parent if p.name == "model.json" else p)]


def status_text(rows: list[ModelRow]) -> str:
    """``2 installed, 6 available`` under the model table."""
    installed = sum(r.installed for r in rows)
    return f"{installed} installed, {len(rows) - installed} available"


def remove_args(row: ModelRow) -> list[str]:
    """``models remove ID@VERSION``."""
    return ["models", "remove", f"{row.id}@{row.version}" if row.version else row.id]
