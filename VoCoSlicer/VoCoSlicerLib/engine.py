"""Which Python runs the engine: ``PythonSlicer`` inside Slicer, so the child sees the PyTorch extension's torch.

The job client (:mod:`VoCoSlicerLib.jobs`) puts the engine folder on the child's ``PYTHONPATH`` and adds the job
options; this module only chooses the interpreter and renders a command line users can copy into a terminal.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path


def python_executable(override: str | None = None) -> str:
    """``override`` (a user-chosen Python) if given, else ``PythonSlicer`` inside Slicer, else this interpreter."""
    if override and str(override) not in ("", "."):
        return str(override)
    exe = Path(sys.executable)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        if exe.name == name:
            return str(exe)
        sibling = exe.with_name(name)
        if sibling.is_file():
            return str(sibling)
    return shutil.which("PythonSlicer") or sys.executable


def shell_command(args: Sequence[str], python: str | None = None) -> str:
    """``PythonSlicer -m vocoslicer ARGS`` quoted for a POSIX shell (shown in logs and "copy command")."""
    return shlex.join([python or python_executable(), "-m", "vocoslicer", *map(str, args)])
