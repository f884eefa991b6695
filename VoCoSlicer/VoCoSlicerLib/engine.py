"""Which Python runs the engine, and with which environment.

``PythonSlicer`` inside Slicer, so the child sees the PyTorch extension's torch; or a Python the user chose
("Python for jobs": a conda env or venv with CUDA). Slicer's own environment is wrong for the latter: the launcher
sets ``PYTHONHOME``, ``PYTHONNOUSERSITE``, ``PYTHONPATH`` and ``LD_LIBRARY_PATH`` for Slicer's Python, and a
foreign interpreter then dies at start-up or mixes in Slicer's stdlib. Such an interpreter gets Slicer's *startup*
environment instead (what the shell gave Slicer, as ``slicer.util.startupEnvironment()`` returns it), which the
module registers once with :func:`set_startup_environment`; this file stays free of Qt and of ``slicer.app``.
Both kinds get the engine folder first on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ENGINE_DIR = Path(__file__).resolve().parents[1]  # the folder holding the ``vocoslicer`` package

StartupEnv = Mapping[str, str] | Callable[[], Mapping[str, str]]
_startup_env: StartupEnv | None = None


class JobError(RuntimeError):
    """A job could not be started or attached; the message is meant for the user as is."""


def set_startup_environment(env: StartupEnv | None) -> None:
    """Register the environment Slicer was started with, for interpreters that are not Slicer's own.

    Pass ``slicer.util.startupEnvironment`` (the callable: read at each start) or a mapping; ``None`` forgets it
    (then every child gets this process's environment, which is right outside Slicer).
    """
    global _startup_env
    _startup_env = env


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


def is_own_python(python: str | os.PathLike[str]) -> bool:
    """True for this application's own interpreter: ``sys.executable`` or a program next to it.

    Inside Slicer ``sys.executable`` is ``bin/PythonSlicer`` (the launcher) and ``python-real`` lies in the same
    folder; both need Slicer's environment. A venv or conda Python lives elsewhere.
    """
    # compare folders, not resolved files: a venv's ``bin/python`` is a symlink to its base interpreter
    mine, other = Path(os.path.abspath(sys.executable)), Path(os.path.abspath(python))
    if other == mine:
        return True
    try:
        return other.parent.resolve() == mine.parent.resolve()
    except (OSError, RuntimeError):
        return other.parent == mine.parent


def base_environment(python: str | os.PathLike[str], startup_env: StartupEnv | None = None) -> dict[str, str]:
    """The environment a child running ``python`` starts from (see the module docstring)."""
    source = startup_env if startup_env is not None else _startup_env
    if source is None or is_own_python(python):
        return dict(os.environ)
    try:
        env = source() if callable(source) else source
        out = {str(k): str(v) for k, v in env.items() if k}
    except Exception as exc:  # noqa: BLE001 - a failing provider must say so, not crash the panel
        raise JobError(f"could not read Slicer's startup environment for {python}: {exc}") from exc
    # our own settings made in this session (not the launcher's) still apply, e.g. VOCOSLICER_HOME
    out.update({k: v for k, v in os.environ.items() if k.startswith("VOCOSLICER_")})
    return out


def child_env(env: Mapping[str, str] | None = None, python: str | os.PathLike[str] | None = None,
              startup_env: StartupEnv | None = None) -> dict[str, str]:
    """Environment of a child running ``python``: its base (:func:`base_environment`), plus ``env``, with the
    engine folder first on ``PYTHONPATH``."""
    out = base_environment(python or sys.executable, startup_env)
    out.update({k: str(v) for k, v in (env or {}).items()})
    parts = [str(ENGINE_DIR)] + [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ENGINE_DIR)]
    out["PYTHONPATH"] = os.pathsep.join(parts)
    out["PYTHONUNBUFFERED"] = "1"
    out["PYTHONIOENCODING"] = "utf-8"
    return out


def resolve_python(python: str | os.PathLike[str] | None) -> str:
    """The interpreter to run, checked now so that a wrong path fails with a clear message."""
    if python is None:
        return sys.executable
    text = str(python)
    if os.path.dirname(text):
        if os.path.isfile(text) and os.access(text, os.X_OK):
            return text
    else:
        found = shutil.which(text)
        if found:
            return found
    raise JobError(f"Python interpreter not found or not executable: {text} (set the path to PythonSlicer, "
                   "or to a Python that has the VoCoSlicer engine requirements, and try again)")


def shell_command(args: Sequence[str], python: str | None = None) -> str:
    """``PythonSlicer -m vocoslicer ARGS`` quoted for a POSIX shell (shown in logs and "copy command")."""
    return shlex.join([python or python_executable(), "-m", "vocoslicer", *map(str, args)])
