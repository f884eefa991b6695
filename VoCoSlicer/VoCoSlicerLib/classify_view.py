"""VoCoSegment's case classes and classification results, without Qt.

- The "Case class" combobox lists the cohort's classes (from ``cohort list --json``), accepts a new name, and
  several findings separated by ``;`` or ``,`` (multi-label). :func:`class_args` turns its text into the
  ``cohort add`` arguments, adding ``--new-class`` only when a name is really new (the engine refuses unknown names
  otherwise, so a typo is never silently a new class).
- A ``classify`` result becomes the table + node attributes of :func:`mrml_io.classification_to_table`; a
  multi-label result also gets a ``positive`` column and the positive findings as ``VoCo.Findings``; after a
  classification the combobox proposes the predicted class (or the positive findings).
"""

from __future__ import annotations

import json
import re
from typing import Any

import slicer
import vtk

from VoCoSlicerLib import mrml_io

FINDINGS_ATTRIBUTE = "VoCo.Findings"  # multi-label: the classes at probability >= 0.5, ";"-separated
MULTI_LABEL_ATTRIBUTE = "VoCo.MultiLabel"
_SEPARATORS = re.compile(r"[;,]")


def _data(list_json: dict[str, Any] | str) -> dict[str, Any]:
    return json.loads(list_json) if isinstance(list_json, str) else dict(list_json or {})


def class_items(list_json: dict[str, Any] | str) -> list[str]:
    """The combobox items: the cohort's class names in class-value order (empty for a cohort without classes)."""
    classes = _data(list_json).get("classes") or []
    return [str(c["name"]) for c in sorted(classes, key=lambda c: int(c.get("value", 0)))]


def counts_summary(list_json: dict[str, Any] | str) -> str:
    """``classes: normal 4, splenomegaly 3`` for the panel ("" without classes)."""
    counts = _data(list_json).get("class_counts") or {}
    return "classes: " + ", ".join(f"{k} {v}" for k, v in counts.items()) if counts else ""


def parse_class_text(text: str) -> list[str]:
    """Names typed in the combobox: ``;``/``,`` separate findings; blanks and repeats dropped."""
    out: list[str] = []
    for part in _SEPARATORS.split(text or ""):
        name = " ".join(part.split())
        if name and name.lower() not in (n.lower() for n in out):
            out.append(name)
    return out


def class_args(text: str, known: list[str]) -> list[str]:
    """``--class A [--class B] [--new-class]`` for ``cohort add``; [] when the field is empty (no class)."""
    names = parse_class_text(text)
    if not names:
        return []
    lower = {k.lower(): k for k in known}
    args: list[str] = []
    for n in names:
        args += ["--class", lower.get(n.lower(), n)]  # the cohort's spelling for a known name
    if any(n.lower() not in lower for n in names):
        args.append("--new-class")
    return args


def with_class(commands: list[list[str]], text: str, known: list[str]) -> list[list[str]]:
    """The ``cohort add`` command of ``segment_flow.prepare_cohort_case`` with the class arguments appended."""
    extra = class_args(text, known)
    if not extra:
        return commands
    out = [list(c) for c in commands]
    adds = [c for c in out if c[:2] == ["cohort", "add"]]
    if len(adds) != 1:
        raise ValueError(f"expected one 'cohort add' command, got {len(adds)}")
    adds[0].extend(extra)
    return out


def finetune_args(cohort_dir: str, init: str, run_dir: str, steps: int = 200, device: str = "auto",
                  arch: str = "", multi_label: bool | None = None) -> list[str]:
    """``finetune --task classification`` for a "Finetune classifier" action (the engine's recipe defaults:
    AdamW 3e-4, batch 4, warm-up 5 %, no AMP); ``init`` is ``voco-b-ssl``, a bundle, a checkpoint or ``scratch``."""
    if not cohort_dir:
        raise ValueError("choose a cohort folder first")
    if not init:
        raise ValueError("choose the starting weights (voco-b-ssl, a model or scratch)")
    args = ["finetune", "--task", "classification", "--cohort", str(cohort_dir), "--init", str(init), "--out",
            str(run_dir), "--steps", str(int(steps)), "--device", device]
    if arch:
        args += ["--arch", arch]
    if multi_label is not None:
        args.append("--multi-label" if multi_label else "--no-multi-label")
    return args


def proposed_text(result: dict[str, Any]) -> str:
    """What the combobox shows after Classify: the top class, or a multi-label result's positive findings."""
    if result.get("multi_label"):
        return "; ".join(result.get("positive") or [])
    pairs = mrml_io.class_probabilities(result)
    return pairs[0][0]


def show_result(scene: slicer.vtkMRMLScene, result: dict[str, Any], volume_node: slicer.vtkMRMLVolumeNode,
                table_node: slicer.vtkMRMLTableNode | None = None) -> slicer.vtkMRMLTableNode:
    """Table + attributes of a ``classify`` result (multi-label: a ``positive`` column and ``VoCo.Findings``)."""
    table = mrml_io.classification_to_table(scene, result, volume_node, table_node)
    multi = bool(result.get("multi_label"))
    for node in (table, volume_node):
        node.SetAttribute(MULTI_LABEL_ATTRIBUTE, "1" if multi else "0")
    if not multi:
        volume_node.RemoveAttribute(FINDINGS_ATTRIBUTE)
        return table
    positive = [str(p) for p in result.get("positive") or []]
    t = table.GetTable()
    col = vtk.vtkIntArray()
    col.SetName("positive")
    names = t.GetColumnByName("class")
    for i in range(t.GetNumberOfRows()):
        col.InsertNextValue(int(names.GetValue(i) in positive))
    t.AddColumn(col)
    table.Modified()
    for node in (table, volume_node):
        node.SetAttribute(FINDINGS_ATTRIBUTE, ";".join(positive))
    return table
