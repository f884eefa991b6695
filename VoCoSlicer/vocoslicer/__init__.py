"""VoCoSlicer engine: VoCo / PUMIT pre-training, finetuning and inference for 3D medical images.

The engine never imports ``slicer``, ``qt`` or ``vtk``: it runs the same inside Slicer's child process,
from a terminal, or under ``torchrun`` on a cluster.
"""

__version__ = "0.1.0"
