"""The panels' Qt-free presenters (issue 12): the "Python for jobs" setting, the timer tick, the incremental log,
the model selector with a real default, stale job results, the embedded editor's node and inputs, pretrain
sizes and "Start from". Qt widgets and QSettings are replaced by tiny stand-ins here (no Qt in pytest): they
record what the panel would set on them; every MRML part is a real slicer-core scene."""

from __future__ import annotations

import ast
import json
import types
from pathlib import Path

import numpy as np
import pytest

from VoCoSlicerLib import compat, models_view, module_support, panels
from VoCoSlicerLib.job_driver import JobDriver
from VoCoSlicerLib.params import DEMO_MODEL_ID, SegmentParams

ROOT = Path(__file__).resolve().parent.parent


class Settings(dict):  # stand-in for qt.QSettings: value(key, default) / setValue(key, value)
    def value(self, key, default=None):
        return self.get(key, default)

    def setValue(self, key, value):  # noqa: N802 - Qt's name
        self[key] = value


# ------------------------------------------------------------------------------------------------ compat (item 4)
def test_unsupported_message_for_old_python_only():
    assert compat.unsupported_message((3, 12, 0)) is None and compat.unsupported_message((3, 13, 1)) is None
    msg = compat.unsupported_message((3, 9, 10, "final", 0))
    assert "5.12" in msg and "3.9" in msg and "3.12" in msg


def test_compat_and_package_init_parse_as_old_python():
    for path in (ROOT / "VoCoSlicer" / "VoCoSlicerLib" / "compat.py", ROOT / "VoCoSlicer" / "VoCoSlicerLib" /
                 "__init__.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), feature_version=(3, 7))
        assert not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in ast.walk(tree)), path
        # annotations are evaluated at definition time on 3.6-3.8: only string annotations allowed
        for n in ast.walk(tree):
            if isinstance(n, ast.FunctionDef) and n.returns is not None:
                assert isinstance(n.returns, ast.Constant), (path.name, n.name)


# ------------------------------------------------------------------------------------------ settings (item 5)
def test_python_setting_reads_writes_and_clears():
    s = Settings()
    assert module_support.read_python(s) == ""
    assert module_support.write_python(s, "/opt/conda/bin/python") == "/opt/conda/bin/python"
    assert module_support.read_python(s) == "/opt/conda/bin/python"
    assert module_support.write_python(s, ".") == "" and module_support.read_python(s) == ""  # a cleared field
    s[module_support.PYTHON_SETTING] = None
    assert module_support.read_python(s) == ""


# ---------------------------------------------------------------------------------------- timer tick (item 15)
def test_timer_tick_reports_once_and_does_not_reenter():
    reports, inner = [], []

    def report(text):
        reports.append(text)
        inner.append(tick([("again", lambda: 1 / 0)]))  # a modal dialog's event loop fires the timer again

    tick = module_support.TimerTick(report)
    ran = []
    errors = tick([("segment job", lambda: 1 / 0), ("models job", lambda: ran.append(1)),
                   ("curves", lambda: [][1])])
    assert len(errors) == 2 and ran == [1]  # one failure does not stop the other steps
    assert len(reports) == 1 and "segment job" in reports[0] and "curves" in reports[0]
    assert inner == [[]]  # the re-entered tick did nothing
    assert tick([("ok", lambda: None)]) == [] and len(reports) == 1


# ------------------------------------------------------------------------------------------------ log (item 16)
class View:  # stand-in for QPlainTextEdit
    def __init__(self):
        self.calls = []

    def appendPlainText(self, text):  # noqa: N802
        self.calls.append(text)


def test_log_follower_appends_only_new_lines_even_past_the_bound():
    a, b = module_support.LogLines(maxlen=3), module_support.LogLines(maxlen=10)
    follow, view = module_support.LogFollower(), View()
    a.append("one")
    b.append("x")
    assert follow.show(view, [("[A] ", a), ("[B] ", b)]) == 2
    assert follow.show(view, [("[A] ", a), ("[B] ", b)]) == 0 and len(view.calls) == 1
    for line in ("two", "three", "four", "five"):
        a.append(line)
    assert a.appended == 5
    assert follow.new_lines([("", a), ("", b)]) == ["three", "four", "five"]  # "two" fell out of the deque


def test_job_driver_log_counts_appended_lines():
    d = JobDriver("t", log_lines=2)
    for i in range(5):
        d.log.append(str(i))
    assert d.log.appended == 5 and list(d.log) == ["3", "4"]


def test_wait_for_ticks_a_real_job_to_the_end():
    d = JobDriver("t")
    d.start([["selftest", "job", "--steps", "2", "--sleep", "0"]])
    events = []
    assert module_support.wait_for(d, lambda: events.append(1), timeout=90, interval=0.02)
    assert d.state.state.value == "done" and events


# ------------------------------------------------------------------------------------------ models (default)
CATALOG = {
    "catalog": [
        {"id": "vocomni-b", "version": "1.0.0", "title": "VoComni-B abdominal CT segmentation", "task": "segmentation",
         "size_bytes": 298600000, "licence": "not stated", "licence_url": "https://huggingface.co/Luffy503/VoCo"},
        {"id": "vocomni-l", "version": "1.0.0", "task": "segmentation", "size_bytes": 1169000000},
        {"id": "voco-b-ssl", "version": "1.0.0", "task": "backbone"},
    ],
    "installed": [{"id": DEMO_MODEL_ID, "version": "1.1.0", "task": "segmentation", "path": "/demo"}],
}


def test_without_a_real_model_the_default_offers_vocomni_b_and_keeps_the_demo():
    rows = models_view.parse_catalog(json.dumps(CATALOG))
    assert models_view.best_segmentation(rows) is None
    entries = models_view.selector_entries(rows)
    assert [e.kind for e in entries] == ["download", "demo"]
    offer = entries[models_view.default_index(entries, "")]
    assert offer.kind == "download" and offer.spec == "vocomni-b@1.0.0" and "298.6 MB" in offer.text
    assert entries[1].text == "Demo (synthetic phantoms only)" and entries[1].spec == "/demo"
    question = models_view.download_question(offer)
    assert "298.6 MB" in question and "not stated" in question and "huggingface.co" in question
    assert models_view.download_args(offer.row) == ["models", "download", "vocomni-b@1.0.0", "--events", "stdout"]
    assert "synthetic phantoms" in models_view.info_text(entries[1])
    assert models_view.default_index(entries, "/demo") == 1  # a user's explicit demo choice is kept


def test_best_installed_real_model_is_the_default():
    data = json.loads(json.dumps(CATALOG))
    data["installed"] += [
        {"id": "vocomni-b", "version": "1.0.0", "task": "segmentation", "path": "/b"},
        {"id": "vocomni-l", "version": "1.0.0", "task": "segmentation", "path": "/l"},
        {"id": "demo-ft", "version": "1", "task": "segmentation", "path": "/ft", "parent": f"{DEMO_MODEL_ID}@1.1.0"},
    ]
    rows = models_view.parse_catalog(json.dumps(data))
    assert models_view.best_segmentation(rows).id == "vocomni-l"
    entries = models_view.selector_entries(rows)
    assert entries[0].spec == "/l" and "download" not in [e.kind for e in entries]
    assert [e.kind for e in entries][-2:] == ["demo", "demo"]  # a demo-finetuned model is no real default
    assert models_view.default_index(entries, "") == 0 and models_view.default_index(entries, "/b") == 1


# -------------------------------------------------------------------------------------------- panels (item 17)
def test_pretrain_sizes_follow_the_method_and_start_from():
    assert panels.sizes_for("voco", "tiny") == (["B", "L", "H"], "B")
    assert panels.sizes_for("tokenizer", "B") == (["paper", "small", "tiny"], "paper")
    assert panels.sizes_for("mim", "S") == (["tiny", "S", "B", "L"], "S")
    assert panels.start_from("mim").folders and panels.start_from("mim").enabled
    assert not panels.start_from("voco").folders and not panels.start_from("tokenizer").enabled


def test_run_filtering():
    runs = [{"run_dir": "/r/pretrain-voco-2", "command": "pretrain voco", "status": "running"},
            {"run_dir": "/r/finetune-1", "command": "finetune", "status": "failed"},
            {"run_dir": "/r/finetune-0", "command": "finetune", "status": "ok"}]
    assert panels.runs_of(runs, "pretrain") == [("pretrain-voco-2  (running)", "/r/pretrain-voco-2")]
    assert panels.resumable(runs, "finetune") == ["/r/finetune-1"]


def test_job_widgets_follow_the_state_machine():
    d = JobDriver("Segment")
    w = panels.job_widgets(d)
    assert (w.button_text, w.button_enabled, w.progress_visible) == ("Segment", True, False)
    d.state.start()
    d.state.apply_event({"kind": "progress", "step": 1, "total": 4, "stage": "inference"})
    w = panels.job_widgets(d)
    assert (w.button_text, w.progress_maximum, w.progress_value, w.label) == ("Cancel", 100, 25, "inference 25%")
    button, bar, label = (types.SimpleNamespace() for _ in range(3))
    panels.show_job(w, button, bar, label)
    assert button.text == "Cancel" and bar.value == 25 and label.text == "inference 25%"


# --------------------------------------------------------------------------- segment flow (items 8, 9, 14, 17)
def _volume(slicer, name, label=False):
    arr = np.zeros((4, 5, 6), np.int16)
    node = slicer.util.addVolumeFromArray(arr, name=name, nodeClassName="vtkMRMLLabelMapVolumeNode" if label
                                          else "vtkMRMLScalarVolumeNode")
    return node


def test_auto_selected_input_is_never_a_label_map(slicer_core):
    import slicer

    from VoCoSlicerLib import segment_flow

    scene = slicer_core.scene
    scene.Clear(0)
    _volume(slicer, "labels", label=True)
    assert segment_flow.default_input_volume(scene) is None
    ct = _volume(slicer, "ct")
    assert segment_flow.default_input_volume(scene) is ct


@pytest.mark.parametrize("op", ["segment", "classify"])
def test_a_result_for_a_closed_scene_is_dropped(slicer_core, tmp_path, op):
    import slicer

    from VoCoSlicerLib import segment_flow

    scene = slicer_core.scene
    vol = _volume(slicer, "ct")
    params = SegmentParams(model="m", device="cpu")
    task = (segment_flow.prepare_segment(vol, params, tmp_path) if op == "segment"
            else segment_flow.prepare_classify(vol, params, tmp_path))
    task.output.write_text("{}")  # the job "finished"; its content never gets read
    scene.Clear(0)
    _volume(slicer, "ct")  # the new scene's volume, likely with the old node's ID
    before = scene.GetNumberOfNodes()
    load = segment_flow.load_segment_result if op == "segment" else segment_flow.load_classify_result
    with pytest.raises(segment_flow.StaleResult, match="no longer in the scene"):
        load(scene, task, task.volume)
    assert scene.GetNumberOfNodes() == before  # nothing loaded into the new scene


def test_segment_editor_singleton_and_inputs_in_the_order_the_editor_accepts(slicer_core):
    import slicer

    from VoCoSlicerLib import segment_flow

    scene = slicer_core.scene
    node = segment_flow.segment_editor_node(scene)
    assert segment_flow.segment_editor_node(scene) is node and node.GetSingletonTag() == "VoCoSegment"
    count = scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode")
    scene.Clear(0)
    assert segment_flow.segment_editor_node(scene).GetID() == node.GetID()  # kept across a scene close
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode") == count

    logic = slicer.vtkSlicerSegmentEditorLogic()  # what qMRMLSegmentEditorWidget forwards to
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(node)
    vol = _volume(slicer, "ct")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "made with Create new")
    logic.SetSourceVolumeNode(vol)  # the old wiring: source first, while no segmentation is set
    assert node.GetSourceVolumeNode() is None
    segment_flow.sync_editor(logic.SetSegmentationNode, logic.SetSourceVolumeNode, seg, vol)
    assert node.GetSegmentationNode() is seg and node.GetSourceVolumeNode() is vol
    segment_flow.sync_editor(logic.SetSegmentationNode, logic.SetSourceVolumeNode, None, vol)  # scene closing
    assert node.GetSegmentationNode() is None


# ------------------------------------------------------------------------------------ panel plumbing (shared)
class Wrapper:  # stand-in for a parameterNodeWrapper instance: records connectGui/disconnectGui
    def __init__(self, log):
        self.log = log

    def connectGui(self, ui):  # noqa: N802
        self.log.append("connect")
        return "tag"

    def disconnectGui(self, tag):  # noqa: N802
        self.log.append(f"disconnect {tag}")


def test_panel_plumbing_binds_unbinds_and_runs_the_hooks(monkeypatch):
    import VoCoSlicerLib

    log = []
    # a real reload here would replace the classes under every later test: record it instead
    monkeypatch.setattr(VoCoSlicerLib, "reload_package", lambda: log.append("package reload"))

    class Base:
        def onReload(self):  # noqa: N802 - stands for ScriptedLoadableModuleWidget.onReload
            log.append("base reload")

    class Widget(module_support.PanelPlumbing, Base):
        ui = object()
        logic = types.SimpleNamespace(getParameterNode=lambda: Wrapper(log))
        parent = types.SimpleNamespace(isEntered=True)

        def parameterNodeSet(self):  # noqa: N802
            log.append("set")

        def sceneClosing(self):  # noqa: N802
            log.append("closing")

    w = Widget()
    w.enter()
    w.exit()
    assert log == ["connect", "set", "disconnect tag"]
    w.exit()  # twice: nothing to disconnect
    log.clear()
    w.enter()
    w.onSceneStartClose(None, None)
    w.onSceneEndClose(None, None)
    assert log == ["connect", "set", "disconnect tag", "closing", "connect", "set"]
    log.clear()
    w.onReload()
    assert log == ["package reload", "base reload"]
