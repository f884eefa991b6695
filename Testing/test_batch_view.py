"""VoCoSlicerLib.batch_view: the arguments it builds are what the real engine parses and runs as a batch, and its
progress text and status summary come from a real batch's events and status file (Threshold model in-process)."""

from __future__ import annotations

import json

import pytest
from helpers_batch import box_volume, register_tiny, save_tiny_bundle

from vocoslicer.cli import build_parser, main
from vocoslicer.infer import batch_cli
from vocoslicer.io import write_image
from VoCoSlicerLib.batch_view import cohort_proposals_args, progress_text, read_status, segment_folder_args


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
