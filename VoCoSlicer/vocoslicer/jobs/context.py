"""The job context a command runs in: events, run directory, checkpoints, cancellation and the GPU lock.

A command gets it with :func:`current_job` (the CLI activates one for every command, with or without
``--run-dir``; library callers get a silent one). Cancellation is cooperative for commands that ask for it:

- the first SIGTERM/SIGINT sets a stop flag. A command that has called :meth:`JobContext.should_stop` at least
  once is trusted to check it, save a checkpoint and raise :class:`~vocoslicer.errors.Cancelled`; any other
  command is interrupted at once with ``Cancelled`` (it has nothing to save);
- a second signal records ``cancelled`` in ``run.json`` and exits immediately (exit code 3); the last checkpoint
  written before it is what ``--resume`` continues from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vocoslicer.errors import EXIT_CANCELLED, Cancelled
from vocoslicer.io.atomic import atomic_write_json
from vocoslicer.jobs.events import EventSink
from vocoslicer.jobs.gpulock import gpu_lock
from vocoslicer.jobs.rundir import CHECKPOINTS, RunRecord, now_iso

log = logging.getLogger("vocoslicer.jobs")

# SIGBREAK: what a Windows client's CTRL_BREAK_EVENT arrives as
_STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), signal.SIGINT, getattr(signal, "SIGBREAK", None))
                      if s is not None)


def _is_cpu(device: Any) -> bool:
    text = str(device).strip().lower() if device is not None else "cpu"
    return text in ("", "cpu", "mps", "none", "-1") or text.startswith(("cpu", "mps"))


class JobContext:
    """Everything a long command needs to behave as a well-mannered background job."""

    def __init__(
        self,
        run_dir: Path | None = None,
        events: EventSink | None = None,
        resume: bool = False,
        rank: int = 0,
        record: RunRecord | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.events = events if events is not None else EventSink()
        self.resume = resume
        self.rank = rank
        self.record = record
        self._stop = threading.Event()
        self._stop_aware = False
        self._stop_reported = False
        self._signals = 0
        self._previous_handlers: dict[int, Any] = {}

    # ---------------------------------------------------------------- cancellation
    def should_stop(self) -> bool:
        """True once a stop was requested; calling it marks the command as checking it (see module doc)."""
        self._stop_aware = True
        if self._stop.is_set() and not self._stop_reported:
            self._stop_reported = True
            self.events.log("stop requested: saving and stopping", level="warning")
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Ask the command to stop at its next check (what the first SIGTERM does)."""
        self._stop.set()

    def check_stop(self, save: Callable[[], Any] | None = None) -> None:
        """If a stop was requested: call ``save()`` (write a checkpoint) and raise ``Cancelled``."""
        if self.should_stop():
            if save is not None:
                save()
            raise Cancelled("stopped on request" + ("; checkpoint saved" if save is not None else ""))

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        if self._signals >= 2:
            self._hard_exit(signum)
        self._stop.set()
        if not self._stop_aware:
            raise Cancelled(f"interrupted by {signal.Signals(signum).name}")

    def _hard_exit(self, signum: int) -> None:
        message = f"cancelled immediately ({signal.Signals(signum).name} received twice)"
        with contextlib.suppress(Exception):
            self.events.emit("error", message=message, code=EXIT_CANCELLED)
            self.events.emit("done", status="cancelled", exit_code=EXIT_CANCELLED)
            if self.record is not None:
                self.record.update(status="cancelled", exit_code=EXIT_CANCELLED, error=message,
                                   error_kind="cancelled", ended=now_iso(), waiting_for=None)
            log.warning(message)
            logging.shutdown()
        os._exit(EXIT_CANCELLED)

    def install_signal_handlers(self) -> None:
        """Route SIGTERM/SIGINT to the stop flag (main thread only; elsewhere signals keep their handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _STOP_SIGNALS:
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        """Put back the handlers that were there before :meth:`install_signal_handlers`."""
        for sig, handler in self._previous_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        self._previous_handlers.clear()

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path | None:
        """``<run_dir>/checkpoints`` (created), or ``None`` without a run directory: nothing to resume from."""
        if self.run_dir is None:
            return None
        path = self.run_dir / CHECKPOINTS
        path.mkdir(parents=True, exist_ok=True)
        return path

    def checkpoint_path(self, name: str = "last.pt") -> Path | None:
        """Where a checkpoint called ``name`` lives (write it with ``vocoslicer.io.atomic.atomic_path``)."""
        folder = self.checkpoint_dir
        return None if folder is None else folder / name

    def save_state(self, state: dict[str, Any], name: str = "state.json") -> Path | None:
        """Write a small JSON checkpoint atomically (no-op without a run directory or on rank > 0)."""
        path = self.checkpoint_path(name)
        if path is None or self.rank != 0:
            return None
        return atomic_write_json(path, state)

    def load_state(self, name: str = "state.json") -> dict[str, Any] | None:
        """The JSON checkpoint saved under ``name``, or ``None`` when there is none."""
        path = self.checkpoint_path(name)
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    # ---------------------------------------------------------------- status and GPU
    def set_status(self, status: str, message: str = "", **fields: Any) -> None:
        """Record a state change in ``run.json`` and tell the client with a ``status`` event."""
        if self.record is not None and self.rank == 0:
            self.record.update(status=status, **fields)
        self.events.status(status, message=message, pid=os.getpid(), **fields)

    @contextlib.contextmanager
    def gpu_lock(self, device: Any) -> Iterator[str | None]:
        """Hold the lock of ``device`` (``"cuda:0"``, ``0``, a ``torch.device``) for the ``with`` block.

        CPU-like devices yield ``None`` without locking. While another job holds the GPU this run is ``queued``
        (in ``run.json`` and as a ``status`` and a ``log`` event) and a stop request cancels the wait.
        """
        if _is_cpu(device):
            yield None
            return
        index = getattr(device, "index", None)
        if getattr(device, "type", None) == "cuda":
            device = 0 if index is None else index
        waited: list[bool] = []

        def on_wait(holder: dict[str, Any]) -> None:
            waited.append(True)
            message = (f"waiting for GPU {holder.get('gpu')} (held by pid {holder.get('pid', '?')}, "
                       f"run {holder.get('run_dir') or '-'})")
            log.info(message)
            self.events.log(message)
            self.set_status("queued", message=message, waiting_for=holder)

        with gpu_lock(device, self.run_dir, on_wait=on_wait, should_stop=self.should_stop) as key:
            if waited:
                self.set_status("running", message=f"GPU {key} acquired", waiting_for=None)
            log.info("holding the lock of GPU %s", key)
            yield key


_CURRENT: JobContext | None = None


def current_job() -> JobContext:
    """The active job context; outside a CLI job a silent one (no files, no stdout events, no signal handling)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = JobContext()
    return _CURRENT


def set_current_job(ctx: JobContext | None) -> None:
    """Make ``ctx`` the context :func:`current_job` returns (``None`` resets to the silent default)."""
    global _CURRENT
    _CURRENT = ctx
