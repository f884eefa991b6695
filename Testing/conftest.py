"""Shared pytest fixtures.

``slicer_core``: one real MRML scene from the slicer-core wheel for the whole session, initialised the way
shared/notes/slicer_core.md §2.1 verified (application logic, colour, volumes and segmentations logics; the logics
are kept referenced because the application logic holds raw pointers). Tests add their own nodes to it.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def slicer_core():
    """A namespace with ``scene``, ``app_logic``, ``colors``, ``volumes``, ``segmentations``."""
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Colors", colors)
    vols = slicer.vtkSlicerVolumesLogic()
    vols.SetMRMLScene(scene)
    vols.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic("Volumes", vols)
    segs = slicer.vtkSlicerSegmentationsModuleLogic()
    segs.SetMRMLScene(scene)  # registers the segmentation converter rules
    segs.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic("Segmentations", segs)

    def mod(logic):
        return types.SimpleNamespace(logic=lambda: logic)

    slicer.modules = types.SimpleNamespace(volumes=mod(vols), segmentations=mod(segs))
    return types.SimpleNamespace(scene=scene, app_logic=app_logic, colors=colors, volumes=vols, segmentations=segs)


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh VOCOSLICER_HOME per test (models, cohorts and locks never touch the real one); a test file may
    define its own ``home`` (e.g. one with a download server), which then wins."""
    h = tmp_path / "home"
    monkeypatch.setenv("VOCOSLICER_HOME", str(h))
    return h
