"""Job events: one JSON object per line, on a child's stdout and/or in ``events.jsonl`` of a run directory.

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
process was killed outright; clients treat a process that exits without ``done`` as ``dead``. Events the client
writes itself (a run whose child could not finish it) carry ``"source": "client"``.

The engine writes events (``vocoslicer.jobs.events.EventSink``), the Slicer client reads them and appends the
ending of a child that died; both encode and decode lines with the functions here.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

EVENT_KINDS = ("progress", "metric", "log", "warning", "artifact", "error", "status", "done")


def json_safe(value: Any) -> Any:
    """``value`` as something :func:`json.dumps` writes as strict JSON: NaN/inf become null, paths strings,
    numpy/torch scalars plain numbers (through ``.item()``), anything else its ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item"):
        try:
            return json_safe(value.item())
        except (ValueError, RuntimeError):
            pass
    return str(value)


def make_event(kind: str, **fields: Any) -> dict[str, Any]:
    """A new event of a known ``kind``, stamped now, its fields made JSON-safe."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    return {"t": round(time.time(), 3), "kind": kind, **json_safe(fields)}


def client_event(kind: str, **fields: Any) -> dict[str, Any]:
    """An event made by the client on behalf of its child (``"source": "client"``)."""
    return {"t": round(time.time(), 3), "kind": kind, "source": "client", **fields}


def event_line(event: dict[str, Any]) -> str:
    """One event as its compact JSON line (without the newline)."""
    return json.dumps(event, separators=(",", ":"))


def parse_event_line(line: str, text_is_log: bool = False) -> dict[str, Any] | None:
    """One event from one line; a malformed line becomes a ``warning`` event (``None`` for a blank line).

    ``text_is_log``: on a stdout channel, plain text that does not even look like JSON (a library printing)
    becomes a ``log`` event instead of a warning.
    """
    line = line.strip()
    if not line:
        return None
    if text_is_log and not line.startswith("{"):
        return client_event("log", level="stdout", message=line)
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict) or not isinstance(event.get("kind"), str):
        return client_event("warning", message=f"skipped a malformed event line: {line[:200]}")
    return event

