"""CLI papercuts: the warm worker's default model, and an official checkpoint file given as ``--model``."""

from __future__ import annotations

import io
import json

import numpy as np
import SimpleITK as sitk
import torch
from helpers_batch import box_volume, register_tiny, save_tiny_bundle

from vocoslicer.cli import main
from vocoslicer.infer.worker import Worker
from vocoslicer.io import write_image


def test_worker_segment_request_without_model_uses_the_default(tmp_path, monkeypatch):
    from vocoslicer.models import installed

    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    register_tiny()
    default = save_tiny_bundle(tmp_path / "default")
    monkeypatch.setattr(installed, "demo_bundle_path", lambda: default)  # the default of `segment` without --model
    img = write_image(box_volume(0), tmp_path / "ct.nii.gz")
    req = {"id": 1, "op": "segment", "input": str(img), "output": str(tmp_path / "seg.nii.gz"), "device": "cpu"}
    out = io.StringIO()
    Worker(io.StringIO(json.dumps(req) + "\n"), out, device="cpu").serve()
    final = [json.loads(line) for line in out.getvalue().splitlines()][-1]
    assert final["kind"] == "result", final
    assert final["model"].startswith("thr-test v1.2.3")
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "seg.nii.gz")))
    truth = sitk.GetArrayFromImage(box_volume(0)) > 50
    dice = 2 * np.count_nonzero((got == 6) & truth) / (np.count_nonzero(got == 6) + np.count_nonzero(truth))
    assert dice > 0.9 and set(np.unique(got)) == {0, 6}  # the CPU label path resamples from the 2 mm grid


def test_classify_request_still_needs_a_model(tmp_path):
    out = io.StringIO()
    req = {"id": 2, "op": "classify", "input": str(tmp_path / "x.nii.gz")}
    Worker(io.StringIO(json.dumps(req) + "\n"), out, device="cpu").serve()
    final = json.loads(out.getvalue().splitlines()[-1])
    assert final["kind"] == "error" and "needs 'model'" in final["message"]


def test_segment_accepts_an_official_checkpoint_path(tmp_path, monkeypatch, capsys):
    from vocoslicer.models.swin import build_swinunetr

    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    net = build_swinunetr(None, feature_size=12, out_channels=21)  # the official VoComni key layout, tiny width
    ckpt = tmp_path / "my_vocomni.pt"
    torch.save({"epoch": 3, "state_dict": net.state_dict()}, ckpt)
    img = write_image(box_volume(0), tmp_path / "ct.nii.gz")
    assert main(["segment", str(img), "-o", str(tmp_path / "seg.nii.gz"), "--model", str(ckpt), "--device", "cpu",
                 "--fast"]) == 0
    assert "my-vocomni" in capsys.readouterr().out
    labels = (tmp_path / "seg.labels.csv").read_text().splitlines()
    assert len(labels) == 21 and "liver" in labels[6]  # the VoComni table, inferred from 21 outputs
    seg = sitk.ReadImage(str(tmp_path / "seg.nii.gz"))
    assert seg.GetSize() == box_volume(0).GetSize()
    assert not (tmp_path / "home" / "models" / "my-vocomni").exists()  # converted in the cache, not installed


def test_checkpoint_that_cannot_be_converted_gives_a_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    ckpt = tmp_path / "other.pt"
    torch.save({"state_dict": {"unrelated.weight": torch.zeros(3)}}, ckpt)
    img = write_image(box_volume(0), tmp_path / "ct.nii.gz")
    assert main(["segment", str(img), "-o", str(tmp_path / "seg.nii.gz"), "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vocoslicer models import" in err and "zip holds no" not in err
