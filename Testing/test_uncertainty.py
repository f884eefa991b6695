"""Per-case uncertainty at inference: the score ranks doubt, costs no extra pass and never changes the labels."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers_models import Threshold

from vocoslicer.data.phantom import generate_phantom
from vocoslicer.errors import UserError
from vocoslicer.infer.segment import segment_image
from vocoslicer.infer.uncertainty import UncertaintyRequest, case_report, normalised_entropy, uncertainty_json_path
from vocoslicer.labels import Label, LabelTable
from vocoslicer.models.bundle import ModelBundle, new_bundle_meta
from vocoslicer.models.factory import build_model

TISSUE = LabelTable((Label(1, "tissue", (200, 100, 100)),))
# the Threshold model splits at -500 HU: body tissue and air are far from it on a clean scan (a confident model);
# strong noise pushes voxels towards the split
PRE = {"orientation": "RAS", "spacing": [8.0, 8.0, 8.0], "pad_value": -1024,
       "intensity": {"a_min": -1000.0, "a_max": 0.0, "b_min": 0.0, "b_max": 1.0, "clip": True}}
INF = {"roi_size": [32, 32, 32], "overlap": 0.25, "mode": "gaussian", "sw_batch_size": 2}
UNET = {"in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2], "num_res_units": 0}


def threshold_bundle() -> ModelBundle:
    meta = new_bundle_meta("threshold", "1.0.0", "segmentation", "unet", UNET, preprocessing=PRE, inference=INF,
                           channel_values=[0, 1])
    return ModelBundle(meta=meta, labels=TISSUE)


def test_entropy_is_zero_when_certain_and_one_when_uniform() -> None:
    p = torch.tensor([[1.0, 0.5, 1 / 3], [0.0, 0.5, 1 / 3], [0.0, 0.0, 1 / 3]])
    h = normalised_entropy(p)
    assert h[0] == pytest.approx(0.0, abs=1e-6) and h[2] == pytest.approx(1.0, abs=1e-5)
    assert 0.5 < float(h[1]) < 0.7  # log 2 / log 3
    rep = case_report(np.array([0.9, 0.1, 0.3]), np.array([0, 1, 2]), [0, 5, 7], {5: "a"})
    assert rep["uncertainty"] == pytest.approx(0.2) and rep["structures"]["a"]["entropy"] == pytest.approx(0.1)
    assert rep["structures"]["7"]["voxels"] == 1
    empty = case_report(np.array([0.2, 0.4]), np.array([0, 0]), [0, 1])
    assert empty["foreground_voxels"] == 0 and empty["uncertainty"] == pytest.approx(0.3)  # never "certain"


@pytest.mark.parametrize("smooth_fast", [False, True])
def test_confident_model_scores_an_easy_phantom_below_a_noisy_one(smooth_fast: bool) -> None:
    """The issue's test: same model, same anatomy; only the image noise differs, and the score follows it. The
    labels are exactly those of a plain ``segment_image`` (same scores, no second pass)."""
    bundle = threshold_bundle()
    scores = {}
    for noise in (2.0, 450.0):
        img = generate_phantom(3, spacing=(8, 8, 8), noise_hu=noise).image
        req = UncertaintyRequest(want_map=True)
        label = segment_image(img, bundle, model=Threshold(), device="cpu", fast=smooth_fast, uncertainty=req)
        plain = segment_image(img, bundle, model=Threshold(), device="cpu", fast=smooth_fast)
        assert np.array_equal(sitk.GetArrayViewFromImage(label), sitk.GetArrayViewFromImage(plain))
        m = req.map_image
        assert m is not None and m.GetSize() == img.GetSize() and np.allclose(m.GetOrigin(), img.GetOrigin())
        arr = sitk.GetArrayViewFromImage(m)
        assert 0.0 <= arr.min() and arr.max() <= 1.0 + 1e-5
        assert req.report["foreground_voxels"] > 100
        assert req.report["structures"]["tissue"]["entropy"] == pytest.approx(req.report["uncertainty"], abs=1e-4)
        scores[noise] = req.report["uncertainty"]
    assert scores[2.0] < 0.6 * scores[450.0], scores


def test_flip_tta_reports_disagreement_and_bad_choice_is_a_user_error() -> None:
    img = generate_phantom(3, spacing=(8, 8, 8), noise_hu=450.0).image
    req = UncertaintyRequest(tta="flip")
    segment_image(img, threshold_bundle(), model=Threshold(), device="cpu", uncertainty=req)
    # a voxel-wise model is flip-equivariant: the flipped passes agree up to the window blending at the borders
    assert 0.0 <= req.report["tta_disagreement"] < 0.05 and req.report["tta"] == "flip"
    with pytest.raises(UserError, match="unknown --tta"):
        UncertaintyRequest(tta="rotate")


def saved_unet_bundle(path: Path) -> Path:
    torch.manual_seed(0)
    meta = new_bundle_meta("tiny-unc", "1.0.0", "segmentation", "unet", UNET, preprocessing=PRE, inference=INF,
                           channel_values=[0, 1])
    return ModelBundle(meta=meta, labels=TISSUE).save(path, build_model("unet", UNET).state_dict())


def test_segment_cli_writes_score_json_and_map(tmp_path: Path) -> None:
    from vocoslicer.data.phantom import write_phantom

    bundle = saved_unet_bundle(tmp_path / "b")
    files = write_phantom(generate_phantom(1, spacing=(8, 8, 8)), tmp_path / "ph")
    out = tmp_path / "seg.nii.gz"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "vocoslicer", "segment", str(files["image"]), "-o", str(out),
                        "--model", str(bundle), "--device", "cpu", "--uncertainty-map", str(tmp_path / "u.nrrd"),
                        "--events", "stdout"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(uncertainty_json_path(out).read_text())
    assert uncertainty_json_path(out).name == "seg.uncertainty.json"
    assert 0 <= rep["uncertainty"] <= 1 and rep["model"] == "tiny-unc" and rep["map"].endswith("u.nrrd")
    events = [json.loads(line) for line in r.stdout.splitlines()]
    art = [e for e in events if e["kind"] == "artifact"][0]
    assert art["uncertainty"] == rep["uncertainty"] and art["uncertainty_json"].endswith(".uncertainty.json")
    assert any(e["kind"] == "metric" and "structures" in e for e in events)
    assert sitk.ReadImage(str(tmp_path / "u.nrrd")).GetSize() == sitk.ReadImage(str(files["image"])).GetSize()
    bad = subprocess.run([sys.executable, "-m", "vocoslicer", "segment", str(files["image"]), "-o",
                          str(tmp_path / "x.nii.gz"), "--model", str(bundle), "--device", "cpu", "--uncertainty-map",
                          str(tmp_path / "u.txt")], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--uncertainty-map" in bad.stderr
    assert not (tmp_path / "x.nii.gz").exists()  # refused before any inference: nothing half-written


def test_worker_request_returns_the_score(tmp_path: Path) -> None:
    from vocoslicer.data.phantom import write_phantom
    from vocoslicer.infer.worker import Worker

    bundle = saved_unet_bundle(tmp_path / "b")
    files = write_phantom(generate_phantom(2, spacing=(8, 8, 8)), tmp_path / "ph")
    req = {"id": 1, "op": "segment", "input": str(files["image"]), "output": str(tmp_path / "s.nii.gz"),
           "model": str(bundle), "device": "cpu", "uncertainty": True}
    stdout = io.StringIO()
    Worker(io.StringIO(json.dumps(req) + "\n"), stdout, device="cpu").serve()
    final = json.loads(stdout.getvalue().splitlines()[-1])
    assert final["kind"] == "result", final
    assert final["uncertainty"] == json.loads(Path(final["uncertainty_json"]).read_text())["uncertainty"]
