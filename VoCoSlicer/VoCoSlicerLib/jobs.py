"""Job client: run ``python -m vocoslicer <command>`` in a child process and follow it without blocking.

Runs inside Slicer's GUI process, so it is stdlib only (no Qt, no torch) and never raises from :meth:`Job.poll`:
the widget calls ``poll()`` from a ``QTimer`` and gets a list of event dicts (schema in
``vocoslicer.contracts.events``). Two ways to follow a child:

- with a run directory (the normal case): the child writes ``events.jsonl`` there and the client tails it from
  an offset; the child's stdout/stderr go to ``console.txt``. Such a run can be ``detached`` (own session,
  survives Slicer closing) and later reattached with :meth:`Job.attach` or continued with :meth:`Job.resume`;
- without one: the child prints its events on stdout (``--events stdout``), read by a thread.

Cancel sends one SIGTERM to the *engine* (it checkpoints and exits with code 3), which is not the process we
started when that is the ``PythonSlicer`` launcher: the engine's pid comes from its ``status`` event or its
``run.json``, checked to belong to our tree. Before the engine has said who it is it has no handler yet (nothing to
save), so the whole group gets the SIGTERM. After a grace period, and after any end, the whole tree gets SIGKILL
(:mod:`VoCoSlicerLib.proctree`), so no grandchild (DataLoader worker, torchrun worker) is left behind.
A poll reads a bounded amount of events (:attr:`Job.read_limit`), so replaying a long run never blocks a tick,
and nothing here waits on the caller's thread.
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from VoCoSlicerLib import proctree
from VoCoSlicerLib.engine import (
    ENGINE_DIR,
    JobError,
    StartupEnv,
    child_env,
    resolve_python,
    set_startup_environment,
)
from VoCoSlicerLib.job_runs import (
    FINAL,
    _client_event,
    _read_lines,
    append_events,
    finalize_run_json,
    last_error,
    list_runs,
    new_run_dir,
    parse_event_line,
    pid_alive,
    read_run,
    write_json_atomic,
)

IS_WINDOWS = os.name == "nt"

__all__ = ["ENGINE_DIR", "Job", "JobError", "child_env", "last_error", "list_runs", "new_run_dir",
           "parse_event_line", "read_run", "resolve_python", "set_startup_environment"]


class Job:
    """One job, started here or reattached; see the module docstring."""

    read_limit = 64 * 1024  # bytes of events.jsonl (or lines of stdout / 100) read by one poll
    drain_s = 2.0  # after the child's end: how long polls wait for its pipes to drain

    def __init__(self) -> None:
        self.run_dir: Path | None = None
        self.argv: list[str] = []
        self.pid: int | None = None  # the engine's pid once known, else the process we started
        self.detached = False
        self.status = "starting"  # starting|queued|running|ok|failed|cancelled|dead
        self.returncode: int | None = None
        self.error: str | None = None
        self.cancel_requested = False
        self._proc: subprocess.Popen | None = None
        self._pid_start: int | None = None
        self._pgid: int | None = None  # a process group of the job's own (never ours): SIGKILL reaches it whole
        self._leader_start: int | None = None  # start time of the group's leader (tells a reused pid apart)
        self._engine: tuple[int, int | None] | None = None  # (pid, start time) of the engine, checked to be ours
        self._snapshot: dict[int, int] = {}  # the tree as seen at cancel time (orphans lose their ancestry)
        self._prior: dict[str, Any] = {}  # run.json before we started: a stale record is not this attempt's
        self._offset = 0
        self._partial = b""
        self._queue: queue.Queue = queue.Queue()
        self._backlog: list[dict[str, Any]] = []  # events read early (cancel looks for the engine's pid)
        self._open_streams = 0
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._kill_at: float | None = None
        self._drain_until: float | None = None
        self._saw_done = False
        self._finished = False
        self._console: Any = None
        self._over = False  # attached to a run whose record says it has ended
        self.backlog = False  # the last poll stopped at read_limit: more events are already waiting

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
        startup_env: StartupEnv | None = None,
    ) -> Job:
        """Start ``python -m vocoslicer <args>`` without waiting; raises :class:`JobError` if it cannot start.

        ``env`` adds to the child's environment (e.g. ``{"CUDA_VISIBLE_DEVICES": "1"}``); its base is ours for
        Slicer's own Python, Slicer's startup environment for another one (``startup_env``, default the one
        registered with :func:`set_startup_environment`). ``detached`` needs a run directory: the child keeps
        running when this process exits. The child always gets a session of its own (the group cancel kills).
        """
        job = cls()
        exe = resolve_python(python)
        job.detached = detached
        job_opts: list[str] = []
        if run_dir is not None:
            job.run_dir = Path(run_dir).expanduser().resolve()
            job._prior = read_run(job.run_dir)
            if job._prior.get("status") in ("queued", "running"):
                raise JobError(f"{job.run_dir}: a job is still running there (pid {job._prior.get('pid')})")
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
        popen: dict[str, Any] = {"env": child_env(env, exe, startup_env), "cwd": str(cwd) if cwd else None,
                                 "stdin": subprocess.DEVNULL}
        if IS_WINDOWS:  # pragma: no cover - not testable on the Linux CI
            flags = subprocess.CREATE_NEW_PROCESS_GROUP
            popen["creationflags"] = flags | (subprocess.DETACHED_PROCESS if detached else 0)
        else:
            popen["start_new_session"] = True  # group id = session id = this pid, even after it has exited
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
        job._pgid = None if IS_WINDOWS else job._proc.pid
        job._leader_start = proctree.start_time(job._proc.pid)
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
        job._over = job.status in FINAL or job.status == "dead"  # a recorded end: its pid may be someone else's now
        if not IS_WINDOWS and not job._over and pid_alive(job.pid, job._pid_start):
            job._engine = (int(job.pid), job._pid_start)  # type: ignore[arg-type]
            info = proctree._stat(int(job.pid))  # type: ignore[arg-type]
            # its own group, or the group of the launcher the client started (launch.json: the engine's parent)
            leaders = (job.pid, info[0] if info is not None and info[0] == launch.get("pid") else None)
            if info is not None and info[1] in leaders and info[1] != os.getpgrp():
                job._pgid, job._leader_start = info[1], proctree.start_time(info[1])
        return job

    @classmethod
    def resume(
        cls,
        run_dir: str | os.PathLike[str],
        python: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        detached: bool = False,
        startup_env: StartupEnv | None = None,
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
            # starts, which would lack Slicer's environment), else the one the engine ran in
            launched = (read_run(run_dir, name="launch.json").get("argv") or [None])[0]
            for candidate in (launched, run.get("python")):
                if candidate and os.path.isfile(str(candidate)):
                    python = str(candidate)
                    break
        return cls.start(args, python=python, run_dir=run_dir, env=full_env, detached=detached,
                         startup_env=startup_env)

    # ---------------------------------------------------------------- following
    @property
    def running(self) -> bool:
        """True until the job has ended (and its last events were read)."""
        return not self._finished

    def _alive(self) -> bool:
        if self._proc is not None and self._proc.poll() is None:
            return True
        if self._engine is not None and self._engine[0] != (self._proc.pid if self._proc else None):
            return pid_alive(*self._engine)  # the launcher may be gone while the engine still saves
        if self._proc is not None or self._over:
            return False
        return pid_alive(self.pid, self._pid_start)

    def _ours(self, pid: int) -> bool:
        # a pid named by an event or run.json is signalled only if it is in the tree we started
        if self._proc is None:
            return False
        if proctree.has_proc():
            return pid in proctree.collect(self._roots(), session=self._pgid, session_start=self._leader_start)
        try:
            return os.getpgid(pid) == self._pgid
        except OSError:
            return False

    def _learn_engine(self, pid: Any) -> None:
        if isinstance(pid, int) and pid > 0 and self._engine is None and self._ours(pid):
            self._engine = (pid, proctree.start_time(pid))

    def _read_file_events(self, final: bool) -> tuple[list[dict[str, Any]], bool]:
        # at most ``read_limit`` bytes; returns (events, reached the end of the file)
        path = self.run_dir / "events.jsonl"  # type: ignore[operator]
        try:
            with open(path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read(self.read_limit)
                at_end = len(data) < self.read_limit or not fh.read(1)
        except OSError:
            return [], True
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = b"" if final and at_end else lines.pop()  # an unfinished last line waits for its newline
        out = []
        for raw in lines:
            event = parse_event_line(raw.decode("utf-8", errors="replace"))
            if event is not None:
                out.append(event)
        return out, at_end

    def _read_queue_events(self) -> tuple[list[dict[str, Any]], bool]:
        out, budget = self._backlog, max(1, self.read_limit // 100)
        self._backlog = []
        while len(out) < budget:
            try:
                tag, line = self._queue.get_nowait()
            except queue.Empty:
                return out, True
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
        return out, self._queue.empty()

    def _track(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            kind = ev.get("kind")
            if kind == "status" and ev.get("status") in ("queued", "running"):
                self.status = ev["status"]
                if self._proc is not None:  # a replayed (attached) log names the pids of earlier attempts
                    self.pid = ev.get("pid") or self.pid
                    self._learn_engine(ev.get("pid"))
            elif kind == "error" and ev.get("source") != "client":
                self.error = str(ev.get("message") or "")
            elif kind == "done":
                self._saw_done = True
                self.status = str(ev.get("status") or self.status)
                if ev.get("exit_code") is not None and self.returncode is None:
                    self.returncode = int(ev["exit_code"])

    def poll(self) -> list[dict[str, Any]]:
        """New events since the last call (a bounded batch); also advances the state (status, returncode,
        cancel escalation). Never raises: a problem (run folder deleted, disk error) becomes a ``warning`` event.
        """
        try:
            return self._poll()
        except Exception as exc:  # noqa: BLE001 - called from the GUI's timer: report, never raise
            return [_client_event("warning", message=f"job client: {type(exc).__name__}: {exc}")]

    def _poll(self) -> list[dict[str, Any]]:
        if self._finished:
            return []
        alive = self._alive()
        if self.run_dir is not None:
            events, at_end = self._read_file_events(final=False)
        else:
            events, at_end = self._read_queue_events()
            if not alive and at_end and self._open_streams > 0:  # pipes still draining: look again next poll
                if self._drain_until is None:  # a leftover grandchild may hold them open: sweep it now
                    self._kill_tree()
                    self._drain_until = time.monotonic() + self.drain_s
                at_end = time.monotonic() >= self._drain_until
        self.backlog = not at_end
        if self._kill_at is not None and alive and time.monotonic() >= self._kill_at:
            self._kill_tree()
            self._kill_at = None
        self._track(events)  # first: the final events may already say "done" before _finish looks
        if not alive and at_end:
            events += self._finish()  # tracks the events it reads itself
        return events

    def _mine(self, run: dict[str, Any]) -> dict[str, Any]:
        # run.json of this attempt: an attached run's, or one the engine we started (re)wrote
        if self._proc is None or not run:
            return run
        if run.get("pid") == self._proc.pid or (self._engine and run.get("pid") == self._engine[0]):
            return run
        same = self._prior and all(run.get(k) == self._prior.get(k) for k in ("pid", "attempt", "updated"))
        return {} if same or not run.get("pid") else run

    def _finish(self) -> list[dict[str, Any]]:
        # the process is gone: read what is left, sweep the tree, fill in what the child could not say
        events = self._read_file_events(final=True)[0] if self.run_dir is not None else self._read_queue_events()[0]
        self._kill_tree()  # leftovers: a grandchild that outlived the engine, a torchrun worker in its own session
        self._track(events)
        self._finished = True
        if self._console is not None:
            self._console.close()
        run = self._mine(read_run(self.run_dir)) if self.run_dir is not None else {}
        if self._proc is not None:
            self.returncode = self._proc.returncode
            if self._engine is not None and self._engine[0] != self._proc.pid and run.get("exit_code") is not None:
                self.returncode = int(run["exit_code"])  # the engine's own code, not its launcher's
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
    def _roots(self) -> dict[int, int | None]:
        roots: dict[int, int | None] = {}
        if self._proc is not None:
            roots[self._proc.pid] = self._leader_start
        if self._engine is not None:
            roots[self._engine[0]] = self._engine[1]
        return roots

    def _kill_tree(self) -> None:
        # SIGKILL to the group, the tree below our child and the engine, and what the cancel-time snapshot saw
        if IS_WINDOWS:  # pragma: no cover - taskkill /T ends the tree
            if self._alive() and self.pid:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.pid)], capture_output=True, check=False)
            return
        if self._proc is None and self._engine is None:
            return  # an attached run we cannot identify safely: leave it alone
        proctree.kill_tree(self._roots(), self._pgid, self._snapshot, signal.SIGKILL, self._leader_start)

    def _engine_target(self) -> int | None:
        # the engine's pid if it is known to be ours and alive: from its status event, its run.json, or events
        # not yet polled (stdout mode)
        if self._engine is None and self.run_dir is not None:
            run = self._mine(read_run(self.run_dir))
            if run.get("pid") and pid_alive(run.get("pid"), run.get("pid_start")):
                self._learn_engine(run["pid"])
        if self._engine is None and self.run_dir is None and self._proc is not None:
            early, _ = self._read_queue_events()
            self._track(early)
            self._backlog = early + self._backlog
        if self._engine is not None and pid_alive(*self._engine):
            return self._engine[0]
        return None

    def cancel(self, grace_s: float = 10.0, wait: bool = False) -> None:
        """Ask the job to stop (one SIGTERM to the engine: it checkpoints and exits with code 3); after
        ``grace_s`` seconds the next :meth:`poll` kills its whole tree. Returns at once unless ``wait=True``
        (tests, CLI), which polls until the job has ended."""
        if self._finished:
            return
        self.cancel_requested = True
        if self._alive():
            try:
                if IS_WINDOWS:  # pragma: no cover
                    os.kill(self.pid, signal.CTRL_BREAK_EVENT)  # type: ignore[arg-type]
                else:
                    self._snapshot = proctree.collect(self._roots(), self._pgid, self._leader_start)
                    engine = self._engine_target()
                    if grace_s <= 0:
                        self._kill_tree()
                    elif engine is not None:
                        os.kill(engine, signal.SIGTERM)
                    elif not proctree.signal_group(self._pgid, signal.SIGTERM, self._leader_start) and self.pid:
                        # engine not up yet (no handler, nothing to save): the group; attached: the pid we know
                        os.kill(self.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError, OSError):
                pass
        self._kill_at = time.monotonic() + max(0.0, grace_s)
        if wait:
            self.wait(timeout=grace_s + 10.0)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[dict[str, Any]]:
        """Poll until the job ends (or ``timeout``); returns every event seen meanwhile. Blocks: not for the GUI."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while not self._finished:
            seen += self.poll()
            if self._finished or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(interval)
        return seen

    def close(self, grace_s: float = 3.0) -> None:
        """Stop following without blocking: a job started here and not detached is cancelled (a daemon thread
        follows it to its end and kills its tree after ``grace_s``); a detached one keeps running."""
        if not self._finished and not self.detached and self._proc is not None:
            self.cancel(grace_s=grace_s)
            # nobody polls a closed job: a daemon thread escalates to SIGKILL and reaps, off the caller's thread
            threading.Thread(target=self.wait, kwargs={"timeout": grace_s + 10.0}, daemon=True).start()
        elif self._console is not None and not self._console.closed:
            self._console.close()
