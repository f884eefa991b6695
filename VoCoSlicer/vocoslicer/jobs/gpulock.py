"""One job per GPU at a time: an advisory inter-process lock per physical device.

The lock is a ``filelock`` lock (``flock`` on POSIX, a byte-range lock on Windows) on
``<VOCOSLICER_HOME>/locks/gpu-<key>.lock``; the OS drops it when the holding process dies (even ``kill -9``), so a
crashed job never blocks the GPU. ``<key>`` is the *physical* device: under
``CUDA_VISIBLE_DEVICES=3`` the process's ``cuda:0`` is GPU 3, and two jobs that both see it as ``cuda:0`` must
still queue. A sidecar ``gpu-<key>.json`` names the holder so that a waiting job can tell the user who it waits
for.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from vocoslicer import paths
from vocoslicer.io.atomic import atomic_write_json


def physical_gpu_key(device: str | int) -> str:
    """Name of the physical GPU behind ``device`` (``0``, ``"cuda:1"``, ``"cuda"``), honouring
    ``CUDA_VISIBLE_DEVICES`` (indices or GPU UUIDs)."""
    if isinstance(device, int):
        index = device
    else:
        text = str(device).strip().lower()
        m = re.fullmatch(r"(?:cuda|gpu)?:?(\d*)", text)
        if not m:
            raise ValueError(f"not a GPU device: {device!r}")
        index = int(m.group(1) or 0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if index < len(entries):
            return re.sub(r"[^A-Za-z0-9_.-]", "_", entries[index])
    return str(index)


def lock_holder(key: str) -> dict[str, Any]:
    """What the sidecar says about the current holder of GPU ``key`` (may be stale if the lock is free)."""
    try:
        data = json.loads((paths.locks_dir() / f"gpu-{key}.json").read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def gpu_lock(
    device: str | int,
    run_dir: str | Path | None = None,
    on_wait: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    poll_s: float = 0.2,
) -> Iterator[str]:
    """Hold the lock of the physical GPU behind ``device`` for the ``with`` block; yields its key.

    While another process holds it, ``on_wait(holder)`` is called once (to mark the run ``queued`` and tell the
    user), then the lock is retried every ``poll_s`` seconds; ``should_stop()`` returning True while waiting
    raises :class:`vocoslicer.errors.Cancelled`.
    """
    from vocoslicer.errors import Cancelled

    key = physical_gpu_key(device)
    lock = FileLock(paths.locks_dir() / f"gpu-{key}.lock")
    waited = False
    while True:
        try:
            lock.acquire(timeout=0)
            break
        except Timeout:
            pass
        if not waited:
            waited = True
            if on_wait is not None:
                holder = lock_holder(key)
                holder.setdefault("gpu", key)
                on_wait(holder)
        if should_stop is not None and should_stop():
            raise Cancelled(f"cancelled while waiting for GPU {key}")
        time.sleep(poll_s)
    try:
        atomic_write_json(paths.locks_dir() / f"gpu-{key}.json",
                          {"gpu": key, "pid": os.getpid(), "run_dir": str(run_dir) if run_dir else None,
                           "since": time.time()})
        yield key
    finally:
        lock.release()
