"""Volume I/O keeps geometry exact, writes atomically and rejects bad input with one clear line."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from helpers_io import ROTATED, make_volume, write_dicom_series

from vocoslicer.errors import UserError
from vocoslicer.io import geometry, list_dicom_series, read_image, same_grid, write_image
from vocoslicer.io.atomic import atomic_path


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_keeps_geometry_and_voxels(tmp_path, ext):
    img = make_volume()
    path = write_image(img, tmp_path / f"vol{ext}")
    back = read_image(path)
    assert same_grid(img, back, tol=1e-5)
    assert np.allclose(back.GetDirection(), ROTATED)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    # a second round trip is bit-identical in geometry too (no drift through float32 headers)
    again = read_image(write_image(back, tmp_path / f"again{ext}"))
    assert geometry(again).matches(geometry(back), tol=1e-6)


def test_dicom_series_round_trip(tmp_path):
    img = make_volume(shape_zyx=(5, 8, 9), spacing=(0.8, 0.8, 2.0))
    write_dicom_series(img, tmp_path / "dcm")
    back = read_image(tmp_path / "dcm")
    assert same_grid(img, back, tol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))


def test_folder_with_two_series_asks_for_one(tmp_path):
    a, b = make_volume(seed=1), make_volume(shape_zyx=(4, 7, 8), seed=2)
    write_dicom_series(a, tmp_path / "d" / "a", series_uid="1.2.3.4.1", description="arterial")
    write_dicom_series(b, tmp_path / "d" / "b", series_uid="1.2.3.4.2", description="venous")
    assert {s.uid for s in list_dicom_series(tmp_path / "d")} == {"1.2.3.4.1", "1.2.3.4.2"}
    with pytest.raises(UserError, match=r"2 DICOM series.*--series.*1\.2\.3\.4\.1.*arterial"):
        read_image(tmp_path / "d")
    chosen = read_image(tmp_path / "d", series_uid="1.2.3.4.2")
    assert chosen.GetSize() == b.GetSize()
    with pytest.raises(UserError, match="no series with UID 9.9"):
        read_image(tmp_path / "d", series_uid="9.9")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_empty_and_truncated_files(tmp_path):
    with pytest.raises(UserError) as e:
        read_image(tmp_path / "nope.nii.gz")
    assert "no such file" in _one_line(e) and "nope.nii.gz" in _one_line(e)
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        read_image(tmp_path / "empty.nii.gz")
    good = write_image(make_volume(shape_zyx=(20, 30, 30)), tmp_path / "good.nrrd", compress=False)
    data = good.read_bytes()
    (tmp_path / "trunc.nrrd").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        read_image(tmp_path / "trunc.nrrd")
    assert "trunc.nrrd" in _one_line(e)
    (tmp_path / "garbage.nii.gz").write_bytes(b"not an image at all" * 10)
    with pytest.raises(UserError, match="cannot read image"):
        read_image(tmp_path / "garbage.nii.gz")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match="folder is empty"):
        read_image(tmp_path / "emptydir")


def test_rejects_2d_4d_nan_and_bad_spacing(tmp_path):
    two_d = sitk.GetImageFromArray(np.zeros((8, 8), np.int16))
    write_image(two_d, tmp_path / "slice.nrrd")
    with pytest.raises(UserError, match="3D"):
        read_image(tmp_path / "slice.nrrd")
    four_d = sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), np.float32), isVector=False)
    sitk.WriteImage(four_d, str(tmp_path / "fourd.nii.gz"))
    with pytest.raises(UserError, match="4D"):
        read_image(tmp_path / "fourd.nii.gz")
    arr = np.zeros((4, 5, 6), np.float32)
    arr[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "nan.nii.gz"))  # as other tools write it
    write_image(sitk.GetImageFromArray(arr), tmp_path / "nan.nrrd")
    with pytest.raises(UserError, match="1 voxels are NaN"):
        read_image(tmp_path / "nan.nrrd")
    with pytest.raises(UserError, match="1 voxels are NaN"):
        read_image(tmp_path / "nan.nii.gz")
    # a NRRD header with a zero-length axis (zero spacing), as some broken exporters write
    (tmp_path / "zero.nhdr").write_text(
        "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 2 2 2\n"
        "space directions: (0,0,0) (0,1,0) (0,0,1)\nkinds: domain domain domain\nendian: little\n"
        "encoding: raw\nspace origin: (0,0,0)\ndata file: zero.raw\n")
    (tmp_path / "zero.raw").write_bytes(b"\0" * 16)
    with pytest.raises(UserError) as e:
        read_image(tmp_path / "zero.nhdr")
    assert "zero.nhdr" in _one_line(e)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"new but incomplete")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    with pytest.raises(UserError, match="unsupported output format"):
        write_image(make_volume(), tmp_path / "out.png")
