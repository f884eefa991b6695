"""MRML nodes <-> the files a job reads and writes, keeping every voxel and the exact grid.

The engine runs in a child process, so everything crosses a file boundary: the input volume goes out as NRRD
(double-precision geometry, unlike NIfTI's float32 header), the label map comes back on exactly that grid, and a
corrected segmentation goes to the cohort with the model's own label values. Every function takes the scene
explicitly (no ``slicer.mrmlScene``, no ``slicer.app``) so it runs the same in Slicer and on slicer-core.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from VoCoSlicerLib.labels_csv import LabelInfo

LABEL_VALUE_TAG = "VoCo.LabelValue"  # segment tag: the model label value a segment stands for
TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
GRID_TOLERANCE = 1e-4  # mm / direction cosine: NIfTI headers store float32


class GeometryError(ValueError):
    """A file that should lie on a volume's grid does not (message names the file and the difference)."""


def ijk_to_ras(volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """The volume's IJK-to-RAS matrix as a 4x4 numpy array."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_array(volume_node: slicer.vtkMRMLVolumeNode, copy: bool = True) -> np.ndarray:
    """The voxels in numpy (K, J, I) order (``copy=False``: a view onto VTK memory, valid while the node is)."""
    image = volume_node.GetImageData()
    dims = image.GetDimensions()
    scalars = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    return scalars.copy() if copy else scalars


def present_values(arr: np.ndarray) -> set[int]:
    """Distinct values of an integer label array (a histogram, not a sort: fast on whole CT label maps)."""
    if arr.size and np.issubdtype(arr.dtype, np.integer) and arr.min() >= 0 and arr.max() < 1 << 16:
        return {int(v) for v in np.flatnonzero(np.bincount(arr.ravel()))}
    return {int(v) for v in np.unique(arr)}


def write_volume(volume_node: slicer.vtkMRMLVolumeNode, path: str | os.PathLike[str],
                 compress: bool = False) -> Path:
    """Write a scalar volume (NRRD or NIfTI, by extension) for a job; geometry as Slicer holds it (IJK-to-RAS).

    A fresh storage node is used for every write: a reused one keeps relative names in its file list.
    """
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("no volume selected, or the volume has no voxels")
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise ValueError(f"{volume_node.GetName()}: needs a scalar (single-component) volume")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sn = slicer.vtkMRMLVolumeArchetypeStorageNode()
    sn.SetFileName(str(p))
    sn.SetUseCompression(1 if compress else 0)
    if not sn.WriteData(volume_node) or not p.is_file():
        raise OSError(f"{p}: could not write volume {volume_node.GetName()}")
    return p


def read_label_volume(scene: slicer.vtkMRMLScene, path: str | os.PathLike[str],
                      reference: slicer.vtkMRMLVolumeNode, name: str = "label") -> slicer.vtkMRMLLabelMapVolumeNode:
    """Load a label map file that must lie on ``reference``'s grid, then give it exactly that grid.

    Header round-off (NIfTI float32) is snapped to the reference; a real mismatch is an error, never a resample.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such label map")
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    sn = slicer.vtkMRMLVolumeArchetypeStorageNode()
    sn.SetFileName(str(p))
    if not sn.ReadData(node) or node.GetImageData() is None:
        scene.RemoveNode(node)
        raise OSError(f"{p}: could not read the label map")
    dims, ref_dims = node.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions()
    diff = float(np.abs(ijk_to_ras(node) - ijk_to_ras(reference)).max())
    if dims != ref_dims or diff > GRID_TOLERANCE * max(1.0, float(np.abs(ijk_to_ras(reference)).max())):
        scene.RemoveNode(node)
        raise GeometryError(f"{p}: label map grid {dims} differs from {reference.GetName()} grid {ref_dims} "
                            f"(max matrix difference {diff:.3g})")
    m = vtk.vtkMatrix4x4()
    reference.GetIJKToRASMatrix(m)
    node.SetIJKToRASMatrix(m)
    return node


def terminology_entry(label: LabelInfo) -> str:
    """Slicer's serialized terminology entry for a label with SNOMED codes ("" when the label has none)."""
    if not (label.category_code and label.type_code):
        return ""

    def code(c: str, meaning: str) -> str:
        scheme, _, value = c.partition("^")
        return f"{scheme}^{value}^{meaning}"

    cat = code(label.category_code, label.category_meaning)
    typ = code(label.type_code, label.type_meaning or label.name)
    return f"{TERMINOLOGY_CONTEXT}~{cat}~{typ}~^^~{ANATOMIC_CONTEXT}~^^~^^"


def _item(sh: slicer.vtkMRMLSubjectHierarchyNode, node: slicer.vtkMRMLNode) -> int:
    # in the app the subject hierarchy plugins create items for new nodes; on slicer-core nobody does
    item = sh.GetItemByDataNode(node)
    return item or sh.CreateItem(sh.GetSceneItemID(), node)


def place_next_to(scene: slicer.vtkMRMLScene, node: slicer.vtkMRMLNode,
                  volume_node: slicer.vtkMRMLVolumeNode) -> None:
    """Put ``node`` under the same subject-hierarchy parent (the study) as the volume it was computed from."""
    sh = scene.GetSubjectHierarchyNode()
    if sh is None:
        return
    parent = sh.GetItemParent(_item(sh, volume_node))
    if parent:
        sh.SetItemParent(_item(sh, node), parent)


def _segment_id(label: LabelInfo) -> str:
    return label.name


def segmentation_from_label_file(scene: slicer.vtkMRMLScene, label_path: str | os.PathLike[str],
                                 labels: Sequence[LabelInfo], volume_node: slicer.vtkMRMLVolumeNode,
                                 name: str | None = None,
                                 segmentation_node: slicer.vtkMRMLSegmentationNode | None = None,
                                 keep_empty: bool = True) -> slicer.vtkMRMLSegmentationNode:
    """A job's label map + labels table -> a segmentation node on the volume's geometry.

    One segment per label (ID = name), named, coloured, tagged with its label value and standard terminology;
    labels absent from the map stay as empty segments (``keep_empty``) so the user can paint them. The node is
    placed under the volume's study and follows the volume's parent transform. Values not in the table are an
    error: silently dropping voxels would corrupt a later cohort label.
    """
    labels = list(labels)
    lm = read_label_volume(scene, label_path, volume_node, name="vocoslicer-import")
    try:
        present = present_values(volume_array(lm, copy=False))
        unknown = sorted(present - {lb.value for lb in labels} - {0})
        if unknown:
            raise ValueError(f"{label_path}: label values {unknown} are not in the labels table")
        seg = segmentation_node or scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        seg.SetName(name or f"{volume_node.GetName()} segmentation")
        if seg.GetDisplayNode() is None:
            seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        seg.SetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole(), volume_node.GetID())
        seg.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        segmentation = seg.GetSegmentation()
        segmentation.RemoveAllSegments()
        for lb in labels:
            segmentation.AddEmptySegment(_segment_id(lb), lb.name, lb.rgb_float)
        ids = vtk.vtkStringArray()
        by_value = {lb.value: lb for lb in labels}
        for v in range(1, max(by_value, default=0) + 1):
            ids.InsertNextValue(_segment_id(by_value[v]) if v in by_value else "")
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lm, seg, ids):
            raise RuntimeError(f"{label_path}: could not import the label map into {seg.GetName()}")
        for lb in labels:
            segment = segmentation.GetSegment(_segment_id(lb))
            segment.SetName(lb.name)
            segment.SetColor(*lb.rgb_float)
            segment.SetTag(LABEL_VALUE_TAG, str(lb.value))
            entry = terminology_entry(lb)
            if entry:
                segment.SetTerminology(entry)
            if not keep_empty and lb.value not in present:
                segmentation.RemoveSegment(_segment_id(lb))
        place_next_to(scene, seg, volume_node)
        return seg
    finally:
        scene.RemoveNode(lm)


def segment_values(segmentation_node: slicer.vtkMRMLSegmentationNode, labels: Sequence[LabelInfo],
                   skip_unknown: bool = False) -> dict[str, int]:
    """Segment ID -> model label value, from the segment's tag, else its name (case-insensitive).

    A segment that maps to no label (a user-added structure) is an error unless ``skip_unknown``: the model
    cannot learn a class it does not have, and dropping it silently would mislabel those voxels as background.
    """
    by_name = {lb.name.lower(): lb.value for lb in labels}
    known = {lb.value for lb in labels}
    segmentation = segmentation_node.GetSegmentation()
    out: dict[str, int] = {}
    unknown = []
    for i in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(sid)
        tag = vtk.mutable("")
        value = None
        if segment.GetTag(LABEL_VALUE_TAG, tag) and str(tag).isdigit() and int(str(tag)) in known:
            value = int(str(tag))
        elif segment.GetName().lower() in by_name:
            value = by_name[segment.GetName().lower()]
        if value is None:
            unknown.append(segment.GetName())
        else:
            out[sid] = value
    if unknown and not skip_unknown:
        raise ValueError(f"segments {unknown} match no label of the model ({[lb.name for lb in labels]}); "
                         "rename or delete them")
    dup = sorted({v for v in out.values() if list(out.values()).count(v) > 1})
    if dup:
        raise ValueError(f"several segments carry the same label value(s) {dup}; merge or delete duplicates")
    return out


def export_label_volume(scene: slicer.vtkMRMLScene, segmentation_node: slicer.vtkMRMLSegmentationNode,
                        volume_node: slicer.vtkMRMLVolumeNode, labels: Sequence[LabelInfo],
                        skip_unknown: bool = False, name: str = "vocoslicer-export"
                        ) -> slicer.vtkMRMLLabelMapVolumeNode:
    """Segmentation -> label map node on exactly the volume's grid, voxels carrying the model's label values."""
    values = segment_values(segmentation_node, labels, skip_unknown)
    ct = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "vocoslicer-export-colors")
    try:
        ct.SetTypeToUser()
        ct.SetNumberOfColors(max(values.values(), default=0) + 1)
        ct.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
        segmentation = segmentation_node.GetSegmentation()
        for sid, v in values.items():  # the exporter matches segment names to colour names
            ct.SetColor(v, segmentation.GetSegment(sid).GetName(), 0.5, 0.5, 0.5, 1.0)
        lm = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
        ids = vtk.vtkStringArray()
        for sid in values:
            ids.InsertNextValue(sid)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, lm, volume_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, ct)
        if not ok or lm.GetImageData() is None:
            scene.RemoveNode(lm)
            raise RuntimeError(f"{segmentation_node.GetName()}: could not export to a label map")
        if values:  # an empty segmentation exports without voxels; make it an all-background map on the grid
            return lm
        image = vtk.vtkImageData()
        image.SetDimensions(volume_node.GetImageData().GetDimensions())
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        image.GetPointData().GetScalars().Fill(0)
        lm.SetAndObserveImageData(image)
        m = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(m)
        lm.SetIJKToRASMatrix(m)
        return lm
    finally:
        scene.RemoveNode(ct)


def write_label_map(scene: slicer.vtkMRMLScene, segmentation_node: slicer.vtkMRMLSegmentationNode,
                    volume_node: slicer.vtkMRMLVolumeNode, labels: Sequence[LabelInfo],
                    path: str | os.PathLike[str], skip_unknown: bool = False) -> Path:
    """Write the corrected segmentation as a label map file on the volume's grid (NRRD/NIfTI by extension).

    Goes through a label map node and the volume writer: the segmentation writer cannot write NIfTI (it writes
    NRRD content under a .nii.gz name).
    """
    lm = export_label_volume(scene, segmentation_node, volume_node, labels, skip_unknown)
    try:
        return write_volume(lm, path, compress=True)
    finally:
        scene.RemoveNode(lm)


CLASS_ATTRIBUTE = "VoCo.Class"  # node attribute: top class of the latest classification
PROBABILITY_ATTRIBUTE = "VoCo.ClassProbability"


def class_probabilities(result: dict) -> list[tuple[str, float]]:
    """Class probabilities from a ``classify`` result, highest first.

    The engine writes ``{"classes": [names], "probabilities": [p, ...], "predicted": {...}}``; a mapping
    ``{"probabilities": {name: p}}`` or ``{"classes": [{"name": .., "probability": ..}]}`` is accepted too, so
    small changes of the engine's JSON do not break the GUI.
    """
    classes, probs = result.get("classes"), result.get("probabilities")
    if isinstance(classes, list) and isinstance(probs, list) and all(isinstance(c, str) for c in classes):
        if len(classes) != len(probs):
            raise ValueError(f"classification result: {len(classes)} classes but {len(probs)} probabilities")
        pairs = [(c, float(p)) for c, p in zip(classes, probs, strict=True)]
    elif isinstance(probs, dict):
        pairs = [(str(k), float(v)) for k, v in probs.items()]
    elif isinstance(classes, list):
        pairs = []
        for c in classes:
            name = c.get("name", c.get("class", c.get("label")))
            prob = c.get("probability", c.get("prob", c.get("p")))
            if name is None or prob is None:
                raise ValueError(f"classification entry without name or probability: {c}")
            pairs.append((str(name), float(prob)))
    else:
        raise ValueError("classification result has neither 'probabilities' nor 'classes'")
    if not pairs:
        raise ValueError("classification result lists no classes")
    return sorted(pairs, key=lambda p: -p[1])


def classification_to_table(scene: slicer.vtkMRMLScene, result: dict, volume_node: slicer.vtkMRMLVolumeNode,
                            table_node: slicer.vtkMRMLTableNode | None = None) -> slicer.vtkMRMLTableNode:
    """A ``classify`` result -> table (class, probability; highest first), top class as attributes.

    The top class is stored on the table and on the volume (``VoCo.Class``) so scripts can use it.
    """
    pairs = class_probabilities(result)
    table = table_node or scene.AddNewNodeByClass("vtkMRMLTableNode")
    table.SetName(f"{volume_node.GetName()} classification")
    t = table.GetTable()
    t.Initialize()
    names, probs = vtk.vtkStringArray(), vtk.vtkDoubleArray()
    names.SetName("class")
    probs.SetName("probability")
    for n, p in pairs:
        names.InsertNextValue(n)
        probs.InsertNextValue(p)
    t.AddColumn(names)
    t.AddColumn(probs)
    table.Modified()
    top, p_top = pairs[0]
    for node in (table, volume_node):
        node.SetAttribute(CLASS_ATTRIBUTE, top)
        node.SetAttribute(PROBABILITY_ATTRIBUTE, f"{p_top:.6g}")
    if result.get("model"):
        table.SetAttribute("VoCo.Model", str(result["model"]))
    place_next_to(scene, table, volume_node)
    return table
