"""Issue 12 item 11: nothing the GUI thread calls waits on a worker or a job.

The worker here is a real process speaking the ``serve --stdio`` protocol that ignores SIGTERM and never
finishes its request: the worst case for a cancel. Only the Qt timer is absent: the test calls ``tick()`` itself.
Timings are bounds on calls that must return at once (0.3 s, where the code before waited 2 to 9 s).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from VoCoSlicerLib.job_driver import JobDriver
from VoCoSlicerLib.jobs import Job
from VoCoSlicerLib.state import JobState
from VoCoSlicerLib.worker_client import WorkerClient

STUBBORN_WORKER = """
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
for line in sys.stdin:
    req = json.loads(line)
    if req.get("op") == "ping":
        print(json.dumps({"id": req["id"], "kind": "result", "pid": os.getpid()}), flush=True)
        continue
    if req.get("op") == "shutdown":  # an idle worker does shut down
        break
    print(json.dumps({"id": req["id"], "kind": "progress", "step": 1, "total": 100}), flush=True)
    while True:
        time.sleep(1)  # a request that never ends (and shutdown lines are never read)
"""
FAST = 0.3


@pytest.fixture
def stubborn(tmp_path) -> Path:
    script = tmp_path / "stubborn_worker.py"
    script.write_text(STUBBORN_WORKER)
    return script


def _gone(proc, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc.poll() is not None


def test_cancel_of_a_warm_worker_request_never_blocks(stubborn):
    worker = WorkerClient(python=sys.executable, args=[str(stubborn)])
    driver = JobDriver("Segment")
    driver.start_request(worker, "segment", {"input": "x"})
    deadline = time.monotonic() + 30
    while driver.state.fraction is None and time.monotonic() < deadline:  # the request is under way
        driver.tick()
        time.sleep(0.02)
    assert driver.state.fraction is not None
    proc = worker._proc
    t0 = time.monotonic()
    driver.cancel()
    assert time.monotonic() - t0 < FAST
    assert driver.state.state is JobState.CANCELLING and proc.poll() is None  # SIGTERM ignored: still there
    slowest, deadline = 0.0, time.monotonic() + 15
    while driver.busy and time.monotonic() < deadline:
        t0 = time.monotonic()
        driver.tick()
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.05)
    assert not driver.busy and slowest < FAST
    assert driver.state.state is JobState.IDLE and proc.poll() is not None  # killed, by the reaper
    assert driver.result is None
    with worker:  # the next request starts a fresh worker
        assert worker.ping(timeout=30)["pid"] != proc.pid


def test_close_returns_at_once_and_the_worker_goes_later(stubborn):
    worker = WorkerClient(python=sys.executable, args=[str(stubborn)])
    worker.ping(timeout=30)
    worker.submit("segment")  # busy for ever, deaf to shutdown and to SIGTERM
    proc = worker._proc
    t0 = time.monotonic()
    worker.close(timeout=0.5, kill_after=0.5)
    assert time.monotonic() - t0 < FAST
    assert not worker.alive and worker.stopping
    assert _gone(proc, timeout=10) and proc.returncode < 0
    deadline = time.monotonic() + 5
    while worker.stopping and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not worker.stopping


def test_job_close_and_driver_close_return_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    job = Job.start(["selftest", "job", "--steps", "400", "--sleep", "0.05"], run_dir=tmp_path / "run",
                    env={"OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 30
    while not (tmp_path / "run" / "checkpoints" / "selftest_state.json").exists() and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    proc = job._proc
    t0 = time.monotonic()
    job.close()
    assert time.monotonic() - t0 < FAST
    assert _gone(proc, timeout=15) and proc.returncode == 3  # graceful, followed to its end off the GUI thread

    driver = JobDriver("Segment")
    driver.start([["selftest", "job", "--steps", "400", "--sleep", "0.05"]], env={"OMP_NUM_THREADS": "1"})
    proc = driver.job._proc
    t0 = time.monotonic()
    driver.close()
    assert time.monotonic() - t0 < FAST
    assert _gone(proc, timeout=15)
