"""Warm worker: a real ``python -m vocoslicer serve --stdio`` child driven by the real Slicer-side client.

``VoCoSlicerLib.worker_client.WorkerClient`` (stdlib only, what the Slicer module uses) starts the worker and
speaks the JSON-lines protocol; each test checks one promise: event lines tagged with the request id, one final
``result``/``error`` line per request, the model cache (a second request skips loading), errors that leave the
worker alive, a clean exit on ``shutdown`` and a restart on the next request.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
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
from VoCoSlicerLib.worker_client import WorkerClient, WorkerError

TIMEOUT = 120
ARGS = ("-m", "vocoslicer", "serve", "--stdio", "--device", "cpu")


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


@pytest.fixture(scope="module")
def worker(setup: dict[str, Path]) -> Iterator[WorkerClient]:
    client = WorkerClient(python=sys.executable, args=ARGS,
                          env={"VOCOSLICER_HOME": str(setup["tmp"] / "home"), "OMP_NUM_THREADS": "1"})
    with client:
        yield client


def call(client: WorkerClient, op: str, **params: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(events, final line) of one request, through the client's non-blocking API (what the GUI timer uses)."""
    rid = client.submit(op, **params)
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for msg in client.poll():
            assert msg.get("source") != "client", msg  # the worker's stdout holds protocol lines only
            if msg["request_id"] != rid:
                continue
            if msg["kind"] in ("result", "error"):
                return events, msg
            events.append(msg)
        time.sleep(0.01)
    raise AssertionError(f"no answer to {op} within {TIMEOUT} s")


def test_ping_answers_with_its_state(worker: WorkerClient) -> None:
    _, pong = call(worker, "ping")
    assert pong["kind"] == "result" and pong["op"] == "ping" and pong["pid"] == worker.pid
    assert isinstance(pong["cached_models"], list) and isinstance(pong["served"], int)
    _, again = call(worker, "ping")
    assert again["served"] == pong["served"] + 1  # one final line per request, and the worker counts them


def test_classify_tags_its_events_and_the_second_call_uses_the_cached_model(setup, worker) -> None:
    events, first = call(worker, "classify", input=str(setup["ct"]), model=str(setup["cls"]),
                         output=str(setup["tmp"] / "c1.json"))
    assert first["kind"] == "result", first
    assert first["model_cached"] is False and abs(sum(first["probabilities"]) - 1) < 1e-4
    assert events and all(e["id"] == first["id"] for e in events)
    assert any(e["kind"] == "progress" for e in events)
    second = worker.request("classify", timeout=TIMEOUT, input=str(setup["ct"]), model=str(setup["cls"]))
    assert second["model_cached"] is True and second["probabilities"] == first["probabilities"]
    assert json.loads((setup["tmp"] / "c1.json").read_text())["predicted"] == first["predicted"]


def test_segment_writes_labels_on_the_input_grid(setup, worker) -> None:
    events, seg = call(worker, "segment", input=str(setup["ct"]), model=str(setup["seg"]),
                       output=str(setup["tmp"] / "seg.nii.gz"))
    assert seg["kind"] == "result", seg
    assert seg["model_cached"] is False and Path(seg["labels"]).is_file()
    assert any(e["kind"] == "artifact" and e["id"] == seg["id"] for e in events)
    out = sitk.ReadImage(seg["output"])
    ref = sitk.ReadImage(str(setup["ct"]))
    assert out.GetSize() == ref.GetSize() and np.allclose(out.GetDirection(), ref.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, 1, 2}


def test_a_line_that_is_not_json_gets_one_error_line(worker: WorkerClient) -> None:
    worker.ping(timeout=TIMEOUT)
    # the client never writes a malformed line; write one on its pipe to see the worker's answer
    worker._proc.stdin.write(b"this is not json\n")  # type: ignore[union-attr]
    worker._proc.stdin.flush()  # type: ignore[union-attr]
    deadline = time.monotonic() + TIMEOUT
    replies: list[dict[str, Any]] = []
    while not replies and time.monotonic() < deadline:
        replies = [m for m in worker.poll() if m["kind"] == "error"]
        time.sleep(0.01)
    assert len(replies) == 1 and replies[0]["id"] is None and replies[0]["code"] == 2
    assert "not valid JSON" in replies[0]["message"]
    assert worker.ping(timeout=TIMEOUT)["kind"] == "result"  # still serving


def test_bad_requests_get_one_error_each_and_write_nothing(setup, worker) -> None:
    pid = worker.pid
    with pytest.raises(WorkerError, match="unknown op 'dance'"):
        worker.request("dance", timeout=TIMEOUT)
    with pytest.raises(WorkerError, match="needs 'input'"):
        worker.request("segment", timeout=TIMEOUT, model=str(setup["seg"]))
    _, wrong = call(worker, "segment", input=str(setup["ct"]), model=str(setup["cls"]),
                    output=str(setup["tmp"] / "x.nii.gz"))
    assert wrong["kind"] == "error" and wrong["code"] == 2 and "not a segmentation model" in wrong["message"]
    assert not (setup["tmp"] / "x.nii.gz").exists()
    if not torch.cuda.is_available():
        _, nocuda = call(worker, "classify", input=str(setup["ct"]), model=str(setup["cls"]), device="cuda")
        assert nocuda["kind"] == "error" and nocuda["code"] == 2 and "CUDA" in nocuda["message"]
    assert worker.pid == pid and worker.alive  # errors never stop the worker


def test_shutdown_exits_cleanly(worker: WorkerClient) -> None:
    proc = worker._proc  # kept to read the exit code: the client reaps the process once it has gone
    assert proc is not None
    assert worker.request("shutdown", timeout=TIMEOUT)["kind"] == "result"
    assert proc.wait(timeout=TIMEOUT) == 0


def test_the_next_request_after_shutdown_restarts_the_worker(worker: WorkerClient) -> None:
    if worker.alive:
        worker.request("shutdown", timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while worker.alive and time.monotonic() < deadline:
            time.sleep(0.05)
    restarts, old_pid = worker.restarts, worker.pid
    pong = worker.ping(timeout=TIMEOUT)
    assert worker.restarts == restarts + 1 and pong["pid"] != old_pid and pong["cached_models"] == []
