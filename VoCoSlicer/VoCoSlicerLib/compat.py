"""Version gate of the extension: a readable message instead of an import error on a too-old Slicer.

Everything else in VoCoSlicerLib and the engine uses Python 3.11+ syntax and library (``datetime.UTC``,
``zip(strict=...)``, ``X | Y`` annotations), so on Slicer 5.8 (Python 3.9) the module files fail while being
imported and the user sees only a traceback in the Python console. The module files import this file first and
show :func:`unsupported_message` instead of loading the rest. For that to work this file must itself import on
any Python 3 that Slicer ever shipped (3.6 and later): no self-documenting f-strings, no walrus, annotations only
as strings (never evaluated, so ``X | Y`` in them is harmless), no ``from __future__ import annotations``,
standard library only (``Testing/test_deps_compat.py`` checks it).
"""

MIN_SLICER = (5, 12)
MIN_PYTHON = (3, 12)  # the Python that Slicer 5.12 ships; the engine alone also runs on 3.11
DOWNLOAD_URL = "https://download.slicer.org"


def _dotted(version: "tuple") -> "str":
    return ".".join(str(int(part)) for part in tuple(version))


def running_slicer_version(app: "object") -> "tuple | None":
    """(major, minor) of a running Slicer application (``slicer.app``: qSlicerCoreApplication's ``majorVersion``
    and ``minorVersion`` properties), or None when it has none (e.g. a bare ``slicer-core`` Python)."""
    major = getattr(app, "majorVersion", None)
    minor = getattr(app, "minorVersion", None)
    if major is None or minor is None:
        return None
    try:
        return (int(major), int(minor))
    except (TypeError, ValueError):
        return None


def unsupported_message(version_info: "tuple", slicer_version: "tuple | None" = None) -> "str | None":
    """The message to show instead of the VoCoSlicer modules when this Slicer or its Python is too old, else None.

    ``version_info`` is ``sys.version_info`` (or any tuple starting with major, minor); ``slicer_version`` is
    (major, minor) of the running Slicer, or None when unknown (then only Python is checked).
    """
    python = tuple(int(part) for part in tuple(version_info)[:3])
    slicer = tuple(int(part) for part in tuple(slicer_version)[:2]) if slicer_version is not None else None
    if python[:2] >= MIN_PYTHON and (slicer is None or slicer >= MIN_SLICER):
        return None
    found = "Python " + _dotted(python)
    if slicer is not None:
        found = "3D Slicer " + _dotted(slicer) + " with " + found
    need = _dotted(MIN_SLICER)
    return (f"VoCoSlicer needs 3D Slicer {need} or later (Python {_dotted(MIN_PYTHON)}); this is {found}. "
            f"Install 3D Slicer {need} or later from {DOWNLOAD_URL} and install the VoCoSlicer extension there.")
