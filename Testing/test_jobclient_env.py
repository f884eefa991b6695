"""Issue 12 item 2: a "Python for jobs" that is not Slicer's own starts from Slicer's startup environment.

Inside Slicer the launcher has set ``PYTHONHOME``, ``PYTHONNOUSERSITE``, ``PYTHONPATH`` and ``LD_LIBRARY_PATH``
for Slicer's Python; here the test process's environment is polluted the same way (a bogus ``PYTHONHOME`` kills
any Python at start-up) and a real venv made in tmp plays the user's conda/venv interpreter. The startup
environment is what ``slicer.util.startupEnvironment()`` would return: the environment before the pollution.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from VoCoSlicerLib import engine
from VoCoSlicerLib.job_driver import JobDriver
from VoCoSlicerLib.jobs import ENGINE_DIR, Job, child_env
from VoCoSlicerLib.state import JobState
from VoCoSlicerLib.worker_client import WorkerClient, WorkerError

FAKE_WORKER = Path(__file__).parent / "data" / "fake_worker.py"
POLLUTION = {"PYTHONHOME": "/nonexistent/Slicer/lib/Python", "PYTHONNOUSERSITE": "1",
             "PYTHONPATH": "/nonexistent/Slicer/lib/Python/site-packages",
             "LD_LIBRARY_PATH": "/nonexistent/Slicer/lib"}


@pytest.fixture(scope="module")
def foreign_python(tmp_path_factory) -> Path:
    """A real venv (``python -m venv --without-pip``) that sees this environment's packages through a .pth."""
    venv = tmp_path_factory.mktemp("foreign") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    ours = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    (site / "borrowed.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
    return venv / "bin" / "python"


@pytest.fixture
def polluted(monkeypatch, tmp_path) -> dict[str, str]:
    """Pollute os.environ like Slicer's launcher does; returns the clean startup environment."""
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    clean = dict(os.environ)
    for key, value in POLLUTION.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(engine, "_startup_env", None)
    return clean


def test_base_environment_per_interpreter(polluted, foreign_python):
    own = child_env(python=sys.executable, startup_env=polluted)
    assert own["PYTHONHOME"] == POLLUTION["PYTHONHOME"]  # Slicer's own Python needs Slicer's environment
    assert own["PYTHONPATH"].split(os.pathsep)[:2] == [str(ENGINE_DIR), POLLUTION["PYTHONPATH"]]
    sibling = Path(sys.executable).with_name("python-real")  # python-real next to PythonSlicer counts as own
    assert engine.is_own_python(sibling) and not engine.is_own_python(foreign_python)
    foreign = child_env({"CUDA_VISIBLE_DEVICES": "1"}, python=foreign_python, startup_env=polluted)
    for key in ("PYTHONHOME", "PYTHONNOUSERSITE", "LD_LIBRARY_PATH"):
        assert foreign.get(key) == polluted.get(key), key
    assert foreign["PYTHONPATH"].split(os.pathsep)[0] == str(ENGINE_DIR)
    assert POLLUTION["PYTHONPATH"] not in foreign["PYTHONPATH"] and foreign["CUDA_VISIBLE_DEVICES"] == "1"
    os.environ["VOCOSLICER_CACHE"] = "/set/in/this/session"  # the extension's own settings carry over
    try:
        assert child_env(python=foreign_python, startup_env=polluted)["VOCOSLICER_CACHE"] == "/set/in/this/session"
    finally:
        del os.environ["VOCOSLICER_CACHE"]
    calls = []
    engine.set_startup_environment(lambda: calls.append(1) or polluted)  # the module registers a callable
    assert "PYTHONHOME" not in child_env(python=foreign_python) and calls == [1]
    assert child_env(python=sys.executable)["PYTHONHOME"] == POLLUTION["PYTHONHOME"] and calls == [1]
    engine.set_startup_environment(None)
    assert child_env(python=foreign_python)["PYTHONHOME"] == POLLUTION["PYTHONHOME"]  # outside Slicer: ours


def _wait(driver: JobDriver, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while driver.busy and time.monotonic() < deadline:
        driver.tick()
        time.sleep(0.05)
    assert not driver.busy


def test_foreign_interpreter_runs_a_job_in_a_polluted_environment(polluted, foreign_python, tmp_path):
    args = ["selftest", "job", "--steps", "3", "--sleep", "0"]
    broken = Job.start(args, python=foreign_python, run_dir=tmp_path / "broken")  # what happened before the fix
    broken.wait(timeout=60)
    assert broken.status == "failed" and broken.returncode != 0

    job = Job.start(args, python=foreign_python, run_dir=tmp_path / "run", startup_env=polluted)
    job.wait(timeout=60)
    assert job.status == "ok" and job.returncode == 0, (job.error, (tmp_path / "run" / "console.txt").read_text())
    engine.set_startup_environment(lambda: polluted)
    try:
        driver = JobDriver("Segment")  # the panels' path: registered startup environment, no run folder
        driver.start([args], python=str(foreign_python))
        _wait(driver)
        assert driver.state.state is JobState.DONE, driver.state.message
        assert driver.metrics.last("train/value") == 3.0
    finally:
        engine.set_startup_environment(None)


def test_foreign_interpreter_runs_the_warm_worker(polluted, foreign_python):
    with WorkerClient(python=foreign_python, args=[str(FAKE_WORKER)], startup_env=polluted) as worker:
        assert worker.ping(timeout=60)["pong"] is True
    broken = WorkerClient(python=foreign_python, args=[str(FAKE_WORKER)])
    try:
        with pytest.raises(WorkerError, match="ended unexpectedly"):
            broken.ping(timeout=60)
    finally:
        broken.close(wait=True)
