"""The run directory contract: ``run.json``, ``events.jsonl``, ``log.txt``, ``checkpoints/``.

``run.json`` is rewritten atomically on every status change so that a reader (the Slicer client, ``vocoslicer
runs``) never sees half a file. Its fields:

- ``schema`` (1), ``id`` (folder name), ``command`` (e.g. ``segment`` or ``pretrain voco``), ``argv`` (the
  arguments after ``python -m vocoslicer``), ``args`` (the same without the job options ``--run-dir`` and
  ``--events``: what a client relaunches with ``--resume``), ``config`` (parsed options), ``python``,
  ``version``, ``cuda_visible_devices`` (as the run saw it, so a resume lands on the same GPUs)
- ``status``: ``queued`` (waiting for a GPU) | ``running`` | ``ok`` | ``failed`` | ``cancelled``
- ``pid``, ``pid_start`` (kernel start time of the pid on Linux, to tell a reused pid apart), ``host``
- ``created``, ``started``, ``updated``, ``ended`` (ISO 8601 UTC), ``attempt`` (1 + number of resumes)
- ``exit_code`` (0 ok, 1 crash, 2 user error, 3 cancelled), ``error`` (one user-facing line), ``error_kind``
  (``user`` | ``crash`` | ``cancelled``), ``waiting_for`` (while queued: who holds the GPU)

The Slicer job client adds ``launch.json`` (its command line and the child's pid, written before the engine
starts) and ``console.txt`` (the child's stdout/stderr); after a forced kill it finishes ``run.json`` itself
(``finalized_by: "client"``).

A reader that finds ``queued``/``running`` but a dead pid reports ``dead``: the process was killed (``kill -9``,
power loss, out-of-memory killer) before it could record an end; ``--resume`` continues it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vocoslicer.io.atomic import atomic_write_json

RUN_JSON = "run.json"
EVENTS_JSONL = "events.jsonl"
LOG_TXT = "log.txt"
CHECKPOINTS = "checkpoints"
ACTIVE_STATUSES = ("queued", "running")
FINAL_STATUSES = ("ok", "failed", "cancelled")


def now_iso() -> str:
    """UTC timestamp with milliseconds; sorts as text."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def pid_start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (Linux ``/proc``), or ``None`` where unavailable; guards against pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after its closing parenthesis
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _windows_pid_alive(pid: int) -> bool:  # pragma: no cover - Windows only
    # os.kill(pid, 0) would *terminate* the process on Windows; ask the kernel for its exit code instead
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    code = ctypes.c_ulong()
    ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
    kernel32.CloseHandle(handle)
    return bool(ok) and code.value == 259  # STILL_ACTIVE


def pid_alive(pid: int | None, start: int | None = None) -> bool:
    """True while ``pid`` runs (not a zombie) and, when ``start`` is known, is still the same process."""
    if not pid or pid <= 0:
        return False
    if os.name == "nt":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists but belongs to someone else
        return True
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rfind(")") + 2:].split()[0] in ("Z", "X"):
            return False
    except OSError:
        pass
    if start is not None:
        current = pid_start_time(pid)
        if current is not None and current != start:
            return False
    return True


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run directory (empty dict when absent or unreadable), with ``status`` corrected to
    ``dead`` when the recorded process is gone without having recorded an end."""
    path = Path(run_dir) / RUN_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    if data.get("status") in ACTIVE_STATUSES and data.get("host") == socket.gethostname():
        if not pid_alive(data.get("pid"), data.get("pid_start")):
            data["status"] = "dead"
    return data


def list_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every run directory directly under ``root`` (newest first), each as its ``run.json`` plus ``run_dir``."""
    out = []
    root = Path(root)
    if not root.is_dir():
        return out
    for sub in root.iterdir():
        if (sub / RUN_JSON).is_file():
            data = read_run(sub)
            if data:
                data["run_dir"] = str(sub)
                out.append(data)
    out.sort(key=lambda d: str(d.get("started") or d.get("created") or ""), reverse=True)
    return out


def tail_lines(path: str | Path, n: int) -> list[str]:
    """Last ``n`` lines of a text file (reads at most the last 256 KiB)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 262144))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = data.splitlines()
    return lines[-n:] if n > 0 else []


JOB_OPTIONS = ("--run-dir", "--events")


def strip_job_options(argv: list[str]) -> list[str]:
    """``argv`` without the global job options (they come before the command, each with one value)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("-"):
            return out + argv[i:]
        if token in JOB_OPTIONS:
            i += 2
            continue
        if not token.startswith(tuple(o + "=" for o in JOB_OPTIONS)):
            out.append(token)
        i += 1
    return out


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

