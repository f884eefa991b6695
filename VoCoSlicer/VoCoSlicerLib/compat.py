"""Which Slicer this extension runs in, checked before anything newer than Python 3.6 syntax is imported.

VoCoSlicerLib uses Python 3.11+ features (``datetime.UTC``, ``zip(strict=...)``) and the modules use
``slicer.parameterNodeWrapper``; on an older Slicer (5.8 ships Python 3.9) the first import would fail with a
confusing error. Each module file calls :func:`unsupported_message` first and shows its text instead. This file
itself must stay importable by Python 3.6, so it uses no annotations, f-strings with ``=`` or newer syntax.
"""

MIN_PYTHON = (3, 12)
MIN_SLICER = "5.12"


def unsupported_message(version_info):
    """A one-paragraph message when this Python is too old for VoCoSlicer, else None.

    ``version_info`` is ``sys.version_info`` (or any sequence that starts with major, minor).
    """
    found = tuple(version_info[:2])
    if found >= MIN_PYTHON:
        return None
    return ("VoCoSlicer needs 3D Slicer {slicer} or later (Python {need}); this Slicer runs Python {have}. "
            "Install a current Slicer from https://download.slicer.org and the extension again.").format(
                slicer=MIN_SLICER, need=".".join(str(v) for v in MIN_PYTHON),
                have=".".join(str(v) for v in found))
