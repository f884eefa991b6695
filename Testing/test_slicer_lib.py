"""VoCoSlicerLib pieces other than MRML I/O: state machine, parameters -> command lines, catalog/cohort views,
live plots (on a real slicer-core scene), dependency checks, and the engine command/environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from VoCoSlicerLib import cohort_view, deps, engine, models_view, params
from VoCoSlicerLib.state import InvalidTransition, JobState, JobStateMachine

# ---------------------------------------------------------------------------------------------- state machine


def test_state_machine_runs_through_a_job_and_drives_the_button():
    seen = []
    sm = JobStateMachine(action="Segment", on_change=lambda old, new: seen.append((old.value, new.value)))
    assert sm.view().button_text == "Segment" and sm.view().inputs_enabled
    sm.start()
    assert sm.busy and sm.view().button_text == "Cancel" and not sm.view().inputs_enabled
    assert sm.view().progress_percent == -1  # no total yet: busy indicator
    sm.apply_event({"kind": "progress", "step": 3, "total": 4, "stage": "inference"})
    assert sm.view().progress_percent == 75 and sm.view().progress_text == "inference 75%"
    sm.apply_event({"kind": "log", "message": "ignored"})
    sm.apply_event({"kind": "done", "status": "ok"})
    assert sm.state is JobState.DONE and sm.view().progress_percent == 100
    sm.reset()
    assert seen == [("idle", "running"), ("running", "done"), ("done", "idle")]


def test_state_machine_failure_keeps_the_jobs_message_and_cancel_returns_to_idle():
    sm = JobStateMachine(action="Finetune")
    sm.start()
    sm.apply_event({"kind": "error", "message": "cohort: no labelled cases"})
    sm.apply_event({"kind": "done", "status": "failed"})
    assert sm.state is JobState.FAILED and "no labelled cases" in sm.view().progress_text
    assert sm.view().button_text == "Finetune" and sm.view().button_enabled
    sm.start()  # retry straight from failed
    sm.request_cancel()
    assert sm.view().button_text == "Cancelling..." and not sm.view().button_enabled
    sm.finish("cancelled")
    assert sm.state is JobState.IDLE and sm.message == "cancelled"
    with pytest.raises(InvalidTransition):
        sm.request_cancel()  # nothing to cancel


def test_done_event_after_the_job_ended_is_ignored():
    sm = JobStateMachine()
    sm.apply_event({"kind": "done", "status": "ok"})  # stale event from a previous run
    assert sm.state is JobState.IDLE


# ----------------------------------------------------------------------------------------- params -> CLI args


def test_segment_and_classify_args():
    p = params.SegmentParams(model="demo@1.0.0", device="cpu", fast=True)
    assert p.segment_args("/t/in.nrrd", "/t/out.nii.gz") == [
        "segment", "/t/in.nrrd", "-o", "/t/out.nii.gz", "--model", "demo@1.0.0", "--device", "cpu", "--fast",
        "--uncertainty", "--events", "stdout"]
    assert params.SegmentParams().segment_args("a", "b") == ["segment", "a", "-o", "b", "--device", "auto",
                                                             "--uncertainty", "--events", "stdout"]
    mapped = params.SegmentParams(uncertaintyMap=True)
    assert mapped.segment_args("a", "/t/job/seg.nii.gz")[-4:-2] == ["--uncertainty-map", "/t/job/uncertainty.nii.gz"]
    assert mapped.uncertainty_request("/t/job/seg.nii.gz") == {"uncertainty": True,
                                                               "uncertainty_map": "/t/job/uncertainty.nii.gz"}
    assert params.SegmentParams().uncertainty_request("o") == {"uncertainty": True}
    assert params.SegmentParams(model="m").classify_args("a", "r.json") == [
        "classify", "a", "-o", "r.json", "--model", "m", "--device", "auto", "--events", "stdout"]
    with pytest.raises(ValueError, match="device"):
        params.SegmentParams(device="gpu").segment_args("a", "b")
    with pytest.raises(ValueError, match="classification model"):
        params.SegmentParams().classify_args("a", "r.json")


def test_segment_and_finetune_args_are_accepted_by_the_engine_parser():
    from vocoslicer.cli import build_parser

    ns = build_parser().parse_args(params.SegmentParams(device="cpu", fast=True, uncertaintyMap=True).segment_args(
        "in.nrrd", "o.nii.gz"))
    assert ns.command == "segment" and ns.fast and ns.device == "cpu" and ns.output == "o.nii.gz"
    assert ns.uncertainty and ns.uncertainty_map == "uncertainty.nii.gz"
    assert ns.events == "stdout"
    ns = build_parser().parse_args(params.SegmentParams(model="c").classify_args("in.nrrd", "o.json"))
    assert (ns.command, ns.model, ns.output, ns.events) == ("classify", "c", "o.json", "stdout")
    row = models_view.ModelRow("voco-b-ssl", "1.0.0")
    ns = build_parser().parse_args(models_view.download_args(row))
    assert (ns.id, ns.events) == ("voco-b-ssl@1.0.0", "stdout")
    f = params.FinetuneParams(baseModel="demo", cohortDir="/c", steps=7, semiSupervised=False)
    ns = build_parser().parse_args(f.args("/runs/ft", resume=True))
    assert (ns.cohort, ns.init, ns.out, ns.steps, ns.semi, ns.resume) == ("/c", "demo", "/runs/ft", 7, False, True)
    assert ns.ssl_weight == 0.0
    ns = build_parser().parse_args(params.FinetuneParams(baseModel="demo", cohortDir="/c", vocoLoss=True).args("/r"))
    assert ns.ssl_weight == 1.0 and ns.semi


def test_cohort_args_match_the_engine_parser(tmp_path):
    from vocoslicer.cli import build_parser

    c = params.CohortParams(cohortDir=str(tmp_path / "c"), annotator="dr x")
    args = c.add_args("img.nrrd", "lab.nrrd", "lab.labels.csv", "demo", "1.0.0", corrected=False)
    ns = build_parser().parse_args(args)
    assert (ns.image, ns.label, ns.labels, ns.model_id, ns.model_version, ns.uncorrected, ns.by) == \
        ("img.nrrd", "lab.nrrd", "lab.labels.csv", "demo", "1.0.0", True, "dr x")
    assert build_parser().parse_args(c.list_args()).json
    with pytest.raises(ValueError, match="cohort folder"):
        params.CohortParams().add_args("img.nrrd")
    with pytest.raises(ValueError, match="label map"):
        c.add_args("img.nrrd", labels_csv="x.csv")


def test_finetune_and_pretrain_args():
    f = params.FinetuneParams(baseModel="demo", cohortDir="/c", steps=50, learningRate=2e-4, batchSize=1,
                              semiSupervised=False, device="cuda")
    assert f.args("/r", resume=True) == ["finetune", "--cohort", "/c", "--init", "demo", "--out", "/r", "--steps",
                                         "50", "--lr", "0.0002", "--batch", "1", "--no-semi", "--device", "cuda",
                                         "--resume"]
    with pytest.raises(ValueError, match="steps"):
        params.FinetuneParams(baseModel="m", cohortDir="/c", steps=0).args("/r")
    with pytest.raises(ValueError, match="model"):
        params.FinetuneParams(cohortDir="/c").args("/r")
    p = params.PretrainParams(method="voco", dataDirs=["/d1", "/d2"], modelSize="L", gpus=2, steps=10,
                              batchSize=4, cropSize=64, outputDir="/o", initCheckpoint="/ck.pt")
    assert p.args() == ["pretrain", "voco", "--data", "/d1", "/d2", "--out", "/o", "--size", "L", "--steps", "10",
                        "--batch", "4", "--crop", "64", "--gpus", "2", "--init", "/ck.pt"]
    assert p.args(resume=True)[-1] == "--resume"
    mim = params.PretrainParams(**{**p.__dict__, "method": "mim", "modelSize": "S", "initCheckpoint": "/tok"})
    assert mim.args()[-2:] == ["--tokenizer", "/tok"]
    for bad, match in ((dict(method="simclr"), "method"), (dict(dataDirs=[]), "data folder"),
                       (dict(outputDir=""), "output"), (dict(gpus=0), "gpus"), (dict(modelSize="S"), "size"),
                       (dict(method="mim", modelSize="B", initCheckpoint=""), "tokenizer"),
                       (dict(method="tokenizer", modelSize="tiny"), "from scratch")):
        with pytest.raises(ValueError, match=match):
            params.PretrainParams(**{**p.__dict__, **bad}).args()
    assert p.torchrun_command() == ("python -m torch.distributed.run --nproc_per_node=2 --standalone -m vocoslicer "
                                    "pretrain voco --data /d1 /d2 --out /o --size L --steps 10 --batch 4 --crop 64 "
                                    "--init /ck.pt")
    assert "--nnodes=4 --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR" in p.torchrun_command(nnodes=4)


def test_torchrun_command_matches_the_engines_own(tmp_path):
    p = params.PretrainParams(method="voco", dataDirs=[str(tmp_path)], modelSize="L", gpus=2, steps=10, batchSize=4,
                              cropSize=64, outputDir=str(tmp_path / "o"))
    out = subprocess.run([sys.executable, "-m", "vocoslicer", *p.args(), "--print-torchrun"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == p.torchrun_command(python=sys.executable)


def test_pretrain_args_are_accepted_by_the_engine_parser(tmp_path):
    from vocoslicer.cli import build_parser

    p = params.PretrainParams(method="tokenizer", dataDirs=[str(tmp_path)], modelSize="tiny", steps=3, batchSize=1,
                              cropSize=32, outputDir=str(tmp_path / "run"))
    ns = build_parser().parse_args(p.args(resume=True))
    assert (ns.method, ns.size, ns.steps, ns.batch, ns.gpus, ns.resume) == ("tokenizer", "tiny", 3, 1, 1, True)
    assert str(ns.out) == str(tmp_path / "run")
    mim = params.PretrainParams(**{**p.__dict__, "method": "mim", "initCheckpoint": str(tmp_path)})
    assert build_parser().parse_args(mim.args()).tokenizer == str(tmp_path)


def test_params_from_a_parameter_node_like_object():
    from pathlib import Path
    from types import SimpleNamespace

    pn = SimpleNamespace(method="voco", dataDirs=("/a",), modelSize="B", gpus=1, steps=5, batchSize=1, cropSize=96,
                         outputDir=Path("/out"), initCheckpoint=Path("."))
    p = params.from_parameter_node(params.PretrainParams, pn)
    assert p.outputDir == "/out" and p.initCheckpoint == "" and p.dataDirs == ["/a"]


# ------------------------------------------------------------------------------------------- engine process


def test_engine_python_and_copyable_command():
    assert engine.python_executable()  # PythonSlicer inside Slicer, this interpreter here
    assert engine.shell_command(["segment", "a b.nrrd"], python="/opt/Slicer/bin/PythonSlicer") == \
        "/opt/Slicer/bin/PythonSlicer -m vocoslicer segment 'a b.nrrd'"


# --------------------------------------------------------------------------------------------- model catalog


CATALOG = {"models": [
    {"id": "demo-abdomen", "version": "1.0.0", "task": "segmentation", "installed": True, "size_bytes": 2_400_000,
     "license": "Apache-2.0", "path": "/m/demo/1.0.0"},
    {"id": "demo-abdomen", "version": "1.0.10", "task": "segmentation", "installed": True, "path": "/m/demo/1.0.10",
     "parent": {"id": "demo-abdomen", "version": "1.0.0"}},
    {"id": "voco-b", "version": "2.0", "task": "segmentation", "installed": False, "size_mb": 300, "licence": "CC"},
    {"id": "cls", "version": "1.0", "task": "classification", "installed": True},
    {"version": "no id: ignored"},
]}


def test_catalog_rows_and_selectors():
    rows = models_view.parse_catalog(json.dumps(CATALOG))
    assert [r.id for r in rows] == ["cls", "demo-abdomen", "demo-abdomen", "voco-b"]
    voco = rows[-1]
    assert voco.cells() == ("voco-b", "2.0", "segmentation", "available", "300.0 MB", "CC")
    seg = models_view.selectable(rows, "segmentation")
    assert [r.version for r in seg] == ["1.0.10", "1.0.0"]  # newest first, numeric version order
    assert seg[0].display_name == "demo-abdomen 1.0.10 (finetuned from demo-abdomen@1.0.0)"
    assert models_view.find(rows, "demo-abdomen").version == "1.0.10"
    assert models_view.find(rows, "/m/demo/1.0.0").version == "1.0.0"
    assert models_view.find(rows, "nope") is None
    assert models_view.download_args(voco) == ["models", "download", "voco-b@2.0", "--events", "stdout"]
    assert models_view.parse_catalog(json.dumps(CATALOG["models"][:1]))[0].spec == "/m/demo/1.0.0"
    assert models_view.format_size(999) == "999 B" and models_view.format_size(None) == ""


def test_catalog_from_the_engines_models_list_json():
    out = subprocess.run([sys.executable, "-m", "vocoslicer", "models", "list", "--json"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    rows = models_view.parse_catalog(out.stdout)
    assert rows and all(r.id and r.version for r in rows)
    engine_json = {"catalog": [{"id": "a", "version": "1.0.0", "task": "segmentation", "size_bytes": 5_000_000,
                                "licence": "MIT", "installed": True},
                               {"id": "b", "version": "2.0.0", "task": "backbone", "installed": False}],
                   "installed": [{"id": "a", "version": "1.0.0", "task": "segmentation", "path": "/m/a/1.0.0",
                                  "title": ""},
                                 {"id": "a-ft", "version": "1.0.1", "task": "segmentation", "path": "/m/a-ft"}]}
    rows = models_view.parse_catalog(json.dumps(engine_json))
    assert [(r.id, r.installed, r.size_bytes, r.license, r.path) for r in rows] == [
        ("a", True, 5_000_000, "MIT", "/m/a/1.0.0"), ("a-ft", True, None, "", "/m/a-ft"), ("b", False, None, "", "")]


# -------------------------------------------------------------------------------------------------- cohort


def test_cohort_counts_and_add_commands(tmp_path):
    listed = {"version": 7, "cases": [{"id": "a", "label": "l1", "split": "train"},
                                      {"id": "b", "label": "l2", "split": "val"},
                                      {"id": "c", "label": None, "split": None}]}
    counts = cohort_view.counts_from_list(json.dumps(listed))
    assert (counts.total, counts.labelled, counts.unlabelled, counts.train, counts.val) == (3, 2, 1, 1, 1)
    assert "1 unlabelled" in counts.summary() and cohort_view.CohortCounts().summary() == "empty cohort"
    p = params.CohortParams(cohortDir=str(tmp_path / "new"))
    files = cohort_view.CaseFiles(tmp_path / "i.nrrd", tmp_path / "l.nrrd", tmp_path / "l.labels.csv")
    cmds = cohort_view.add_commands(p, files, "demo", "1.0.0")
    assert cmds[0] == ["cohort", "init", str(tmp_path / "new"), "--labels", str(tmp_path / "l.labels.csv")]
    assert cmds[1][:2] == ["cohort", "add"] and "--uncorrected" not in cmds[1]
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "manifest.json").write_text("{}")
    assert len(cohort_view.add_commands(p, cohort_view.CaseFiles(tmp_path / "i.nrrd"))) == 1


# ---------------------------------------------------------------------------------------------------- plots


def test_metric_history_to_plot_chart(slicer_core):
    from VoCoSlicerLib import plots

    h = plots.MetricHistory()
    assert not h.add({"kind": "progress", "step": 1})
    for s in range(1, 6):
        h.add({"kind": "metric", "step": s, "loss": 1.0 / s, "lr": 1e-4, "nan": float("nan")})
    h.add({"kind": "metric", "step": 5, "split": "val", "dice": 0.5})
    h.add({"kind": "metric", "step": 3, "loss": 0.9})  # resumed run re-reports from step 3: 4 and 5 are gone
    assert h.names() == ["train/loss", "train/lr", "val/dice"]
    steps, loss = h.arrays("train/loss")
    np.testing.assert_allclose(steps, [1, 2, 3])
    np.testing.assert_allclose(loss, [1, 0.5, 0.9])
    scene = slicer_core.scene
    live = plots.LiveChart("finetune demo")
    chart = live.follow(scene)
    live.update(scene, h)
    h.add({"kind": "metric", "step": 10, "split": "val", "dice": 0.8})
    live.update(scene, h)
    assert chart.GetNumberOfPlotSeriesNodes() == 3  # refreshed in place, not duplicated
    dice = [chart.GetNthPlotSeriesNode(i) for i in range(3) if chart.GetNthPlotSeriesNode(i).GetName() == "val/dice"]
    t = dice[0].GetTableNode().GetTable()
    assert t.GetNumberOfRows() == 2 and t.GetValueByName(1, "val/dice").ToDouble() == pytest.approx(0.8)


def test_throughput_and_eta():
    from VoCoSlicerLib.plots import Throughput

    tp = Throughput()
    assert tp.text() == ""
    tp.add({"kind": "progress", "t": 100.0, "step": 0, "total": 1000})
    tp.add({"kind": "progress", "t": 110.0, "step": 100, "total": 1000})
    assert tp.steps_per_s == pytest.approx(10.0) and tp.eta == pytest.approx(90.0)
    assert tp.text() == "10 steps/s, ETA 1 min 30 s"
    tp.add({"kind": "progress", "t": 111.0, "step": 110, "total": 1000, "eta_s": 7200})
    assert tp.text().endswith("ETA 2 h 00 min")


# -------------------------------------------------------------------------------------------------- deps


def test_requirements_and_protected_constraints(tmp_path):
    req = os.path.join(os.path.dirname(deps.__file__), "..", "Resources", "requirements.txt")
    lines = deps.requirement_lines(req)
    names = {deps.requirement_name(x).lower() for x in lines}
    assert names == {"monai", "einops", "nibabel", "safetensors", "pyyaml", "filelock", "highdicom"}
    assert not names & {"torch", "numpy", "simpleitk"}  # Slicer's / the PyTorch extension's own
    assert all("==" in x for x in lines)  # pinned
    assert deps.protected_constraints({"torch": "2.5.1", "numpy": None, "SimpleITK": "2.4.0"}) == \
        "torch==2.5.1\nSimpleITK==2.4.0\n"
    assert deps.missing_requirements(["monai==1.6.1", "einops==0.8.2", "x>=1"],
                                     {"monai": "1.5.0", "einops": "0.8.2"}) == ["monai==1.6.1", "x>=1"]


@pytest.mark.slow  # imports torch in a child process (1 s alone, up to 10 s on a loaded 2-core machine)
def test_env_report_from_the_real_probe_and_advice():
    out = subprocess.run([sys.executable, "-m", "vocoslicer", "env", "--json"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    rep = deps.EnvReport.from_json(out.stdout)
    assert rep.torch and rep.packages["monai"]
    assert ("PyTorch", rep.torch) in rep.rows()
    cpu_build = deps.EnvReport(torch="2.5.0+cpu", driver="550.54", packages={"monai": None})
    advice = " ".join(cpu_build.advice())
    assert "CPU-only build" in advice and "monai" in advice
    assert "too old" in " ".join(deps.EnvReport(torch="2.1.0").advice())
    assert "PyTorch is missing" in deps.EnvReport().advice()[0]


RELOAD_CHECK = """
import VoCoSlicerLib
from VoCoSlicerLib import job_driver, mrml_io, state
before = state.JobStateMachine
order = VoCoSlicerLib.reload_package()
assert order.index("VoCoSlicerLib.state") < order.index("VoCoSlicerLib.job_driver"), order
assert "VoCoSlicerLib.mrml_io" in order
assert state.JobStateMachine is not before  # really re-executed
assert job_driver.JobStateMachine is state.JobStateMachine  # dependants see the fresh classes
print("ok")
"""


def test_reload_package_reloads_every_loaded_submodule_leaves_first():
    # in a child interpreter: reloading inside the test session would swap classes under other tests
    lib_root = os.path.dirname(os.path.dirname(engine.__file__))  # the folder holding VoCoSlicerLib
    out = subprocess.run([sys.executable, "-c", RELOAD_CHECK], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": lib_root})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
