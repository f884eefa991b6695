"""Issue 12 item 10, reading half: reattaching to a long run reads its log in bounded batches.

A finished run with 100k events (what a long pre-training leaves) is replayed by ``Job.attach`` and by the
panel's ``JobDriver.attach``: no poll hands over more than one batch, and every event arrives, in order.
Bounds are counted (events and bytes per poll), not timed.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from VoCoSlicerLib.job_driver import JobDriver
from VoCoSlicerLib.jobs import Job
from VoCoSlicerLib.state import JobState

N = 100_000


def _long_run(tmp_path: Path, pid: int = 1) -> tuple[Path, int]:
    # pid 1 (alive, someone else's): a finished record whose pid was reused must not look like a running job
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"t": 1.0 + i, "kind": "metric", "step": i, "loss": 1.0 / (i + 1)})
             for i in range(1, N + 1)]
    lines.append(json.dumps({"t": 2e5, "kind": "done", "status": "ok", "exit_code": 0}))
    data = ("\n".join(lines) + "\n").encode()
    (run / "events.jsonl").write_bytes(data)
    (run / "run.json").write_text(json.dumps({"status": "ok", "exit_code": 0, "pid": pid, "host": socket.gethostname(),
                                              "argv": ["selftest", "job"]}))
    return run, min(len(x) for x in lines) + 1


def test_attach_reads_a_long_log_in_bounded_batches(tmp_path):
    run, shortest = _long_run(tmp_path)
    job = Job.attach(run)
    bound = job.read_limit // shortest + 1
    steps, polls, biggest = [], 0, 0
    while job.running and polls < 10_000:
        before = job._offset
        events = job.poll()
        polls += 1
        assert job._offset - before <= job.read_limit
        biggest = max(biggest, len(events))
        steps += [e["step"] for e in events if e["kind"] == "metric"]
    assert not job.running and job.status == "ok" and job.returncode == 0
    assert steps == list(range(1, N + 1))  # all of them, in order, none twice (lines cut between batches too)
    assert biggest <= bound and polls >= (run / "events.jsonl").stat().st_size // job.read_limit


def test_driver_attach_replays_over_many_ticks(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run, shortest = _long_run(tmp_path, pid=int(gone.stdout))
    for budget in (0.0, JobDriver.tick_budget_s):  # one batch per tick; batches within the default budget
        driver = JobDriver("Launch")
        driver.tick_budget_s = budget
        driver.attach(run)
        ticks, biggest = 0, 0
        while driver.busy and ticks < 10_000:
            biggest = max(biggest, len(driver.tick()))
            ticks += 1
        assert driver.state.state is JobState.DONE
        steps, values = driver.metrics.arrays("train/loss")
        assert len(steps) == N and values[-1] == 1.0 / (N + 1)
        if budget == 0.0:
            assert ticks > 10 and biggest <= Job.read_limit // shortest + 1
