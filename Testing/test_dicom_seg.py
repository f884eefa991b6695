"""DICOM SEG output: a round trip through highdicom on a generated DICOM series (Threshold known-answer model)."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers_batch import LABELS, box_volume, register_tiny, save_tiny_bundle, write_ct_series

from vocoslicer.cli import main
from vocoslicer.io import write_image
from vocoslicer.io.dicom_seg import read_dicom_seg_labels


@pytest.fixture(autouse=True)
def _tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    register_tiny()


def _series(tmp_path, img=None):
    return tmp_path / "dicom", write_ct_series(img or box_volume(1), tmp_path / "dicom")


def test_dicom_seg_round_trip_matches_label_map(tmp_path, capsys):
    bundle = save_tiny_bundle(tmp_path / "bundle")
    folder, files = _series(tmp_path)
    assert main(["segment", str(folder), "-o", str(tmp_path / "lab.nii.gz"), "--model", str(bundle),
                 "--device", "cpu"]) == 0
    assert main(["segment", str(folder), "-o", str(tmp_path / "seg.dcm"), "--model", str(bundle),
                 "--device", "cpu"]) == 0
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "lab.nii.gz")))
    assert 0 < np.count_nonzero(label) < label.size and set(np.unique(label)) == {0, 6}
    numbers, names = read_dicom_seg_labels(tmp_path / "seg.dcm", files)
    assert names == ["liver", "spleen"]  # every label of the model is a segment, in table order
    values = np.array([0, *LABELS.values])[numbers]  # segment number → label value
    np.testing.assert_array_equal(values, label)  # voxel for voxel, on the source grid

    seg = hd.seg.segread(str(tmp_path / "seg.dcm"))
    spleen = seg.get_segment_description(2)
    assert spleen.segmented_property_type.value == "78961009"
    assert spleen.segmented_property_type.scheme_designator == "SCT"
    assert spleen.segmented_property_category.value == "123037004"
    algo = spleen.algorithm_identification[0]
    assert algo.AlgorithmName == "thr-test" and algo.AlgorithmVersion == "1.2.3"
    assert "weights_sha256" in str(algo.AlgorithmParameters)
    source_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced and referenced <= source_uids
    assert str(seg.StudyInstanceUID) == str(pydicom.dcmread(files[0]).StudyInstanceUID)


def test_nifti_input_is_refused_without_a_dicom_source(tmp_path, capsys):
    bundle = save_tiny_bundle(tmp_path / "bundle")
    nii = write_image(box_volume(1), tmp_path / "ct.nii.gz")
    code = main(["segment", str(nii), "-o", str(tmp_path / "seg.dcm"), "--model", str(bundle), "--device", "cpu"])
    err = capsys.readouterr().err.strip()  # refused before any model is loaded
    assert code == 2 and "--dicom-source" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "seg.dcm").exists()


def test_nifti_input_with_its_dicom_source_writes_a_seg(tmp_path):
    bundle = save_tiny_bundle(tmp_path / "bundle")
    img = box_volume(2)
    folder, files = _series(tmp_path, img)
    nii = write_image(sitk.ReadImage([str(f) for f in files]), tmp_path / "ct.nii.gz")
    assert main(["segment", str(nii), "-o", str(tmp_path / "seg.dcm"), "--format", "dicom-seg", "--dicom-source",
                 str(folder), "--model", str(bundle), "--device", "cpu"]) == 0
    numbers, _ = read_dicom_seg_labels(tmp_path / "seg.dcm", files)
    assert np.count_nonzero(numbers == 2) == np.count_nonzero(sitk.GetArrayFromImage(img) > 50)


def test_dicom_source_on_another_grid_is_refused(tmp_path, capsys):
    bundle = save_tiny_bundle(tmp_path / "bundle")
    folder, _ = _series(tmp_path, box_volume(1))
    other = write_image(box_volume(1, shape_zyx=(10, 18, 22)), tmp_path / "other.nii.gz")
    code = main(["segment", str(other), "-o", str(tmp_path / "seg.dcm"), "--dicom-source", str(folder),
                 "--model", str(bundle), "--device", "cpu"])
    assert code == 2 and "grid" in capsys.readouterr().err
    assert not (tmp_path / "seg.dcm").exists()


def test_highdicom_advice_stays_out_of_the_terminal(tmp_path):
    import warnings

    bundle = save_tiny_bundle(tmp_path / "bundle")
    folder, files = _series(tmp_path)
    for f in files:  # a one-component patient name: highdicom warns about it
        ds = pydicom.dcmread(f)
        ds.PatientName = "P001"
        ds.save_as(f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning escaping write_dicom_seg would fail the command
        assert main(["segment", str(folder), "-o", str(tmp_path / "seg.dcm"), "--model", str(bundle),
                     "--device", "cpu"]) == 0


def test_batch_dicom_seg_refuses_non_dicom_inputs_up_front(tmp_path, capsys):
    bundle = save_tiny_bundle(tmp_path / "bundle")
    folder, _ = _series(tmp_path)
    nii = write_image(box_volume(1), tmp_path / "ct.nii.gz")
    code = main(["segment", str(folder), str(nii), "-o", str(tmp_path / "out"), "--format", "dicom-seg",
                 "--model", str(bundle)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "ct.nii.gz" in err and "--dicom-source" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
