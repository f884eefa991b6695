"""The engine's writer of ``run.json`` (the run directory contract is :mod:`vocoslicer.contracts.rundir`).

The readers (``read_run``, ``list_runs``, ``tail_lines``, ...) are the contract's, shared with the Slicer client;
they are re-exported here for the engine's commands.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from vocoslicer.contracts.atomic import atomic_write_json
from vocoslicer.contracts.rundir import (
    ACTIVE_STATUSES,
    CHECKPOINTS,
    EVENTS_JSONL,
    LOG_TXT,
    RUN_JSON,
    list_runs,
    now_iso,
    pid_start_time,
    read_run,
    strip_job_options,
    tail_lines,
)

# the contract's names the engine's modules import from here
__all__ = ["CHECKPOINTS", "EVENTS_JSONL", "LOG_TXT", "RunRecord", "list_runs", "now_iso", "read_run",
           "strip_job_options", "tail_lines"]


class RunRecord:
    """The engine's writer of ``run.json``: holds the current fields and rewrites the file atomically."""

    def __init__(self, run_dir: Path, data: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.path = run_dir / RUN_JSON
        self.data = data

    @classmethod
    def open(cls, run_dir: Path, command: str, argv: list[str], config: dict[str, Any], version: str) -> RunRecord:
        """Create (or take over for a resume) the record of ``run_dir``; refuses a run directory that another
        live process is using."""
        previous = read_run(run_dir)
        if previous.get("status") in ACTIVE_STATUSES:
            raise RuntimeError(f"{run_dir}: already in use by pid {previous.get('pid')} on {previous.get('host')}")
        pid = os.getpid()
        data: dict[str, Any] = {
            "schema": 1,
            "id": run_dir.name,
            "command": command,
            "argv": argv,
            "args": strip_job_options(argv),
            "config": config,
            "python": sys.executable,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "version": version,
            "status": "running",
            "pid": pid,
            "pid_start": pid_start_time(pid),
            "host": socket.gethostname(),
            "created": previous.get("created") or now_iso(),
            "started": now_iso(),
            "updated": now_iso(),
            "ended": None,
            "attempt": int(previous.get("attempt") or 0) + 1,
            "exit_code": None,
            "error": None,
            "error_kind": None,
            "waiting_for": None,
        }
        record = cls(run_dir, data)
        record.write()
        return record

    def write(self) -> None:
        """Rewrite ``run.json`` atomically."""
        self.data["updated"] = now_iso()
        atomic_write_json(self.path, self.data)

    def update(self, **fields: Any) -> None:
        """Change some fields and rewrite the file."""
        self.data.update(fields)
        self.write()

