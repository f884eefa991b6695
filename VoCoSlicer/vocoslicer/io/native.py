"""Keep what native libraries print (ITK, GDCM, niftilib, MetaIO) off the user's terminal and in the run log.

ITK warnings, GDCM traces, niftilib's ``fprintf(stderr)`` and MetaIO's ``std::cerr`` lines all go straight to file
descriptor 2, around the one-line error the CLI promises. :func:`native_output_to_log` points fd 2 at a temporary
file while a native call runs and then hands every line to the ``vocoslicer.lib`` logger, which writes into the
job's ``log.txt`` (and on the terminal only with ``--verbose``). The captured text is also returned, because it is
sometimes the only place that says *why* a read failed ("data not read completely").
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

LIB_LOGGER = "vocoslicer.lib"
log = logging.getLogger(LIB_LOGGER)
log.propagate = False  # the job log and --verbose attach handlers (vocoslicer.jobs.runner, cli); never the terminal
log.addHandler(logging.NullHandler())
_lock = threading.Lock()


class Captured:
    """The text native code wrote to stderr inside the ``with`` block (filled in on exit)."""

    def __init__(self) -> None:
        self.text = ""

    def lines(self) -> list[str]:
        """Non-empty, stripped lines."""
        return [ln.strip() for ln in self.text.splitlines() if ln.strip()]


@contextlib.contextmanager
def native_output_to_log(what: str = "") -> Iterator[Captured]:
    """Redirect fd 2 to a temporary file for the block, then log each captured line as a warning."""
    cap = Captured()
    with _lock, tempfile.TemporaryFile(mode="w+b") as tmp:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 at all (a GUI process): nothing can reach a terminal anyway
            yield cap
            return
        os.dup2(tmp.fileno(), 2)
        try:
            yield cap
        finally:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            cap.text = tmp.read().decode("utf-8", "replace")
            for line in cap.lines():
                log.warning("%s%s", f"{what}: " if what else "", line)


_itk_logger = None  # kept referenced: ITK holds only a raw pointer to the global logger


def install_itk_logger() -> None:
    """Route ITK's output window (warnings of any filter, not only readers) to the ``vocoslicer.lib`` logger.

    Called by the CLI, never on import: a host application (Slicer) keeps its own ITK output handling.
    """
    global _itk_logger
    if _itk_logger is not None:
        return
    import SimpleITK as sitk

    class _ITKToLogging(sitk.LoggerBase):
        """One log record per ITK message (its multi-line text joined)."""

        def _emit(self, level: int, text: str) -> None:
            lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
            if lines:
                log.log(level, "ITK: %s", " | ".join(lines))

        def DisplayText(self, t: str) -> None:  # noqa: N802 - ITK's method names
            self._emit(logging.INFO, t)

        def DisplayErrorText(self, t: str) -> None:  # noqa: N802
            self._emit(logging.ERROR, t)

        def DisplayWarningText(self, t: str) -> None:  # noqa: N802
            self._emit(logging.WARNING, t)

        def DisplayGenericOutputText(self, t: str) -> None:  # noqa: N802
            self._emit(logging.INFO, t)

        def DisplayDebugText(self, t: str) -> None:  # noqa: N802
            self._emit(logging.DEBUG, t)

    _itk_logger = _ITKToLogging()
    _itk_logger.SetAsGlobalITKLogger()
