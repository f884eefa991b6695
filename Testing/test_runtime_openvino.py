"""The real OpenVINO runtime on the trained demo network: same structures as eager PyTorch, graph exported once.

OpenVINO is in the ``test`` extra (through ``cpu-fast``), so CI runs this; it is skipped, with the reason, only
where the package is absent (the fallback path is then what test_runtime.py checks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from vocoslicer.data.phantom import generate_phantom
from vocoslicer.infer import runtime as rt
from vocoslicer.infer.segment import segment_image
from vocoslicer.jobs.events import EventSink
from vocoslicer.metrics import dice_per_label
from vocoslicer.models.installed import resolve

pytest.importorskip("openvino", reason="openvino not installed: the runtime path falls back to eager (tested)")


@pytest.mark.slow
def test_openvino_agrees_with_eager_and_exports_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(rt, "_LOADED", type(rt._LOADED)())
    bundle = resolve(None)
    model = bundle.build_model()
    img = generate_phantom(1001, spacing=(3.0, 3.0, 3.0), size=(60, 56, 50)).image  # one 64³ window
    eager = sitk.GetArrayFromImage(segment_image(img, bundle, model=model, device="cpu", runtime="eager"))
    before = rt.EXPORTS["count"]
    sink = EventSink(tmp_path / "events.jsonl")
    fast = sitk.GetArrayFromImage(segment_image(img, bundle, model=model, device="cpu", runtime="openvino",
                                                events=sink))
    sink.close()
    assert "warning" not in (tmp_path / "events.jsonl").read_text()  # the runtime ran, no fallback
    assert rt.EXPORTS["count"] == before + 1
    dice = dice_per_label(fast, eager, [v for v in bundle.channel_values if v])
    present = {k: d for k, d in dice.items() if not np.isnan(d)}
    assert len(present) >= 5, present
    assert min(present.values()) >= 0.99, present
    rt._LOADED.clear()  # as a new process would: the IR comes from the disk cache
    again = sitk.GetArrayFromImage(segment_image(img, bundle, model=model, device="cpu", runtime="openvino"))
    assert rt.EXPORTS["count"] == before + 1
    assert np.array_equal(again, fast)
