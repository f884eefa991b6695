"""Job client: run ``python -m vocoslicer <command>`` in a child process and follow it without blocking.

Runs inside Slicer's GUI process, so it is stdlib only (no Qt, no torch) and never raises from :meth:`Job.poll`:
the widget calls ``poll()`` from a ``QTimer`` and gets a list of event dicts (schema in
``vocoslicer.jobs.events``). Two ways to follow a child:

- with a run directory (the normal case): the child writes ``events.jsonl`` there and the client tails it from
  an offset; the child's stdout/stderr go to ``console.txt``. Such a run can be ``detached`` (own session,
  survives Slicer closing) and later reattached with :meth:`Job.attach` or continued with :meth:`Job.resume`;
- without one: the child prints its events on stdout (``--events stdout``), read by a thread.

Cancel sends SIGTERM to the job (it checkpoints and exits with code 3), then after a grace period SIGKILL to
its whole process group, so no grandchild (data loader worker, torchrun worker) is left behind.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from VoCoSlicerLib.job_runs import (
    FINAL,
    append_events,
    finalize_run_json,
    last_error,
    list_runs,
    new_run_dir,
    pid_alive,
    read_run,
    write_json_atomic,
)

ENGINE_DIR = Path(__file__).resolve().parents[1]  # the folder holding the ``vocoslicer`` package
IS_WINDOWS = os.name == "nt"

__all__ = ["ENGINE_DIR", "Job", "JobError", "child_env", "last_error", "list_runs", "new_run_dir",
           "parse_event_line", "read_run"]


class JobError(RuntimeError):
    """A job could not be started or attached; the message is meant for the user as is."""


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a child: ours, plus ``env``, with the engine folder first on ``PYTHONPATH``."""
    out = dict(os.environ)
    out.update({k: str(v) for k, v in (env or {}).items()})
    parts = [str(ENGINE_DIR)] + [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ENGINE_DIR)]
    out["PYTHONPATH"] = os.pathsep.join(parts)
    out["PYTHONUNBUFFERED"] = "1"
    out["PYTHONIOENCODING"] = "utf-8"
    return out


def resolve_python(python: str | os.PathLike[str] | None) -> str:
    """The interpreter to run, checked now so that a wrong path fails with a clear message."""
    if python is None:
        return sys.executable
    text = str(python)
    if os.path.dirname(text):
        if os.path.isfile(text) and os.access(text, os.X_OK):
            return text
    else:
        found = shutil.which(text)
        if found:
            return found
    raise JobError(f"Python interpreter not found or not executable: {text} (set the path to PythonSlicer, "
                   "or to a Python that has the VoCoSlicer engine requirements, and try again)")


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


class Job:
    """One job, started here or reattached; see the module docstring."""

    def __init__(self) -> None:
        self.run_dir: Path | None = None
        self.argv: list[str] = []
        self.pid: int | None = None
        self.detached = False
        self.status = "starting"  # starting|queued|running|ok|failed|cancelled|dead
        self.returncode: int | None = None
        self.error: str | None = None
        self.cancel_requested = False
        self._proc: subprocess.Popen | None = None
        self._pid_start: int | None = None
        self._offset = 0
        self._partial = b""
        self._queue: queue.Queue = queue.Queue()
        self._open_streams = 0
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._kill_at: float | None = None
        self._saw_done = False
        self._finished = False
        self._console: Any = None
        self._leads_group = False  # the job's pid leads its own process group (we may kill the group)

    # ---------------------------------------------------------------- starting
    @classmethod
    def start(
        cls,
        args: Sequence[str],
        python: str | os.PathLike[str] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        detached: bool = False,
        cwd: str | os.PathLike[str] | None = None,
        offset: int | None = None,
    ) -> Job:
        """Start ``python -m vocoslicer <args>`` without waiting; raises :class:`JobError` if it cannot start.

        ``env`` adds to our environment (e.g. ``{"CUDA_VISIBLE_DEVICES": "1"}``). ``detached`` needs a run
        directory: the child gets its own session and keeps running when this process exits.
        """
        job = cls()
        exe = resolve_python(python)
        job.detached = detached
        job_opts: list[str] = []
        if run_dir is not None:
            job.run_dir = Path(run_dir).expanduser().resolve()
            existing = read_run(job.run_dir)
            if existing.get("status") in ("queued", "running"):
                raise JobError(f"{job.run_dir}: a job is still running there (pid {existing.get('pid')})")
            try:
                job.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise JobError(f"{job.run_dir}: cannot create the run directory ({exc.strerror or exc})") from exc
            events = job.run_dir / "events.jsonl"
            job._offset = events.stat().st_size if offset is None and events.exists() else (offset or 0)
            job_opts = ["--run-dir", str(job.run_dir)]
        elif detached:
            raise JobError("a detached job needs a run directory (its events and status are kept there)")
        else:
            job_opts = ["--events", "stdout"]
        job.argv = [exe, "-m", "vocoslicer", *job_opts, *[str(a) for a in args]]
        popen: dict[str, Any] = {"env": child_env(env), "cwd": str(cwd) if cwd else None, "stdin": subprocess.DEVNULL}
        if IS_WINDOWS:  # pragma: no cover - not testable on the Linux CI
            flags = subprocess.CREATE_NEW_PROCESS_GROUP
            popen["creationflags"] = flags | (subprocess.DETACHED_PROCESS if detached else 0)
        else:
            popen["start_new_session"] = True  # own process group: cancel reaches every grandchild
        if job.run_dir is not None:
            job._console = open(job.run_dir / "console.txt", "ab")  # noqa: SIM115 - closed when the job ends
            popen.update(stdout=job._console, stderr=subprocess.STDOUT)
        else:
            popen.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            job._proc = subprocess.Popen(job.argv, **popen)
        except OSError as exc:
            if job._console is not None:
                job._console.close()
            raise JobError(f"could not start {exe}: {exc.strerror or exc}") from exc
        job.pid = job._proc.pid
        job._leads_group = not IS_WINDOWS
        if job.run_dir is not None:
            write_json_atomic(job.run_dir / "launch.json", {"argv": job.argv, "pid": job.pid, "detached": detached,
                                                             "started": time.time()})
        else:
            for stream, tag in ((job._proc.stdout, "stdout"), (job._proc.stderr, "stderr")):
                threading.Thread(target=_read_lines, args=(stream, tag, job._queue), daemon=True).start()
                job._open_streams += 1
        return job

    @classmethod
    def attach(cls, run_dir: str | os.PathLike[str], offset: int = 0) -> Job:
        """Follow a run started elsewhere (by an earlier Slicer session): events from ``offset`` (0 = all)."""
        job = cls()
        job.run_dir = Path(run_dir).expanduser().resolve()
        run = read_run(job.run_dir)
        launch = read_run(job.run_dir, name="launch.json")
        if not run and not launch:
            raise JobError(f"{job.run_dir}: not a run directory (no run.json)")
        job.pid = run.get("pid") or launch.get("pid")
        job._pid_start = run.get("pid_start")
        job.argv = list(run.get("argv") or launch.get("argv") or [])
        job.detached = True
        job._offset = offset
        job.status = run.get("status") or "starting"
        if not IS_WINDOWS and pid_alive(job.pid, job._pid_start):
            try:
                job._leads_group = os.getpgid(job.pid) == job.pid
            except ProcessLookupError:
                pass
        return job

    @classmethod
    def resume(
        cls,
        run_dir: str | os.PathLike[str],
        python: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        detached: bool = False,
    ) -> Job:
        """Relaunch the command recorded in ``run_dir`` with ``--resume`` (after a cancel, a crash, kill -9)."""
        run = read_run(run_dir)
        if not run or not run.get("args"):
            raise JobError(f"{run_dir}: no run to resume (run.json missing or without the command)")
        if run.get("status") in ("queued", "running"):
            raise JobError(f"{run_dir}: the run is still going (pid {run.get('pid')}); attach to it instead")
        args = list(run["args"])
        if "--resume" not in args:
            args.append("--resume")
        full_env = dict(env or {})
        if run.get("cuda_visible_devices") is not None:
            full_env.setdefault("CUDA_VISIBLE_DEVICES", run["cuda_visible_devices"])
        if python is None:
            # the interpreter the first attempt was launched with (PythonSlicer rather than the python-real it
            # execs, which would lack Slicer's environment), else the one the engine ran in
            launched = (read_run(run_dir, name="launch.json").get("argv") or [None])[0]
            for candidate in (launched, run.get("python")):
                if candidate and os.path.isfile(str(candidate)):
                    python = str(candidate)
                    break
        return cls.start(args, python=python, run_dir=run_dir, env=full_env, detached=detached)

    # ---------------------------------------------------------------- following
    @property
    def running(self) -> bool:
        """True until the job has ended (and its last events were read)."""
        return not self._finished

    def _alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return pid_alive(self.pid, self._pid_start)

    def _read_file_events(self, final: bool) -> list[dict[str, Any]]:
        path = self.run_dir / "events.jsonl"  # type: ignore[operator]
        try:
            with open(path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except OSError:
            return []
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = b"" if final else lines.pop()  # an unfinished last line waits for its newline
        out = []
        for raw in lines:
            event = parse_event_line(raw.decode("utf-8", errors="replace"))
            if event is not None:
                out.append(event)
        return out

    def _read_queue_events(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                tag, line = self._queue.get_nowait()
            except queue.Empty:
                return out
            if line is None:
                self._open_streams -= 1
                continue
            if tag == "stderr":
                if line.strip():
                    self._stderr_tail.append(line.rstrip())
                    out.append(_client_event("log", level="stderr", message=line.rstrip()))
                continue
            event = parse_event_line(line, text_is_log=True)
            if event is not None:
                out.append(event)

    def _track(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            kind = ev.get("kind")
            if kind == "status" and ev.get("status") in ("queued", "running"):
                self.status = ev["status"]
                self.pid = ev.get("pid") or self.pid
            elif kind == "error" and ev.get("source") != "client":
                self.error = str(ev.get("message") or "")
            elif kind == "done":
                self._saw_done = True
                self.status = str(ev.get("status") or self.status)
                if ev.get("exit_code") is not None and self.returncode is None:
                    self.returncode = int(ev["exit_code"])

    def poll(self) -> list[dict[str, Any]]:
        """New events since the last call; also advances the state (status, returncode, cancel escalation).

        Never raises: an unexpected problem (run folder deleted, disk error) comes back as a ``warning`` event.
        """
        try:
            return self._poll()
        except Exception as exc:  # noqa: BLE001 - called from the GUI's timer: report, never raise
            return [_client_event("warning", message=f"job client: {type(exc).__name__}: {exc}")]

    def _poll(self) -> list[dict[str, Any]]:
        if self._finished:
            return []
        alive = self._alive()
        events = self._read_file_events(final=False) if self.run_dir is not None else self._read_queue_events()
        if self._kill_at is not None and alive and time.monotonic() >= self._kill_at:
            self._kill_tree(signal.SIGKILL if not IS_WINDOWS else None)
            self._kill_at = None
        self._track(events)  # first: the final events may already say "done" before _finish looks
        if not alive:
            events += self._finish()  # tracks the events it reads itself
        if not alive and self.status in ("starting", "queued", "running"):
            self.status = "dead"
        return events

    def _finish(self) -> list[dict[str, Any]]:
        # the process is gone: read what is left, sweep the process group, fill in what the child could not say
        if self._proc is not None:
            deadline = time.monotonic() + 2.0
            while self._open_streams > 0 and time.monotonic() < deadline:  # reader threads drain the pipes
                time.sleep(0.01)
        events = self._read_file_events(final=True) if self.run_dir is not None else self._read_queue_events()
        self._kill_tree(signal.SIGKILL if not IS_WINDOWS else None, group_only=True)
        self._track(events)
        self._finished = True
        if self._console is not None:
            self._console.close()
        run = read_run(self.run_dir) if self.run_dir is not None else {}
        if self._proc is not None:
            self.returncode = self._proc.returncode
        elif run.get("exit_code") is not None:
            self.returncode = int(run["exit_code"])
        if run.get("status") in FINAL:
            self.status = run["status"]
            self.error = run.get("error") or self.error
        if self._saw_done:
            return events
        # no ``done`` from the child: killed, crashed natively, or never got the engine going
        if self.cancel_requested:
            status, message = "cancelled", "cancelled (the job was stopped by force)"
        else:
            status = "dead" if run.get("status") == "dead" or (self.returncode or 0) < 0 else "failed"
            detail = self._last_output_line()
            if self.returncode is not None and self.returncode < 0:
                message = f"the job was killed by signal {signal.Signals(-self.returncode).name}"
            else:
                message = f"the job ended without reporting (exit code {self.returncode})"
            if detail:
                message += f": {detail}"
        extra = [_client_event("error", message=message, code=self.returncode),
                 _client_event("done", status=status, exit_code=self.returncode)]
        self.status, self.error = status, message
        if self.run_dir is not None and self._proc is not None and (status == "cancelled" or not run):
            append_events(self.run_dir, extra)  # a later reattach sees the same ending
            finalize_run_json(self.run_dir, status, self.returncode, message, self.argv, self.pid)
        return events + extra

    def _last_output_line(self) -> str:
        lines = list(self._stderr_tail)
        if not lines and self.run_dir is not None:
            from VoCoSlicerLib.job_runs import tail_lines

            lines = tail_lines(self.run_dir / "console.txt", 20)
        lines = [ln.strip() for ln in lines if ln.strip()]
        return lines[-1][:300] if lines else ""

    # ---------------------------------------------------------------- stopping
    def _kill_tree(self, sig: int | None, group_only: bool = False) -> None:
        # group_only: the sweep after the job's own process is gone (leftover grandchildren of its group)
        pid = self.pid
        if not pid:
            return
        if IS_WINDOWS:  # pragma: no cover - taskkill /T ends the tree
            if not group_only:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False)
            return
        if self._leads_group:
            try:
                os.killpg(pid, sig)
                return
            except (ProcessLookupError, PermissionError):
                pass
        if not group_only and self._alive():
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def cancel(self, grace_s: float = 10.0, wait: bool = False) -> None:
        """Ask the job to stop (SIGTERM: it checkpoints and exits with code 3); after ``grace_s`` seconds the
        next :meth:`poll` kills its whole process group. ``wait=True`` blocks until it has ended (tests, CLI)."""
        if self._finished:
            return
        self.cancel_requested = True
        if self._alive() and self.pid:
            try:
                if IS_WINDOWS:  # pragma: no cover
                    os.kill(self.pid, signal.CTRL_BREAK_EVENT)
                elif grace_s <= 0:
                    self._kill_tree(signal.SIGKILL)
                else:
                    os.kill(self.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError, OSError):
                pass
        self._kill_at = time.monotonic() + max(0.0, grace_s)
        if wait:
            self.wait(timeout=grace_s + 10.0)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[dict[str, Any]]:
        """Poll until the job ends (or ``timeout``); returns every event seen meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while not self._finished:
            seen += self.poll()
            if self._finished or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(interval)
        return seen

    def close(self) -> None:
        """Stop following: an attached job is cancelled (killed after 3 s), a detached one keeps running."""
        if not self._finished and not self.detached and self._proc is not None:
            self.cancel(grace_s=3.0, wait=True)
        if self._console is not None and not self._console.closed:
            self._console.close()
