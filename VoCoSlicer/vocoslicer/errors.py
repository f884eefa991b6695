"""Error types and exit codes of every command (defined in :mod:`vocoslicer.contracts.errors`).

The exit codes are read by the Slicer job client too, so they live with the other cross-process contracts; this
module keeps the engine's historical import path.
"""

from vocoslicer.contracts.errors import EXIT_CANCELLED, EXIT_CRASH, EXIT_OK, EXIT_USER, Cancelled, UserError, VoCoError

__all__ = ["EXIT_CANCELLED", "EXIT_CRASH", "EXIT_OK", "EXIT_USER", "Cancelled", "UserError", "VoCoError"]
