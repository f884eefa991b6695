"""Run directories seen from the Slicer side: list runs, read their status, show why one failed.

The format is the engine's (``vocoslicer.jobs.rundir``: ``run.json``, ``events.jsonl``, ``log.txt``); this module
reads it with the stdlib only, because the GUI process must not import the engine (or torch) to draw a list.
Also the parsing of event lines shared by the job client and the warm-worker client.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ACTIVE = ("queued", "running")
FINAL = ("ok", "failed", "cancelled")


def default_runs_root() -> Path:
    """``<VOCOSLICER_HOME>/runs`` (``~/.vocoslicer/runs`` by default), as the engine defines it."""
    home = Path(os.environ.get("VOCOSLICER_HOME") or Path.home() / ".vocoslicer").expanduser()
    return home / "runs"


def new_run_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """A fresh, unique run directory ``<root>/<UTC time>-<name>`` (created)."""
    base = Path(root) if root is not None else default_runs_root()
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


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via a temporary file and rename, so that readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()


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
    """True while ``pid`` runs (not a zombie) and, if ``start`` is known, is the process that was recorded."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.name == "nt":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
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


def read_run(run_dir: str | os.PathLike[str], name: str = "run.json") -> dict[str, Any]:
    """``run.json`` (or another JSON file of the run) as a dict, ``{}`` if missing; an active status whose
    process is gone reads as ``dead``."""
    try:
        data = json.loads((Path(run_dir) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    if data.get("status") in ACTIVE and data.get("host") == socket.gethostname():
        if not pid_alive(data.get("pid"), data.get("pid_start")):
            data["status"] = "dead"
    return data


def list_runs(root: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The runs directly under ``root`` (default: the engine's runs folder), newest first, each its
    ``run.json`` with ``run_dir`` added. A folder whose child never wrote ``run.json`` is skipped."""
    base = Path(root) if root is not None else default_runs_root()
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
    tail = tail_lines(Path(run_dir) / "log.txt", 400) or tail_lines(Path(run_dir) / "console.txt", 400)
    start = max((i for i, ln in enumerate(tail) if ln.startswith("Traceback")), default=None)
    detail = tail[start:][-lines:] if start is not None else tail[-lines:]
    return "\n".join([message, *detail]) if detail else message


def append_events(run_dir: Path, events: list[dict[str, Any]]) -> None:
    """Append events to ``events.jsonl`` (the client finishing a run whose child could not)."""
    with open(run_dir / "events.jsonl", "a", encoding="utf-8") as fh:
        for ev in events:
            fh.write(json.dumps(ev, separators=(",", ":")) + "\n")


def finalize_run_json(run_dir: Path, status: str, exit_code: int | None, message: str, argv: list[str],
                      pid: int | None) -> None:
    """Record the end of a run whose child died without doing it (forced cancel, failure before the engine
    started), so that listings and reattach agree with what the client saw."""
    run = read_run(run_dir)
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    run.setdefault("schema", 1)
    run.setdefault("id", run_dir.name)
    run.setdefault("argv", argv[3:] if argv[1:3] == ["-m", "vocoslicer"] else argv)
    run.setdefault("pid", pid)
    run.setdefault("host", socket.gethostname())
    run.setdefault("started", run.get("created") or now)
    run.update(status=status, exit_code=3 if status == "cancelled" else exit_code, error=message,
               error_kind="cancelled" if status == "cancelled" else "crash", ended=now, updated=now,
               waiting_for=None, finalized_by="client", finalized_t=round(time.time(), 3))
    write_json_atomic(run_dir / "run.json", run)


def _client_event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"t": round(time.time(), 3), "kind": kind, "source": "client", **fields}


def parse_event_line(line: str, text_is_log: bool = False) -> dict[str, Any] | None:
    """One event from one line; a malformed line becomes a ``warning`` event (``None`` for a blank line).

    ``text_is_log``: on a stdout channel, plain text that does not even look like JSON (a library printing)
    becomes a ``log`` event instead of a warning.
    """
    line = line.strip()
    if not line:
        return None
    if text_is_log and not line.startswith("{"):
        return _client_event("log", level="stdout", message=line)
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict) or not isinstance(event.get("kind"), str):
        return _client_event("warning", message=f"skipped a malformed event line: {line[:200]}")
    return event


def _read_lines(stream: Any, tag: str, out: queue.Queue) -> None:
    # reader thread: binary lines, decoded leniently (a non-UTF-8 console must not kill the reader)
    try:
        for raw in iter(stream.readline, b""):
            out.put((tag, raw.decode("utf-8", errors="replace")))
    except (OSError, ValueError):
        pass
    finally:
        out.put((tag, None))
