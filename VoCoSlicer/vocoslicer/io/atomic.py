"""Atomic file writes (defined in :mod:`vocoslicer.contracts.atomic`, which the Slicer side shares)."""

from vocoslicer.contracts.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    make_temp_dir,
    make_temp_file,
)

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "make_temp_dir",
           "make_temp_file"]
