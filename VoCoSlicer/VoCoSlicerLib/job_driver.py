"""One background job as a panel drives it: job client + state machine + curves + log, advanced by ``tick()``.

The widget owns only a ``qt.QTimer`` that calls :meth:`JobDriver.tick` and redraws from :attr:`JobDriver.state`;
everything else (starting, chaining commands, cancel, reattach, resume, folding events into progress, metrics
and the log, deleting the job's temporary files) is here, Qt-free, and tested with real child processes. Events
come from a :mod:`~VoCoSlicerLib.job_sources` source (a child process or a warm-worker request); every call
returns at once, so a tick never blocks the GUI.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from VoCoSlicerLib.engine import StartupEnv, python_executable, shell_command
from VoCoSlicerLib.job_sources import UNAVAILABLE, JobSource, ProcessSource, WorkerRequestSource
from VoCoSlicerLib.jobs import Job
from VoCoSlicerLib.module_support import LogLines
from VoCoSlicerLib.plots import MetricHistory, Throughput
from VoCoSlicerLib.state import JobState, JobStateMachine


class JobDriver:
    """Runs one command, or a chain of commands (each must succeed), or one warm-worker request, and follows it.

    >>> d = JobDriver("Segment")
    >>> d.start([["selftest", "job", "--steps", "3"]], temp_paths=[work_dir])   # doctest: +SKIP
    >>> while d.busy: d.tick()                            # the widget's QTimer does this  # doctest: +SKIP
    """

    tick_budget_s = 0.05  # a tick replaying a long log polls batch after batch for at most this long

    def __init__(self, action: str, on_finished: Callable[[JobDriver], None] | None = None,
                 on_change: Callable[[JobState, JobState], None] | None = None, log_lines: int = 2000,
                 startup_env: StartupEnv | None = None) -> None:
        self.state = JobStateMachine(action=action, on_change=on_change)
        self.on_finished = on_finished
        self.startup_env = startup_env  # for a Python that is not Slicer's (default: the registered one)
        self.source: JobSource | None = None
        self.job: Job | None = None  # the child process of the current command, if the source is one
        self.metrics = MetricHistory()
        self.throughput = Throughput()
        self.log = LogLines(maxlen=log_lines)  # counts appended lines: views append only new ones
        self.artifacts: list[dict[str, Any]] = []
        self.python: str | None = None
        self._pending: list[list[str]] = []
        self._launch: dict[str, Any] = {}
        self.run_dir: Path | None = None
        self.worker: Any = None  # the WorkerClient of the last warm-worker request
        self.result: dict[str, Any] | None = None  # the worker's result of the last request
        self._fallback: list[str] | None = None
        self._run_root: Path | None = None
        self._step = 0
        self.temp_paths: list[Path] = []  # owned by the current job: deleted once it is final

    @property
    def busy(self) -> bool:
        """True while a job runs or is being cancelled."""
        return self.state.busy

    def _reset_outputs(self, temp_paths: Iterable[str | os.PathLike[str]] | None = None) -> None:
        self.remove_temp_files()
        self.metrics, self.throughput, self.artifacts, self.result = MetricHistory(), Throughput(), [], None
        self.job, self.source, self._fallback, self._run_root, self._step = None, None, None, None, 0
        self._pending = []
        self.temp_paths = [Path(p) for p in temp_paths or ()]

    def start(self, commands: Sequence[Sequence[str]], run_dir: str | os.PathLike[str] | None = None,
              env: Mapping[str, str] | None = None, detached: bool = False, python: str | None = None,
              temp_paths: Iterable[str | os.PathLike[str]] | None = None) -> None:
        """Launch ``commands[0]`` now and the others one after the other, each only if the previous succeeded.

        ``run_dir`` keeps events, log, console output and checkpoints there (``run_dir/step-N`` per command of
        a chain), so the run can be reattached or resumed after a Slicer restart and a command's printed JSON can
        be read with :meth:`json_output`. ``temp_paths`` (files or folders, e.g. the volume copy a job reads) are
        the job's: deleted once it is final, after ``on_finished`` ran. Raises the job client's error if the first
        command cannot start (its temporary files are deleted then too).
        """
        if self.busy:
            raise RuntimeError("a job is already running; cancel it first")
        if not commands:
            raise ValueError("nothing to run")
        self._reset_outputs(temp_paths)
        self.python = python or self.python or python_executable()
        self._pending = [list(map(str, c)) for c in commands]
        self._run_root = Path(run_dir) if run_dir is not None and len(commands) > 1 else None
        self._launch = {"run_dir": None if self._run_root else run_dir, "env": dict(env or {}), "detached": detached}
        self.state.start()
        try:
            self._start_next()
        except Exception as exc:
            self.state.finish("failed", str(exc))
            self.remove_temp_files()
            raise

    def _start_next(self) -> None:
        args = self._pending.pop(0)
        if self._run_root is not None:
            self._launch["run_dir"] = self._run_root / f"step-{self._step}"
        self._step += 1
        self.log.append(f"$ {shell_command(args, self.python)}")
        self._follow(Job.start(args, python=self.python, startup_env=self.startup_env, **self._launch))

    def _follow(self, job: Job) -> None:
        self.job, self.source, self.run_dir = job, ProcessSource(job), job.run_dir

    def start_request(self, worker: Any, op: str, params: Mapping[str, Any],
                      fallback: Sequence[str] | None = None,
                      temp_paths: Iterable[str | os.PathLike[str]] | None = None) -> None:
        """Send ``op`` to a warm worker (``VoCoSlicerLib.worker_client.WorkerClient``) and follow it.

        ``fallback``: command to run as a one-shot job if the worker dies before answering (e.g. an engine
        without ``serve``), so a broken worker costs time, never the result. ``temp_paths`` as for :meth:`start`.
        """
        if self.busy:
            raise RuntimeError("a job is already running; cancel it first")
        self._reset_outputs(temp_paths)
        self.worker = worker
        self.state.start(stage="sending to the warm worker")
        try:
            self.source = WorkerRequestSource(worker, op, params)
        except Exception as exc:
            self.state.finish("failed", str(exc))
            self.remove_temp_files()
            raise
        self._fallback = list(map(str, fallback)) if fallback else None
        self.log.append(f"warm worker request {self.source.request_id}: {op}")

    def attach(self, run_dir: str | os.PathLike[str]) -> None:
        """Follow a run started earlier (e.g. before Slicer was restarted), replaying its events from the start
        (a bounded batch per tick, so a long run never freezes the panel)."""
        if self.busy:
            raise RuntimeError("a job is already running; cancel it first")
        self._reset_outputs()
        self._follow(Job.attach(run_dir, offset=0))
        self.log.append(f"attached to {self.run_dir}")
        self.state.start(stage="attached")

    def resume(self, run_dir: str | os.PathLike[str], detached: bool = False) -> None:
        """Relaunch a stopped/failed run's command with ``--resume`` (continues from its last checkpoint)."""
        if self.busy:
            raise RuntimeError("a job is already running; cancel it first")
        self._reset_outputs()
        self.state.start(stage="resuming")
        try:
            job = Job.resume(run_dir, python=self.python, detached=detached, startup_env=self.startup_env)
        except Exception as exc:
            self.state.finish("failed", str(exc))
            raise
        self._follow(job)
        self.log.append(f"$ {' '.join(job.argv)}")

    def cancel(self) -> None:
        """Ask the running job to stop (it checkpoints first); queued commands are dropped. Returns at once:
        later ticks see the end (a warm worker is shut down, and the request ends once its processes are gone)."""
        if not self.state.busy or self.state.state is JobState.CANCELLING:
            return
        self._pending, self._fallback = [], None
        self.state.request_cancel()
        if self.source is not None:
            self.source.cancel()

    def close(self) -> None:
        """The panel goes away: stop what must not outlive it (never waits) and delete the temporary files.

        A detached run keeps going (reattach it later); an attached job or a warm-worker request is cancelled.
        """
        self._pending, self._fallback = [], None
        if self.source is not None and not self.source.final:
            self.source.close()
        self.source = None  # a closed job is followed (and reaped) off the GUI thread, never by a late tick
        self.remove_temp_files()

    def remove_temp_files(self) -> None:
        """Delete the files and folders handed over with ``temp_paths`` (missing ones are fine)."""
        paths, self.temp_paths = self.temp_paths, []
        for path in paths:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            except OSError as exc:
                self.log.append(f"warning: could not delete the temporary {path}: {exc.strerror or exc}")

    def tick(self) -> list[dict[str, Any]]:
        """Poll the source once: fold its new events in; start the next command or finish when it has ended."""
        if not self.busy or self.source is None:
            return []
        source, t0 = self.source, time.monotonic()
        events: list[dict[str, Any]] = []
        while True:  # one batch, more while a replay has a backlog and the tick's time budget allows
            batch = source.poll()
            for ev in batch:
                if source.foldable(ev):
                    self._fold(ev)
            events += batch
            if not source.more or time.monotonic() - t0 >= self.tick_budget_s:
                break
        if not source.final:
            return events
        status, message = source.outcome()
        if isinstance(source, WorkerRequestSource):
            self.result = source.result
        if status == UNAVAILABLE:
            if self._fallback and self.state.state is JobState.RUNNING:
                self.log.append(f"warm worker unavailable ({message}); running a one-shot job")
                self._pending, self._fallback = [self._fallback], None
                self._launch = {"run_dir": None, "env": {}, "detached": False}
                self._start_next()
                return events
            status = "failed"
        if status == "ok" and self._pending and self.state.state is JobState.RUNNING:
            self._start_next()
            return events
        if self.state.busy:
            self.state.finish(status, message)
        try:
            if self.on_finished is not None:
                self.on_finished(self)
        finally:
            self.remove_temp_files()  # after on_finished: it may still read the job's output from them
        return events

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
