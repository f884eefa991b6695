"""VoCoSegment's case-class field and classification display, on a real MRML scene (slicer-core).

The Qt combobox itself cannot run here; what it shows and what it sends is computed by VoCoSlicerLib.classify_view,
tested below with the engine's real ``cohort list --json`` output and real ``cohort add`` runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
slicer = pytest.importorskip("slicer")

from vocoslicer.cli import main  # noqa: E402
from VoCoSlicerLib import classify_view, mrml_io  # noqa: E402


def _volume(scene, name: str):
    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(vol, np.zeros((4, 5, 6), np.int16))
    return vol


def _list_json(cohort: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert main(["cohort", "list", str(cohort), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_combobox_items_and_add_arguments_drive_the_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    cohort = tmp_path / "c"
    assert main(["cohort", "init", str(cohort)]) == 0
    assert classify_view.class_items(_list_json(cohort, capsys)) == []
    imgs = []
    for seed in range(3):
        path = tmp_path / f"img{seed}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(seed).normal(size=(6, 6, 6))), str(path))
        imgs.append(path)
    add = [["cohort", "init", str(cohort)], ["cohort", "add", str(cohort), "--image", str(imgs[0])]]
    cmds = classify_view.with_class(add, "Splenomegaly", [])
    assert cmds[0] == add[0] and cmds[1][-3:] == ["--class", "Splenomegaly", "--new-class"]
    assert main(cmds[1]) == 0
    known = classify_view.class_items(_list_json(cohort, capsys))
    assert known == ["Splenomegaly"]
    # a known name typed in another case: the cohort's spelling, no --new-class; "; " separates findings
    args = classify_view.class_args("splenomegaly;  liver lesion ; splenomegaly", known)
    assert args == ["--class", "Splenomegaly", "--class", "liver lesion", "--new-class"]
    assert main(["cohort", "add", str(cohort), "--image", str(imgs[1]), *args]) == 0
    assert classify_view.class_args("splenomegaly", known) == ["--class", "Splenomegaly"]
    assert main(["cohort", "add", str(cohort), "--image", str(imgs[2]),
                 *classify_view.class_args("splenomegaly", known)]) == 0
    data = _list_json(cohort, capsys)
    assert classify_view.class_items(data) == ["Splenomegaly", "liver lesion"]
    assert classify_view.counts_summary(data) == "classes: Splenomegaly 3, liver lesion 1"
    assert classify_view.with_class(add, "  ", known) == add  # empty field: no class
    with pytest.raises(ValueError, match="one 'cohort add'"):
        classify_view.with_class([add[0]], "x", known)


def test_single_and_multi_label_results_on_the_scene(slicer_core) -> None:
    scene = slicer_core.scene
    vol = _volume(scene, "cls-view-ct")
    single = {"model": "m", "classes": ["normal", "splenomegaly"], "probabilities": [0.2, 0.8], "multi_label": False,
              "predicted": {"index": 1, "name": "splenomegaly", "probability": 0.8}}
    table = classify_view.show_result(scene, single, vol)
    assert vol.GetAttribute(mrml_io.CLASS_ATTRIBUTE) == "splenomegaly"
    assert vol.GetAttribute(classify_view.MULTI_LABEL_ATTRIBUTE) == "0"
    assert table.GetTable().GetNumberOfColumns() == 2 and classify_view.proposed_text(single) == "splenomegaly"
    multi = {"model": "m", "classes": ["splenomegaly", "liver lesion", "ascites"], "multi_label": True,
             "probabilities": [0.9, 0.6, 0.1], "positive": ["splenomegaly", "liver lesion"],
             "predicted": {"index": 0, "name": "splenomegaly", "probability": 0.9}}
    table = classify_view.show_result(scene, multi, vol, table)
    t = table.GetTable()
    rows = [(t.GetColumnByName("class").GetValue(i), t.GetColumnByName("positive").GetValue(i))
            for i in range(t.GetNumberOfRows())]
    assert rows == [("splenomegaly", 1), ("liver lesion", 1), ("ascites", 0)]
    assert vol.GetAttribute(classify_view.FINDINGS_ATTRIBUTE) == "splenomegaly;liver lesion"
    assert classify_view.proposed_text(multi) == "splenomegaly; liver lesion"
    classify_view.show_result(scene, single, vol, table)  # back to single-label: stale findings removed
    assert vol.GetAttribute(classify_view.FINDINGS_ATTRIBUTE) is None
    assert table.GetTable().GetNumberOfColumns() == 2


def test_finetune_args_are_the_engines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cohort = tmp_path / "c"
    assert main(["cohort", "init", str(cohort)]) == 0
    args = classify_view.finetune_args(str(cohort), "scratch", str(tmp_path / "run"), steps=5, device="cpu",
                                       arch="pumit_vit_cls", multi_label=True)
    assert args[:3] == ["finetune", "--task", "classification"] and "--multi-label" in args
    capsys.readouterr()
    assert main(args) == 2  # parsed by the real engine parser; the empty cohort is refused, nothing written
    assert "no case has a class" in capsys.readouterr().err and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="cohort folder"):
        classify_view.finetune_args("", "scratch", "r")
