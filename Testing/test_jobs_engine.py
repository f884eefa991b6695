"""Engine side of the job runtime: ``--run-dir`` on the CLI, signals, run-dir guards, ``runs`` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vocoslicer.cli import main
from vocoslicer.errors import Cancelled
from vocoslicer.jobs import EventSink, JobContext, current_job, physical_gpu_key, read_run
from vocoslicer.jobs.rundir import strip_job_options


@pytest.fixture()
def env(tmp_path):
    return {**os.environ, "VOCOSLICER_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}


def vocoslicer(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vocoslicer", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def wait_for(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def test_second_sigterm_exits_at_once_and_records_cancelled(tmp_path, env):
    run_dir = tmp_path / "run"
    # one long step: the first SIGTERM only sets the flag (the loop checks it between steps)
    proc = subprocess.Popen([sys.executable, "-m", "vocoslicer", "--run-dir", str(run_dir), "selftest", "job",
                             "--steps", "2", "--sleep", "20"], env=env, stderr=subprocess.PIPE)
    wait_for(lambda: (run_dir / "events.jsonl").exists() and "running" in (run_dir / "events.jsonl").read_text())
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert proc.poll() is None  # still finishing its step after the first signal
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 3 and time.monotonic() - t0 < 5
    run = read_run(run_dir)
    assert run["status"] == "cancelled" and run["exit_code"] == 3 and "twice" in run["error"]
    last = json.loads((run_dir / "events.jsonl").read_text().splitlines()[-1])
    assert last == {**last, "kind": "done", "status": "cancelled", "exit_code": 3}


def test_signal_interrupts_a_command_that_never_checks_should_stop():
    ctx = JobContext()
    ctx.install_signal_handlers()
    try:
        with pytest.raises(Cancelled, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, long before the sleep ends
        ctx2 = JobContext()
        assert ctx2.should_stop() is False  # a command that checks is only flagged, never interrupted
    finally:
        ctx.restore_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) is not ctx._on_signal


def test_run_dir_in_use_is_refused(tmp_path, env):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "vocoslicer", "--run-dir", str(run_dir), "selftest", "job",
                              "--steps", "100", "--sleep", "0.05"], env=env)
    try:
        wait_for(lambda: read_run(run_dir).get("status") == "running")
        second = vocoslicer("--run-dir", str(run_dir), "selftest", "job", "--steps", "1", env=env)
        assert second.returncode == 2 and "already in use by pid" in second.stderr
        assert second.stderr.count("\n") == 1 and read_run(run_dir)["pid"] == first.pid
    finally:
        first.terminate()
        first.wait(10)
    assert read_run(run_dir)["status"] == "cancelled"


def test_resume_needs_a_run_dir_and_events_go_to_stdout(env, capsys):
    assert main(["selftest", "job", "--resume"]) == 2
    assert "--resume needs --run-dir" in capsys.readouterr().err
    ok = vocoslicer("--events", "stdout", "selftest", "job", "--steps", "2", "--sleep", "0", env=env)
    events = [json.loads(line) for line in ok.stdout.splitlines()]
    assert [e["kind"] for e in events] == ["status", "progress", "metric", "progress", "metric", "done"]


def test_non_zero_rank_writes_only_its_own_log(tmp_path, env):
    run_dir = tmp_path / "run"
    res = vocoslicer("--run-dir", str(run_dir), "selftest", "job", "--steps", "1", "--sleep", "0",
                     env={**env, "RANK": "1"})
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "log.rank1.txt"]


def test_runs_list_and_show(tmp_path, env, capsys):
    root = tmp_path / "runs"
    assert vocoslicer("--run-dir", str(root / "good"), "selftest", "job", "--steps", "1", "--sleep", "0",
                      env=env).returncode == 0
    assert vocoslicer("--run-dir", str(root / "bad"), "selftest", "job", "--steps", "2", "--sleep", "0",
                      "--crash-at", "2", env=env).returncode == 1
    # the runs command in-process (it is plain file reading; saves three interpreter start-ups)
    assert main(["runs", "list", "--root", str(root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {Path(r["run_dir"]).name: (r["status"], r["exit_code"]) for r in listed} == {
        "good": ("ok", 0), "bad": ("failed", 1)}
    assert main(["runs", "show", str(root / "bad"), "--tail", "8"]) == 0
    shown = capsys.readouterr().out
    assert "status:   failed (exit code 1" in shown
    assert "RuntimeError: selftest crash at step 2" in shown.split("--- last")[1]
    assert main(["runs", "show", str(root / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_gpu_lock_accepts_torch_devices_and_maps_visible_devices(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,7")
    ctx = JobContext()
    with ctx.gpu_lock(torch.device("cuda", 1)) as key:  # the process's cuda:1 is physical GPU 7
        assert key == "7"
        holder = json.loads((tmp_path / "home" / "locks" / "gpu-7.json").read_text())
        assert holder["pid"] == os.getpid()
    with ctx.gpu_lock(torch.device("cpu")) as key:
        assert key is None


def test_library_context_and_helpers(monkeypatch):
    job = current_job()  # outside the CLI: silent, no files, nothing to resume
    assert job.run_dir is None and job.checkpoint_dir is None and job.save_state({"a": 1}) is None
    assert job.should_stop() is False
    with job.gpu_lock("cpu") as key:
        assert key is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert physical_gpu_key("cuda:1") == "5" and physical_gpu_key(0) == "3" and physical_gpu_key("cuda") == "3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert physical_gpu_key("cuda:2") == "2"
    with pytest.raises(ValueError):
        physical_gpu_key("tpu:0")
    assert strip_job_options(["--run-dir", "R", "--debug", "--events=stdout", "segment", "--events", "stdout"]) == [
        "--debug", "segment", "--events", "stdout"]
    sink = EventSink()
    assert sink.emit("status", status="queued")["kind"] == "status"
