"""VoCoSegment's jobs without the widget (VoCoSlicerLib.segment_panel) on a real slicer-core scene with real
engine child processes: the model selector's real default and download offer, a result that arrives after a
scene close, live curves across a scene close, and the in-app self-test flow. Only the Qt side is left out:
the widget callbacks are plain recorders here."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from VoCoSlicerLib import active_view, classify_view, models_view, module_support, plots, segment_panel  # noqa: E402
from VoCoSlicerLib.params import DEMO_MODEL_ID, CohortParams, SegmentParams  # noqa: E402
from VoCoSlicerLib.state import JobState  # noqa: E402


class Recorder:
    def __init__(self):
        self.segmentations, self.tables, self.models, self.later = [], [], [], []


@pytest.fixture
def panel(slicer_core, tmp_path, monkeypatch):
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))  # no models installed but the bundled demo
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rec = Recorder()
    counter = iter(range(1000))
    p = segment_panel.SegmentPanel(
        slicer_core.scene, lambda: str(tmp_path / f"tmp{next(counter)}"), lambda: None,
        lambda seg, vol: rec.segmentations.append((seg, vol)), rec.tables.append,
        lambda entries, index: rec.models.append((entries, index)), rec.later.append)
    p.rec = rec
    yield p
    p.close()


def _tick_until_idle(p, timeout=120.0, during=None):
    tick = module_support.TimerTick(lambda text: pytest.fail(f"the tick reported: {text}"))
    deadline = time.monotonic() + timeout
    while p.busy and time.monotonic() < deadline:
        tick([*p.tick_steps(), ("curves", p.draw_curves)])
        if during is not None:
            during()
        time.sleep(0.05)
    assert not p.busy, "timed out"


def _volume(name="ct", seed=0):
    arr = (np.random.default_rng(seed).random((16, 24, 24)) * 400 - 200).astype(np.int16)
    return slicer.util.addVolumeFromArray(arr, name=name)


def test_no_real_model_installed_first_segment_offers_vocomni_b(panel):
    panel.refresh_models()
    _tick_until_idle(panel)
    (entries, index), = panel.rec.models
    assert entries[index].kind == "download" and entries[index].spec.startswith("vocomni-b@")
    assert entries[-1].text == models_view.DEMO_TEXT
    volume = _volume()
    assert panel.run("segment", volume, None, SegmentParams(useWarmWorker=False), entries[index]) == "confirm"
    assert not panel.busy  # nothing starts before the user agreed to the download


@pytest.mark.parametrize("close_scene", [False, True])
def test_segment_result_lands_or_is_dropped_after_a_scene_close(panel, slicer_core, close_scene):
    scene = slicer_core.scene
    demo = models_view.Entry(models_view.DEMO_TEXT, DEMO_MODEL_ID, "demo")  # as the selector lists it
    volume = _volume()
    params = SegmentParams(model=demo.spec, device="cpu", fast=True, useWarmWorker=False)
    assert panel.run("segment", volume, None, params, demo) == "started"
    if close_scene:
        scene.Clear(0)
        _volume("the next scene's ct")  # what a new parameter node would hold
    _tick_until_idle(panel, timeout=180)
    assert panel.job.state.state is JobState.DONE
    if close_scene:
        assert panel.rec.segmentations == [] and "no longer in the scene" in panel.job.state.message
        assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    else:
        (seg, vol), = panel.rec.segmentations
        assert vol is volume and scene.IsNodePresent(seg) and seg.GetSegmentation().GetNumberOfSegments() >= 1


@pytest.mark.parametrize("how", ["clear scene", "delete chart"])
def test_followed_run_survives_a_scene_close_and_curves_resume(panel, slicer_core, tmp_path, how):
    scene = slicer_core.scene
    panel.finetune.start([["selftest", "job", "--steps", "40", "--sleep", "0.03"]], run_dir=tmp_path / "run")
    first = panel.curves.follow(scene)
    done = []

    def close_midway():
        if not done and len(panel.finetune.metrics.values.get("train/value", [])) >= 5:
            done.append(1)
            if how == "clear scene":
                scene.Clear(0)
                panel.curves.reset()  # the widget's sceneClosing hook
            else:
                scene.RemoveNode(first)

    _tick_until_idle(panel, during=close_midway)  # TimerTick fails the test on any error in a tick
    assert done and panel.finetune.state.state is JobState.DONE
    chart = panel.curves.chart(scene)
    assert chart is not None and chart is not first
    series = chart.GetNthPlotSeriesNode(0)
    t = series.GetTableNode().GetTable()
    assert [t.GetValue(r, 0).ToDouble() for r in range(t.GetNumberOfRows())] == list(range(1, 41))
    assert chart.GetAttribute(plots.CHART_ATTRIBUTE)


@pytest.mark.slow
def test_in_app_self_test_flow_runs_on_slicer_core(slicer_core, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def wait(driver):
        assert module_support.wait_for(driver, timeout=300, interval=0.05)
        assert driver.state.state is JobState.DONE, driver.state.message

    def load(path: Path):
        return slicer_core.volumes.AddArchetypeVolume(str(path), path.stem)

    segments, counts = segment_panel.self_test(slicer_core.scene, tmp_path, load, wait)
    assert segments >= 1 and (counts.total, counts.labelled) == (1, 1)
    assert os.path.isdir(tmp_path / "cohort")


def test_a_failed_download_reports_and_does_not_segment(panel, tmp_path, monkeypatch):
    """The offered download runs as the real ``models download`` child job; here its file is no checkpoint
    (a local catalog with a file:// URL: no network), so the job fails: the panel says so and no Segment runs."""
    import json

    catalog = json.loads((Path(models_view.__file__).parents[1] / "vocoslicer" / "resources" /
                          "models.json").read_text())
    entry = next(m for m in catalog["models"] if m["id"] == models_view.RECOMMENDED_DOWNLOAD)
    (tmp_path / "VoComni_B.pt").write_bytes(b"not a checkpoint")
    catalog["models"] = [{**entry, "url": (tmp_path / "VoComni_B.pt").as_uri(), "size_bytes": 16}]
    (tmp_path / "catalog.json").write_text(json.dumps(catalog))
    monkeypatch.setenv("VOCOSLICER_CATALOG", str(tmp_path / "catalog.json"))
    panel.refresh_models()
    _tick_until_idle(panel)
    offer = panel.entries[0]
    assert offer.kind == "download" and "16 B" in offer.text
    assert panel.run("segment", _volume(), None, SegmentParams(useWarmWorker=False), offer) == "confirm"
    panel.download(offer)
    assert panel.downloading and panel.view().segmenting  # Segment button = Cancel, progress = the download
    _tick_until_idle(panel)
    assert panel.model_error.startswith("model job failed") and "VoComni_B.pt" in panel.model_error
    assert panel.rec.later == [] and panel.job.state.state is JobState.IDLE


# ------------------------------------------------------------------------------------------ issues 13 and 15
def _demo_params(**kw):
    return SegmentParams(model=DEMO_MODEL_ID, device="cpu", fast=True, **kw)


DEMO = models_view.Entry(models_view.DEMO_TEXT, DEMO_MODEL_ID, "demo")


def test_segment_reports_uncertainty_and_overlays_the_map_one_shot_and_warm(panel, slicer_core):
    """Both paths (``segment`` child job and warm-worker request) ask for the uncertainty and the map; the map is
    read before the job's work folder goes, and the second run reloads the same overlay node."""
    scene = slicer_core.scene
    volume = _volume()
    assert panel.run("segment", volume, None, _demo_params(useWarmWorker=False, uncertaintyMap=True), DEMO) == \
        "started"
    assert "--uncertainty" in panel.task.args and panel.task.request["uncertainty"] is True
    _tick_until_idle(panel, timeout=180)
    assert panel.job.state.state is JobState.DONE, panel.job.state.message
    assert panel.uncertainty_text.startswith("Case uncertainty "), panel.uncertainty_text
    overlay = panel.map_node
    assert overlay is not None and scene.IsNodePresent(overlay) and overlay.GetAttribute(active_view.MAP_ATTRIBUTE)
    assert overlay.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    work = panel.job.temp_paths
    assert not any(p.exists() for p in work), "the work folder outlives the job"
    panel.uncertainty_text = ""
    volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    assert panel.run("segment", volume, None, _demo_params(useWarmWorker=True, uncertaintyMap=True), DEMO) == \
        "started"
    _tick_until_idle(panel, timeout=180)
    assert panel.job.state.state is JobState.DONE, panel.job.state.message
    assert panel.uncertainty_text.startswith("Case uncertainty ") and panel.map_node is overlay
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes  # no second overlay
    assert panel.run("segment", volume, None, _demo_params(useWarmWorker=True), DEMO) == "started"
    assert panel.uncertainty_text == ""  # not the previous result's while this one runs
    _tick_until_idle(panel, timeout=180)
    assert panel.uncertainty_text.startswith("Case uncertainty ") and panel.map_node is None
    assert not scene.IsNodePresent(overlay), "a map of an earlier result stays over the new one"


def test_case_class_field_goes_into_the_cohort_and_refills_the_items(panel, tmp_path):
    cohort = CohortParams(cohortDir=str(tmp_path / "cohort"), annotator="t")
    panel.add_case(_volume("a"), None, cohort, labelled=False, class_text="Splenomegaly")
    _tick_until_idle(panel)
    assert panel.cohort.state.state is JobState.DONE, panel.cohort.state.message
    assert panel.classes == ["Splenomegaly"] and "classes: Splenomegaly 1" in panel.cohort_text
    panel.add_case(_volume("b", 1), None, cohort, labelled=False, class_text=" splenomegaly ")  # known: no new class
    _tick_until_idle(panel)
    assert panel.classes == ["Splenomegaly"] and "Splenomegaly 2" in panel.cohort_text, panel.cohort_text
    panel.add_case(_volume("c", 2), None, cohort, labelled=False, class_text="")  # empty field: no class
    _tick_until_idle(panel)
    assert panel.cohort.state.state is JobState.DONE and "3 cases" in panel.cohort_text
    assert "Splenomegaly 2" in panel.cohort_text, panel.cohort_text


def test_classify_shows_the_table_and_proposes_the_class_once(panel, slicer_core, tmp_path):
    from test_infer_classify import CLASSES, make_bundle

    bundle = make_bundle(tmp_path / "cls")
    entry = models_view.Entry("tiny", str(bundle), "model")
    params = SegmentParams(model=str(bundle), device="cpu", useWarmWorker=False)
    assert panel.run("classify", _volume(), None, params, entry) == "started"
    _tick_until_idle(panel, timeout=180)
    assert panel.job.state.state is JobState.DONE, panel.job.state.message
    (table,) = panel.rec.tables
    assert table.GetAttribute(classify_view.MULTI_LABEL_ATTRIBUTE) == "0"
    proposal = panel.take_class_proposal()
    assert proposal in CLASSES and panel.take_class_proposal() is None


def _ranked_cohort(root: Path) -> None:
    from vocoslicer.data.cohort import Cohort
    from vocoslicer.data.phantom import PHANTOM_LABELS, generate_phantom

    c = Cohort.init(root)
    for s in range(3):
        ph = generate_phantom(s, spacing=(8, 8, 8), noise_hu=float(20 + 60 * s))
        c.add(ph.image, ph.label if s == 0 else None, PHANTOM_LABELS if s == 0 else None)


@pytest.mark.slow  # ~40 s on 2 shared cores: the demo model scores two unlabelled phantoms
def test_next_case_ranks_first_then_loads_the_case_and_its_proposal(panel, slicer_core, tmp_path):
    root = tmp_path / "cohort"
    _ranked_cohort(root)
    with pytest.raises(ValueError, match="existing cohort"):
        panel.next_case(str(tmp_path / "nothing"))
    panel.next_case(str(root), device="cpu")  # no ranking stored yet: a ``cohort rank`` job with the demo model
    assert panel.active.busy and panel.view().active_enabled  # the button cancels the ranking
    _tick_until_idle(panel, timeout=180)
    assert panel.active.state.state is JobState.DONE, panel.active.state.message
    (seg, vol), = panel.rec.segmentations
    nxt = active_view.next_case(root)
    assert vol.GetName() == nxt.case and panel.active_text.startswith("Next case: " + nxt.case)
    assert seg is not None and seg.GetSegmentation().GetNumberOfSegments() >= 1
    panel.next_case(str(root))  # a ranking is stored now: loads at once, no job
    assert not panel.busy and len(panel.rec.segmentations) == 2


def test_dice_curve_job_without_finetunes_says_what_to_do(slicer_core, panel, tmp_path):
    """The real ``cohort curve`` job on a cohort never finetuned: its one-line reason reaches the panel and no
    chart appears (the rows -> chart path is Testing/test_active_view.py's; real rows need two finetunes)."""
    root = tmp_path / "cohort"
    _ranked_cohort(root)
    charts = []
    panel.show_chart = charts.append
    panel.dice_curve(str(root))
    _tick_until_idle(panel)
    assert panel.active.state.state is JobState.FAILED
    assert charts == [] and panel.active_text.startswith("Curve failed: ") and "finetune" in panel.active_text
    assert panel.view().active_enabled


class _PythonQtCombo:
    """PythonQt exposes Qt properties as attributes (``combo.count``, ``combo.currentText``, as Slicer's
    SegmentEditorThresholdEffect.py:534 and DICOMSendDialog.py:76 read them); PySide6 has methods. This shim over
    a real PySide6 QComboBox gives the PythonQt spelling, the rest is the real widget."""

    def __init__(self, combo):
        self.combo = combo

    def __getattr__(self, name):
        return getattr(self.combo, name)

    @property
    def count(self):
        return self.combo.count()

    @property
    def currentText(self):  # noqa: N802 - Qt's name
        return self.combo.currentText()


def test_class_items_refill_only_on_change_and_keep_the_typed_text():
    qt_widgets = pytest.importorskip("PySide6.QtWidgets")
    app = qt_widgets.QApplication.instance() or qt_widgets.QApplication(["test", "-platform", "offscreen"])
    real = qt_widgets.QComboBox()
    real.setEditable(True)
    combo = _PythonQtCombo(real)
    segment_panel.show_classes(combo, ["normal", "splenomegaly"], None)
    assert [real.itemText(i) for i in range(real.count())] == ["normal", "splenomegaly"]
    real.setEditText("liver les")  # the user is typing
    changes = []
    real.currentTextChanged.connect(changes.append)
    segment_panel.show_classes(combo, ["normal", "splenomegaly"], None)  # every tick: nothing rebuilt
    assert real.currentText() == "liver les" and changes == []
    segment_panel.show_classes(combo, ["normal", "splenomegaly", "liver lesion"], None)  # the cohort grew
    assert real.count() == 3 and real.currentText() == "liver les" and changes == []
    segment_panel.show_classes(combo, ["normal", "splenomegaly", "liver lesion"], "splenomegaly")  # Classify
    assert real.currentText() == "splenomegaly"
    models = [models_view.Entry("a", "a@1", "model"), models_view.Entry("demo", DEMO_MODEL_ID, "demo")]
    picked = []
    model_combo = qt_widgets.QComboBox()
    segment_panel.show_models(model_combo, models, 1, picked.append)
    assert model_combo.count() == 2 and model_combo.itemData(1) == DEMO_MODEL_ID and picked == [1]
    del app
