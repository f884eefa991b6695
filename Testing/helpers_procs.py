"""Process helpers shared by the job and worker tests: whether a process really ended (a zombie counts as gone,
since only its parent can reap it, and the tests check that nothing keeps running)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def pid_gone(pid: int, timeout: float = 5.0) -> bool:
    """True once ``pid`` no longer runs (absent, zombie or dead) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat[stat.rfind(")") + 2] in "ZX":
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False
