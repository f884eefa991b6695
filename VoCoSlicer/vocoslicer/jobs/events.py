"""Job events: one JSON object per line, on stdout and/or in ``events.jsonl`` of a run directory.

This is the only channel between a child process and the Slicer GUI (or any other client), so the schema is
small and stable. Every event has ``t`` (unix time, float) and ``kind``:

- ``progress``: ``step``, ``total``, optional ``stage`` (text), ``eta_s``
- ``metric``: ``step`` and any numeric fields (``loss``, ``dice``, ``lr``, ...), optional ``split`` (train/val)
- ``log``: ``level`` (info/warning), ``message``
- ``warning``: ``message``
- ``artifact``: ``path``, ``type`` (segmentation, model, checkpoint, table, ...), optional metadata
- ``error``: ``message`` (one line, user-facing), optional ``code`` (exit code)
- ``status``: ``status`` (queued/running), optional ``message``, ``pid``, ``waiting_for`` (who holds the GPU)
- ``done``: ``status`` (ok/cancelled/failed), optional ``exit_code``

A run ends with at most one ``error`` (on failure or cancel) followed by exactly one ``done``, unless the
process was killed outright; clients treat a process that exits without ``done`` as ``dead``.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

EVENT_KINDS = ("progress", "metric", "log", "warning", "artifact", "error", "status", "done")


def _clean(value: Any) -> Any:
    # events must always be valid JSON: NaN/inf become null, paths become strings, numpy/torch scalars floats
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item"):
        try:
            return _clean(value.item())
        except (ValueError, RuntimeError):
            pass
    return str(value)


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
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = {"t": round(time.time(), 3), "kind": kind, **_clean(fields)}
        line = json.dumps(event, separators=(",", ":"))
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
