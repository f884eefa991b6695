"""The one inter-process lock (``filelock``) behind the cohort manifest, the GPU lock and the pretraining cache.

Real processes contend: two writers doing read-modify-write on a shared counter lose no update under each lock,
a holder killed with SIGKILL leaves no stale lock, and a waiter sees the holder (GPU) or a one-line timeout (cohort).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vocoslicer.errors import Cancelled, UserError

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 25

# child: `python -c CHILD kind target rounds|hold` (VOCOSLICER_HOME set by the parent for the GPU lock)
CHILD = r"""
import sys, time
from pathlib import Path
kind, target, what = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if kind == "cohort":
    from vocoslicer.data.cohort_manifest import file_lock
    lock = lambda: file_lock(target / ".cohort.lock", timeout=60)
elif kind == "gpu":
    from vocoslicer.jobs.gpulock import gpu_lock
    lock = lambda: gpu_lock("cuda:0", run_dir=target, poll_s=0.005)
else:
    from vocoslicer.data.cache import _locked
    lock = lambda: _locked(target)
counter = target / "counter.txt"
if what == "hold":
    with lock():
        (target / "held").write_text("1")
        time.sleep(600)
for _ in range(int(what)):
    with lock():
        n = int(counter.read_text()) if counter.exists() else 0
        time.sleep(0.002)  # widen the race window: without the lock, updates are lost
        counter.write_text(str(n + 1))
"""


def _child(kind: str, target: Path, what: str, home: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "VoCoSlicer"), VOCOSLICER_HOME=str(home), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", CHILD, kind, str(target), what], env=env)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "the lock holder died"
        assert time.monotonic() < deadline, "the lock holder never got the lock"
        time.sleep(0.02)


@pytest.mark.parametrize("kind", ["cohort", "gpu", "cache"])
def test_two_processes_lose_no_update(tmp_path, kind):
    target = tmp_path / "shared"
    target.mkdir()
    procs = [_child(kind, target, str(ROUNDS), tmp_path / "home") for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert int((target / "counter.txt").read_text()) == 2 * ROUNDS


def test_gpu_lock_waits_for_a_live_holder_and_not_for_a_killed_one(tmp_path, monkeypatch):
    from vocoslicer.jobs.gpulock import gpu_lock

    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    holder = _child("gpu", tmp_path, "hold", tmp_path / "home")
    try:
        _wait_for(tmp_path / "held", holder)
        seen: list[dict] = []
        polls = iter(range(5))
        with pytest.raises(Cancelled, match="waiting for GPU 0"):
            with gpu_lock(0, on_wait=seen.append, should_stop=lambda: next(polls, 4) >= 4, poll_s=0.01):
                pytest.fail("got the GPU while another process holds it")
        assert len(seen) == 1 and seen[0]["pid"] == holder.pid and seen[0]["run_dir"] == str(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    t0 = time.monotonic()
    with gpu_lock(0, run_dir=tmp_path / "me") as key:  # the OS dropped the dead holder's lock
        assert key == "0"
    assert time.monotonic() - t0 < 5


def test_cohort_lock_times_out_with_one_line_then_frees_when_the_holder_dies(tmp_path):
    from vocoslicer.data.cohort_manifest import file_lock

    holder = _child("cohort", tmp_path, "hold", tmp_path / "home")
    try:
        _wait_for(tmp_path / "held", holder)
        with pytest.raises(UserError, match="locked by another process"):
            with file_lock(tmp_path / ".cohort.lock", timeout=0.3):
                pytest.fail("got the cohort lock while another process holds it")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with file_lock(tmp_path / ".cohort.lock", timeout=5):
        pass


def test_cache_lock_blocks_index_updates_until_the_holder_lets_go(tmp_path):
    import numpy as np
    import SimpleITK as sitk

    from vocoslicer.data.cache import PreprocessConfig, VolumeCache, find_sources

    img = sitk.GetImageFromArray(np.full((20, 20, 20), 100, np.int16))
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    cache_root = tmp_path / "cache"
    holder = _child("cache", cache_root, "hold", tmp_path / "home")
    try:
        _wait_for(cache_root / "held", holder)
        import threading

        done: list = []
        cache = VolumeCache(cache_root, PreprocessConfig(spacing=None, min_size=4))
        worker = threading.Thread(target=lambda: done.append(cache.prepare(find_sources([tmp_path / "ct.nii.gz"]))))
        worker.start()
        worker.join(1.0)
        assert worker.is_alive() and not done  # waiting on the other process's lock
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    worker.join(30)
    entries, bad = done[0]
    assert len(entries) == 1 and entries[0].cached and not bad


PREPARE = r"""
import dataclasses, sys, time
from vocoslicer.data.cache import PreprocessConfig, VolumeCache, find_sources

@dataclasses.dataclass(frozen=True)
class Counting(PreprocessConfig):
    log: str = ""

    def __call__(self, source):
        with open(self.log, "a") as fh:
            fh.write(source.path + "\n")
        time.sleep(0.2)  # long enough for the other process to want the same volume meanwhile
        return super().__call__(source)

cfg = Counting(spacing=None, min_size=4, log=sys.argv[3])
entries, bad = VolumeCache(sys.argv[2], cfg).prepare(find_sources([sys.argv[1]]))
assert len(entries) == 4 and not bad, (entries, bad)
"""


def test_two_processes_preparing_one_cache_preprocess_each_volume_once(tmp_path):
    import numpy as np
    import SimpleITK as sitk

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 8, 8), 100 + i, np.int16)), str(data / f"ct{i}.nii.gz"))
    log = tmp_path / "calls.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "VoCoSlicer"), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE, str(data), str(tmp_path / "cache"), str(log)], env=env)
             for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    calls = log.read_text().splitlines()
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 4  # shared, not done twice
