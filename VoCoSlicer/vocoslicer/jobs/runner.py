"""Turn any CLI command into a job: the global ``--run-dir`` / ``--events`` options and the start/finish of a run.

``vocoslicer [--run-dir DIR] [--events stdout] <command> ...`` (or with the job options after the command):

- without ``--run-dir`` the command still runs in a :class:`JobContext` (signals, ``should_stop``), writing no
  files; ``--events stdout`` prints its events as JSON lines on stdout for a parent process;
- without ``--events stdout`` every ``warning`` event is also one line on stderr (``vocoslicer: warning: ...``):
  a user at a terminal sees "does not look like CT" instead of a silent event;
- with ``--run-dir`` it also writes ``run.json``, ``events.jsonl``, ``log.txt`` (Python logging plus the full
  traceback of a crash, while the user sees one line) and ``checkpoints/`` (see :mod:`vocoslicer.jobs.rundir`).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import IO, Any

from vocoslicer import __version__
from vocoslicer.contracts.torchrun import env_rank
from vocoslicer.errors import EXIT_CANCELLED, EXIT_OK, EXIT_USER, UserError
from vocoslicer.jobs.context import JobContext, set_current_job
from vocoslicer.jobs.events import EventSink
from vocoslicer.jobs.rundir import EVENTS_JSONL, LOG_TXT, RunRecord, now_iso

log = logging.getLogger("vocoslicer.jobs")
# the run's own bookkeeping (start/end lines, crash tracebacks) goes to log.txt only, never to the user's terminal
runlog = logging.getLogger("vocoslicer.run")
runlog.propagate = False
runlog.addHandler(logging.NullHandler())  # without --run-dir: no "last resort" echo of errors on stderr

_SUBCOMMAND_KEYS = ("command", "method", "action")
# Python warnings, captured native output (vocoslicer.io.native) and nibabel's header repairs: log.txt, not the terminal
LIBRARY_LOGGERS = ("py.warnings", "vocoslicer.lib", "nibabel")


class TerminalEventSink(EventSink):
    """An event sink that also prints each ``warning`` as one line on stderr, for a user at a terminal."""

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:  # noqa: D102 - see EventSink
        event = super().emit(kind, **fields)
        if kind == "warning" and self.rank == 0:
            text = (str(event.get("message") or "").strip().splitlines() or [""])[0]
            try:
                sys.stderr.write(f"vocoslicer: warning: {text}\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
        return event


def job_event_sink(path: str | Path | None, stdout: bool, rank: int = 0) -> EventSink:
    """The sink of a command's run: warnings on stderr unless a parent process reads the events on stdout."""
    return EventSink(path=path, stdout=True, rank=rank) if stdout else TerminalEventSink(path=path, rank=rank)


EVENTS_CHOICES = ("none", "stdout")


def add_events_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, dest: str = "events",
                        default: Any = "none",
                        help: str = "emit JSON-lines progress events on stdout (for the Slicer module / job clients)",
                        ) -> argparse.Action:
    """``--events none|stdout``, the one definition: the global job option (``dest="job_events"``), its copies
    after each command (``default=SUPPRESS``) and the commands that report through their own option (segment,
    classify, models download) all accept the same values, which :func:`start_job` reads from either dest."""
    return parser.add_argument("--events", dest=dest, choices=EVENTS_CHOICES, default=default, help=help)


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the job options to the top-level parser (they apply to every command)."""
    group = parser.add_argument_group("job options (before or after the command)")
    # dest names are prefixed so that a command's own ``run_dir``/``events`` arguments never collide with them
    group.add_argument("--run-dir", dest="job_run_dir", type=Path, metavar="DIR",
                       help="run as a job: write run.json, events.jsonl, log.txt and checkpoints/ into DIR")
    add_events_argument(group, dest="job_events",
                        help="also print job events as JSON lines on stdout (for a parent process)")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    # JSON-safe copy of the parsed options: callables dropped, paths and other objects as text
    plain = {k: v for k, v in vars(args).items() if not callable(v)}
    return json.loads(json.dumps(plain, default=str))


def _command_name(args: argparse.Namespace) -> str:
    return " ".join(str(getattr(args, k)) for k in _SUBCOMMAND_KEYS if getattr(args, k, None))


class JobRun:
    """One run of one command: created by :func:`start_job`, closed by :meth:`finish` with the exit code."""

    def __init__(self, ctx: JobContext, handler: logging.Handler | None, log_stream: IO[str] | None) -> None:
        self.ctx = ctx
        self._handler = handler
        self._log_stream = log_stream

    def finish(self, code: int, exc: BaseException | None = None) -> None:
        """Record the outcome: ``error`` + ``done`` events, final ``run.json``, traceback of a crash in log.txt."""
        ctx = self.ctx
        ctx._stop_aware = True  # a late SIGTERM must not interrupt the bookkeeping below (a second still exits)
        status = "ok" if code == EXIT_OK else "cancelled" if code == EXIT_CANCELLED else "failed"
        kind = {EXIT_OK: None, EXIT_USER: "user", EXIT_CANCELLED: "cancelled"}.get(code, "crash")
        message = None
        if exc is not None:
            first = (str(exc).strip().splitlines() or [""])[0][:500]
            if kind == "crash":
                message = f"internal error: {type(exc).__name__}: {first}"
                if ctx.run_dir is not None:
                    message += f" (traceback in {ctx.run_dir / LOG_TXT})"
                runlog.error("%s\n%s", message, "".join(traceback.format_exception(exc)).rstrip())
            else:
                message = first or type(exc).__name__
                (runlog.warning if kind == "cancelled" else runlog.error)("%s", message)
        elif code != EXIT_OK:
            message = f"ended with exit code {code}"
        if message is not None:
            ctx.events.emit("error", message=message, code=code)
        ctx.events.emit("done", status=status, exit_code=code)
        if ctx.record is not None:
            ctx.record.update(status=status, exit_code=code, error=message, error_kind=kind, ended=now_iso(),
                              waiting_for=None)
        runlog.info("run ended: %s (exit code %d)", status, code)
        self.close()

    def close(self) -> None:
        """Undo what :func:`start_job` changed in this process (handlers, logging, current context)."""
        self.ctx.restore_signal_handlers()
        set_current_job(None)
        self.ctx.events.close()
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            runlog.removeHandler(self._handler)
            for name in LIBRARY_LOGGERS:
                logging.getLogger(name).removeHandler(self._handler)
            self._handler.close()
        if self._log_stream is not None:
            if faulthandler.is_enabled():
                faulthandler.disable()
                faulthandler.enable()  # back to stderr
            self._log_stream.close()


def start_job(args: argparse.Namespace, argv: list[str]) -> JobRun:
    """Open the run directory (if any), install signal handlers and make the context current.

    Raises :class:`UserError` for a run directory that cannot be created or that a live process still uses.
    """
    rank = env_rank()
    resume = bool(getattr(args, "resume", False))
    # a command's own ``--events stdout`` (segment has one) counts too: one context, one event stream
    stdout = "stdout" in (getattr(args, "job_events", "none"), getattr(args, "events", None))
    run_dir = getattr(args, "job_run_dir", None)
    handler = None
    log_stream = None
    if run_dir is None:
        ctx = JobContext(events=job_event_sink(None, stdout, rank), resume=resume, rank=rank)
    else:
        run_dir = Path(run_dir).expanduser().resolve()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{run_dir}: cannot create the run directory ({exc.strerror or exc})") from exc
        record = None
        if rank == 0:
            try:
                record = RunRecord.open(run_dir, _command_name(args), list(argv), _config(args), __version__)
            except RuntimeError as exc:
                raise UserError(str(exc)) from exc
        log_name = LOG_TXT if rank == 0 else f"log.rank{rank}.txt"
        log_stream = open(run_dir / log_name, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()
        handler = logging.StreamHandler(log_stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.DEBUG)
        root = logging.getLogger()
        root.addHandler(handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        faulthandler.enable(file=log_stream)  # a segfault in native code still leaves a trace in log.txt
        for name in LIBRARY_LOGGERS:  # library warnings into log.txt, not onto the terminal (cli routes them)
            logging.getLogger(name).addHandler(handler)
        ctx = JobContext(run_dir, job_event_sink(run_dir / EVENTS_JSONL, stdout, rank), resume, rank, record)
        attempt = record.data["attempt"] if record is not None else 0
        runlog.addHandler(handler)
        runlog.setLevel(logging.INFO)
        runlog.info("run started: vocoslicer %s (pid %d, attempt %d%s)", " ".join(argv), os.getpid(), attempt,
                 ", resume" if resume else "")
    ctx.install_signal_handlers()
    set_current_job(ctx)
    ctx.events.status("running", message="started", pid=os.getpid())
    return JobRun(ctx, handler, log_stream)

