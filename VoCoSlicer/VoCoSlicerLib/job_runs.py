"""Run directories and event lines seen from the Slicer side.

The format is :mod:`vocoslicer.contracts.rundir` and :mod:`vocoslicer.contracts.events` (standard library only:
the GUI process must not import the engine's torch to draw a list); this module re-exports it under the names the
job client has always used, and adds the client's reader thread.
"""

from __future__ import annotations

import queue
from typing import Any

from vocoslicer.contracts.atomic import atomic_write_json as write_json_atomic
from vocoslicer.contracts.events import client_event as _client_event
from vocoslicer.contracts.events import parse_event_line
from vocoslicer.contracts.rundir import ACTIVE_STATUSES as ACTIVE
from vocoslicer.contracts.rundir import FINAL_STATUSES as FINAL
from vocoslicer.contracts.rundir import (
    append_events,
    finalize_run_json,
    last_error,
    list_runs,
    new_run_dir,
    pid_alive,
    read_run,
    tail_lines,
)

__all__ = ["ACTIVE", "FINAL", "_client_event", "append_events", "finalize_run_json", "last_error", "list_runs",
           "new_run_dir", "parse_event_line", "pid_alive", "read_run", "tail_lines", "write_json_atomic"]


def _read_lines(stream: Any, tag: str, out: queue.Queue) -> None:
    # reader thread: binary lines, decoded leniently (a non-UTF-8 console must not kill the reader)
    try:
        for raw in iter(stream.readline, b""):
            out.put((tag, raw.decode("utf-8", errors="replace")))
    except (OSError, ValueError):
        pass
    finally:
        out.put((tag, None))
