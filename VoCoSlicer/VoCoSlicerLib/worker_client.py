"""Warm worker client: keep one ``python -m vocoslicer serve --stdio`` process and send it requests.

Loading a model and warming CUDA take seconds; an interactive "segment this volume again" should not pay them
every time. The worker speaks JSON lines: we write one request per line,
``{"id": "3", "op": "segment"|"classify"|"ping"|"shutdown", ...}``, it answers with event lines (the engine's
event schema) and then exactly one ``{"id": "3", "kind": "result"|"error", ...}``. Requests are handled in order.

Stdlib only (it runs in Slicer's GUI process). Two ways to use it:

- non-blocking, from a ``QTimer``: ``rid = client.submit("segment", input=..., output=...)``, then
  ``client.poll()`` returns new events and final responses (each tagged with ``request_id``);
- blocking, for quick calls and scripts: ``client.request("ping", timeout=30)`` returns the result dict or raises
  :class:`WorkerError`.

A worker that died (crash, CUDA out of memory killing the process) is restarted by the next request; requests
that were in flight get an ``error`` response saying so. :meth:`WorkerClient.close` asks the worker to shut
down and returns at once; a reaper thread then ends its whole tree (SIGTERM, then SIGKILL), so a worker busy
with a long request, or one that ignores SIGTERM, never blocks the GUI thread. On interpreter exit and at the
end of a ``with`` block the close waits for the end.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from VoCoSlicerLib import proctree
from VoCoSlicerLib.engine import StartupEnv
from VoCoSlicerLib.jobs import IS_WINDOWS, _read_lines, child_env, parse_event_line, resolve_python

DEFAULT_ARGS = ("-m", "vocoslicer", "serve", "--stdio")


class WorkerError(RuntimeError):
    """The worker answered with an error, died during the request, or did not answer in time."""


class WorkerClient:
    """One warm worker process; see the module docstring."""

    def __init__(
        self,
        python: str | os.PathLike[str] | None = None,
        args: Sequence[str] = DEFAULT_ARGS,
        env: Mapping[str, str] | None = None,
        startup_env: StartupEnv | None = None,
    ) -> None:
        self.python = resolve_python(python)
        self.args = [str(a) for a in args]
        self.env = dict(env or {})
        self.startup_env = startup_env
        self.restarts = -1  # becomes 0 on the first start
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._pending: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._results: dict[str, dict[str, Any]] = {}
        self._stderr: collections.deque[str] = collections.deque(maxlen=50)
        self._next_id = 0
        self._lock = threading.Lock()
        self._stdout_open = False
        self._dying: list[subprocess.Popen] = []

    # ---------------------------------------------------------------- process
    @property
    def alive(self) -> bool:
        """True while the worker process runs."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Pid of the current worker process (changes on restart)."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the worker if it is not running (a restart if it ran before)."""
        if self.alive:
            return
        self._reap()
        popen: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
                                 "env": child_env(self.env, self.python, self.startup_env)}
        if IS_WINDOWS:  # pragma: no cover - not testable on the Linux CI
            popen["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            popen["start_new_session"] = True  # its own group: close() ends the worker's children too
        try:
            self._proc = subprocess.Popen([self.python, *self.args], **popen)
        except OSError as exc:
            raise WorkerError(f"could not start the worker with {self.python}: {exc.strerror or exc}") from exc
        self._queue = queue.Queue()  # lines of a dead worker must not leak into the new one's
        self._stdout_open = True
        threading.Thread(target=_read_lines, args=(self._proc.stdout, "stdout", self._queue), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(self._proc.stderr,), daemon=True).start()
        self.restarts += 1
        atexit.register(self._at_exit)

    def _read_stderr(self, stream: Any) -> None:
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip()
                if line:
                    self._stderr.append(line)
        except (OSError, ValueError):
            pass

    def _reap(self) -> list[dict[str, Any]]:
        # the worker is gone: every request still waiting gets an error response
        if self._proc is None:
            return []
        code = self._proc.poll()
        detail = self._stderr[-1] if self._stderr else ""
        out = []
        for rid in list(self._pending):
            message = f"the worker process ended unexpectedly (exit code {code})" + (f": {detail}" if detail else "")
            response = {"t": round(time.time(), 3), "id": rid, "kind": "error", "message": message,
                        "source": "client", "request_id": rid}
            self._results[rid] = response
            out.append(response)
        self._pending.clear()
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._proc = None
        return out

    # ---------------------------------------------------------------- requests
    def submit(self, op: str, **params: Any) -> str:
        """Send one request (starting or restarting the worker if needed); returns its id."""
        with self._lock:
            self.start()
            self._next_id += 1
            rid = f"{os.getpid()}-{self._next_id}"
            line = json.dumps({"id": rid, "op": op, **params}, default=str) + "\n"
            self._pending[rid] = time.monotonic()
            try:
                self._proc.stdin.write(line.encode("utf-8"))  # type: ignore[union-attr]
                self._proc.stdin.flush()  # type: ignore[union-attr]
            except (OSError, ValueError):  # died between start and write: reported by the next poll()
                pass
            return rid

    def poll(self) -> list[dict[str, Any]]:
        """New events and responses; each dict carries ``request_id`` (the request it belongs to)."""
        out: list[dict[str, Any]] = []
        while True:
            try:
                _tag, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._stdout_open = False  # end of the worker's output: it has exited or is exiting
                continue
            msg = parse_event_line(line, text_is_log=True)
            if msg is None:
                continue
            rid = msg.get("id") if msg.get("id") is not None else next(iter(self._pending), None)
            msg["request_id"] = rid
            if msg.get("kind") in ("result", "error") and rid in self._pending:
                self._pending.pop(rid)
                self._results[rid] = msg
            out.append(msg)
        if self._proc is not None and not self._stdout_open and self._proc.poll() is not None:
            out += self._reap()
        return out

    def request(self, op: str, timeout: float | None = 60.0,
                on_event: Callable[[dict[str, Any]], None] | None = None, **params: Any) -> dict[str, Any]:
        """Send a request and wait for its response; returns the ``result`` dict, raises ``WorkerError``."""
        rid = self.submit(op, **params)
        deadline = None if timeout is None else time.monotonic() + timeout
        while rid not in self._results:
            for msg in self.poll():
                if on_event is not None and msg.get("request_id") == rid and msg.get("kind") not in ("result",):
                    on_event(msg)
            if rid in self._results:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerError(f"the worker did not answer {op!r} within {timeout:g} s")
            time.sleep(0.01)
        response = self._results.pop(rid)
        if response.get("kind") == "error":
            raise WorkerError(str(response.get("message") or f"{op} failed"))
        return response

    def ping(self, timeout: float = 60.0) -> dict[str, Any]:
        """Round trip to check that the worker is up (starting it if needed)."""
        return self.request("ping", timeout=timeout)

    # ---------------------------------------------------------------- shutdown
    @property
    def stopping(self) -> bool:
        """True while a closed worker (or anything it started) is still being shut down."""
        self._dying = [p for p in self._dying if p.poll() is None]
        return bool(self._dying)

    def close(self, timeout: float = 5.0, wait: bool = False, force: bool = False, kill_after: float = 2.0) -> None:
        """Shut the worker down; returns at once unless ``wait`` (the GUI thread must never wait on it).

        The worker is asked to shut down (a ``shutdown`` request, then end of input); a thread gives it ``timeout``
        seconds, then sends SIGTERM to its whole tree and SIGKILL ``kill_after`` seconds later. ``force``: SIGTERM
        at once (cancel of a request that cannot be interrupted). Requests still waiting get an ``error``
        response; the next request starts a fresh worker. :attr:`stopping` tells when the old one is gone.
        """
        atexit.unregister(self._at_exit)
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.stdin.write(b'{"id": "shutdown", "op": "shutdown"}\n')  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
            except (OSError, ValueError):
                pass
        start = None if IS_WINDOWS else proctree.start_time(proc.pid)  # not reaped yet: the pid is still ours
        snapshot = {} if IS_WINDOWS else proctree.collect({proc.pid: start}, proc.pid, start)
        if force and not IS_WINDOWS:
            proctree.signal_snapshot(snapshot, signal.SIGTERM) or proctree.signal_group(proc.pid, signal.SIGTERM, start)
        self._pending_close_errors()
        self._proc = None
        self._dying.append(proc)
        reaper = threading.Thread(target=_stop_worker, daemon=True,
                                  args=(proc, start, snapshot, 0.0 if force else timeout, kill_after))
        reaper.start()
        if wait:
            reaper.join()

    def _pending_close_errors(self) -> None:
        for rid in list(self._pending):
            self._results[rid] = {"t": round(time.time(), 3), "id": rid, "kind": "error", "request_id": rid,
                                  "message": "the worker was shut down before it answered", "source": "client"}
        self._pending.clear()

    def _at_exit(self) -> None:
        self.close(timeout=0.5, wait=True, force=True, kill_after=0.5)

    def __enter__(self) -> WorkerClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(wait=True)


def _stop_worker(proc: subprocess.Popen, start: int | None, snapshot: dict[int, int], grace: float,
                 kill_after: float) -> None:
    # reaper thread of close(): graceful end, else SIGTERM to the tree, else SIGKILL; always sweep the group
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        if IS_WINDOWS:  # pragma: no cover - not testable on the Linux CI
            subprocess.run(["taskkill", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
        else:
            proctree.signal_snapshot(snapshot, signal.SIGTERM)
            proctree.signal_group(proc.pid, signal.SIGTERM, start)
    try:
        proc.wait(kill_after)
    except subprocess.TimeoutExpired:
        pass
    if IS_WINDOWS:  # pragma: no cover
        if proc.poll() is None:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
    else:  # the worker and anything it started (the group outlives a leader that exited)
        proctree.kill_tree({proc.pid: start}, proc.pid, snapshot, signal.SIGKILL, start)
    if proc.poll() is None:
        proc.kill()
    proc.wait()

