"""Warm worker client against a stand-in server process speaking the ``serve --stdio`` protocol."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from helpers_procs import pid_gone

from VoCoSlicerLib.worker_client import WorkerClient, WorkerError

FAKE = Path(__file__).parent / "data" / "fake_worker.py"




def test_requests_events_and_clean_shutdown():
    seen = []
    with WorkerClient(python=sys.executable, args=[str(FAKE)]) as client:
        first_pid = client.ping()["pid"]
        result = client.request("segment", steps=4, output="/tmp/x.nrrd", on_event=seen.append)
        assert result["output"] == "/tmp/x.nrrd" and result["kind"] == "result"
        assert [e["step"] for e in seen if e["kind"] == "progress"] == [1, 2, 3, 4]
        assert client.ping()["pid"] == first_pid  # warm: the same process served every request
        with pytest.raises(WorkerError, match="unknown op"):
            client.request("fly")
        rid = client.submit("classify", steps=2)  # the non-blocking path a QTimer would use
        msgs = []
        deadline = time.monotonic() + 10
        while not any(m.get("kind") == "result" for m in msgs) and time.monotonic() < deadline:
            msgs += client.poll()
            time.sleep(0.01)
        assert all(m["request_id"] == rid for m in msgs) and msgs[-1]["op"] == "classify"
        proc = client._proc
    assert proc.poll() == 0  # shut down on request, not killed
    assert not client.alive


def test_restart_after_the_worker_died():
    client = WorkerClient(python=sys.executable, args=[str(FAKE)])
    try:
        pid = client.ping()["pid"]
        with pytest.raises(WorkerError, match="ended unexpectedly.*simulated crash"):
            client.request("crash", timeout=10)
        assert not client.alive
        again = client.ping()["pid"]  # the next request starts a fresh worker
        assert again != pid and client.restarts == 1
    finally:
        client.close()


def test_malformed_lines_become_warnings_and_close_ends_the_group():
    client = WorkerClient(python=sys.executable, args=[str(FAKE)])
    try:
        seen = []
        client.request("garbage", on_event=seen.append)
        kinds = [(m["kind"], m.get("level")) for m in seen]
        assert ("log", "stdout") in kinds and ("warning", None) in kinds
        child = client.request("spawn")["child"]
    finally:
        client.close(timeout=2)
    assert pid_gone(child), "a process started by the worker survived close()"


def test_missing_interpreter_and_timeout(tmp_path):
    from VoCoSlicerLib.jobs import JobError

    with pytest.raises(JobError, match="Python interpreter not found"):
        WorkerClient(python=tmp_path / "nope" / "python")
    sleeper = tmp_path / "silent.py"
    sleeper.write_text("import sys, time\nfor line in sys.stdin:\n    time.sleep(30)\n")
    client = WorkerClient(python=sys.executable, args=[str(sleeper)])
    try:
        with pytest.raises(WorkerError, match="did not answer 'ping' within 0.5 s"):
            client.request("ping", timeout=0.5)
    finally:
        t0 = time.monotonic()
        client.close(timeout=0.5)
        assert time.monotonic() - t0 < 5 and not client.alive
