"""Warm worker: a real ``python -m vocoslicer serve --stdio`` child process speaking JSON lines.

Checks the protocol exactly as the Slicer-side client uses it: event lines tagged with the request id, one final
``result``/``error`` line per request, the model cache (second request skips loading), errors that leave the
worker alive, and a clean exit on ``shutdown``.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from vocoslicer.labels import Label, LabelTable
from vocoslicer.models.bundle import ModelBundle, new_bundle_meta
from vocoslicer.models.classifier import VoCoClassifier
from vocoslicer.models.swin import build_swinunetr

TIMEOUT = 120


class Client:
    """Minimal line client with a reader thread (so a hung worker fails the test instead of blocking it)."""

    def __init__(self, home: Path) -> None:
        env = {**os.environ, "VOCOSLICER_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "vocoslicer", "serve", "--stdio", "--device", "cpu"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.raw: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            self.lines.put(line)

    def send(self, obj: dict[str, Any] | str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Events and the final line of the next request."""
        events = []
        while True:
            msg = json.loads(self.lines.get(timeout=TIMEOUT))
            if msg["kind"] in ("result", "error"):
                return events, msg
            events.append(msg)

    def request(self, obj: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        self.send(obj)
        return self.reply()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("worker")
    torch.manual_seed(0)
    cls_meta = new_bundle_meta("tiny-cls", "1.0.0", "classification", "voco_classifier",
                               {"size": None, "feature_size": 12, "num_classes": 2}, classes=["a", "b"],
                               inference={"input_size": [64, 32, 32]})
    cls_dir = ModelBundle(meta=cls_meta).save(tmp / "cls", VoCoClassifier(None, feature_size=12,
                                                                          num_classes=2).state_dict())
    seg_meta = new_bundle_meta("tiny-seg", "1.0.0", "segmentation", "swinunetr",
                               {"size": None, "feature_size": 12, "out_channels": 3},
                               inference={"roi_size": [64, 32, 32], "overlap": 0.25, "mode": "gaussian",
                                          "sw_batch_size": 2})
    seg = ModelBundle(meta=seg_meta, labels=LabelTable((Label(1, "liver"), Label(2, "spleen"))))
    seg_dir = seg.save(tmp / "seg", build_swinunetr(None, feature_size=12, out_channels=3).state_dict())
    arr = np.random.default_rng(0).uniform(-1000, 800, size=(16, 24, 40)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 3.0))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(tmp / "ct.nii.gz"))
    return {"tmp": tmp, "cls": cls_dir, "seg": seg_dir, "ct": tmp / "ct.nii.gz"}


@pytest.mark.slow
def test_worker_protocol_end_to_end(setup: dict[str, Path]) -> None:
    tmp = setup["tmp"]
    client = Client(tmp / "home")
    try:
        _, pong = client.request({"id": 1, "op": "ping"})
        assert pong["kind"] == "result" and pong["id"] == 1 and pong["cached_models"] == []

        first_events, first = client.request({"id": "c1", "op": "classify", "input": str(setup["ct"]),
                                              "model": str(setup["cls"]), "output": str(tmp / "c1.json")})
        assert first["kind"] == "result", first
        assert first["model_cached"] is False and abs(sum(first["probabilities"]) - 1) < 1e-4
        assert first_events and all(e["id"] == "c1" for e in first_events)
        assert any(e["kind"] == "progress" for e in first_events)
        _, second = client.request({"id": "c2", "op": "classify", "input": str(setup["ct"]),
                                    "model": str(setup["cls"])})
        assert second["model_cached"] is True and second["probabilities"] == first["probabilities"]
        assert json.loads((tmp / "c1.json").read_text())["predicted"] == first["predicted"]

        seg_events, seg = client.request({"id": "s1", "op": "segment", "input": str(setup["ct"]),
                                          "model": str(setup["seg"]), "output": str(tmp / "seg.nii.gz")})
        assert seg["kind"] == "result", seg
        assert seg["model_cached"] is False and Path(seg["labels"]).is_file()
        assert any(e["kind"] == "artifact" and e["id"] == "s1" for e in seg_events)
        out = sitk.ReadImage(seg["output"])
        ref = sitk.ReadImage(str(setup["ct"]))
        assert out.GetSize() == ref.GetSize() and np.allclose(out.GetDirection(), ref.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, 1, 2}

        # errors answer with one line and leave the worker running
        client.send("this is not json")
        _, bad = client.reply()
        assert bad == {"id": None, "kind": "error", "code": 2, "message": bad["message"]}
        _, unknown = client.request({"id": 7, "op": "dance"})
        assert unknown["kind"] == "error" and "unknown op" in unknown["message"]
        _, missing = client.request({"id": 8, "op": "segment", "model": str(setup["seg"])})
        assert missing["kind"] == "error" and "input" in missing["message"]
        _, wrong = client.request({"id": 9, "op": "segment", "input": str(setup["ct"]), "model": str(setup["cls"]),
                                   "output": str(tmp / "x.nii.gz")})
        assert wrong["kind"] == "error" and "not a segmentation model" in wrong["message"]
        assert not (tmp / "x.nii.gz").exists()
        if not torch.cuda.is_available():
            _, nocuda = client.request({"id": 10, "op": "classify", "input": str(setup["ct"]),
                                        "model": str(setup["cls"]), "device": "cuda"})
            assert nocuda["kind"] == "error" and nocuda["code"] == 2 and "CUDA" in nocuda["message"]

        _, pong2 = client.request({"id": 11, "op": "ping"})
        assert len(pong2["cached_models"]) == 2 and pong2["served"] == 4
        _, bye = client.request({"id": 12, "op": "shutdown"})
        assert bye["kind"] == "result"
        assert client.proc.wait(timeout=TIMEOUT) == 0
        assert all(json.loads(line) for line in client.raw)  # stdout held protocol lines only
    finally:
        if client.proc.poll() is None:
            client.proc.kill()
            client.proc.wait()
