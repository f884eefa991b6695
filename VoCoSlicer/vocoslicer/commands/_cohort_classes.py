"""Case classes on the command line: ``cohort add --class``, ``cohort set-class``, ``cohort classes``, list output.

Kept apart from :mod:`vocoslicer.commands.cohort` so that the class vocabulary (classes.csv, --new-class) has one
home; ``cohort.py`` only calls the hooks below.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_class_args(v: argparse.ArgumentParser) -> None:
    """``--class NAME`` (repeatable: several = multi-label findings) and ``--new-class`` for ``cohort add``."""
    v.add_argument("--class", dest="classes", action="append", metavar="NAME",
                   help="case-level class of the image (repeat for several findings: multi-label)")
    v.add_argument("--new-class", action="store_true",
                   help="allow class names that are not yet in the cohort's classes.csv (they are added)")


def precheck(cohort: Any, args: argparse.Namespace) -> None:
    """Refuse unknown class names before the image is written."""
    if getattr(args, "classes", None):
        from vocoslicer.data.cohort_classes import check_names

        check_names(cohort, args.classes, allow_new=args.new_class)


def apply(cohort: Any, args: argparse.Namespace, case_id: str, prov: Any) -> int | None:
    """Record the classes of ``cohort add`` on the case; returns the class version (None without --class)."""
    if not getattr(args, "classes", None):
        return None
    from vocoslicer.data.cohort_classes import set_classes

    return set_classes(cohort, case_id, args.classes, provenance=prov, allow_new=args.new_class)


def list_json(data: dict[str, Any]) -> dict[str, Any]:
    """Extra top-level fields of ``cohort list --json``: the class list and counts per class."""
    from vocoslicer.data.cohort_classes import class_counts

    return {"classes": data.get("classes", []), "class_counts": class_counts(data)}


def case_json(data: dict[str, Any], case_id: str) -> dict[str, Any]:
    """Extra per-case fields of ``cohort list --json``."""
    versions = (data["cases"].get(case_id) or {}).get("class_versions") or []
    return {"classes": list(versions[-1]["classes"]) if versions else [], "class_versions": versions}


def case_text(data: dict[str, Any], case_id: str) -> str:
    """Classes column of ``cohort list``."""
    from vocoslicer.data.cohort_classes import describe_case

    text = describe_case((data["cases"].get(case_id) or {}).get("class_versions") or [])
    return f"  class {text}" if text else ""


def counts_text(data: dict[str, Any]) -> str | None:
    """``classes: normal 4, splenomegaly 3`` (None when the cohort has no classes)."""
    from vocoslicer.data.cohort_classes import class_counts

    counts = class_counts(data)
    return "classes: " + ", ".join(f"{k} {v}" for k, v in counts.items()) if counts else None


def _set_class(args: argparse.Namespace) -> int:
    from vocoslicer.commands.cohort import _open
    from vocoslicer.data.cohort import Provenance
    from vocoslicer.data.cohort_classes import set_classes

    cohort = _open(args)
    prov = Provenance(model_id=args.model_id or "", model_version=args.model_version or "",
                      corrected=not args.uncorrected, by=args.by or "", note=args.note or "")
    version = set_classes(cohort, args.case, args.names, provenance=prov, allow_new=args.new_class)
    print(json.dumps({"case": args.case, "class_version": version, "classes": _latest(cohort, args.case),
                      "cohort_version": cohort.version}))
    return 0


def _latest(cohort: Any, case_id: str) -> list[str]:
    versions = cohort.manifest["cases"][case_id].get("class_versions") or []
    return list(versions[-1]["classes"]) if versions else []


def _classes(args: argparse.Namespace) -> int:
    from vocoslicer.commands.cohort import _open
    from vocoslicer.data.cohort_classes import CohortClass, class_table, define_classes, read_classes_csv

    cohort = _open(args)
    if args.csv or args.add:
        table: list[CohortClass] = read_classes_csv(args.csv) if args.csv else []
        if args.add:
            current = class_table(cohort.manifest)
            known = {c.name.lower(): c for c in current + table}
            nxt = max((c.value for c in current + table), default=-1) + 1
            old = known.get(args.add.lower())
            table.append(CohortClass(old.value if old else nxt, old.name if old else args.add, args.snomed or ""))
        define_classes(cohort, table)
    data = cohort.manifest
    out = {"cohort_version": data["version"], **list_json(data)}
    print(json.dumps(out, indent=2), file=sys.stdout)
    return 0


def register_verbs(verbs: argparse._SubParsersAction) -> None:
    """Add ``cohort set-class`` and ``cohort classes``."""
    v = verbs.add_parser("set-class", help="give a case new classes (a new class version with provenance)")
    v.add_argument("cohort")
    v.add_argument("case", help="case id")
    v.add_argument("names", nargs="+", metavar="NAME", help="class name(s); several = multi-label findings")
    v.add_argument("--new-class", action="store_true", help="allow names not yet in classes.csv")
    v.add_argument("--model-id", help="bundle id of the model that proposed the class")
    v.add_argument("--model-version", help="version of that bundle")
    v.add_argument("--uncorrected", action="store_true", help="the class is a raw model proposal")
    v.add_argument("--by", help="who set the class (default: the current user)")
    v.add_argument("--note", help="free-text note")
    v.set_defaults(func=_set_class)

    v = verbs.add_parser("classes", help="show or extend the cohort's class list (classes.csv: value,name,snomed)")
    v.add_argument("cohort")
    v.add_argument("--csv", help="merge a value,name[,snomed] CSV into the class list")
    v.add_argument("--add", metavar="NAME", help="add one class (or set the SNOMED code of an existing one)")
    v.add_argument("--snomed", help="SNOMED CT code for --add (e.g. 16294009 for splenomegaly)")
    v.set_defaults(func=_classes)
