"""Find and signal the processes of one job's tree, without blocking and without hitting an unrelated process.

Why this exists: ``PythonSlicer`` is a launcher (CTKAppLauncher) that starts ``python-real`` as its child and
forwards no signal, DataLoader workers are the engine's children, and ``torchrun`` starts its workers in sessions
of their own. ``os.killpg`` on the launcher's group therefore misses some of them, and ``os.kill`` on the
launcher misses the engine. On Linux the whole tree is read from ``/proc`` (parent, group, session and start time
of every process); a pid is signalled only while its start time is the one we saw, so a reused pid is never hit.
Elsewhere on POSIX only the process group is reachable (``killpg``). Stdlib only: it runs in Slicer's GUI process.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path

PROC = Path("/proc")


def _stat(pid: int) -> tuple[int, int, int, int, str] | None:
    # (ppid, pgrp, session, starttime, state) from /proc/<pid>/stat; None when gone or unreadable
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    try:
        return int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]), fields[0]
    except (IndexError, ValueError):
        return None


def has_proc() -> bool:
    """True where ``/proc`` describes processes (Linux)."""
    return (PROC / str(os.getpid()) / "stat").is_file()


def _table() -> dict[int, tuple[int, int, int, int, str]]:
    out = {}
    try:
        names = os.listdir(PROC)
    except OSError:
        return out
    for name in names:
        if name.isdigit():
            info = _stat(int(name))
            if info is not None and info[4] not in "ZX":  # zombies are gone already; their parent reaps them
                out[int(name)] = info
    return out


def start_time(pid: int) -> int | None:
    """Kernel start time of a running ``pid`` (Linux), else None."""
    info = _stat(pid)
    return None if info is None or info[4] in "ZX" else info[3]


def reused(pid: int | None, start: int | None) -> bool:
    """True when ``pid`` now names another process than the one that started at ``start`` (Linux; False when
    unknown). A group or session id cannot be reused while a member lives, so a leader that is gone is fine."""
    if not pid or start is None:
        return False
    info = _stat(pid)
    return info is not None and info[3] != start


def collect(roots: Mapping[int, int | None] | Iterable[int], session: int | None = None,
            session_start: int | None = None) -> dict[int, int]:
    """``{pid: start time}`` of the ``roots``, all their descendants, and every process of ``session``.

    ``roots`` may carry start times (``{pid: start}``): a root whose pid was reused is skipped, and so is a
    ``session`` whose leader pid was reused (``session_start``). Empty where ``/proc`` is not available (the
    caller falls back to the process group).
    """
    table = _table()
    if not table:
        return {}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _pg, _sid, _st, _state) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, int] = {}
    starts = dict(roots) if isinstance(roots, Mapping) else dict.fromkeys(roots)
    todo = [p for p, st in starts.items() if p and p in table and (st is None or table[p][3] == st)]
    if session and session != os.getsid(0) and not reused(session, session_start):
        todo += [p for p, info in table.items() if info[2] == session]
    while todo:
        pid = todo.pop()
        if pid in found or pid == os.getpid():
            continue
        found[pid] = table[pid][3]
        todo += children.get(pid, [])
    return found


def alive(snapshot: Mapping[int, int]) -> dict[int, int]:
    """The part of a :func:`collect` snapshot that still runs as the same processes."""
    return {pid: st for pid, st in snapshot.items() if start_time(pid) == st}


def signal_snapshot(snapshot: Mapping[int, int], sig: int) -> int:
    """Send ``sig`` to every process of the snapshot that is still the same process; returns how many."""
    sent = 0
    for pid, st in snapshot.items():
        if start_time(pid) != st:
            continue
        try:
            os.kill(pid, sig)
            sent += 1
        except (ProcessLookupError, PermissionError):
            pass
    return sent


def signal_group(pgid: int | None, sig: int, leader_start: int | None = None) -> bool:
    """``killpg`` a group we created (never our own, never one whose leader pid was reused); False when it has
    no member left."""
    if not pgid or pgid <= 1 or pgid == os.getpgrp() or reused(pgid, leader_start):
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def kill_tree(roots: Mapping[int, int | None] | Iterable[int], pgid: int | None,
              snapshot: Mapping[int, int] | None = None, sig: int = signal.SIGKILL,
              leader_start: int | None = None) -> dict[int, int]:
    """Signal the whole tree: the group ``pgid`` (also its session), the roots' descendants now, and what an
    earlier ``snapshot`` saw (orphans lose their ancestry once their parent is gone). Returns what was hit."""
    own = {os.getpgrp(), os.getsid(0)}
    targets = collect(roots, session=None if pgid in own else pgid, session_start=leader_start)
    for pid, st in (snapshot or {}).items():
        targets.setdefault(pid, st)
    signal_group(pgid, sig, leader_start)
    signal_snapshot(targets, sig)
    return targets
