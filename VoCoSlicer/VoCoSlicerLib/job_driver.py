"""One background job as a panel drives it: job client + state machine + curves + log, advanced by ``tick()``.

The widget owns only a ``qt.QTimer`` that calls :meth:`JobDriver.tick` and redraws from :attr:`JobDriver.state`;
everything else (starting, chaining commands, cancel, reattach, resume, folding events into progress, metrics
and the log) is here, Qt-free, and tested with real child processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from VoCoSlicerLib.engine import python_executable, shell_command
from VoCoSlicerLib.job_runs import FINAL, read_run
from VoCoSlicerLib.jobs import Job
from VoCoSlicerLib.module_support import LogLines
from VoCoSlicerLib.plots import MetricHistory, Throughput
from VoCoSlicerLib.state import JobState, JobStateMachine


class JobDriver:
    """Runs one command, or a chain of commands (each must succeed), and follows it.

    >>> d = JobDriver("Segment")
    >>> d.start([["selftest", "job", "--steps", "3"]])   # doctest: +SKIP
    >>> while d.busy: d.tick()                            # the widget's QTimer does this  # doctest: +SKIP
    """

    def __init__(self, action: str, on_finished: Callable[[JobDriver], None] | None = None,
                 on_change: Callable[[JobState, JobState], None] | None = None, log_lines: int = 2000) -> None:
        self.state = JobStateMachine(action=action, on_change=on_change)
        self.on_finished = on_finished
        self.job: Job | None = None
        self.metrics = MetricHistory()
        self.throughput = Throughput()
        self.log = LogLines(maxlen=log_lines)  # counts appended lines: views append only new ones
        self.artifacts: list[dict[str, Any]] = []
        self.python: str | None = None
        self._pending: list[list[str]] = []
        self._launch: dict[str, Any] = {}
        self.run_dir: Path | None = None
        self.worker: Any = None  # a WorkerClient while a warm-worker request runs
        self.result: dict[str, Any] | None = None  # the worker's result of the last request
        self._request: tuple[str, list[str] | None, bool] | None = None  # (request id, fallback args, any event)
        self._run_root: Path | None = None
        self._step = 0

    @property
    def busy(self) -> bool:
        """True while a job runs or is being cancelled."""
        return self.state.busy

    def _reset_outputs(self) -> None:
        self.metrics, self.throughput, self.artifacts, self.result = MetricHistory(), Throughput(), [], None
        self.job, self._request, self._run_root, self._step = None, None, None, 0

    def start(self, commands: Sequence[Sequence[str]], run_dir: str | os.PathLike[str] | None = None,
              env: Mapping[str, str] | None = None, detached: bool = False, python: str | None = None) -> None:
        """Launch ``commands[0]`` now and the others one after the other, each only if the previous succeeded.

        ``run_dir`` keeps events, log, console output and checkpoints there (``run_dir/step-N`` per command of
        a chain), so the run can be reattached or resumed after a Slicer restart and a command's printed JSON can
        be read with :meth:`json_output`. Raises the job client's error if the first one cannot start.
        """
        if self.busy:
            raise RuntimeError("a job is already running; cancel it first")
        if not commands:
            raise ValueError("nothing to run")
        self._reset_outputs()
        self.python = python or self.python or python_executable()
        self._pending = [list(map(str, c)) for c in commands]
        self._run_root = Path(run_dir) if run_dir is not None and len(commands) > 1 else None
        self._launch = {"run_dir": None if self._run_root else run_dir, "env": dict(env or {}), "detached": detached}
        self.state.start()
        try:
            self._start_next()
        except Exception as exc:
            self.state.finish("failed", str(exc))
            raise

    def _start_next(self) -> None:
        args = self._pending.pop(0)
        if self._run_root is not None:
            self._launch["run_dir"] = self._run_root / f"step-{self._step}"
        self._step += 1
        self.log.append(f"$ {shell_command(args, self.python)}")
        self.job = Job.start(args, python=self.python, **self._launch)
        self.run_dir = self.job.run_dir

    def start_request(self, worker: Any, op: str, params: Mapping[str, Any],
                      fallback: Sequence[str] | None = None) -> None:
        """Send ``op`` to a warm worker (``VoCoSlicerLib.worker_client.WorkerClient``) and follow it.

        ``fallback``: command to run as a one-shot job if the worker dies before answering (e.g. an engine
        without ``serve``), so a broken worker costs time, never the result.
        """
        if self.busy:
            raise RuntimeError("a job is already running; cancel it first")
        self._reset_outputs()
        self._pending = []
        self.worker = worker
        self.state.start(stage="sending to the warm worker")
        try:
            rid = worker.submit(op, **params)
        except Exception as exc:
            self.state.finish("failed", str(exc))
            raise
        self._request = (rid, list(map(str, fallback)) if fallback else None, False)
        self.log.append(f"warm worker request {rid}: {op}")

    def _tick_worker(self) -> list[dict[str, Any]]:
        rid, fallback, seen = self._request  # type: ignore[misc]
        mine = [m for m in self.worker.poll() if m.get("request_id") == rid]
        for msg in mine:
            kind = msg.get("kind")
            if kind == "result":
                self.result, self._request = msg, None
                self.state.finish("ok")
                if self.on_finished is not None:
                    self.on_finished(self)
                return mine
            if kind == "error":
                if msg.get("source") == "client" and not seen and fallback and self.state.state is JobState.RUNNING:
                    self.log.append(f"warm worker unavailable ({msg.get('message')}); running a one-shot job")
                    self._request = None
                    self._pending = [fallback]
                    self._launch = {"run_dir": None, "env": {}, "detached": False}
                    self._start_next()
                    return mine
                self._request = None
                self.state.finish("cancelled" if self.state.state is JobState.CANCELLING else "failed",
                                  str(msg.get("message") or "the worker request failed"))
                if self.on_finished is not None:
                    self.on_finished(self)
                return mine
            self._request = (rid, fallback, True)
            self._fold(msg)
        return mine

    def attach(self, run_dir: str | os.PathLike[str]) -> None:
        """Follow a run started earlier (e.g. before Slicer was restarted), replaying its events from the start."""
        if self.busy:
            raise RuntimeError("a job is already running; cancel it first")
        self._reset_outputs()
        self._pending = []
        self.job = Job.attach(run_dir, offset=0)
        self.run_dir = self.job.run_dir
        self.log.append(f"attached to {self.run_dir}")
        self.state.start(stage="attached")

    def resume(self, run_dir: str | os.PathLike[str], detached: bool = False) -> None:
        """Relaunch a stopped/failed run's command with ``--resume`` (continues from its last checkpoint)."""
        if self.busy:
            raise RuntimeError("a job is already running; cancel it first")
        self._reset_outputs()
        self._pending = []
        self.state.start(stage="resuming")
        try:
            self.job = Job.resume(run_dir, python=self.python, detached=detached)
        except Exception as exc:
            self.state.finish("failed", str(exc))
            raise
        self.run_dir = self.job.run_dir
        self.log.append(f"$ {' '.join(self.job.argv)}")

    def cancel(self) -> None:
        """Ask the running job to stop (it checkpoints first); queued commands are dropped.

        A warm-worker request cannot be interrupted half-way, so the worker is shut down (the next request
        starts a fresh one).
        """
        if not self.state.busy or self.state.state is JobState.CANCELLING:
            return
        self._pending = []
        self.state.request_cancel()
        if self._request is not None:
            self._request = None
            self.worker.close(timeout=2.0)
            self.state.finish("cancelled")
            if self.on_finished is not None:
                self.on_finished(self)
        elif self.job is not None:
            self.job.cancel()

    def tick(self) -> list[dict[str, Any]]:
        """Poll the job once: fold its new events in; start the next command or finish when it has ended."""
        if not self.busy:
            return []
        if self._request is not None:
            return self._tick_worker()
        if self.job is None:
            return []
        events = self.job.poll()
        for ev in events:
            self._fold(ev)
        if not self.job.running:
            status, message = self._outcome()
            if status == "ok" and self._pending and self.state.state is JobState.RUNNING:
                self._start_next()
                return events
            if self.state.busy:
                self.state.finish(status, message)
            if self.on_finished is not None:
                self.on_finished(self)
        return events

    def _outcome(self) -> tuple[str, str]:
        # run.json is the engine's own record (the client completes it when the engine could not); it wins over
        # what the client inferred from the event stream, e.g. when a replayed run holds several attempts
        status, message = self.job.status, self.job.error or ""
        if self.job.run_dir is not None:
            run = read_run(self.job.run_dir)
            if run.get("status") in FINAL:
                status, message = run["status"], run.get("error") or ""
        status = status if status in ("ok", "cancelled") else "failed"
        return status, "" if status == "ok" else message

    def _fold(self, ev: dict[str, Any]) -> None:
        kind = ev.get("kind")
        if kind == "done":  # the driver decides when the chain is finished
            return
        self.state.apply_event(ev)
        self.metrics.add(ev)
        self.throughput.add(ev)
        if kind == "artifact":
            self.artifacts.append(ev)
        elif kind in ("log", "warning", "error"):
            prefix = "" if kind == "log" else f"{kind}: "
            self.log.append(prefix + str(ev.get("message", "")))

    def artifact(self, type_: str) -> dict[str, Any] | None:
        """The latest artifact event of a type (``segmentation``, ``model``, ...), or None."""
        for ev in reversed(self.artifacts):
            if ev.get("type") == type_:
                return ev
        return None

    def console_text(self) -> str:
        """What the last command printed (stdout and stderr; needs a run directory), "" when unknown."""
        if self.job is None or self.job.run_dir is None:
            return ""
        try:
            return (self.job.run_dir / "console.txt").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def json_output(self) -> Any:
        """The first JSON object or list the last command printed (``... --json`` commands)."""
        text = self.console_text()
        decoder = json.JSONDecoder()
        pos = 0
        for line in text.splitlines(keepends=True):
            if line.lstrip().startswith(("{", "[")):
                try:
                    return decoder.raw_decode(text, pos + len(line) - len(line.lstrip()))[0]
                except ValueError:
                    pass
            pos += len(line)
        raise ValueError(f"the command printed no JSON: {text.strip()[-300:] or '(nothing)'}")

    def log_text(self) -> str:
        """The log as one string for a text view."""
        return "\n".join(self.log)
