"""The warm worker never dies of a request: the whole malformed list, then valid requests, in one real
``python -m vocoslicer serve --stdio`` child process.

Every request line gets exactly one final line (``result`` or ``error`` with code 2 for what the client got
wrong), in order, and the worker still answers a ping and a real segmentation afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from vocoslicer.labels import Label, LabelTable
from vocoslicer.models.bundle import ModelBundle, new_bundle_meta
from vocoslicer.models.swin import build_swinunetr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("worker_bad")
    torch.manual_seed(0)
    meta = new_bundle_meta("tiny-seg", "1.0.0", "segmentation", "swinunetr",
                           {"size": None, "feature_size": 12, "out_channels": 3},
                           preprocessing={"orientation": "RAS", "spacing": [3.0, 3.0, 3.0],
                                          "intensity": {"a_min": -1000.0, "a_max": 1000.0, "clip": True}},
                           inference={"roi_size": [64, 64, 32], "overlap": 0.25, "mode": "gaussian",
                                      "sw_batch_size": 1})
    seg = ModelBundle(meta=meta, labels=LabelTable((Label(1, "liver"), Label(2, "spleen"))))
    good = seg.save(tmp / "seg", build_swinunetr(None, feature_size=12, out_channels=3).state_dict())
    # a broken bundle: model.json says feature size 24, the weights are of feature size 12
    broken = tmp / "broken"
    shutil.copytree(good, broken)
    mj = json.loads((broken / "model.json").read_text())
    mj["architecture"]["args"]["feature_size"] = 24
    (broken / "model.json").write_text(json.dumps(mj))
    bad_json = tmp / "bad_json"
    shutil.copytree(good, bad_json)
    (bad_json / "model.json").write_text("{not json")
    arr = np.random.default_rng(0).uniform(-1000, 400, size=(16, 24, 24)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((3.0, 3.0, 3.0))
    sitk.WriteImage(img, str(tmp / "ct.nii.gz"))
    return {"tmp": tmp, "seg": good, "broken": broken, "bad_json": bad_json, "ct": tmp / "ct.nii.gz"}


def malformed(inp: dict[str, Path]) -> list[tuple[str, str]]:
    """(request line, what it is): each must get one ``error`` line with code 2."""
    ct, seg, out = str(inp["ct"]), str(inp["seg"]), str(inp["tmp"] / "out.nii.gz")

    def req(**kw: object) -> str:
        return json.dumps(kw)

    return [
        ("this is not json", "not JSON"),
        ('{"id": NaN, "op": "ping"}', "NaN id"),
        ('{"id": Infinity, "op": "ping"}', "Infinity id"),
        ('{"id": -Infinity, "op": "ping"}', "-Infinity id"),
        ("[" * 100_000 + "]" * 100_000, "deeply nested"),
        ('{"a":' * 50_000 + "1" + "}" * 50_000, "deeply nested objects"),
        ("null", "null"),
        ("12345", "a number"),
        ('"ping"', "a string"),
        (req(id="op-dict", op={"x": 1}), "op is an object"),
        (req(id="ping-tpu", op="ping", device="tpu"), "ping on a TPU"),
        (req(id="ping-list", op="ping", device=[1]), "device a list"),
        (req(id="shutdown-tpu", op="shutdown", device="tpu"), "shutdown with a bad device"),
        (req(id="input-list", op="segment", input=[1], model=seg, output=out), "input a list"),
        (req(id="ov-text", op="segment", input=ct, model=seg, output=out, overlap="abc"), "overlap text"),
        (req(id="ov-big", op="segment", input=ct, model=seg, output=out, overlap=2), "overlap 2"),
        (req(id="ov-bool", op="segment", input=ct, model=seg, output=out, overlap=True), "overlap true"),
        (req(id="fast-text", op="segment", input=ct, model=seg, output=out, fast="yes"), "fast text"),
        (req(id="broken", op="segment", input=ct, model=str(inp["broken"]), output=out), "weights do not fit"),
        (req(id="bad-json", op="segment", input=ct, model=str(inp["bad_json"]), output=out), "model.json not JSON"),
        (req(id="no-model", op="segment", input=ct, model=str(inp["tmp"] / "nope"), output=out), "no bundle"),
        (req(id="out-is-in", op="segment", input=ct, model=seg, output=ct), "output is the input"),
        (req(id="out-png", op="segment", input=ct, model=seg, output=str(inp["tmp"] / "x.png")), "bad extension"),
        (req(id="missing", op="segment", input=str(inp["tmp"] / "nope.nii.gz"), model=seg, output=out),
         "missing input"),
        (req(id="wrong-task", op="classify", input=ct, model=seg), "segmentation model asked to classify"),
        (req(id="cuda", op="ping", device="cuda:99"), "no such GPU"),
    ]


def test_worker_survives_every_malformed_request(inputs: dict[str, Path]) -> None:
    bad = malformed(inputs)
    valid = [json.dumps({"id": "ping", "op": "ping"}),
             json.dumps({"id": "seg", "op": "segment", "input": str(inputs["ct"]), "model": str(inputs["seg"]),
                         "output": str(inputs["tmp"] / "seg.nii.gz")}),
             json.dumps({"id": "bye", "op": "shutdown"})]
    # strict decoding as in a UTF-8 locale (the C locale would hide a non-UTF-8 line behind surrogateescape)
    env = {**os.environ, "VOCOSLICER_HOME": str(inputs["tmp"] / "home"), "OMP_NUM_THREADS": "1",
           "PYTHONIOENCODING": "utf-8:strict"}
    bad.insert(1, ("\udcff", "not UTF-8"))  # sent as the raw byte 0xff
    stdin = ("\n".join([line for line, _ in bad] + valid) + "\n").encode("utf-8", "surrogateescape")
    r = subprocess.run([sys.executable, "-m", "vocoslicer", "serve", "--stdio", "--device", "cpu"], input=stdin,
                       capture_output=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    finals = []
    for line in r.stdout.decode().splitlines():
        msg = json.loads(line)  # stdout carries protocol lines only
        if msg["kind"] in ("result", "error"):
            finals.append(msg)
    assert len(finals) == len(bad) + len(valid), [f.get("id") for f in finals]
    wrong = [(what, f) for (_, what), f in zip(bad, finals, strict=False)
             if f["kind"] != "error" or f["code"] != 2 or "\n" in f["message"]]
    assert not wrong, wrong
    by_id = {f["id"]: f for f in finals[: len(bad)] if f["id"] is not None}
    assert by_id["ping-tpu"]["message"].startswith("device tpu: unknown device")
    assert "broken model bundle" in by_id["bad-json"]["message"] or "model.json" in by_id["bad-json"]["message"]
    assert "cannot build the network" in by_id["broken"]["message"]
    assert not (inputs["tmp"] / "out.nii.gz").exists() and not (inputs["tmp"] / "x.png").exists()
    ping, seg, bye = finals[len(bad):]
    assert ping["kind"] == "result" and ping["id"] == "ping"
    assert seg["kind"] == "result" and Path(seg["output"]).is_file(), seg
    assert bye["kind"] == "result" and bye["served"] == 2
