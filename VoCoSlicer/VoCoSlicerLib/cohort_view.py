"""The cohort as VoCoSegment shows it: case counts, and the files + commands behind "Add to cohort".

The cohort store itself (manifest, locking, label versions, provenance) is the engine's
(``vocoslicer cohort ...``); the Slicer side only writes the case files from the scene and runs the commands.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import slicer

from VoCoSlicerLib import mrml_io
from VoCoSlicerLib.labels_csv import LabelInfo, labels_csv_path, write_labels_csv
from VoCoSlicerLib.params import CohortParams

MANIFEST = "manifest.json"  # the engine's cohort manifest (vocoslicer/data/cohort_manifest.py)


@dataclass(frozen=True)
class CohortCounts:
    """How many cases the cohort holds, by kind."""

    total: int = 0
    labelled: int = 0
    train: int = 0
    val: int = 0
    version: int = 0

    @property
    def unlabelled(self) -> int:
        """Cases without any label (used by semi-supervised finetuning)."""
        return self.total - self.labelled

    def summary(self) -> str:
        """One line for the panel."""
        if not self.total:
            return "empty cohort"
        return (f"{self.total} cases: {self.labelled} labelled ({self.train} train, {self.val} validation), "
                f"{self.unlabelled} unlabelled")


def is_cohort(folder: str | os.PathLike[str]) -> bool:
    """True when the folder already holds a cohort manifest."""
    return bool(folder) and (Path(folder) / MANIFEST).is_file()


def counts_from_list(data: dict[str, Any] | str) -> CohortCounts:
    """Counts from the JSON ``cohort list --json`` prints."""
    if isinstance(data, str):
        data = json.loads(data)
    cases = data.get("cases", [])
    labelled = [c for c in cases if c.get("label")]
    return CohortCounts(total=len(cases), labelled=len(labelled),
                        train=sum(1 for c in labelled if c.get("split") == "train"),
                        val=sum(1 for c in labelled if c.get("split") == "val"),
                        version=int(data.get("version", 0) or 0))


def init_args(params: CohortParams, labels_csv: str | None = None) -> list[str]:
    """``cohort init COHORT [--labels CSV]``: run once before the first add to a new folder."""
    args = ["cohort", "init", params.cohortDir]
    return [*args, "--labels", str(labels_csv)] if labels_csv else args


@dataclass(frozen=True)
class CaseFiles:
    """The files written from the scene for one cohort case."""

    image: Path
    label: Path | None = None
    labels_csv: Path | None = None


def write_case_files(scene: slicer.vtkMRMLScene, folder: str | os.PathLike[str],
                     volume_node: slicer.vtkMRMLVolumeNode,
                     segmentation_node: slicer.vtkMRMLSegmentationNode | None = None,
                     labels: list[LabelInfo] | None = None, skip_unknown: bool = False) -> CaseFiles:
    """Write the image and, for a labelled case, the label map on its exact grid plus the model's labels table.

    NRRD keeps the double-precision geometry, so the engine's same-grid check sees exactly the volume's grid.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = mrml_io.write_volume(volume_node, folder / "image.nrrd", compress=True)
    if segmentation_node is None:
        return CaseFiles(image)
    if not labels:
        raise ValueError("the model's labels table is needed to write a label map with its label values")
    label = mrml_io.write_label_map(scene, segmentation_node, volume_node, labels, folder / "label.nrrd",
                                    skip_unknown=skip_unknown)
    csv_path = write_labels_csv(labels, labels_csv_path(label))
    return CaseFiles(image, label, csv_path)


def add_commands(params: CohortParams, files: CaseFiles, model_id: str = "", model_version: str = "",
                 corrected: bool = True) -> list[list[str]]:
    """The engine commands that add the case: ``cohort init`` first when the folder is not a cohort yet."""
    cmds = []
    if not is_cohort(params.cohortDir):
        cmds.append(init_args(params, str(files.labels_csv) if files.labels_csv else None))
    cmds.append(params.add_args(str(files.image), str(files.label) if files.label else None,
                                str(files.labels_csv) if files.labels_csv else None, model_id, model_version,
                                corrected))
    return cmds
