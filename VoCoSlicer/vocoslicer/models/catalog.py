"""The catalog of official VoCo weights: what can be downloaded, and the label tables its entries name.

``resources/models.json`` lists what can be downloaded (id, version, URL, size, sha256 when published, licence,
task, architecture, labels). An official ``.pt`` is never used as is: :mod:`vocoslicer.models.convert` turns it
into a bundle (``model.json`` + ``weights.safetensors`` + ``labels.csv``) so that every consumer reads one format.
``VOCOSLICER_CATALOG`` points to another catalog file (tests, mirrors, institutional copies). Reading the catalog
needs no torch (``models list`` stays quick).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vocoslicer.errors import UserError
from vocoslicer.ids import id_problem
from vocoslicer.labels import LabelTable
from vocoslicer.paths import resources_dir

CATALOG_FORMAT = "vocoslicer-catalog/1"


@dataclass(frozen=True)
class CatalogEntry:
    """One downloadable model."""

    id: str
    version: str
    title: str
    url: str
    filename: str
    task: str
    architecture: dict[str, Any]
    description: str = ""
    size_bytes: int | None = None
    size_exact: bool = False
    sha256: str | None = None
    licence: str = ""
    licence_url: str = ""
    labels: str | None = None  # name of a table in resources/labels (without .csv)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)
    source: str = "official"
    citation: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str) -> CatalogEntry:
        """Validate one catalog record."""
        missing = [k for k in ("id", "version", "url", "filename", "task", "architecture") if not d.get(k)]
        if missing:
            raise UserError(f"{origin}: catalog entry {d.get('id', '?')!r} lacks {', '.join(missing)}")
        for key in ("id", "version", "filename"):  # each becomes a file or folder name under the models home
            problem = id_problem(d[key])
            if problem:
                raise UserError(f"{origin}: catalog entry {key} {d[key]!r} {problem}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``models list --json``)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def catalog_path() -> Path:
    """The catalog in use: ``VOCOSLICER_CATALOG`` or the one shipped in the package."""
    env = os.environ.get("VOCOSLICER_CATALOG")
    return Path(env).expanduser() if env else resources_dir() / "models.json"


def load_catalog(path: str | os.PathLike[str] | None = None) -> list[CatalogEntry]:
    """Read and validate the catalog."""
    p = Path(path) if path is not None else catalog_path()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{p}: model catalog not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{p}: unreadable model catalog ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise UserError(f"{p}: a catalog is a JSON object with a 'models' list")
    entries = [CatalogEntry.from_dict(d, str(p)) for d in data["models"]]
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise UserError(f"{p}: duplicate model ids in the catalog")
    return entries


def find_entry(key: str, entries: list[CatalogEntry] | None = None) -> CatalogEntry | None:
    """Look an entry up by id (``ID`` or ``ID@VERSION``) or by its official file name."""
    entries = load_catalog() if entries is None else entries
    model_id, _, version = key.partition("@")
    for e in entries:
        if (e.id == model_id and (not version or e.version == version)) or e.filename == key:
            return e
    return None


def label_table(name: str) -> LabelTable:
    """A label table shipped in ``resources/labels`` (``btcv``, ``vocomni``)."""
    path = resources_dir() / "labels" / f"{name}.csv"
    if not path.is_file():
        raise UserError(f"unknown label table {name!r} (no {path.name} in the package resources)")
    return LabelTable.read_csv(path)
