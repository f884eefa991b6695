"""The engine's writer of job events (the schema is :mod:`vocoslicer.contracts.events`).

An :class:`EventSink` writes each event as one JSON line to a child's stdout and/or ``events.jsonl`` of its run
directory; it never raises on a closed stream, because a vanished GUI must not kill a training run.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import IO, Any

from vocoslicer.contracts.events import EVENT_KINDS, event_line, make_event

__all__ = ["EVENT_KINDS", "NULL_SINK", "EventSink"]


class EventSink:
    """Writes events as JSON lines to any number of streams; thread-safe, flushes every line.

    ``stdout=True`` makes the events visible to a parent process reading our stdout; ``path`` appends to an
    ``events.jsonl`` file. A sink with neither is silent (library use).
    """

    def __init__(self, path: str | Path | None = None, stdout: bool = False, rank: int = 0) -> None:
        # re-entrant: a signal handler runs on the main thread and may emit while that thread is mid-emit
        self._lock = threading.RLock()
        self._streams: list[IO[str]] = []
        self._owned: list[IO[str]] = []
        self.rank = rank
        if rank != 0:  # only rank 0 of a distributed run reports
            return
        if path is not None:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            fh = open(p, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._streams.append(fh)
            self._owned.append(fh)
        if stdout:
            self._streams.append(sys.stdout)

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Write one event and return it."""
        event = make_event(kind, **fields)
        line = event_line(event)
        with self._lock:
            for s in self._streams:
                try:
                    s.write(line + "\n")
                    s.flush()
                except (OSError, ValueError):  # a closed pipe must not kill a training run
                    pass
        return event

    def progress(self, step: int, total: int, stage: str = "", eta_s: float | None = None, **extra: Any) -> None:
        """Report progress ``step`` of ``total``."""
        self.emit("progress", step=int(step), total=int(total), stage=stage, eta_s=eta_s, **extra)

    def metric(self, step: int, **values: Any) -> None:
        """Report numeric values at ``step``."""
        self.emit("metric", step=int(step), **values)

    def log(self, message: str, level: str = "info") -> None:
        """Report a line for the log view."""
        self.emit("log", level=level, message=message)

    def warning(self, message: str) -> None:
        """Report a warning the user should see."""
        self.emit("warning", message=message)

    def artifact(self, path: str | Path, type: str, **meta: Any) -> None:  # noqa: A002 - schema field name
        """Report a file the job produced."""
        self.emit("artifact", path=str(path), type=type, **meta)

    def status(self, status: str, message: str = "", **extra: Any) -> None:
        """Report a change of the run's state (``queued`` while waiting for a GPU, ``running``)."""
        self.emit("status", status=status, message=message, **extra)

    def close(self) -> None:
        """Close the files this sink opened."""
        with self._lock:
            for fh in self._owned:
                fh.close()
            self._owned.clear()
            self._streams.clear()


NULL_SINK = EventSink()
