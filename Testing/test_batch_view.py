"""VoCoSlicerLib.batch_view: the arguments it builds are what the real engine parses and runs as a batch, and its
progress text and status summary come from a real batch's events and status file (Threshold model in-process)."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from helpers_batch import box_volume, register_tiny, save_tiny_bundle

from vocoslicer.cli import build_parser, main
from vocoslicer.infer import batch_cli
from vocoslicer.io import write_image
from VoCoSlicerLib.batch_view import (
    FolderSegment,
    cohort_proposals_args,
    progress_text,
    read_status,
    segment_folder_args,
)
from VoCoSlicerLib.params import DEMO_MODEL_ID
from VoCoSlicerLib.state import JobState


def test_arguments_parse_as_a_batch(tmp_path):
    args = segment_folder_args([tmp_path / "in"], tmp_path / "out", model="m@1.0.0", fmt="dicom-seg", fast=True)
    ns = build_parser().parse_args(args)
    assert batch_cli.is_batch(ns) and ns.out_format == "dicom-seg" and ns.model == "m@1.0.0" and ns.fast
    ns = build_parser().parse_args(cohort_proposals_args(tmp_path / "c"))
    assert batch_cli.is_batch(ns) and ns.unlabelled and ns.cohort == str(tmp_path / "c")


def test_bad_choices_are_refused_before_starting(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(ValueError, match="inside the input folder"):
        segment_folder_args([tmp_path / "in"], tmp_path / "in" / "results")
    with pytest.raises(ValueError, match="at least one"):
        segment_folder_args([], tmp_path / "out")
    with pytest.raises(ValueError, match="format"):
        segment_folder_args([tmp_path / "in"], tmp_path / "out", fmt="png")


def test_progress_and_summary_from_a_real_batch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    register_tiny()
    bundle = save_tiny_bundle(tmp_path / "bundle")
    write_image(box_volume(0), tmp_path / "in" / "a.nii.gz")
    write_image(box_volume(1), tmp_path / "in" / "b.nii.gz")
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not an image")
    args = segment_folder_args([tmp_path / "in"], tmp_path / "out", model=str(bundle), device="cpu")
    assert main(["--events", "stdout", *args]) == 2
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    texts = [t for t in map(progress_text, events) if t]
    assert texts[-1] == "3/3 cases, 1 failed"
    assert texts[0].startswith("1/3 cases") and "ETA" in texts[0]
    status = read_status(tmp_path / "out")
    assert sorted(status.done) == ["a", "b"] and status.failed[0][0] == "broken"
    assert status.summary() == "2 segmented, 1 failed"


def test_folder_segment_runs_the_real_batch_through_a_job_driver(tmp_path, monkeypatch):
    """VoCoPretrain's "Segment a folder" without its widgets: the real ``segment`` child process with the bundled
    demo model on two phantoms and one broken file, polled as the panel's timer does; widgets are plain objects."""
    pytest.importorskip("slicer")  # JobDriver's live curves use slicer-core's vtk
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))  # nothing installed but the bundled demo
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["phantom", "--seed", "3", "--count", "2", "--size", "32", "32", "16", "-o", str(tmp_path / "d")]) == 0
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for ct in (tmp_path / "d").glob("*_ct.nii.gz"):  # not the truth label maps next to them
        ct.rename(inp / ct.name)
    (inp / "broken.nii.gz").write_bytes(b"not an image")
    job, run_dirs = FolderSegment(), []

    def new_run():
        run_dirs.append(tmp_path / f"run{len(run_dirs)}")
        return run_dirs[-1]

    with pytest.raises(ValueError, match="input folder"):
        job.toggle(str(tmp_path / "missing"), str(out), run_dir=new_run)
    with pytest.raises(ValueError, match="inside the input folder"):
        job.toggle(str(inp), str(inp / "results"), run_dir=new_run)
    assert not job.busy and not run_dirs  # a refused choice starts nothing and makes no run folder
    assert job.toggle(str(inp), str(out), model=DEMO_MODEL_ID, device="cpu", run_dir=new_run) == "started"
    labels, deadline = [], time.monotonic() + 180
    while job.busy and time.monotonic() < deadline:
        job.tick()
        labels.append(job.label())
        time.sleep(0.05)
    assert not job.busy, "timed out"
    progress = [text for text in labels if " cases" in text]
    assert progress[-1] == "3/3 cases, 1 failed"
    assert any(text.startswith(("1/3 cases", "2/3 cases")) and "ETA" in text for text in progress), progress
    assert job.driver.state.state is JobState.FAILED  # a batch with a failed case exits 2 ...
    summary = job.label()  # ... but the label says what was done
    assert summary.startswith(f"2 segmented, 1 failed into {out}. Failed: broken (") and "..." not in summary
    assert sorted(p.name for p in out.glob("*_ct.nii.gz")) == ["phantom_3_ct.nii.gz", "phantom_4_ct.nii.gz"]
    button, bar, label = SimpleNamespace(), SimpleNamespace(), SimpleNamespace()
    job.show(button, bar, label)
    assert button.text == "Segment folder" and button.enabled and label.text == summary and bar.visible
    assert run_dirs == [tmp_path / "run0"] and "segmented 2 of 3 cases" in job.driver.console_text()
    # Cancel (the same button) once the first case of a fresh folder is through: the label says what was kept
    assert job.toggle(str(inp), str(tmp_path / "out2"), model=DEMO_MODEL_ID, device="cpu") == "started"
    deadline = time.monotonic() + 180
    while job.busy and time.monotonic() < deadline:
        job.tick()
        if job.progress and job.driver.state.state is JobState.RUNNING:
            assert job.toggle("", "") == "cancelling"  # no folder needed to cancel
            assert job.label() == "cancelling"
        time.sleep(0.05)
    assert not job.busy and job.driver.state.state is JobState.IDLE
    assert job.label().startswith("cancelled"), job.label()
