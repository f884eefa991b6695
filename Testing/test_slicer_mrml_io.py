"""VoCoSlicerLib.mrml_io on a real MRML scene (slicer-core wheel, no Slicer app, no fake modules).

Volumes use a non-identity direction (an oblique rotation) and anisotropic spacing so that any mix-up of
RAS/LPS, axis order or spacing shows up as a failure.
"""

from __future__ import annotations

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
slicer = pytest.importorskip("slicer")

from VoCoSlicerLib import mrml_io  # noqa: E402
from VoCoSlicerLib.labels_csv import LabelInfo, labels_csv_path, read_labels_csv, write_labels_csv  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0])
LABELS = [
    LabelInfo(1, "liver", (220, 20, 20), "SCT^123037004", "Anatomical Structure", "SCT^10200004", "Liver"),
    LabelInfo(2, "spleen", (20, 20, 220), "SCT^123037004", "Anatomical Structure", "SCT^78961009", "Spleen"),
    LabelInfo(3, "kidney", (20, 200, 20)),
    LabelInfo(5, "aorta", (250, 200, 0)),
]


def _matrix() -> np.ndarray:
    a, b = np.deg2rad(30.0), np.deg2rad(20.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = (rz @ rx) * np.array([0.7, 0.9, 2.5])  # columns = direction * spacing
    m[:3, 3] = [-12.5, 30.25, 7.0]
    return m


def _volume(name: str = "ct", shape=(12, 16, 20)):
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1500, size=shape).astype(np.int16)
    vol = slicer.util.addVolumeFromArray(arr, _matrix(), name=name)
    return vol, arr


def _sitk_on_grid(arr: np.ndarray, m: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((LPS @ (m[:3, :3] / spacing)).ravel().tolist())
    img.SetOrigin((LPS @ m[:3, 3]).tolist())
    return img


def _assert_geometry(img: sitk.Image, m: np.ndarray, tol: float) -> None:
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    np.testing.assert_allclose(img.GetSpacing(), spacing, atol=tol)
    np.testing.assert_allclose(np.array(img.GetDirection()).reshape(3, 3), LPS @ (m[:3, :3] / spacing), atol=tol)
    np.testing.assert_allclose(img.GetOrigin(), LPS @ m[:3, 3], atol=tol)


def _label_array(shape) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[2:6, 3:9, 4:12] = 1
    lab[7:11, 2:6, 3:8] = 2
    lab[1:4, 10:15, 14:19] = 5  # value 3 (kidney) absent on purpose
    return lab


def _segmented(slicer_core, tmp_path, name="seg"):
    vol, _ = _volume(f"{name}-ct")
    lab = _label_array(slicer.util.arrayFromVolume(vol).shape)
    path = tmp_path / f"{name}.nii.gz"
    sitk.WriteImage(_sitk_on_grid(lab, _matrix()), str(path))  # as the engine writes it (NIfTI, float32 header)
    write_labels_csv(LABELS, labels_csv_path(path))
    seg = mrml_io.segmentation_from_label_file(slicer_core.scene, path, read_labels_csv(labels_csv_path(path)), vol)
    return vol, lab, seg


@pytest.mark.parametrize("ext,tol", [(".nrrd", 1e-9), (".nii.gz", 1e-5)])
def test_volume_file_has_exact_geometry_and_voxels(slicer_core, tmp_path, ext, tol):
    vol, arr = _volume(f"geo{ext}")
    path = mrml_io.write_volume(vol, tmp_path / f"in{ext}")
    img = sitk.ReadImage(str(path))
    _assert_geometry(img, _matrix(), tol)
    assert np.array_equal(sitk.GetArrayFromImage(img), arr)
    np.testing.assert_allclose(mrml_io.ijk_to_ras(vol), _matrix(), atol=1e-12)


def test_label_file_becomes_named_coloured_segmentation(slicer_core, tmp_path):
    scene = slicer_core.scene
    sh = scene.GetSubjectHierarchyNode()
    vol, lab, _ = _volume("study-ct")[0], None, None
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    sh.SetItemParent(sh.GetItemByDataNode(vol) or sh.CreateItem(sh.GetSceneItemID(), vol), study)
    lab = _label_array(slicer.util.arrayFromVolume(vol).shape)
    path = tmp_path / "out.nii.gz"
    sitk.WriteImage(_sitk_on_grid(lab, _matrix()), str(path))
    seg = mrml_io.segmentation_from_label_file(scene, path, LABELS, vol)

    assert seg.GetName() == "study-ct segmentation"
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == \
        ["liver", "spleen", "kidney", "aorta"]
    for lb in LABELS:
        segment = segmentation.GetSegment(lb.name)
        np.testing.assert_allclose(segment.GetColor(), lb.rgb_float, atol=1e-6)
        arr = slicer.util.arrayFromSegmentBinaryLabelmap(seg, lb.name, vol)
        assert np.array_equal(arr.astype(bool), lab == lb.value), lb.name
    assert "^10200004^Liver" in segmentation.GetSegment("liver").GetTerminology()
    assert "Anatomical Structure" in segmentation.GetSegment("liver").GetTerminology()
    assert not slicer.util.arrayFromSegmentBinaryLabelmap(seg, "kidney", vol).any()  # empty, ready to paint
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()).GetID() == vol.GetID()
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
    assert scene.GetFirstNodeByName("vocoslicer-import") is None  # temporary label map removed


def test_unknown_label_values_and_wrong_grid_are_errors(slicer_core, tmp_path):
    vol, _ = _volume("err-ct")
    lab = _label_array(slicer.util.arrayFromVolume(vol).shape)
    lab[0, 0, 0] = 9
    bad_values = tmp_path / "bad_values.nii.gz"
    sitk.WriteImage(_sitk_on_grid(lab, _matrix()), str(bad_values))
    with pytest.raises(ValueError, match=r"\[9\]"):
        mrml_io.segmentation_from_label_file(slicer_core.scene, bad_values, LABELS, vol)
    shifted = _matrix()
    shifted[:3, 3] += [0.0, 0.0, 1.0]
    bad_grid = tmp_path / "bad_grid.nrrd"
    sitk.WriteImage(_sitk_on_grid(_label_array(lab.shape), shifted), str(bad_grid))
    with pytest.raises(mrml_io.GeometryError, match="bad_grid.nrrd"):
        mrml_io.segmentation_from_label_file(slicer_core.scene, bad_grid, LABELS, vol)


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz"])
def test_corrected_segmentation_exports_voxel_exact_cohort_label(slicer_core, tmp_path, ext):
    vol, lab, seg = _segmented(slicer_core, tmp_path, name=f"fix{ext.replace('.', '')}")
    expected = lab.copy()
    # the user's corrections: erase part of the liver, paint the missing kidney, grow the aorta
    liver = expected == 1
    liver[2:4] = False
    expected[(lab == 1) & ~liver] = 0
    kidney = np.zeros_like(lab, bool)
    kidney[8:11, 10:14, 12:17] = True
    expected[kidney] = 3
    aorta = lab == 5
    aorta[4:6, 10:15, 14:19] = True
    expected[aorta & (expected == 0)] = 5
    for sid, mask in (("liver", liver), ("kidney", kidney), ("aorta", expected == 5)):
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), seg, sid, vol)
    # a segment the user renamed keeps its label value through its tag
    seg.GetSegmentation().GetSegment("spleen").SetName("Spleen (corrected)")

    out = mrml_io.write_label_map(slicer_core.scene, seg, vol, LABELS, tmp_path / f"label{ext}")
    img = sitk.ReadImage(str(out))
    assert np.array_equal(sitk.GetArrayFromImage(img), expected)
    _assert_geometry(img, _matrix(), 1e-9 if ext == ".nrrd" else 1e-5)
    assert slicer_core.scene.GetFirstNodeByName("vocoslicer-export") is None


def test_user_added_segment_without_label_is_refused_unless_skipped(slicer_core, tmp_path):
    vol, lab, seg = _segmented(slicer_core, tmp_path, name="extra")
    seg.GetSegmentation().AddEmptySegment("tumour", "tumour", (1.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="tumour"):
        mrml_io.write_label_map(slicer_core.scene, seg, vol, LABELS, tmp_path / "x.nrrd")
    out = mrml_io.write_label_map(slicer_core.scene, seg, vol, LABELS, tmp_path / "x.nrrd", skip_unknown=True)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), lab)


def test_empty_segmentation_exports_background_on_the_grid(slicer_core, tmp_path):
    vol, arr = _volume("empty-ct")
    seg = slicer_core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    img = sitk.ReadImage(str(mrml_io.write_label_map(slicer_core.scene, seg, vol, LABELS, tmp_path / "e.nrrd")))
    assert img.GetSize() == arr.shape[::-1] and not sitk.GetArrayFromImage(img).any()
    _assert_geometry(img, _matrix(), 1e-9)


def test_classification_becomes_table_and_attribute(slicer_core):
    vol, _ = _volume("cls-ct")
    result = {"model": "demo-cls", "probabilities": {"normal": 0.2, "tumour": 0.7, "cyst": 0.1}}
    table = mrml_io.classification_to_table(slicer_core.scene, result, vol)
    t = table.GetTable()
    assert [t.GetColumn(0).GetValue(i) for i in range(3)] == ["tumour", "normal", "cyst"]
    np.testing.assert_allclose([t.GetColumn(1).GetValue(i) for i in range(3)], [0.7, 0.2, 0.1])
    assert vol.GetAttribute(mrml_io.CLASS_ATTRIBUTE) == "tumour"
    assert table.GetAttribute(mrml_io.PROBABILITY_ATTRIBUTE) == "0.7"
    engine = {"model": "m", "classes": ["x", "y"], "probabilities": [0.3, 0.7], "predicted": {"index": 1}}
    assert mrml_io.class_probabilities(engine) == [("y", 0.7), ("x", 0.3)]
    with pytest.raises(ValueError, match="2 classes but 1"):
        mrml_io.class_probabilities({"classes": ["x", "y"], "probabilities": [1.0]})
    listed = {"classes": [{"name": "a", "probability": 0.4}, {"class": "b", "prob": 0.6}]}
    assert mrml_io.class_probabilities(listed) == [("b", 0.6), ("a", 0.4)]
    with pytest.raises(ValueError):
        mrml_io.class_probabilities({"classes": []})


def test_present_values_fast_path_and_fallback():
    assert mrml_io.present_values(np.array([[0, 3], [3, 70000]], np.int32)) == {0, 3, 70000}  # beyond 16 bits
    assert mrml_io.present_values(np.array([0, 2, 2, 9], np.uint16)) == {0, 2, 9}
    assert mrml_io.present_values(np.array([-1, 0, 1], np.int16)) == {-1, 0, 1}
