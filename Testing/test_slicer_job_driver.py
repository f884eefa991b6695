"""VoCoSlicerLib.job_driver with real engine child processes (``vocoslicer selftest job``), as the widgets'
QTimer drives it: chains, failures with the job's own message, cancel, resume and reattach."""

from __future__ import annotations

import sys
import time

import pytest

from VoCoSlicerLib.job_driver import JobDriver
from VoCoSlicerLib.state import JobState

ENV = {"OMP_NUM_THREADS": "1"}


def _run(driver: JobDriver, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while driver.busy and time.monotonic() < deadline:
        driver.tick()
        time.sleep(0.05)
    assert not driver.busy, "job did not finish in time"


def test_chain_runs_in_order_and_folds_progress_metrics_and_log():
    finished = []
    d = JobDriver("Segment", on_finished=finished.append)
    d.start([["selftest", "job", "--steps", "2", "--sleep", "0"], ["selftest", "job", "--steps", "3", "--sleep", "0"]],
            env=ENV, python=sys.executable)
    assert d.state.view().button_text == "Cancel"
    _run(d)
    assert d.state.state is JobState.DONE and finished == [d]
    assert d.metrics.arrays("train/value")[1].tolist() == [1.0, 2.0, 3.0]  # second command's metrics
    assert sum(line.startswith("$ ") for line in d.log) == 2 and "selftest job --steps 3" in d.log_text()
    with pytest.raises(ValueError):
        d.start([])


def test_chain_with_run_dirs_reads_the_last_commands_json(tmp_path):
    cohort = tmp_path / "cohort"
    d = JobDriver("Add")
    d.start([["cohort", "init", str(cohort)], ["cohort", "list", str(cohort), "--json"]], run_dir=tmp_path / "runs",
            env=ENV, python=sys.executable)
    _run(d)
    assert d.state.state is JobState.DONE
    assert (tmp_path / "runs" / "step-0" / "run.json").is_file() and d.job.run_dir == tmp_path / "runs" / "step-1"
    listed = d.json_output()
    assert listed["cases"] == [] and listed["cohort"] == str(cohort.resolve())


def test_failure_shows_the_jobs_own_message_and_stops_the_chain():
    d = JobDriver("Finetune")
    d.start([["selftest", "job", "--steps", "3", "--sleep", "0", "--fail-at", "2"], ["selftest", "job"]],
            env=ENV, python=sys.executable)
    _run(d)
    assert d.state.state is JobState.FAILED
    assert "failing at step 2" in d.state.message and "failing at step 2" in d.state.view().progress_text
    assert sum(line.startswith("$ ") for line in d.log) == 1  # the second command never started


def test_cancel_then_resume_then_reattach(tmp_path):
    run = tmp_path / "run"
    d = JobDriver("Launch")
    d.start([["selftest", "job", "--steps", "60", "--sleep", "0.05"]], run_dir=run, env=ENV, python=sys.executable)
    deadline = time.monotonic() + 60
    while d.state.fraction is None and time.monotonic() < deadline:  # wait for the first step
        d.tick()
        time.sleep(0.05)
    d.cancel()
    assert d.state.state is JobState.CANCELLING
    _run(d)
    assert d.state.state is JobState.IDLE and d.state.message
    d.resume(run)
    _run(d, timeout=120)
    assert d.state.state is JobState.DONE and "resuming after step" in d.log_text()
    later = JobDriver("Launch")  # a new Slicer session: reattach to the finished run, replay its curves
    later.attach(run)
    _run(later)
    assert later.state.state is JobState.DONE and later.metrics.last("train/value") == 60.0


def test_warm_worker_request_and_fallback_to_a_one_shot_job():
    from VoCoSlicerLib.worker_client import WorkerClient

    with WorkerClient(python=sys.executable, env=ENV) as worker:  # the real ``vocoslicer serve --stdio``
        d = JobDriver("Segment")
        d.start_request(worker, "ping", {})
        _run(d, timeout=120)
        assert d.state.state is JobState.DONE and d.result["kind"] == "result" and d.result["pid"] == worker.pid
        d.start_request(worker, "segment", {"input": "/no/such.nrrd", "output": "/tmp/x.nii.gz", "model": "m"},
                        fallback=["selftest", "job"])
        _run(d, timeout=60)
        assert d.state.state is JobState.FAILED and d.state.message  # the engine's error, no fallback
        assert "warm worker unavailable" not in d.log_text()
    with WorkerClient(python=sys.executable, args=["-m", "vocoslicer", "no-such-command"], env=ENV) as broken:
        d = JobDriver("Segment")
        d.start_request(broken, "segment", {"input": "x"}, fallback=["selftest", "job", "--steps", "2", "--sleep", "0"])
        _run(d)
        assert d.state.state is JobState.DONE and "warm worker unavailable" in d.log_text()
        assert d.metrics.last("train/value") == 2.0


@pytest.mark.slow
def test_pretrain_run_from_panel_settings_reports_curves_and_reattaches(tmp_path):
    """VoCoPretrain's path: PretrainParams -> detached run with a run folder -> live metrics -> reattach."""
    from VoCoSlicerLib.params import PretrainParams

    d = JobDriver("Launch")
    d.start([["phantom", "--seed", "11", "--count", "2", "--size", "48", "48", "24", "-o", str(tmp_path / "data")]],
            env=ENV, python=sys.executable)
    _run(d)
    images = [str(p) for p in sorted((tmp_path / "data").glob("*_ct.nii.gz"))]  # not the truth label maps
    params = PretrainParams(method="tokenizer", dataDirs=images, modelSize="tiny", steps=2,
                            batchSize=1, cropSize=32, outputDir=str(tmp_path / "run"))
    home = {**ENV, "VOCOSLICER_HOME": str(tmp_path / "home")}  # preprocessing cache stays in the test folder
    d.start([params.args()], run_dir=tmp_path / "run", detached=True, env=home, python=sys.executable)
    _run(d, timeout=240)
    assert d.state.state is JobState.DONE, d.state.message
    assert d.metrics.names() and d.artifact("model")["architecture"] == "pumit_tokenizer"
    later = JobDriver("Launch")
    later.attach(tmp_path / "run")
    _run(later)
    assert later.state.state is JobState.DONE and later.metrics.names() == d.metrics.names()
