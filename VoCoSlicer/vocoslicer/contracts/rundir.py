"""The run directory contract: ``run.json``, ``events.jsonl``, ``log.txt``, ``checkpoints/``.

``run.json`` is rewritten atomically on every status change so that a reader (the Slicer client, ``vocoslicer
runs``) never sees half a file. Its fields:

- ``schema`` (1), ``id`` (folder name), ``command`` (e.g. ``segment`` or ``pretrain voco``), ``argv`` (the
  arguments after ``python -m vocoslicer``), ``args`` (the same without the job options ``--run-dir`` and
  ``--events``: what a client relaunches with ``--resume``), ``config`` (every parsed option;
  with ``--config FILE`` also ``config`` = the file's absolute path and ``config_sha256``), ``python``,
  ``version``, ``cuda_visible_devices`` (as the run saw it, so a resume lands on the same GPUs)
- ``status``: ``queued`` (waiting for a GPU) | ``running`` | ``ok`` | ``failed`` | ``cancelled``
- ``pid``, ``pid_start`` (kernel start time of the pid on Linux, to tell a reused pid apart), ``host``
- ``created``, ``started``, ``updated``, ``ended`` (ISO 8601 UTC), ``attempt`` (1 + number of resumes)
- ``exit_code`` (0 ok, 1 crash, 2 user error, 3 cancelled), ``error`` (one user-facing line), ``error_kind``
  (``user`` | ``crash`` | ``cancelled``), ``waiting_for`` (while queued: who holds the GPU)

The engine writes it (``vocoslicer.jobs.rundir.RunRecord``). The Slicer job client adds ``launch.json`` (its
command line and the child's pid, written before the engine starts) and ``console.txt`` (the child's
stdout/stderr); after a forced kill it finishes ``run.json`` itself (:func:`finalize_run_json`,
``finalized_by: "client"``).

A reader that finds ``queued``/``running`` but a dead pid reports ``dead``: the process was killed (``kill -9``,
power loss, out-of-memory killer) before it could record an end; ``--resume`` continues it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vocoslicer.contracts.atomic import atomic_write_json
from vocoslicer.contracts.errors import EXIT_CANCELLED
from vocoslicer.contracts.events import event_line
from vocoslicer.contracts.paths import runs_dir

RUN_JSON = "run.json"
EVENTS_JSONL = "events.jsonl"
LOG_TXT = "log.txt"
CHECKPOINTS = "checkpoints"
ACTIVE_STATUSES = ("queued", "running")
FINAL_STATUSES = ("ok", "failed", "cancelled")
JOB_OPTIONS = ("--run-dir", "--events")


def now_iso() -> str:
    """UTC timestamp with milliseconds; sorts as text."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after its closing parenthesis
    return stat[stat.rfind(")") + 2:].split()


def pid_start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (Linux ``/proc``), or ``None`` where unavailable; guards against pid reuse."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
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


def pid_alive(pid: Any, start: Any = None) -> bool:
    """True while ``pid`` runs (not a zombie) and, when ``start`` is known, is still the process that was
    recorded. Both come from JSON files, so anything that is not a positive integer reads as gone/unknown."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
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
    fields = _stat_fields(pid)
    if fields:
        if fields[0] in ("Z", "X"):
            return False
        if isinstance(start, int) and len(fields) > 19 and fields[19].isdigit() and int(fields[19]) != start:
            return False
    return True


def read_run(run_dir: str | os.PathLike[str], name: str = RUN_JSON) -> dict[str, Any]:
    """``run.json`` (or another JSON file of the run, e.g. ``launch.json``) as a dict, ``{}`` when absent or
    unreadable; an active status whose process is gone without having recorded an end reads as ``dead``."""
    try:
        data = json.loads((Path(run_dir) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    if data.get("status") in ACTIVE_STATUSES and data.get("host") == socket.gethostname():
        if not pid_alive(data.get("pid"), data.get("pid_start")):
            data["status"] = "dead"
    return data


def list_runs(root: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The runs directly under ``root`` (default: the home's runs folder, not created), newest first, each its
    ``run.json`` with ``run_dir`` added. A folder whose child never wrote ``run.json`` is skipped."""
    base = Path(root) if root is not None else runs_dir(create=False)
    if not base.is_dir():
        return []
    out = []
    for sub in base.iterdir():
        data = read_run(sub) if sub.is_dir() else {}
        if data:
            data["run_dir"] = str(sub)
            out.append(data)
    out.sort(key=lambda d: str(d.get("started") or d.get("created") or ""), reverse=True)
    return out


def new_run_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """A fresh, unique run directory ``<root>/<UTC time>-<name>`` (created; default root: the home's runs)."""
    base = Path(root) if root is not None else runs_dir(create=False)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "run"
    for i in range(1000):
        path = base / (f"{stamp}-{safe}" if i == 0 else f"{stamp}-{safe}-{i}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}: could not create a unique run directory for {name}")


def tail_lines(path: str | os.PathLike[str], n: int) -> list[str]:
    """The last ``n`` lines of a text file (at most the last 256 KiB are read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 262144))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return text.splitlines()[-n:] if n > 0 else []


def last_error(run_dir: str | os.PathLike[str], lines: int = 20) -> str:
    """What to show for a failed run: its one-line error, then the end of ``log.txt`` from the last traceback
    (or the last ``lines`` lines; ``console.txt`` when the log is empty). Empty text for a run without error."""
    run = read_run(run_dir)
    message = run.get("error") or ""
    if run.get("status") == "dead" and not message:
        message = "the job process ended without recording an end (killed?); resume it to continue"
    if not message:
        return ""
    tail = tail_lines(Path(run_dir) / LOG_TXT, 400) or tail_lines(Path(run_dir) / "console.txt", 400)
    start = max((i for i, ln in enumerate(tail) if ln.startswith("Traceback")), default=None)
    detail = tail[start:][-lines:] if start is not None else tail[-lines:]
    return "\n".join([message, *detail]) if detail else message


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


def append_events(run_dir: Path, events: list[dict[str, Any]]) -> None:
    """Append events to ``events.jsonl`` (the client finishing a run whose child could not)."""
    with open(run_dir / EVENTS_JSONL, "a", encoding="utf-8") as fh:
        for ev in events:
            fh.write(event_line(ev) + "\n")


def finalize_run_json(run_dir: Path, status: str, exit_code: int | None, message: str, argv: list[str],
                      pid: int | None) -> None:
    """Record the end of a run whose child died without doing it (forced cancel, failure before the engine
    started), so that listings and reattach agree with what the client saw."""
    run = read_run(run_dir)
    now = now_iso()
    run.setdefault("schema", 1)
    run.setdefault("id", run_dir.name)
    run.setdefault("argv", argv[3:] if argv[1:3] == ["-m", "vocoslicer"] else argv)
    run.setdefault("pid", pid)
    run.setdefault("host", socket.gethostname())
    run.setdefault("started", run.get("created") or now)
    cancelled = status == "cancelled"
    run.update(status=status, exit_code=EXIT_CANCELLED if cancelled else exit_code, error=message,
               error_kind="cancelled" if cancelled else "crash", ended=now, updated=now,
               waiting_for=None, finalized_by="client", finalized_t=round(time.time(), 3))
    atomic_write_json(run_dir / RUN_JSON, run)
