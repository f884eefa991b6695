"""Case-level classes of a cohort: the class list (``classes.csv``) and each case's class history.

Classification finetuning learns from these the way segmentation finetuning learns from label maps, so they follow
the same rules as :mod:`vocoslicer.data.cohort`: every change happens under the cohort lock and ends with an atomic
manifest replace (``version`` grows by one); re-classifying a case appends a version with its provenance (who,
when, which model proposed it) instead of overwriting; a case put in validation stays there.

A case may carry one class (single-label: normal / splenomegaly) or several (multi-label findings, as in CT-RATE).
Names are matched case-insensitively; a name that is not yet in the class list is refused unless the caller says
the list may grow (``allow_new``), because a typo must not silently become a new class that training then learns.
"""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vocoslicer.data.cohort import Cohort, Provenance
from vocoslicer.data.cohort_manifest import LOCK, assign_splits, file_lock
from vocoslicer.errors import UserError
from vocoslicer.io.atomic import atomic_write_text

CLASSES_CSV = "classes.csv"
MAX_NAME = 64


@dataclass(frozen=True)
class CohortClass:
    """One entry of the class list: its stable integer value, its name and an optional SNOMED CT code."""

    value: int
    name: str
    snomed: str = ""


@dataclass(frozen=True)
class ClassCase:
    """A class-labelled case as training sees it (latest class version)."""

    id: str
    image: Path
    split: str | None
    classes: tuple[str, ...]


def _clean(name: str) -> str:
    text = " ".join(str(name).split())
    if not text or len(text) > MAX_NAME or any(c in text for c in ",\"\n"):
        raise UserError(f"class name {name!r}: 1-{MAX_NAME} characters, no comma or quote")
    return text


def class_table(data: dict[str, Any]) -> list[CohortClass]:
    """The class list stored in a manifest, by value."""
    return sorted((CohortClass(int(c["value"]), str(c["name"]), str(c.get("snomed", "")))
                   for c in data.get("classes", [])), key=lambda c: c.value)


def table_csv(table: list[CohortClass]) -> str:
    """``classes.csv`` text: value,name,snomed."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["value", "name", "snomed"])
    for c in table:
        w.writerow([c.value, c.name, c.snomed])
    return buf.getvalue()


def read_classes_csv(path: str | Path) -> list[CohortClass]:
    """Read a ``value,name[,snomed]`` CSV (header optional) into a class list; duplicate values/names refused."""
    try:
        rows = list(csv.reader(Path(path).read_text(encoding="utf-8").splitlines()))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read classes table ({type(exc).__name__})") from None
    out: list[CohortClass] = []
    for row in rows:
        if not row or not "".join(row).strip() or row[0].strip().lower() == "value":
            continue
        try:
            value = int(row[0])
        except ValueError:
            raise UserError(f"{path}: class value {row[0]!r} is not an integer") from None
        if len(row) < 2:
            raise UserError(f"{path}: row {row} needs value,name")
        out.append(CohortClass(value, _clean(row[1]), row[2].strip() if len(row) > 2 else ""))
    _check_unique(out, str(path))
    if not out:
        raise UserError(f"{path}: the classes table is empty")
    return sorted(out, key=lambda c: c.value)


def _check_unique(table: list[CohortClass], source: str) -> None:
    values = [c.value for c in table]
    names = [c.name.lower() for c in table]
    if len(set(values)) != len(values) or len(set(names)) != len(names):
        raise UserError(f"{source}: class values and names must be unique")
    if any(v < 0 for v in values):
        raise UserError(f"{source}: class values must be >= 0")


def _resolve_names(table: list[CohortClass], names: list[str], allow_new: bool, source: str
                   ) -> tuple[list[CohortClass], list[str]]:
    """(table with any new names appended, canonical names); unknown names are an error unless ``allow_new``."""
    if not names:
        raise UserError(f"{source}: give at least one class name")
    by_name = {c.name.lower(): c for c in table}
    table = list(table)
    out: list[str] = []
    for raw in names:
        name = _clean(raw)
        known = by_name.get(name.lower())
        if known is None:
            if not allow_new:
                have = ", ".join(c.name for c in table) or "none yet"
                raise UserError(f"{source}: unknown class {name!r} (the cohort's classes: {have}); pass --new-class "
                                "to add it to the class list")
            known = CohortClass(max((c.value for c in table), default=-1) + 1, name)
            table.append(known)
            by_name[name.lower()] = known
        if known.name not in out:
            out.append(known.name)
    return table, out


def check_names(cohort: Cohort, names: list[str], allow_new: bool = False) -> list[str]:
    """Validate class names before anything is written (``cohort add`` calls this before adding the image)."""
    return _resolve_names(class_table(cohort.manifest), names, allow_new, str(cohort.root))[1]


def _save_table(cohort: Cohort, data: dict[str, Any], table: list[CohortClass]) -> None:
    listed = [{"value": c.value, "name": c.name, "snomed": c.snomed} for c in table]
    if listed != data.get("classes"):
        data["classes"] = listed
        atomic_write_text(cohort.root / CLASSES_CSV, table_csv(table))


def set_classes(cohort: Cohort, case_id: str, names: list[str], provenance: Provenance | None = None,
                allow_new: bool = False) -> int:
    """Give a case a new class version (a re-classification never overwrites); returns the class version."""
    with file_lock(cohort.root / LOCK):
        data = cohort._load()
        if case_id not in data["cases"]:
            raise UserError(f"{cohort.root}: no case {case_id!r}")
        table, canon = _resolve_names(class_table(data), names, allow_new, str(cohort.root))
        rec = data["cases"][case_id]
        versions = rec.setdefault("class_versions", [])
        version = len(versions) + 1
        versions.append({"version": version, "classes": canon,
                         "provenance": (provenance or Provenance(corrected=True)).to_dict()})
        _save_table(cohort, data, table)
        _assign_stratified(data)
        cohort._commit(data)
        return version


def define_classes(cohort: Cohort, table: list[CohortClass]) -> int:
    """Set or extend the class list (e.g. with SNOMED codes); an existing class may not change its value/name."""
    with file_lock(cohort.root / LOCK):
        data = cohort._load()
        current = {c.value: c for c in class_table(data)}
        merged = dict(current)
        for c in table:
            old = current.get(c.value)
            if old is not None and old.name.lower() != c.name.lower():
                raise UserError(f"class value {c.value} is {old.name!r} in the cohort, not {c.name!r}; cases already "
                                "carry that name")
            merged[c.value] = CohortClass(c.value, old.name if old else c.name, c.snomed or (old.snomed if old
                                                                                             else ""))
        out = sorted(merged.values(), key=lambda c: c.value)
        _check_unique(out, str(cohort.root))
        _save_table(cohort, data, out)
        return cohort._commit(data)


def _latest(rec: dict[str, Any]) -> tuple[str, ...] | None:
    versions = rec.get("class_versions") or []
    return tuple(versions[-1]["classes"]) if versions else None


def _assign_stratified(data: dict[str, Any]) -> None:
    """Give class-labelled cases without a split one, per (first) class, so each class has validation cases.

    Existing assignments never move (validation accuracy stays comparable across finetunes); the order within a
    class is the image hash, as for label maps.
    """
    ratio = float(data.get("val_ratio", 0.2))
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in data["cases"].values():
        names = _latest(rec)
        if names:
            groups.setdefault(names[0], []).append(rec)
    for recs in groups.values():
        assign_splits(recs, ratio)


def classes_of(cohort: Cohort) -> list[CohortClass]:
    """The cohort's class list."""
    return class_table(cohort.manifest)


def case_classes(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Class versions per case id (cases without classes are absent)."""
    return {cid: list(rec["class_versions"]) for cid, rec in data["cases"].items() if rec.get("class_versions")}


def class_counts(data: dict[str, Any]) -> dict[str, int]:
    """How many cases carry each class now (latest version), every listed class included."""
    counts: Counter[str] = Counter()
    for rec in data["cases"].values():
        counts.update(_latest(rec) or ())
    return {c.name: counts.get(c.name, 0) for c in class_table(data)}


def labelled_cases(cohort: Cohort) -> list[ClassCase]:
    """Every class-labelled case (latest class version) in id order, with absolute image paths."""
    data = cohort.manifest
    out = []
    for cid in sorted(data["cases"]):
        rec = data["cases"][cid]
        names = _latest(rec)
        if names:
            out.append(ClassCase(cid, cohort.root / rec["image"], rec.get("split"), names))
    return out


def describe_case(versions: list[dict[str, Any]]) -> str:
    """``splenomegaly (v2 by alice)`` for ``cohort list``."""
    if not versions:
        return ""
    last = versions[-1]
    prov = last.get("provenance") or {}
    who = f" by {prov['by']}" if prov.get("by") else ""
    when = time.strftime("%Y-%m-%d", time.localtime(prov["time"])) if prov.get("time") else ""
    return f"{'+'.join(last['classes'])} (v{last['version']}{who}{' ' + when if when else ''})"
