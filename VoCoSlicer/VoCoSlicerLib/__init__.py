"""Slicer glue of VoCoSlicer: MRML <-> files, job state, parameters <-> command lines, views of engine output.

Qt-free and torch-free on purpose: it imports only ``slicer`` MRML classes, ``vtk``, numpy and the standard
library, so the same code runs inside the Slicer app and in pytest on a plain ``slicer-core`` scene. The thin
module files (VoCoSlicer.py, VoCoSegment.py, VoCoPretrain.py) own every widget and timer.
"""

# leaves first, so a reloaded module never keeps references into a stale one (``onReload`` in the widgets)
_RELOAD_ORDER = ("compat", "labels_csv", "state", "params", "engine", "module_support", "job_runs", "proctree", "jobs",
                 "worker_client", "job_sources", "plots", "deps", "models_view", "panels", "mrml_io", "cohort_view",
                 "segment_flow", "job_driver", "segment_panel")


def reload_package() -> "list[str]":  # quoted: this file is imported before the version check
    """Reload every loaded ``VoCoSlicerLib`` submodule (Slicer's "Reload" only reloads the module file)."""
    import importlib
    import sys

    loaded = [n for n in sys.modules if n.startswith(__name__ + ".")]
    order = [f"{__name__}.{m}" for m in _RELOAD_ORDER if f"{__name__}.{m}" in loaded]
    order += sorted(set(loaded) - set(order))
    for name in order:
        importlib.reload(sys.modules[name])
    return order
