"""CPU inference runtimes (infer/runtime.py): choice, fallback to eager on failure, graph cache reuse, threads.

The fallback and cache tests use a stand-in backend (an in-process "export" that saves the weights and a
"compiled" function running them) because what is tested is the wrapper's contract, not a compiler; the real
OpenVINO path is tested in test_runtime_openvino.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vocoslicer.errors import UserError
from vocoslicer.infer import runtime as rt
from vocoslicer.infer.sliding import sliding_window_labels
from vocoslicer.jobs.events import EventSink


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4),
                               torch.nn.Conv3d(4, 3, 1)).eval()


class SavedWeights:
    """Stand-in backend: 'exports' the state dict to the cache folder, 'compiles' it back into a network."""

    def __init__(self, name: str = "fake", fail: str | None = None) -> None:
        self.name = name
        self.fail = fail
        self.exports = 0
        self.model_factory = tiny_net

    def missing(self) -> str | None:
        return None

    def version(self) -> str:
        return "1"

    def export(self, model: torch.nn.Module, example: torch.Tensor, folder: Path) -> None:
        if self.fail == "export":
            raise RuntimeError("exporter exploded")
        self.exports += 1
        assert not torch.is_inference_mode_enabled()  # exporters trace: they must not see inference tensors
        torch.save(model.state_dict(), folder / "weights.pt")

    def load(self, folder: Path, threads: int):  # noqa: ANN201
        net = self.model_factory()
        net.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))

        def run(x: np.ndarray) -> np.ndarray:
            if self.fail == "infer":
                raise RuntimeError("kernel crashed")
            with torch.inference_mode():
                return net(torch.from_numpy(x)).numpy()

        return run


@pytest.fixture()
def fake_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # noqa: ANN201
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(rt, "_LOADED", type(rt._LOADED)())
    backend = SavedWeights()
    monkeypatch.setitem(rt.BACKENDS, "fake", backend)
    return backend


def events_in(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def volume() -> torch.Tensor:
    return torch.randn((1, 1, 40, 36, 30), generator=torch.Generator().manual_seed(3))


def test_runtime_answers_like_eager_and_cache_is_reused(fake_backend: SavedWeights) -> None:
    net = tiny_net()
    eager = sliding_window_labels(net, volume(), (16, 16, 16), overlap=0.5)
    wrapped = rt.runtime_model(net, torch.device("cpu"), "fake", model_key="abc")
    assert isinstance(wrapped, rt.RuntimeModule)
    fast = sliding_window_labels(wrapped, volume(), (16, 16, 16), overlap=0.5, sw_batch_size=3)
    assert torch.equal(fast, eager)
    assert fake_backend.exports == 1  # one shape, many windows: exported once
    rt._LOADED.clear()  # a new process: nothing in memory, the graph on disk
    again = rt.runtime_model(net, torch.device("cpu"), "fake", model_key="abc")
    assert torch.equal(sliding_window_labels(again, volume(), (16, 16, 16), overlap=0.5), eager)
    assert fake_backend.exports == 1
    folders = list((rt._cache_root() / "fake").iterdir())
    assert len(folders) == 1 and (folders[0] / "done.json").is_file()  # no temporary folder left behind
    rt.runtime_model(net, torch.device("cpu"), "fake", model_key="other-weights")(torch.zeros((1, 1, 16, 16, 16)))
    assert fake_backend.exports == 2  # other weights: their own graph


@pytest.mark.parametrize("where", ["export", "infer"])
def test_failing_runtime_falls_back_to_eager_with_one_warning(fake_backend: SavedWeights, tmp_path: Path,
                                                              where: str) -> None:
    fake_backend.fail = where
    net = tiny_net()
    eager = sliding_window_labels(net, volume(), (16, 16, 16), overlap=0.5)
    sink = EventSink(tmp_path / "events.jsonl")
    wrapped = rt.runtime_model(net, torch.device("cpu"), "fake", model_key="k", events=sink)
    labels = sliding_window_labels(wrapped, volume(), (16, 16, 16), overlap=0.5)
    sink.close()
    assert torch.equal(labels, eager)
    warnings = [e for e in events_in(tmp_path / "events.jsonl") if e["kind"] == "warning"]
    assert len(warnings) == 1 and "fake runtime failed" in warnings[0]["message"]
    assert wrapped.runtime == "eager"
    assert not any(p.name.startswith(".") for p in (rt._cache_root() / "fake").iterdir())  # nothing half-written


def test_pick_runtime_rules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert rt.pick_runtime("eager", cpu) == "eager"
    assert rt.pick_runtime("auto", gpu) == "eager"
    with pytest.raises(UserError, match="unknown runtime 'fastest'"):
        rt.check_runtime("fastest")
    monkeypatch.setattr(rt.BACKENDS["openvino"], "missing", lambda: "the openvino package is not installed")
    sink = EventSink(tmp_path / "events.jsonl")
    assert rt.pick_runtime("auto", cpu, sink) == "eager"
    assert rt.pick_runtime("openvino", gpu, sink) == "eager"
    sink.close()
    msgs = [e["message"] for e in events_in(tmp_path / "events.jsonl") if e["kind"] == "warning"]
    assert "not installed" in msgs[0] and "eager PyTorch" in msgs[0]
    assert "CPU only" in msgs[1]
    net = tiny_net()
    assert rt.runtime_model(net, cpu, "auto") is net  # small network: eager (and no warning for it)
    monkeypatch.setattr(rt, "AUTO_MIN_PARAMS", 0)
    sink = EventSink(tmp_path / "events2.jsonl")
    assert rt.runtime_model(net, cpu, "auto", events=sink) is net  # missing runtime: the eager network itself
    sink.close()
    assert "not installed" in events_in(tmp_path / "events2.jsonl")[0]["message"]


def test_threads_follow_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert rt.default_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert rt.default_threads() >= 1
        assert rt.apply_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(UserError, match="--threads must be at least 1"):
            rt.apply_threads(0)
    finally:
        torch.set_num_threads(before)
