"""Classification: tiny random VoCo classifier bundle, CLI JSON/CSV output, bad input, SSL weights into the encoder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from vocoslicer.cli import main
from vocoslicer.errors import UserError
from vocoslicer.models.bundle import ModelBundle, new_bundle_meta
from vocoslicer.models.checkpoints import load_official_weights
from vocoslicer.models.classifier import VoCoClassifier
from vocoslicer.models.swin import build_swinunetr

CLASSES = ["normal", "common pneumonia", "covid-19"]
TINY = {"size": None, "feature_size": 12, "num_classes": 3}


def make_bundle(path: Path, classes: list[str] = CLASSES, args: dict | None = None) -> Path:
    torch.manual_seed(0)
    model = VoCoClassifier(**TINY)
    meta = new_bundle_meta("tiny-cls", "1.0.0", "classification", "voco_classifier", args or TINY,
                           classes=classes, inference={"input_size": [64, 32, 32]})
    return ModelBundle(meta=meta).save(path, model.state_dict())


def ct_image(path: Path, values: tuple[float, float] = (-1000, 1000), nan: bool = False) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.uniform(*values, size=(20, 30, 40)).astype(np.float32)
    if nan:
        arr[3, 3, 3] = np.nan
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 1.1, 2.5))
    img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("cls") / "bundle")


def test_classify_json_and_csv(bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = ct_image(tmp_path / "ct.nii.gz")
    out = tmp_path / "res.json"
    assert main(["classify", str(img), "--model", str(bundle_dir), "-o", str(out), "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    probs = res["probabilities"]
    assert res["classes"] == CLASSES and len(probs) == 3 and abs(sum(probs) - 1) < 1e-4
    assert res["predicted"]["index"] == int(np.argmax(probs)) and res["predicted"]["name"] in CLASSES
    out_csv = tmp_path / "res.csv"
    assert main(["classify", str(img), "--model", str(bundle_dir), "-o", str(out_csv)]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["class"] for r in rows] == CLASSES
    assert np.allclose([float(r["probability"]) for r in rows], probs, atol=1e-5)  # deterministic
    assert sum(int(r["predicted"]) for r in rows) == 1


def test_bad_inputs_write_nothing(bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = ct_image(tmp_path / "ct.nii.gz")
    bad_img = ct_image(tmp_path / "nan.nii.gz", nan=True)
    cases = [
        [str(img), "--model", str(bundle_dir), "-o", str(tmp_path / "o.txt")],
        [str(bad_img), "--model", str(bundle_dir), "-o", str(tmp_path / "o1.json")],
        [str(img), "--model", str(bundle_dir), "-o", str(tmp_path / "o2.json"), "--device", "cuda"]
        if not torch.cuda.is_available() else [str(tmp_path / "absent.nii.gz"), "--model", str(bundle_dir)],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(["classify", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[0].startswith("vocoslicer: error:")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_labels_not_matching_head_and_wrong_task(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="3 outputs but 4 classes"):
        make_bundle(tmp_path / "b4", classes=[*CLASSES, "extra"])
    seg = ModelBundle(meta=new_bundle_meta("seg", "1.0.0", "segmentation", "swinunetr",
                                           {"size": None, "feature_size": 12, "out_channels": 2},
                                           labels=[{"value": 1, "name": "liver"}]))
    from vocoslicer.labels import Label, LabelTable

    seg.labels = LabelTable((Label(1, "liver"),))
    seg_dir = seg.save(tmp_path / "seg", build_swinunetr(None, feature_size=12, out_channels=2).state_dict())
    from vocoslicer.infer.classify import run_classify

    with pytest.raises(UserError, match="not a classification model"):
        run_classify(str(ct_image(tmp_path / "ct.nii.gz")), None, str(seg_dir))


def test_non_ct_range_warns(bundle_dir: Path, tmp_path: Path) -> None:
    from vocoslicer.infer.classify import run_classify
    from vocoslicer.jobs.events import EventSink

    img = ct_image(tmp_path / "mr.nii.gz", values=(0, 1))
    sink = EventSink(path=tmp_path / "ev.jsonl")
    run_classify(str(img), str(tmp_path / "r.json"), str(bundle_dir), "cpu", events=sink)
    sink.close()
    events = [json.loads(x) for x in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "warning" and "Hounsfield" in e["message"] for e in events)


def test_ssl_checkpoint_loads_into_classifier_encoder() -> None:
    seg = build_swinunetr(None, feature_size=12, out_channels=14)
    prefixes = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
    ssl = {f"module.backbone.{k}": v for k, v in seg.state_dict().items() if k.startswith(prefixes)}
    for pool, dim in (("deepest", 192), ("voco", 288)):
        clf = VoCoClassifier(None, feature_size=12, num_classes=3, pool=pool)
        report = load_official_weights(clf, {"state_dict": ssl})
        assert len(report.loaded) == 145 and report.missing == ["head.weight", "head.bias"]
        assert clf.head.in_features == dim
    with torch.inference_mode():  # the multi-scale variant exercises every encoder block
        assert clf(torch.randn(1, 1, 64, 32, 32)).shape == (1, 3)
