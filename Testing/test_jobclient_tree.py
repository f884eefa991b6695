"""Issue 12 item 12: cancel reaches the engine behind a launcher and ends the whole tree, in every phase.

``PythonSlicer`` is a CTKAppLauncher: it starts ``python-real`` as a child and forwards no signal. The stand-in
here is a real launcher-like process doing the same (start the interpreter as a child, forward nothing, exit with
its code), which also starts two grandchildren that ignore SIGTERM: one in the launcher's group (a DataLoader
worker that hangs) and one in a session of its own (what torchrun does with its workers). The engine is the real
``vocoslicer selftest job --spawn-child`` (its own child is a third grandchild). A graceful cancel is visible as
the engine's own ``run.json`` record: ``cancelled``, exit code 3, not finalized by the client.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from VoCoSlicerLib import proctree
from VoCoSlicerLib.job_runs import read_run
from VoCoSlicerLib.jobs import ENGINE_DIR, Job

LAUNCHER = """#!{python}
import os, signal, subprocess, sys
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
folder = os.environ["TREE_PIDS"]
grouped = subprocess.Popen([sys.executable, "-c", stubborn])
alone = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True)
engine = subprocess.Popen([sys.executable, *sys.argv[1:]])
with open(os.path.join(folder, "tree.txt"), "w") as fh:
    fh.write(f"{{engine.pid}} {{grouped.pid}} {{alone.pid}}")
sys.exit(engine.wait())
"""

pytestmark = pytest.mark.skipif(not proctree.has_proc(), reason="the tree is read from /proc (Linux)")


@pytest.fixture
def launcher(tmp_path, monkeypatch):
    """Path of a launcher named like Slicer's; a finalizer kills whatever a failing test left behind."""
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TREE_PIDS", str(tmp_path))
    exe = tmp_path / "bin" / "PythonSlicer"
    exe.parent.mkdir()
    exe.write_text(LAUNCHER.format(python=sys.executable))
    exe.chmod(0o755)
    yield exe
    for pid in _tree_pids(tmp_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _tree_pids(folder: Path) -> list[int]:
    pids = []
    for name in ("tree.txt", "run/child.pid"):
        try:
            pids += [int(p) for p in (folder / name).read_text().split()]
        except (OSError, ValueError):
            pass
    return pids


def _wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _file_has(path: Path, text: str) -> bool:
    try:
        return text in path.read_text()
    except OSError:
        return False


def _gone(pids: list[int], timeout: float = 3.0) -> list[int]:
    # the survivors (a SIGKILLed orphan is reaped by init a moment later)
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if proctree.start_time(p) is not None]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.mark.parametrize("phase", ["after_status", "before_status"])
def test_cancel_is_graceful_for_the_engine_and_ends_the_tree(launcher, tmp_path, phase):
    run_dir = tmp_path / "run"
    job = Job.start(["selftest", "job", "--spawn-child", "--steps", "400", "--sleep", "0.05"], python=launcher,
                    run_dir=run_dir)
    launcher_pid = job.pid
    if phase == "after_status":  # the client has read the engine's status event (it knows the engine's pid)
        seen: list[dict] = []
        _wait_for(lambda: (seen.extend(job.poll()) or sum(e["kind"] == "progress" for e in seen) >= 2))
        assert job.pid != launcher_pid
    else:  # the engine runs (handler installed, counting) but the client has not polled once
        _wait_for(lambda: _file_has(run_dir / "events.jsonl", '"progress"') and (run_dir / "child.pid").exists())
    _wait_for(lambda: len(_tree_pids(tmp_path)) == 4)
    engine_pid, grouped, alone, child = _tree_pids(tmp_path)
    t0 = time.monotonic()
    job.cancel(grace_s=5)
    assert time.monotonic() - t0 < 0.3
    job.wait(timeout=30)
    run = read_run(run_dir)
    assert run["pid"] == engine_pid and job.pid == engine_pid
    assert run["status"] == "cancelled" and run["exit_code"] == 3 and run["error_kind"] == "cancelled"
    assert "finalized_by" not in run, "the engine never got the SIGTERM: the client had to record the end"
    assert job.status == "cancelled" and job.returncode == 3, (job.status, job.returncode, job.error)
    assert 1 <= read_run(run_dir, "checkpoints/selftest_state.json")["step"] < 400
    left = _gone([launcher_pid, engine_pid, grouped, alone, child])
    assert not left, f"processes of the tree survived the cancel: {left}"


def test_cancel_before_the_engine_is_up_ends_everything(launcher, tmp_path):
    job = Job.start(["selftest", "job", "--steps", "400"], python=launcher, run_dir=tmp_path / "run")
    session = job.pid
    _wait_for(lambda: (tmp_path / "tree.txt").exists())
    job.cancel(grace_s=3)  # the engine is still importing: no handler, nothing to save; the group goes
    job.wait(timeout=30)
    assert job.status == "cancelled"
    _wait_for(lambda: not proctree.collect([], session=session), timeout=5)
    assert not _gone(_tree_pids(tmp_path))


def test_stdout_job_behind_a_launcher_cancels_gracefully(launcher, tmp_path):
    job = Job.start(["selftest", "job", "--steps", "400", "--sleep", "0.05"], python=launcher)
    seen: list[dict] = []
    _wait_for(lambda: (seen.extend(job.poll()) or any(e["kind"] == "progress" for e in seen)))
    _wait_for(lambda: len(_tree_pids(tmp_path)) == 3)
    job.cancel(grace_s=5)
    seen += job.wait(timeout=30)
    assert not job.running
    assert job.status == "cancelled" and job.returncode == 3
    assert any(e["kind"] == "done" and e.get("exit_code") == 3 and e.get("source") != "client" for e in seen)
    assert not _gone(_tree_pids(tmp_path))


def test_reattached_detached_run_behind_a_launcher_cancels_gracefully(launcher, tmp_path):
    run_dir = tmp_path / "run"
    first_session = (  # an earlier Slicer session started the run, detached, and went away
        "from VoCoSlicerLib.jobs import Job; "
        f"j = Job.start(['selftest', 'job', '--spawn-child', '--steps', '400'], python={str(launcher)!r}, "
        f"run_dir={str(run_dir)!r}, detached=True); print(j.pid)"
    )
    out = subprocess.run([sys.executable, "-c", first_session], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(ENGINE_DIR)})
    launcher_pid = int(out.stdout)
    _wait_for(lambda: len(_tree_pids(tmp_path)) == 4 and _file_has(run_dir / "events.jsonl", '"progress"'))
    job = Job.attach(run_dir)
    engine_pid, grouped, alone, child = _tree_pids(tmp_path)
    assert job.pid == engine_pid
    job.cancel(grace_s=5)
    job.wait(timeout=30)
    run = read_run(run_dir)
    assert run["status"] == "cancelled" and run["exit_code"] == 3 and "finalized_by" not in run
    left = _gone([launcher_pid, engine_pid, grouped, alone, child])
    assert not left, f"processes of the tree survived the cancel: {left}"


def test_a_reused_pid_is_never_signalled(tmp_path):
    # a process that merely carries a pid we once knew (its start time differs) is left alone, as is its group
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        _wait_for(lambda: proctree.start_time(proc.pid) is not None)
        start = proctree.start_time(proc.pid)
        assert not proctree.reused(proc.pid, start) and proctree.reused(proc.pid, start + 1)
        assert proctree.collect({proc.pid: start + 1}, session=proc.pid, session_start=start + 1) == {}
        proctree.kill_tree({proc.pid: start + 1}, proc.pid, None, signal.SIGKILL, leader_start=start + 1)
        time.sleep(0.2)
        assert proc.poll() is None, "a process that only reuses a known pid was killed"
        assert proctree.collect({proc.pid: start}) == {proc.pid: start}
        proctree.kill_tree({proc.pid: start}, proc.pid, None, signal.SIGKILL, leader_start=start)
        assert proc.wait(5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cancelled_warm_worker_behind_a_launcher_leaves_no_process(launcher, tmp_path):
    from VoCoSlicerLib.job_driver import JobDriver
    from VoCoSlicerLib.worker_client import WorkerClient

    busy = tmp_path / "busy_worker.py"  # answers ping, then works on "segment" for ever
    busy.write_text("import json, os, sys, time\n"
                    "for line in sys.stdin:\n"
                    "    req = json.loads(line)\n"
                    "    print(json.dumps({'id': req['id'], 'kind': 'progress', 'step': 1, 'total': 9}), flush=True)\n"
                    "    time.sleep(600)\n")
    worker = WorkerClient(python=launcher, args=[str(busy)])
    driver = JobDriver("Segment")
    driver.start_request(worker, "segment", {})
    _wait_for(lambda: (driver.tick() is not None and driver.state.fraction is not None))
    _wait_for(lambda: len(_tree_pids(tmp_path)) == 3)
    launcher_pid = worker.pid
    driver.cancel()
    _wait_for(lambda: (driver.tick() is not None and not driver.busy), timeout=15)
    left = _gone([launcher_pid, *_tree_pids(tmp_path)])
    assert not left, f"processes of the worker's tree survived the cancel: {left}"
