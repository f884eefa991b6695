"""Error types and exit codes shared by every command.

A :class:`UserError` is a problem with the user's input (missing file, bad volume, wrong option): the CLI prints
its message as one line and exits with :data:`EXIT_USER`, never with a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CRASH = 1  # a bug or an unexpected environment failure: one line on stderr, traceback in the run log
EXIT_USER = 2  # bad input or options
EXIT_CANCELLED = 3  # stopped on request (SIGTERM/SIGINT/cancel); a checkpoint was written where applicable


class VoCoError(Exception):
    """Base class of all errors the engine raises on purpose."""

    exit_code = EXIT_CRASH


class UserError(VoCoError):
    """Bad input: reported as one line, exit code 2, nothing written."""

    exit_code = EXIT_USER


class Cancelled(VoCoError):
    """The job was asked to stop; whatever could be saved has been saved."""

    exit_code = EXIT_CANCELLED
