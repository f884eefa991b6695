"""Job client (VoCoSlicerLib.jobs) driving real ``python -m vocoslicer selftest job`` child processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_procs import pid_gone

from VoCoSlicerLib.job_runs import last_error, list_runs, read_run
from VoCoSlicerLib.jobs import ENGINE_DIR, Job, JobError, parse_event_line


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    # GPU lock files and default run folders of the children land in the test's own folder
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def selftest(*extra: str, steps: int = 5, sleep: float = 0.05) -> list[str]:
    return ["selftest", "job", "--steps", str(steps), "--sleep", str(sleep), *extra]


def poll_until(job: Job, cond, timeout: float = 30.0, seen: list | None = None) -> list[dict]:
    seen = [] if seen is None else seen
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += job.poll()
        if cond(seen):
            return seen
        if not job.running:
            break
        time.sleep(0.02)
    raise AssertionError(f"condition not reached; status={job.status}, events={seen[-5:]}")


def steps_of(events: list[dict]) -> list[int]:
    return [e["step"] for e in events if e["kind"] == "progress"]




@pytest.mark.parametrize("with_run_dir", [True, False])
def test_tiny_job_streams_progress_and_finishes(tmp_path, with_run_dir):
    run_dir = tmp_path / "run" if with_run_dir else None
    job = Job.start(selftest(steps=4, sleep=0.02), run_dir=run_dir)
    events = job.wait(timeout=30)
    assert job.status == "ok" and job.returncode == 0, (job.status, job.error, events)
    assert steps_of(events) == [1, 2, 3, 4]
    assert events[-1]["kind"] == "done" and events[-1]["status"] == "ok"
    assert not [e for e in events if e["kind"] == "warning"]
    if with_run_dir:
        run = read_run(run_dir)
        assert run["status"] == "ok" and run["exit_code"] == 0 and run["pid"] == job.pid
        assert run["args"] == selftest(steps=4, sleep=0.02)
        assert (run_dir / "log.txt").read_text().count("run ended: ok") == 1


def test_cancel_stops_job_and_grandchild_with_consistent_run_json(tmp_path):
    run_dir = tmp_path / "run"
    job = Job.start(selftest("--spawn-child", steps=400), run_dir=run_dir)
    seen = poll_until(job, lambda ev: len(steps_of(ev)) >= 2)
    child = int((run_dir / "child.pid").read_text())
    job.cancel(grace_s=10, wait=True)
    seen += job.poll()
    assert job.status == "cancelled" and job.returncode == 3, (job.status, job.error)
    run = read_run(run_dir)
    assert run["status"] == "cancelled" and run["exit_code"] == 3 and run["error_kind"] == "cancelled"
    state = json.loads((run_dir / "checkpoints" / "selftest_state.json").read_text())
    assert 2 <= state["step"] < 400
    assert pid_gone(child), "grandchild survived the cancel"


def test_forced_cancel_kills_the_whole_group(tmp_path):
    run_dir = tmp_path / "run"
    job = Job.start(selftest("--spawn-child", steps=400), run_dir=run_dir)
    poll_until(job, lambda ev: len(steps_of(ev)) >= 1)
    child = int((run_dir / "child.pid").read_text())
    job.cancel(grace_s=0, wait=True)  # SIGKILL at once: the job cannot clean up, the client must
    assert job.status == "cancelled" and job.returncode == -signal.SIGKILL
    assert pid_gone(child), "grandchild survived a forced cancel"
    run = read_run(run_dir)
    assert run["status"] == "cancelled" and run["exit_code"] == 3 and run["finalized_by"] == "client"


def test_kill_9_then_resume_continues_from_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    job = Job.start(selftest(steps=12), run_dir=run_dir)
    poll_until(job, lambda ev: len(steps_of(ev)) >= 3)
    os.kill(job.pid, signal.SIGKILL)
    job.wait(timeout=10)
    assert job.status == "dead" and "SIGKILL" in (job.error or "")
    assert read_run(run_dir)["status"] == "dead"
    saved = json.loads((run_dir / "checkpoints" / "selftest_state.json").read_text())["step"]
    assert 3 <= saved < 12

    again = Job.resume(run_dir)
    events = again.wait(timeout=30)
    assert again.status == "ok", again.error
    steps = steps_of(events)
    assert steps[0] == saved + 1 and steps[-1] == 12, steps  # continued, not restarted
    run = read_run(run_dir)
    assert run["attempt"] == 2 and run["args"][-1] == "--resume" and run["status"] == "ok"


def test_detached_run_survives_its_parent_and_reattaches(tmp_path):
    run_dir = tmp_path / "run"
    launcher = (
        "import sys; from VoCoSlicerLib.jobs import Job; "
        f"j = Job.start({selftest(steps=15)!r}, run_dir={str(run_dir)!r}, detached=True); print(j.pid)"
    )
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(ENGINE_DIR)})
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.strip())  # the parent has exited; the job must keep going
    job = Job.attach(run_dir)
    assert job.pid == pid
    events = job.wait(timeout=30)
    assert job.status == "ok" and job.returncode == 0, (job.status, job.error)
    assert steps_of(events)[-1] == 15 and events[-1]["kind"] == "done"
    assert any(r["run_dir"] == str(run_dir) and r["status"] == "ok" for r in list_runs(tmp_path))


def test_malformed_and_partial_event_lines(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # a real writer process, standing in for a job whose event file got damaged (disk full, foreign writer)
    writer = (
        "import json, os, socket, sys, time\n"
        "d = sys.argv[1]\n"
        "def put(obj):\n"
        "    with open(d + '/tmp.json', 'w') as fh: json.dump(obj, fh)\n"
        "    os.replace(d + '/tmp.json', d + '/run.json')\n"
        "put({'status': 'running', 'pid': os.getpid(), 'host': socket.gethostname()})\n"
        "f = open(d + '/events.jsonl', 'a')\n"
        "f.write('{\"t\":1,\"kind\":\"progress\",\"step\":1,\"total\":2}\\nnot json at all\\n[1,2]\\n'); f.flush()\n"
        "f.write('{\"t\":2,\"kind\":\"progress\",'); f.flush(); time.sleep(0.6)\n"
        "f.write('\"step\":2,\"total\":2}\\n'); f.flush()\n"
        "f.write('{\"t\":3,\"kind\":\"done\",\"status\":\"ok\",\"exit_code\":0}\\n'); f.flush()\n"
        "time.sleep(0.3)\n"
        "put({'status': 'ok', 'exit_code': 0, 'pid': os.getpid(), 'host': socket.gethostname()})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(run_dir)])
    deadline = time.monotonic() + 10
    while not (run_dir / "run.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    job = Job.attach(run_dir)
    events = job.wait(timeout=20)
    proc.wait(10)
    warnings = [e for e in events if e["kind"] == "warning"]
    assert len(warnings) == 2 and all("malformed" in w["message"] for w in warnings)
    assert steps_of(events) == [1, 2]  # the line split across two writes was not mistaken for garbage
    assert job.status == "ok"
    assert parse_event_line("some library print", text_is_log=True)["kind"] == "log"
    assert parse_event_line("{broken", text_is_log=True)["kind"] == "warning"
    assert parse_event_line("   ") is None


def test_missing_interpreter_fails_clearly(tmp_path):
    for python in (tmp_path / "no" / "python3", "no-such-python-vocoslicer"):
        with pytest.raises(JobError, match="Python interpreter not found"):
            Job.start(selftest(), python=python, run_dir=tmp_path / "run")
    with pytest.raises(JobError, match="needs a run directory"):
        Job.start(selftest(), detached=True)


def test_gpu_lock_queues_second_job(tmp_path):
    first = Job.start(selftest("--gpu-lock", "0", steps=1000), run_dir=tmp_path / "a")  # ends when cancelled
    poll_until(first, lambda ev: len(steps_of(ev)) >= 1)
    second = Job.start(selftest("--gpu-lock", "0", steps=2, sleep=0.01), run_dir=tmp_path / "b")
    seen = poll_until(second, lambda ev: any(e["kind"] == "status" and e["status"] == "queued" for e in ev))
    assert second.status == "queued"
    run_b = read_run(tmp_path / "b")
    assert run_b["status"] == "queued" and run_b["waiting_for"]["pid"] == first.pid
    waiting = [e for e in seen if e["kind"] == "log" and e["message"].startswith("waiting for GPU 0")]
    assert waiting and f"held by pid {first.pid}" in waiting[0]["message"]
    assert str(tmp_path / "a") in waiting[0]["message"]
    third = Job.start(selftest("--gpu-lock", "0", steps=2, sleep=0.01), run_dir=tmp_path / "c")
    poll_until(third, lambda ev: any(e["kind"] == "status" and e["status"] == "queued" for e in ev))
    third.cancel(grace_s=10, wait=True)  # a queued job can be cancelled without ever getting the GPU
    assert third.status == "cancelled" and third.returncode == 3 and "waiting for GPU" in third.error
    assert second.status == "queued" and first.status == "running"
    first.cancel(grace_s=10)  # the first job lets go of the GPU: now the second may count
    first_events = first.wait(timeout=30)
    seen += second.wait(timeout=30)
    assert first.status == "cancelled" and second.status == "ok"
    first_done = [e["t"] for e in first_events if e["kind"] == "done"][0]
    second_start = [e["t"] for e in seen if e["kind"] == "progress"][0]
    assert second_start >= first_done - 0.01  # the second job counted only once the first had let go


def test_user_error_and_crash_are_recorded(tmp_path):
    user = Job.start(selftest("--fail-at", "2"), run_dir=tmp_path / "user")
    user.wait(timeout=30)
    assert user.returncode == 2 and user.status == "failed"
    assert user.error == "selftest job: failing at step 2 as asked (--fail-at)"
    run = read_run(tmp_path / "user")
    assert run["status"] == "failed" and run["exit_code"] == 2 and run["error_kind"] == "user"
    assert "Traceback" not in (tmp_path / "user" / "console.txt").read_text()

    crash = Job.start(selftest("--crash-at", "1"), run_dir=tmp_path / "crash")
    crash.wait(timeout=30)
    assert crash.returncode == 1 and crash.status == "failed"
    assert crash.error.startswith("internal error: RuntimeError: selftest crash at step 1")
    assert "Traceback" in (tmp_path / "crash" / "log.txt").read_text()
    assert "Traceback" not in (tmp_path / "crash" / "console.txt").read_text()  # the user sees one line
    detail = last_error(tmp_path / "crash")
    assert detail.splitlines()[0] == crash.error and "Traceback (most recent call last)" in detail
    assert last_error(tmp_path / "user").startswith("selftest job: failing")
    statuses = {Path(r["run_dir"]).name: r["status"] for r in list_runs(tmp_path)}
    assert statuses == {"user": "failed", "crash": "failed"}


def test_child_that_fails_before_the_engine_starts(tmp_path):
    # bad options stop the child before it opens the run directory: the client records the end itself
    broken = Job.start(["--no-such-option"], run_dir=tmp_path / "bad")
    broken.wait(timeout=30)
    assert broken.returncode == 2 and broken.status == "failed"
    assert "--no-such-option" in broken.error
    run = read_run(tmp_path / "bad")
    assert run["status"] == "failed" and run["finalized_by"] == "client"
