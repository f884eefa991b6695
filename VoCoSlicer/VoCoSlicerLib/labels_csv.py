"""The engine's labels CSV on the Slicer side (the format is :mod:`vocoslicer.contracts.labels`, standard library
only, so the Slicer process reads and writes the table next to a segmentation without importing the engine).

``LabelInfo`` is the contract's ``Label`` under the name the Slicer code has always used.
"""

from vocoslicer.contracts.labels import (
           CSV_COLUMNS,
           LabelsCsvError,
           labels_csv_path,
           parse_labels_csv,
           read_labels_csv,
           write_labels_csv,
)
from vocoslicer.contracts.labels import Label as LabelInfo

__all__ = ["CSV_COLUMNS", "LabelInfo", "LabelsCsvError", "labels_csv_path", "parse_labels_csv", "read_labels_csv",
           "write_labels_csv"]
