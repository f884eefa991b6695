"""VoCoSegment's actions end to end on a real slicer-core scene and the real engine CLI (child processes):
volume -> job files -> result -> segmentation -> corrections -> cohort (engine's store) voxel-exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
slicer = pytest.importorskip("slicer")

from VoCoSlicerLib import segment_flow  # noqa: E402
from VoCoSlicerLib.labels_csv import LabelInfo, labels_csv_path, write_labels_csv  # noqa: E402
from VoCoSlicerLib.params import DEMO_MODEL_ID, CohortParams, SegmentParams  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LABELS = [LabelInfo(1, "liver", (200, 30, 30)), LabelInfo(2, "spleen", (30, 30, 200)), LabelInfo(4, "aorta")]
LPS = np.diag([-1.0, -1.0, 1.0])


def _engine(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "vocoslicer", *args], capture_output=True, text=True, timeout=180,
                         env=ENV)
    assert out.returncode == 0, out.stderr
    return out


def _volume(name: str):
    m = np.eye(4)
    m[:3, :3] = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]]) * np.array([0.8, 1.1, 3.0])  # oblique axes
    m[:3, 3] = [5.0, -7.5, 12.0]
    arr = np.random.default_rng(1).integers(-200, 300, size=(10, 14, 18)).astype(np.int16)
    return slicer.util.addVolumeFromArray(arr, m, name=name), m


def _as_engine_would_write(task: segment_flow.Task, lab: np.ndarray) -> None:
    # what 'vocoslicer segment' writes: a label map on exactly the input's grid plus its labels CSV
    ref = sitk.ReadImage(str(task.input))
    img = sitk.GetImageFromArray(lab)
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(task.output))
    write_labels_csv(LABELS, labels_csv_path(task.output))


def test_segment_result_correction_and_cohort_roundtrip(slicer_core, tmp_path):
    scene = slicer_core.scene
    vol, m = _volume("flow-ct")
    task = segment_flow.prepare_segment(vol, SegmentParams(device="cpu"), tmp_path / "job")
    assert task.args[:4] == ["segment", str(task.input), "-o", str(task.output)]
    assert task.request["input"] == str(task.input) and task.request["model"] == DEMO_MODEL_ID
    ref = sitk.ReadImage(str(task.input))
    np.testing.assert_allclose(ref.GetOrigin(), LPS @ m[:3, 3], atol=1e-9)

    lab = np.zeros((10, 14, 18), np.uint8)
    lab[2:6, 2:8, 3:10] = 1
    lab[6:9, 8:12, 10:16] = 2
    _as_engine_would_write(task, lab)
    seg = segment_flow.load_segment_result(scene, task, vol, artifact={"model": "demo", "model_version": "1.0.0"})
    assert [lb.name for lb in segment_flow.labels_of(seg)] == ["liver", "spleen", "aorta"]

    # the user corrects: paints the aorta the model missed
    aorta = np.zeros_like(lab, bool)
    aorta[0:3, 10:13, 0:4] = True
    slicer.util.updateSegmentBinaryLabelmapFromArray(aorta.astype(np.uint8), seg, "aorta", vol)
    expected = lab.copy()
    expected[aorta] = 4

    cohort = tmp_path / "cohort"
    cmds = segment_flow.prepare_cohort_case(scene, vol, seg, CohortParams(str(cohort), "tester"), tmp_path / "case")
    assert [c[:2] for c in cmds] == [["cohort", "init"], ["cohort", "add"]]
    for c in cmds:
        _engine(*c)
    listed = json.loads(_engine("cohort", "list", str(cohort), "--json").stdout)
    case = listed["cases"][0]
    stored = sitk.ReadImage(case["label"])
    assert np.array_equal(sitk.GetArrayFromImage(stored), expected)
    image = sitk.ReadImage(case["image"])
    np.testing.assert_allclose(image.GetOrigin(), stored.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), stored.GetDirection(), atol=1e-6)
    prov = case["label_versions"][-1]["provenance"]
    assert (prov["model_id"], prov["model_version"], prov["corrected"], prov["by"]) == ("demo", "1.0.0", True,
                                                                                         "tester")
    # an unlabelled case goes in with the image only (no init the second time)
    vol2, _ = _volume("flow-ct-2")
    cmds = segment_flow.prepare_cohort_case(scene, vol2, None, CohortParams(str(cohort)), tmp_path / "case2")
    assert len(cmds) == 1 and "--label" not in cmds[0]


def test_demo_model_id_is_the_engines():
    from vocoslicer.models.installed import DEMO_MODEL_ID as ENGINE_DEMO

    assert DEMO_MODEL_ID == ENGINE_DEMO


def test_segmentation_made_elsewhere_cannot_go_to_the_cohort(slicer_core, tmp_path):
    vol, _ = _volume("foreign-ct")
    seg = slicer_core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(ValueError, match="not made by a VoCo model"):
        segment_flow.prepare_cohort_case(slicer_core.scene, vol, seg, CohortParams(str(tmp_path / "c")), tmp_path)


def test_classify_result_to_table(slicer_core, tmp_path):
    vol, _ = _volume("cls-flow-ct")
    task = segment_flow.prepare_classify(vol, SegmentParams(model="cls@1.0"), tmp_path / "cls")
    assert task.args[:2] == ["classify", str(task.input)] and "--model" in task.args
    Path(task.output).write_text(json.dumps({"probabilities": {"a": 0.25, "b": 0.75}}))
    table = segment_flow.load_classify_result(slicer_core.scene, task, vol)
    assert table.GetTable().GetColumn(0).GetValue(0) == "b" and vol.GetAttribute("VoCo.Class") == "b"


@pytest.mark.slow
def test_segment_correct_cohort_finetune_loop_with_the_demo_model(slicer_core, tmp_path):
    """The VoCoSegment loop with real engine jobs driven like the panel: segment (events + artifact) -> correct
    -> cohort -> finetune 2 steps -> a new model version is listed."""
    from VoCoSlicerLib import models_view
    from VoCoSlicerLib.job_driver import JobDriver
    from VoCoSlicerLib.params import FinetuneParams
    from VoCoSlicerLib.state import JobState

    probe = subprocess.run([sys.executable, "-c", "from vocoslicer.models.installed import resolve; resolve(None)"],
                           capture_output=True, text=True, env=ENV, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"no default model bundled yet: {probe.stderr.strip().splitlines()[-1:]}")

    home = {"OMP_NUM_THREADS": "1", "VOCOSLICER_HOME": str(tmp_path / "home")}  # the new model goes here

    def run(driver, commands, **kw):
        import time

        driver.start(commands, python=sys.executable, env=home, **kw)
        deadline = time.monotonic() + 600
        while driver.busy and time.monotonic() < deadline:
            driver.tick()
            time.sleep(0.1)
        assert driver.state.state is JobState.DONE, driver.state.message

    d = JobDriver("Segment")
    run(d, [["phantom", "--seed", "21", "--count", "2", "--size", "64", "64", "32", "-o", str(tmp_path / "ph"),
             "--format", ".nrrd"]])
    cohort = CohortParams(str(tmp_path / "cohort"), "loop-test")
    for i, image in enumerate(sorted((tmp_path / "ph").glob("*_ct.nrrd"))):
        vol = slicer_core.volumes.AddArchetypeVolume(str(image), f"loop{i}")
        task = segment_flow.prepare_segment(vol, SegmentParams(device="cpu", fast=True), tmp_path / f"job{i}")
        run(d, [task.args])
        art = d.artifact("segmentation")
        assert art and art["model"] and d.state.fraction == 1.0  # the command's own events reached the driver
        seg = segment_flow.load_segment_result(slicer_core.scene, task, vol, artifact=art)
        sid = seg.GetSegmentation().GetNthSegmentID(0)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, vol)
        mask[:2] = 1  # a correction
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, sid, vol)
        run(d, segment_flow.prepare_cohort_case(slicer_core.scene, vol, seg, cohort, tmp_path / f"case{i}"))
    ft = FinetuneParams(baseModel=DEMO_MODEL_ID, cohortDir=cohort.cohortDir, steps=2, batchSize=1, device="cpu")
    run(d, [ft.args(str(tmp_path / "ft"))], run_dir=tmp_path / "ft")
    model = d.artifact("model")
    assert model and model["id"]
    run(d, [models_view.list_args()], run_dir=tmp_path / "list")
    rows = models_view.parse_catalog(d.json_output())
    assert any(r.id == model["id"] and r.version == model["version"] and r.installed for r in rows)


@pytest.mark.slow
def test_real_segment_command_on_a_phantom(slicer_core, tmp_path):
    """The engine's own segment command with its default (demo) model, on a phantom it generates."""
    probe = subprocess.run([sys.executable, "-c", "from vocoslicer.models.installed import resolve; resolve(None)"],
                           capture_output=True, text=True, env=ENV, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"no default model bundled yet: {probe.stderr.strip().splitlines()[-1:]}")
    _engine("phantom", "--seed", "3", "--size", "48", "48", "24", "-o", str(tmp_path / "ph"), "--format", ".nrrd")
    image = sorted((tmp_path / "ph").glob("*_ct.nrrd"))[0]
    vol = slicer_core.volumes.AddArchetypeVolume(str(image), "phantom")
    task = segment_flow.prepare_segment(vol, SegmentParams(device="cpu", fast=True), tmp_path / "job")
    _engine(*task.args)
    seg = segment_flow.load_segment_result(slicer_core.scene, task, vol)
    assert seg.GetSegmentation().GetNumberOfSegments() >= 8
    assert sitk.ReadImage(str(task.output)).GetSize() == vol.GetImageData().GetDimensions()
