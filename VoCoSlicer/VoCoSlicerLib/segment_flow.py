"""The VoCoSegment actions as scene-in, files-out steps: prepare a job's files, load its result back.

Each action is split around the background job: ``prepare_*`` writes the inputs and returns the command (and
the warm-worker request), the widget runs it, ``load_*`` turns the outputs into nodes. The segmentation keeps
its model and labels table as node attributes, so "Add to cohort" can later export it with the model's own
label values even after the job's temporary folder is gone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import slicer

from VoCoSlicerLib import cohort_view, mrml_io
from VoCoSlicerLib.labels_csv import LabelInfo, labels_csv_path, parse_labels_csv, read_labels_csv
from VoCoSlicerLib.params import DEMO_MODEL_ID, CohortParams, SegmentParams

LABELS_ATTRIBUTE = "VoCo.Labels"  # the model's labels table (CSV text) on a segmentation node
MODEL_ATTRIBUTE = "VoCo.ModelId"
VERSION_ATTRIBUTE = "VoCo.ModelVersion"


@dataclass
class Task:
    """One prepared job: its folder, input and output files, command and warm-worker request."""

    work_dir: Path
    input: Path
    output: Path
    args: list[str]
    request: dict[str, Any] = field(default_factory=dict)
    volume: Any = None  # the nodes the result belongs to, remembered at start (see check_target)
    segmentation: Any = None


class StaleResult(RuntimeError):
    """The job's target nodes left the scene (scene closed, node deleted) while it ran: its result is dropped."""


def check_target(scene: slicer.vtkMRMLScene, task: Task) -> None:
    """Raise :class:`StaleResult` unless the volume (and the segmentation) a job started for are still in
    ``scene``. Node objects, not IDs, are compared: after a scene close the next scene reuses the IDs."""
    for node in (task.volume, task.segmentation):
        if node is not None and not scene.IsNodePresent(node):
            raise StaleResult(f"{node.GetName()} is no longer in the scene (closed or deleted): result dropped")


def default_input_volume(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLScalarVolumeNode | None:
    """The first scalar volume that is not a label map (a label map is a scalar volume subclass)."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if not node.IsA("vtkMRMLLabelMapVolumeNode"):
            return node
    return None


EDITOR_SINGLETON_TAG = "VoCoSegment"


def segment_editor_node(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLSegmentEditorNode:
    """The embedded editor's node, as Slicer's SegmentEditor module keeps its own: one singleton per scene (it
    survives a scene close instead of a new node per scene)."""
    node = scene.GetSingletonNode(EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
        node.UnRegister(None)  # CreateNodeByClass hands over a reference (Slicer's SegmentEditor.py does the same)
        node.SetSingletonTag(EDITOR_SINGLETON_TAG)
        node = scene.AddNode(node)
    return node


def sync_editor(set_segmentation: Any, set_source_volume: Any, segmentation_node: Any, volume_node: Any) -> None:
    """Point the embedded editor at a segmentation and its source volume, in the order the editor accepts:
    it ignores a source volume while it has no segmentation (vtkSlicerSegmentEditorLogic::SetSourceVolumeNode),
    so a segmentation made with "Create new" or elsewhere was left without one."""
    set_segmentation(segmentation_node)
    if segmentation_node is not None:
        set_source_volume(volume_node)


def prepare_segment(volume_node: slicer.vtkMRMLVolumeNode, params: SegmentParams,
                    work_dir: str | os.PathLike[str],
                    segmentation_node: slicer.vtkMRMLSegmentationNode | None = None) -> Task:
    """Write the volume (NRRD, exact geometry) and build ``segment`` for a job and for the warm worker.
    ``segmentation_node``: the node the result will replace (remembered, like the volume)."""
    work = Path(work_dir)
    source = mrml_io.write_volume(volume_node, work / "input.nrrd")
    output = work / "segmentation.nii.gz"
    request = {"input": str(source), "output": str(output), "model": params.model or DEMO_MODEL_ID,
               "device": params.device, "fast": params.fast, **params.uncertainty_request(str(output))}
    return Task(work, source, output, params.segment_args(str(source), str(output)), request, volume_node,
                segmentation_node)


def load_segment_result(scene: slicer.vtkMRMLScene, task: Task, volume_node: slicer.vtkMRMLVolumeNode,
                        segmentation_node: slicer.vtkMRMLSegmentationNode | None = None,
                        artifact: dict[str, Any] | None = None) -> slicer.vtkMRMLSegmentationNode:
    """The job's label map + labels CSV -> segmentation node, remembering model and labels for the cohort.
    Raises :class:`StaleResult` when the job's volume or segmentation left the scene meanwhile."""
    check_target(scene, task)
    if not task.output.is_file():
        raise FileNotFoundError(f"{task.output}: the job reported success but wrote no segmentation")
    csv_path = Path(artifact["labels"]) if artifact and artifact.get("labels") else labels_csv_path(task.output)
    labels = read_labels_csv(csv_path)
    seg = mrml_io.segmentation_from_label_file(scene, task.output, labels, volume_node,
                                               segmentation_node=segmentation_node)
    seg.SetAttribute(LABELS_ATTRIBUTE, csv_path.read_text(encoding="utf-8"))
    if artifact:
        seg.SetAttribute(MODEL_ATTRIBUTE, str(artifact.get("model") or ""))
        seg.SetAttribute(VERSION_ATTRIBUTE, str(artifact.get("model_version") or ""))
    return seg


def labels_of(segmentation_node: slicer.vtkMRMLSegmentationNode) -> list[LabelInfo]:
    """The labels table a VoCo segmentation was created with (error for a segmentation made elsewhere)."""
    text = segmentation_node.GetAttribute(LABELS_ATTRIBUTE) if segmentation_node is not None else None
    if not text:
        raise ValueError("this segmentation was not made by a VoCo model: segment the volume first, then correct "
                         "it, so its label values are known")
    return parse_labels_csv(text, f"{segmentation_node.GetName()} labels")


def prepare_classify(volume_node: slicer.vtkMRMLVolumeNode, params: SegmentParams,
                     work_dir: str | os.PathLike[str]) -> Task:
    """Write the volume and build ``classify`` (result JSON next to it)."""
    work = Path(work_dir)
    source = mrml_io.write_volume(volume_node, work / "input.nrrd")
    output = work / "classification.json"
    request = {"input": str(source), "output": str(output), "model": params.model, "device": params.device}
    return Task(work, source, output, params.classify_args(str(source), str(output)), request, volume_node)


def load_classify_result(scene: slicer.vtkMRMLScene, task: Task, volume_node: slicer.vtkMRMLVolumeNode,
                         table_node: slicer.vtkMRMLTableNode | None = None) -> slicer.vtkMRMLTableNode:
    """The job's JSON -> table node (class, probability) with the top class as attributes (StaleResult as
    for a segmentation)."""
    check_target(scene, task)
    if not task.output.is_file():
        raise FileNotFoundError(f"{task.output}: the job reported success but wrote no classification")
    return mrml_io.classification_to_table(scene, json.loads(task.output.read_text(encoding="utf-8")), volume_node,
                                           table_node)


def prepare_cohort_case(scene: slicer.vtkMRMLScene, volume_node: slicer.vtkMRMLVolumeNode,
                        segmentation_node: slicer.vtkMRMLSegmentationNode | None, params: CohortParams,
                        work_dir: str | os.PathLike[str], corrected: bool = True) -> list[list[str]]:
    """Write a case (image; label on the image grid with the model's values, for a labelled case) and return
    the ``cohort`` commands that add it, with the model's id/version as provenance."""
    labels = labels_of(segmentation_node) if segmentation_node is not None else None
    files = cohort_view.write_case_files(scene, work_dir, volume_node, segmentation_node, labels)
    model_id = model_version = ""
    if segmentation_node is not None:
        model_id = segmentation_node.GetAttribute(MODEL_ATTRIBUTE) or ""
        model_version = segmentation_node.GetAttribute(VERSION_ATTRIBUTE) or ""
    return cohort_view.add_commands(params, files, model_id, model_version, corrected)
