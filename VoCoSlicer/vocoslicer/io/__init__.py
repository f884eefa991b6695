"""Volume and file I/O that keeps geometry (spacing, origin, direction) exact and never leaves half-written files.

The names load on first use (module ``__getattr__``): ``vocoslicer.io.atomic`` is standard library only, and a
process that only writes JSON (or the contracts' users) must not pay for, or depend on, SimpleITK, which
``vocoslicer.io.volume`` imports. ``from vocoslicer.io import read_image`` works as before.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULE = {
    "atomic_path": "atomic",
    "atomic_write_bytes": "atomic",
    "atomic_write_json": "atomic",
    "atomic_write_text": "atomic",
    "VOLUME_EXTENSIONS": "volume",
    "check_output_path": "volume",
    "geometry": "volume",
    "list_dicom_series": "volume",
    "read_image": "volume",
    "same_grid": "volume",
    "write_image": "volume",
}

__all__ = sorted(_SUBMODULE)


def __getattr__(name: str) -> Any:
    try:
        module = _SUBMODULE[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULE})
