"""Slicer glue of VoCoSlicer: MRML <-> files, job state, parameters <-> command lines, views of engine output.

Qt-free and torch-free on purpose: it imports only ``slicer`` MRML classes, ``vtk``, numpy and the standard
library, so the same code runs inside the Slicer app and in pytest on a plain ``slicer-core`` scene. The thin
module files (VoCoSlicer.py, VoCoSegment.py, VoCoPretrain.py) own every widget and timer.
"""
