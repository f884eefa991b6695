"""Segmentation lands on exactly the input's grid, in the right place, whatever the input's geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers_io import run_cli
from helpers_models import Threshold

from vocoslicer.device import pick_device
from vocoslicer.errors import UserError
from vocoslicer.infer.segment import labels_csv_path, segment_image
from vocoslicer.labels import Label, LabelTable
from vocoslicer.models.bundle import ModelBundle, new_bundle_meta


def _bundle(spacing=(2.0, 2.0, 2.0)) -> ModelBundle:
    meta = new_bundle_meta("thr", "1.0.0", "segmentation", "tiny", {"out_channels": 2},
                           preprocessing={"spacing": list(spacing),
                                          "intensity": {"a_min": 0, "a_max": 100, "b_min": 0, "b_max": 1}},
                           inference={"roi_size": [16, 16, 16], "overlap": 0.25, "sw_batch_size": 2},
                           channel_values=[0, 7])
    return ModelBundle(meta=meta, labels=LabelTable((Label(7, "cube"),)))


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),
    (0, 1, 0, -1, 0, 0, 0, 0, 1),          # rotated in-plane
    (-1, 0, 0, 0, 0, 1, 0, -1, 0),         # axes swapped and flipped (e.g. a coronal acquisition)
])
def test_output_grid_and_position_match_input(direction):
    arr = np.zeros((30, 40, 50), np.int16)  # (z, y, x)
    arr[8:20, 10:30, 12:40] = 100  # an off-centre bright box: wrong flips/permutations would move it
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 1.1, 2.5))  # anisotropic
    img.SetOrigin((12.0, -30.0, 55.0))
    img.SetDirection(direction)
    label = segment_image(img, _bundle(), model=Threshold(), device="cpu")
    assert label.GetSize() == img.GetSize()
    assert np.allclose(label.GetSpacing(), img.GetSpacing())
    assert np.allclose(label.GetOrigin(), img.GetOrigin())
    assert np.allclose(label.GetDirection(), img.GetDirection())
    out = sitk.GetArrayFromImage(label)
    assert set(np.unique(out)) == {0, 7}  # channel 1 is written as the bundle's label value 7
    truth = arr == 100
    dice = 2 * np.logical_and(out == 7, truth).sum() / ((out == 7).sum() + truth.sum())
    assert dice > 0.9, dice


def test_small_volume_is_padded_not_rejected():
    img = sitk.GetImageFromArray(np.full((4, 5, 6), 100, np.int16))
    label = segment_image(img, _bundle(spacing=(1, 1, 1)), model=Threshold(), device="cpu")
    assert (sitk.GetArrayFromImage(label) == 7).all()


def test_one_device_picker_for_inference_and_training_ranks():
    """``auto`` means the same for segment and for a torchrun rank; ``local_rank`` only picks which GPU."""
    gpu = torch.cuda.is_available()
    assert pick_device("auto") == torch.device("cuda" if gpu else "cpu")
    assert pick_device(None) == pick_device("") == pick_device(" Auto ") == pick_device("auto")
    assert pick_device("CPU", local_rank=3) == torch.device("cpu")
    assert pick_device("auto", local_rank=0) == (torch.device("cuda", 0) if gpu else torch.device("cpu"))
    if gpu:
        assert pick_device("cuda", local_rank=0) == torch.device("cuda", 0)
        assert pick_device("cuda:0", local_rank=5) == torch.device("cuda", 0)  # an explicit index is kept
    else:
        with pytest.raises(UserError, match="no CUDA GPU"):
            pick_device("cuda", local_rank=1)


def test_device_and_task_errors():
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            pick_device("cuda")
    with pytest.raises(UserError, match="unknown device"):
        pick_device("tpu")
    b = _bundle()
    b.meta["task"] = "classification"
    with pytest.raises(UserError, match="not a segmentation model"):
        segment_image(sitk.Image(4, 4, 4, sitk.sitkInt16), b, model=Threshold(), device="cpu")


def test_labels_csv_path():
    assert labels_csv_path("a/seg.nii.gz").name == "seg.labels.csv"
    assert labels_csv_path("a/seg.seg.nrrd").name == "seg.labels.csv"


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    r = run_cli("segment", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "out.nii.gz"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing.nii.gz: no such file" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out.nii.gz").exists()
    r = run_cli("segment", "x", "-o", "y.nii.gz", "--overlap", "1.5")
    assert r.returncode == 2 and "--overlap" in r.stderr
    r = run_cli("no-such-command")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = run_cli("--help")
    assert r.returncode == 0 and "segment" in r.stdout


@pytest.fixture(autouse=True)
def _tiny_arch():
    from vocoslicer.models import factory

    with factory.temporary_architecture("tiny", lambda out_channels=2: Threshold()):
        yield
