"""Model ids and versions as both sides name and order them.

``--model`` everywhere accepts a bundle path, ``ID`` (the newest installed version) or ``ID@VERSION``; with no
``--model`` the engine uses its bundled demo model, which the Slicer side must name the same way. "Newest" must
mean the same on both sides too: the engine resolves ``ID`` to a bundle, the model selector pre-selects a row.
"""

from __future__ import annotations

import re

DEMO_MODEL_ID = "vocoslicer-demo-phantom"  # the demo bundle shipped in vocoslicer/resources/demo_model


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a version text: dot/dash/plus separated parts, numbers compared as numbers (``1.10`` after
    ``1.9``); a word part sorts after any number part, so mixed versions never fail to compare."""
    parts = re.split(r"[.+-]", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)

