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

from VoCoSlicerLib import models_view, module_support, plots, segment_panel  # noqa: E402
from VoCoSlicerLib.params import DEMO_MODEL_ID, SegmentParams  # noqa: E402
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


def _volume(name="ct"):
    arr = (np.random.default_rng(0).random((16, 24, 24)) * 400 - 200).astype(np.int16)
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
    assert panel.model_error.startswith("model job failed") and "checkpoint" in panel.model_error
    assert panel.rec.later == [] and panel.job.state.state is JobState.IDLE
