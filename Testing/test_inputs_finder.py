"""One input finder for every pretraining recipe: label maps of segmentation data sets are never training images.

Issue 16: PUMIT's finder took ``labelsTr/case_001.nii.gz`` and ``case_002_seg.nii.gz`` as images while VoCo's kept
only the images. Both now use :func:`vocoslicer.data.sources.find_sources`; ``--list-inputs`` shows the result.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from vocoslicer.cli import main
from vocoslicer.data.anisotropy import find_inputs
from vocoslicer.data.cache import find_sources

ROOT = Path(__file__).resolve().parents[1]

IMAGES = ["case_002.nii.gz", "imagesTr/case_001_0000.nii.gz", "imagesTs/case_009_0000.nrrd"]
LABELS = ["labelsTr/case_001.nii.gz", "labelsTs/case_009.nrrd", "case_002_seg.nii.gz", "case_003_label.nii.gz",
          "case_004_labels.mha", "case_005_mask.nii.gz", "case_006.seg.nrrd", "seg/case_007.nii.gz",
          "label/case_008.nii.gz", "segmentations/liver.nii.gz", "masks/lung.nii.gz", "ground_truth/c.nii.gz",
          "case_010_truth.nii.gz"]
PHOTOS = ["photos/skin_001.png"]


def _write(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.uint8)), str(path))
    else:
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.int16)), str(path))


@pytest.fixture()
def nnunet_folder(tmp_path: Path) -> Path:
    root = tmp_path / "Dataset001_Phantom"
    for name in IMAGES + LABELS + PHOTOS:
        _write(root / name)
    return root


def _rel(sources, root: Path) -> list[str]:
    return sorted(Path(s.path).relative_to(root).as_posix() for s in sources)


def test_voco_and_pumit_find_the_same_volumes_and_no_label_map(nnunet_folder):
    voco = _rel(find_sources([nnunet_folder]), nnunet_folder)
    pumit = _rel(find_inputs([nnunet_folder]), nnunet_folder)
    assert voco == sorted(IMAGES)
    assert pumit == sorted(IMAGES + PHOTOS)  # PUMIT also reads 2D images; nothing else differs


def test_files_named_on_the_command_line_are_taken_as_given(nnunet_folder):
    label = nnunet_folder / "labelsTr" / "case_001.nii.gz"
    assert [s.path for s in find_inputs([label])] == [str(label)]
    assert [s.path for s in find_sources([label])] == [str(label)]


@pytest.mark.parametrize("method", ["voco", "tokenizer", "mim"])
def test_list_inputs_prints_the_training_images_and_creates_nothing(nnunet_folder, tmp_path, capsys, method):
    out = tmp_path / "run"
    code = main(["pretrain", method, "--data", str(nnunet_folder), "--out", str(out), "--list-inputs"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    expected = IMAGES + (PHOTOS if method != "voco" else [])
    assert sorted(Path(line).relative_to(nnunet_folder).as_posix() for line in lines) == sorted(expected)
    assert not out.exists()


def test_list_inputs_needs_data_and_reports_an_empty_folder(tmp_path, capsys):
    assert main(["pretrain", "voco", "--list-inputs"]) == 2
    (tmp_path / "empty" / "labelsTr").mkdir(parents=True)
    _write(tmp_path / "empty" / "labelsTr" / "a.nii.gz")
    assert main(["pretrain", "tokenizer", "--data", str(tmp_path / "empty"), "--list-inputs"]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["pretrain", "mim", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "m")]) == 2
    assert "--tokenizer is required" in capsys.readouterr().err


def test_list_inputs_imports_no_torch(nnunet_folder):
    """A real process: listing the inputs of all three methods never imports torch (so builds no model)."""
    script = (
        "import sys\n"
        "from vocoslicer.cli import main\n"
        "for m in ('voco', 'tokenizer', 'mim'):\n"
        f"    assert main(['pretrain', m, '--data', {str(nnunet_folder)!r}, '--list-inputs']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "VoCoSlicer"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 3 * len(IMAGES) + 2 * len(PHOTOS)
