"""Issue 12 item 13: the job driver owns the temporary copies it is handed and deletes them once the job is final.

Real child processes (``vocoslicer selftest job``) and a real worker process (the ``serve --stdio`` stand-in);
``on_finished`` must still see the files (the panel loads the job's output from them there).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from VoCoSlicerLib.job_driver import JobDriver
from VoCoSlicerLib.jobs import JobError
from VoCoSlicerLib.state import JobState
from VoCoSlicerLib.worker_client import WorkerClient

FAKE_WORKER = Path(__file__).parent / "data" / "fake_worker.py"
ENV = {"OMP_NUM_THREADS": "1"}


def _temp(tmp_path: Path, name: str) -> tuple[Path, Path]:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "input.nrrd").write_bytes(b"\0" * 4096)  # a volume copy
    single = tmp_path / f"{name}-labels.csv"
    single.write_text("value,name\n1,liver\n")
    return folder, single


def _run(driver: JobDriver, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while driver.busy and time.monotonic() < deadline:
        driver.tick()
        time.sleep(0.02)
    assert not driver.busy


def test_chain_deletes_its_files_after_on_finished(tmp_path, monkeypatch):
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    folder, single = _temp(tmp_path, "job")
    seen = []
    driver = JobDriver("Add", on_finished=lambda d: seen.append((folder / "input.nrrd").is_file() and single.exists()))
    step = ["selftest", "job", "--steps", "2", "--sleep", "0"]
    driver.start([step, step], env=ENV, python=sys.executable, temp_paths=[folder, single])
    driver.tick()
    assert folder.is_dir()  # the chain is still running: nothing deleted
    _run(driver)
    assert driver.state.state is JobState.DONE and seen == [True]
    assert not folder.exists() and not single.exists()


@pytest.mark.parametrize("how", ["failed", "cancelled"])
def test_failed_and_cancelled_jobs_delete_their_files(tmp_path, monkeypatch, how):
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    folder, single = _temp(tmp_path, how)
    driver = JobDriver("Segment")
    extra = ["--fail-at", "1"] if how == "failed" else []
    driver.start([["selftest", "job", "--steps", "400", "--sleep", "0.05", *extra]], env=ENV, python=sys.executable,
                 temp_paths=[folder, single])
    if how == "cancelled":
        driver.cancel()
    _run(driver)
    assert driver.state.state is (JobState.FAILED if how == "failed" else JobState.IDLE)
    assert not folder.exists() and not single.exists()


def test_a_job_that_cannot_start_deletes_its_files(tmp_path):
    folder, single = _temp(tmp_path, "nostart")
    driver = JobDriver("Segment")
    with pytest.raises(JobError):
        driver.start([["selftest", "job"]], python=str(tmp_path / "no" / "python"), temp_paths=[folder, single])
    assert not folder.exists() and not single.exists() and not driver.busy


def test_warm_worker_requests_delete_their_files(tmp_path):
    with WorkerClient(python=sys.executable, args=[str(FAKE_WORKER)]) as worker:
        folder, single = _temp(tmp_path, "ok")
        driver = JobDriver("Segment", on_finished=lambda d: (folder / "input.nrrd").read_bytes())
        driver.start_request(worker, "segment", {"steps": 2, "output": "x"}, temp_paths=[folder, single])
        _run(driver)
        assert driver.state.state is JobState.DONE and driver.result["output"] == "x"
        assert not folder.exists() and not single.exists()

        folder, single = _temp(tmp_path, "cancel")
        driver.start_request(worker, "segment", {"steps": 1000, "sleep": 0.05}, temp_paths=[folder, single])
        driver.cancel()
        assert folder.exists()  # the worker may still read it until it is gone
        _run(driver)
        assert driver.state.state is JobState.IDLE and not folder.exists() and not single.exists()

    folder, single = _temp(tmp_path, "closed")
    driver = JobDriver("Segment")
    driver.start([["selftest", "job", "--steps", "400"]], env=ENV, python=sys.executable, temp_paths=[folder])
    driver.close()  # the panel goes away while the job runs
    assert not folder.exists()
