"""Volume and file I/O that keeps geometry (spacing, origin, direction) exact and never leaves half-written files."""

from vocoslicer.io.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from vocoslicer.io.volume import (
    VOLUME_EXTENSIONS,
    check_output_path,
    geometry,
    list_dicom_series,
    read_image,
    same_grid,
    write_image,
)

__all__ = [
    "VOLUME_EXTENSIONS",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_path",
    "geometry",
    "list_dicom_series",
    "read_image",
    "same_grid",
    "write_image",
]
